//! `ticker subscribe`: prints the ticks of a live TickerStream, one line each (or JSON
//! lines), control events on stderr, and takes `+SYM` / `-SYM` lines on stdin.

use std::collections::HashMap;

use clap::Args;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::mpsc,
};

use super::{
    connect::{CliError, ConnectOpts},
    live::{self, Command, Event},
};
use crate::{clock, pb::TickerResponse};

#[derive(Args, Debug, Clone)]
pub struct SubscribeArgs {
    /// Symbols to subscribe to.
    #[arg(required = true)]
    pub symbols: Vec<String>,
    /// One JSON object per tick on stdout (for jq); events stay readable on stderr.
    #[arg(long)]
    pub json: bool,
    /// Give up after this many consecutive failed reconnect attempts (default: never).
    #[arg(long)]
    pub max_retries: Option<u32>,
}

/// A tick as `--json` prints it.
#[derive(Serialize)]
struct TickLine<'a> {
    symbol: &'a str,
    ltp: f64,
    change: f64,
    seq: u64,
    timestamp: &'a str,
    event_time_unix_nanos: i64,
    latency_us: i64,
}

pub async fn run(opts: ConnectOpts, args: SubscribeArgs) -> Result<(), CliError> {
    let (commands, mut events, stream) =
        live::spawn(opts, args.symbols.clone(), args.max_retries, 4096);
    tokio::spawn(read_commands(commands));
    let mut first_price: HashMap<String, f64> = HashMap::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Tick(tick) => {
                let base = *first_price.entry(tick.symbol.clone()).or_insert(tick.ltp);
                print_tick(&tick, tick.ltp - base, args.json);
            }
            Event::Snapshot(snapshot) => {
                first_price
                    .entry(snapshot.symbol.clone())
                    .or_insert(snapshot.ltp);
                eprintln!("{}", describe(&Event::Snapshot(snapshot)));
            }
            other => eprintln!("{}", describe(&other)),
        }
    }
    match stream.await {
        Ok(result) => result,
        Err(e) => Err(CliError::new(1, format!("internal error: {e}"))),
    }
}

fn print_tick(tick: &TickerResponse, change: f64, json: bool) {
    let latency_us = (clock::now_unix_nanos() - tick.event_time_unix_nanos) / 1000;
    if json {
        let line = TickLine {
            symbol: &tick.symbol,
            ltp: tick.ltp,
            change,
            seq: tick.seq,
            timestamp: &tick.timestamp,
            event_time_unix_nanos: tick.event_time_unix_nanos,
            latency_us,
        };
        if let Ok(text) = serde_json::to_string(&line) {
            println!("{text}");
        }
    } else {
        let time = tick.timestamp.get(11..23).unwrap_or(&tick.timestamp);
        println!(
            "{time}  {:<10} {:>12.4}  {:>+10.4}  seq {:<8} latency {:.3} ms",
            tick.symbol,
            tick.ltp,
            change,
            tick.seq,
            latency_us as f64 / 1000.0
        );
    }
}

/// A control event as a sentence for stderr.
pub fn describe(event: &Event) -> String {
    match event {
        Event::Tick(t) => format!("tick {} {:.4}", t.symbol, t.ltp),
        Event::Snapshot(t) => format!("snapshot {}: last {:.4} (seq {}, {})", t.symbol, t.ltp, t.seq, t.timestamp),
        Event::Subscribed(s) => format!("subscribed {s}"),
        Event::Unsubscribed(s) => format!("unsubscribed {s}"),
        Event::Rejected { symbol, detail } => format!("rejected {symbol:?}: {detail}"),
        Event::Warning { detail, .. } => format!("warning: {detail}"),
        Event::Lagged { symbol, dropped } => {
            format!("lagged on {symbol}: the server dropped {dropped} ticks this client could not keep up with")
        }
        Event::Missed { symbol, last_seen, snapshot_seq, missed } => format!(
            "gap on {symbol}: missed {missed} ticks during the outage (last seen seq {last_seen}, now seq {snapshot_seq})"
        ),
        Event::SequenceRestarted { symbol, last_seen, snapshot_seq } => format!(
            "gap on {symbol}: the server restarted its sequence (last seen seq {last_seen}, now seq {snapshot_seq}); ticks in between are unknown"
        ),
        Event::Disconnected { reason, retry_in, attempt } => {
            format!("disconnected: {reason}; reconnecting in {:.1} s (attempt {attempt})", retry_in.as_secs_f64())
        }
        Event::Reconnected { symbols } => format!("reconnected; resubscribing to {symbols} symbols"),
        Event::Recovered { symbol, last_seen, seq } => format!(
            "resumed {symbol}: the server replays the {} ticks published during the outage (seq {} to {seq})",
            seq - last_seen,
            last_seen + 1
        ),
    }
}

/// `+SYM` subscribes, `-SYM` unsubscribes; anything else gets a hint.
pub fn parse_command(line: &str) -> Option<Result<Command, String>> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    Some(match (line.get(..1), line.get(1..)) {
        (Some("+"), Some(sym)) if !sym.trim().is_empty() => {
            Ok(Command::Add(sym.trim().to_string()))
        }
        (Some("-"), Some(sym)) if !sym.trim().is_empty() => {
            Ok(Command::Remove(sym.trim().to_string()))
        }
        _ => Err(format!(
            "ignored {line:?}: type +SYMBOL to subscribe or -SYMBOL to unsubscribe"
        )),
    })
}

async fn read_commands(commands: mpsc::Sender<Command>) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let command = match parse_command(&line) {
            Some(Ok(command)) => command,
            Some(Err(hint)) => {
                eprintln!("{hint}");
                continue;
            }
            None => continue,
        };
        if commands.send(command).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_commands() {
        assert_eq!(
            parse_command("+AAPL"),
            Some(Ok(Command::Add("AAPL".into())))
        );
        assert_eq!(
            parse_command(" -MSFT \n"),
            Some(Ok(Command::Remove("MSFT".into())))
        );
        assert_eq!(parse_command(""), None);
        assert!(parse_command("AAPL").unwrap().is_err());
        assert!(parse_command("+").unwrap().is_err());
    }

    #[test]
    fn snapshots_print_prices_as_ticks_do() {
        let snapshot = TickerResponse {
            symbol: "SYM01".into(),
            ltp: 378.794_859_008_937_75,
            seq: 7,
            timestamp: "2026-12-04T00:00:00.000000000Z".into(),
            ..Default::default()
        };
        assert_eq!(
            describe(&Event::Snapshot(snapshot)),
            "snapshot SYM01: last 378.7949 (seq 7, 2026-12-04T00:00:00.000000000Z)"
        );
    }
}
