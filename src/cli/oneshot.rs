//! The one-shot subcommands: `ticker quote` (GetQuotes), `ticker publish` (Publish from a
//! CSV) and `ticker health` (grpc.health.v1).

use std::{path::PathBuf, time::Duration};

use clap::Args;
use tokio::io::AsyncRead;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use super::connect::{exit, CliError, ConnectOpts};
use crate::{
    feed::csv::{Line, TickReader},
    pb::{GetQuotesRequest, PublishRequest},
};

#[derive(Args, Debug, Clone)]
pub struct QuoteArgs {
    /// Symbols to quote.
    #[arg(required = true)]
    pub symbols: Vec<String>,
    /// One JSON object per quote instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn quote(opts: ConnectOpts, args: QuoteArgs) -> Result<(), CliError> {
    let mut client = opts.connect().await?;
    let mut request = Request::new(GetQuotesRequest {
        symbols: args.symbols.clone(),
    });
    request.set_timeout(opts.timeout);
    let quotes = client
        .get_quotes(request)
        .await
        .map_err(|s| CliError::from_status("quote failed", &s))?
        .into_inner()
        .quotes;
    if args.json {
        for q in &quotes {
            let line = serde_json::json!({
                "symbol": q.symbol, "ltp": q.ltp, "seq": q.seq, "timestamp": q.timestamp,
                "event_time_unix_nanos": q.event_time_unix_nanos,
            });
            println!("{line}");
        }
    } else {
        println!("{:<12} {:>14} {:>10}  TIME", "SYMBOL", "LAST", "SEQ");
        for q in &quotes {
            println!(
                "{:<12} {:>14.4} {:>10}  {}",
                q.symbol, q.ltp, q.seq, q.timestamp
            );
        }
    }
    for missing in args
        .symbols
        .iter()
        .filter(|s| !quotes.iter().any(|q| &q.symbol == *s))
    {
        eprintln!("no quote for {missing:?}: unknown or never ticked");
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct PublishArgs {
    /// CSV of `symbol,price[,unix_nanos]` lines; `-` or nothing reads stdin.
    pub file: Option<PathBuf>,
    /// Ticks per second; 0 sends as fast as the server takes them.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
}

pub async fn publish(opts: ConnectOpts, args: PublishArgs) -> Result<(), CliError> {
    let mut client = opts.connect().await?;
    let (tx, rx) = mpsc_channel();
    let call = tokio::spawn(async move { client.publish(ReceiverStream::new(rx)).await });
    let (sent, malformed) = match args.file.as_ref().filter(|p| p.as_os_str() != "-") {
        Some(path) => {
            let file = tokio::fs::File::open(path).await.map_err(|e| {
                CliError::new(exit::USAGE, format!("cannot open {}: {e}", path.display()))
            })?;
            feed_lines(file, &tx, args.rate).await
        }
        None => feed_lines(tokio::io::stdin(), &tx, args.rate).await,
    };
    drop(tx);
    let reply = call
        .await
        .map_err(|e| CliError::new(1, format!("internal error: {e}")))?
        .map_err(|s| CliError::from_status("publish failed", &s))?
        .into_inner();
    println!(
        "sent {sent}: accepted {}, rejected {}; {malformed} malformed lines skipped",
        reply.accepted, reply.rejected
    );
    Ok(())
}

fn mpsc_channel() -> (
    tokio::sync::mpsc::Sender<PublishRequest>,
    tokio::sync::mpsc::Receiver<PublishRequest>,
) {
    tokio::sync::mpsc::channel(1024)
}

/// Sends each good line, paced at `rate` per second if positive; reports bad lines by
/// number on stderr. Returns (sent, malformed).
async fn feed_lines(
    input: impl AsyncRead + Unpin,
    tx: &tokio::sync::mpsc::Sender<PublishRequest>,
    rate: f64,
) -> (u64, u64) {
    let mut reader = TickReader::new(input);
    let pace = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let mut next = tokio::time::Instant::now();
    let (mut sent, mut malformed) = (0u64, 0u64);
    loop {
        let tick = match reader.next().await {
            Line::Tick(tick) => tick,
            Line::End => break,
            Line::Malformed { line, reason } => {
                malformed += 1;
                eprintln!("line {line}: {reason}; skipped");
                continue;
            }
            Line::Failed { line, error } => {
                eprintln!("line {line}: cannot read: {error}; stopping");
                break;
            }
        };
        if let Some(pace) = pace {
            tokio::time::sleep_until(next).await;
            next += pace;
        }
        let request = PublishRequest {
            symbol: tick.symbol,
            ltp: tick.price,
            event_time_unix_nanos: tick.unix_nanos.unwrap_or(0),
        };
        if tx.send(request).await.is_err() {
            break; // the call failed; its status is reported by the caller
        }
        sent += 1;
    }
    (sent, malformed)
}

#[derive(Args, Debug, Clone)]
pub struct HealthArgs {
    /// Service to check; empty checks the server as a whole.
    #[arg(long, default_value = "")]
    pub service: String,
}

pub async fn health(opts: ConnectOpts, args: HealthArgs) -> Result<(), CliError> {
    let channel = opts.channel().await?;
    let mut client = HealthClient::with_interceptor(channel, opts.bearer()?);
    let mut request = Request::new(HealthCheckRequest {
        service: args.service.clone(),
    });
    request.set_timeout(opts.timeout);
    let status = client
        .check(request)
        .await
        .map_err(|s| CliError::from_status("health check failed", &s))?
        .into_inner()
        .status();
    let name = status.as_str_name();
    println!("{name}");
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(CliError::new(
            exit::REJECTED,
            format!("{} is {name}", opts.target()),
        ))
    }
}
