//! A resilient TickerStream for `ticker subscribe` and `ticker watch`: it follows the
//! user's add/remove commands, reconnects with backoff when the server goes away,
//! resubscribes to everything it had, and reports what the outage cost per symbol
//! (from the seq it last saw to the snapshot it gets back), so a gap is never hidden.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

use rand::{rngs::SmallRng, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::{
    backoff::{Backoff, BUSY_FLOOR},
    connect::{exit, retryable, CliError, ConnectOpts},
};
use crate::{
    client::Kind,
    pb::{TickerRequest, TickerResponse},
};

/// What the user asks for while the stream runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add(String),
    Remove(String),
}

/// What happens on the stream, for a printer or a board to show.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Tick(TickerResponse),
    Snapshot(TickerResponse),
    Subscribed(String),
    Unsubscribed(String),
    Rejected {
        symbol: String,
        detail: String,
    },
    /// The server warns that this client is falling behind (KIND_BACKLOG), or that its
    /// market-data bus went away or came back (KIND_STALE, KIND_LIVE).
    Warning {
        symbol: String,
        detail: String,
    },
    /// The server dropped `dropped` ticks because this client fell behind.
    Lagged {
        symbol: String,
        dropped: u64,
    },
    /// Across a reconnect: ticks after `last_seen` up to before `snapshot_seq` were missed.
    Missed {
        symbol: String,
        last_seen: u64,
        snapshot_seq: u64,
        missed: u64,
    },
    /// Across a reconnect the symbol's seq went backwards: the server restarted its
    /// sequence, so how much was missed is unknown.
    SequenceRestarted {
        symbol: String,
        last_seen: u64,
        snapshot_seq: u64,
    },
    Disconnected {
        reason: String,
        retry_in: Duration,
        attempt: u32,
    },
    Reconnected {
        symbols: usize,
    },
    /// After a reconnect the server replays the ticks after `last_seen` up to `seq`
    /// from its history: nothing was lost.
    Recovered {
        symbol: String,
        last_seen: u64,
        seq: u64,
    },
}

enum End {
    Retry { reason: String, busy: bool },
    Fatal(CliError),
}

/// The stream's state that survives reconnects.
struct Live {
    opts: ConnectOpts,
    wanted: BTreeSet<String>,
    last_seq: HashMap<String, u64>,
    /// The epoch of each symbol's `last_seq`, for resuming and for noticing a restart.
    epochs: HashMap<String, u64>,
    events: mpsc::Sender<Event>,
    commands: mpsc::Receiver<Command>,
    commands_open: bool,
}

/// What a tick or snapshot with `seq` says about the ticks after `last_seen`: on one
/// server seq only grows, and a snapshot after a reconnect may skip ticks. A tick never
/// jumps (the server announces those gaps with KIND_LAGGED), so only its going backwards
/// (a restarted sequence) is news.
fn continuity(symbol: &str, last_seen: u64, seq: u64, snapshot: bool) -> Option<Event> {
    let symbol = symbol.to_string();
    if seq < last_seen || (!snapshot && seq == last_seen) {
        Some(Event::SequenceRestarted {
            symbol,
            last_seen,
            snapshot_seq: seq,
        })
    } else if snapshot && seq > last_seen + 1 {
        Some(Event::Missed {
            symbol,
            last_seen,
            snapshot_seq: seq,
            missed: seq - last_seen - 1,
        })
    } else {
        None
    }
}

/// Starts `run` as a task: returns where to send commands, where events arrive, and the
/// task (its result says why the stream gave up).
pub fn spawn(
    opts: ConnectOpts,
    symbols: Vec<String>,
    max_retries: Option<u32>,
    event_buffer: usize,
) -> (
    mpsc::Sender<Command>,
    mpsc::Receiver<Event>,
    tokio::task::JoinHandle<Result<(), CliError>>,
) {
    let (commands_tx, commands) = mpsc::channel(64);
    let (events_tx, events) = mpsc::channel(event_buffer);
    let task = tokio::spawn(run(opts, symbols, commands, events_tx, max_retries));
    (commands_tx, events, task)
}

/// Runs until a non-retryable error, `max_retries` consecutive failed attempts, or the
/// event receiver going away.
pub async fn run(
    opts: ConnectOpts,
    symbols: Vec<String>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    max_retries: Option<u32>,
) -> Result<(), CliError> {
    let mut live = Live {
        opts,
        wanted: symbols.into_iter().collect(),
        last_seq: HashMap::new(),
        epochs: HashMap::new(),
        events,
        commands,
        commands_open: true,
    };
    let mut backoff = Backoff::new();
    let mut rng = SmallRng::seed_from_u64(
        crate::clock::now_unix_nanos() as u64 ^ u64::from(std::process::id()),
    );
    let mut reconnecting = false;
    loop {
        let started = Instant::now();
        let end = live.session(reconnecting).await;
        let (reason, busy) = match end {
            End::Fatal(e) => return Err(e),
            End::Retry { reason, busy } => (reason, busy),
        };
        if live.events.is_closed() {
            return Ok(());
        }
        backoff.connection_ended(started.elapsed());
        if max_retries.is_some_and(|max| backoff.attempts() >= max) {
            return Err(CliError::new(
                exit::CANNOT_CONNECT,
                format!(
                    "giving up after {} attempts: {reason}",
                    backoff.attempts() + 1
                ),
            ));
        }
        let mut delay = backoff.next_delay(&mut rng);
        if busy {
            delay = delay.max(BUSY_FLOOR);
        }
        let _ = live
            .events
            .send(Event::Disconnected {
                reason,
                retry_in: delay,
                attempt: backoff.attempts(),
            })
            .await;
        tokio::time::sleep(delay).await;
        reconnecting = true;
    }
}

impl Live {
    async fn emit(&self, event: Event) -> Result<(), End> {
        self.events
            .send(event)
            .await
            .map_err(|_| End::Fatal(CliError::new(exit::OK, "output closed")))
    }

    async fn session(&mut self, reconnecting: bool) -> End {
        match self.session_inner(reconnecting).await {
            Ok(never) => match never {},
            Err(end) => end,
        }
    }

    async fn session_inner(&mut self, reconnecting: bool) -> Result<std::convert::Infallible, End> {
        let mut client = self.opts.connect().await.map_err(|e| match e.code {
            exit::CANNOT_CONNECT => End::Retry {
                reason: e.message,
                busy: false,
            },
            _ => End::Fatal(e),
        })?;
        let (tx, rx) = mpsc::channel(1024);
        for symbol in &self.wanted {
            let _ = tx.try_send(self.resubscribe(symbol));
        }
        let mut stream = match client.ticker_stream(ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(self.classify(&status)),
        };
        if reconnecting {
            self.emit(Event::Reconnected {
                symbols: self.wanted.len(),
            })
            .await?;
        }
        loop {
            tokio::select! {
                command = self.commands.recv(), if self.commands_open => match command {
                    Some(Command::Add(symbol)) => {
                        self.wanted.insert(symbol.clone());
                        let _ = tx.send(TickerRequest::subscribe(symbol)).await;
                    }
                    Some(Command::Remove(symbol)) => {
                        self.wanted.remove(&symbol);
                        self.last_seq.remove(&symbol);
                        self.epochs.remove(&symbol);
                        let _ = tx.send(TickerRequest::unsubscribe(symbol)).await;
                    }
                    None => self.commands_open = false,
                },
                message = stream.message() => match message {
                    Ok(Some(msg)) => self.on_message(msg).await?,
                    Ok(None) => {
                        return Err(End::Retry { reason: "the server ended the stream".into(), busy: false })
                    }
                    Err(status) => return Err(self.classify(&status)),
                },
            }
        }
    }

    /// A subscribe that resumes after the last tick seen, when one was seen: the
    /// server replays what the outage cost if its history still holds it.
    fn resubscribe(&self, symbol: &str) -> TickerRequest {
        let request = TickerRequest::subscribe(symbol);
        match (self.last_seq.get(symbol), self.epochs.get(symbol)) {
            (Some(&seq), Some(&epoch)) if epoch != 0 => request.resume(epoch, seq),
            _ => request,
        }
    }

    fn classify(&self, status: &tonic::Status) -> End {
        if !retryable(status) {
            return End::Fatal(CliError::from_status(
                "the server refused the stream",
                status,
            ));
        }
        let reason = match status.code() {
            Code::Unavailable if status.message().is_empty() => {
                format!("lost the connection to {}", self.opts.target())
            }
            _ => format!("{} ({:?})", status.message(), status.code()),
        };
        End::Retry {
            reason,
            busy: status.code() == Code::ResourceExhausted,
        }
    }

    async fn on_message(&mut self, msg: TickerResponse) -> Result<(), End> {
        let symbol = msg.symbol.clone();
        let event = match msg.kind() {
            Kind::Tick | Kind::Snapshot => {
                let snapshot = msg.kind() == Kind::Snapshot;
                if let Some(&last_seen) = self.last_seq.get(&symbol) {
                    let same_epoch = self.epochs.get(&symbol).is_none_or(|&e| e == msg.epoch);
                    let gap = if same_epoch {
                        continuity(&symbol, last_seen, msg.seq, snapshot)
                    } else {
                        Some(Event::SequenceRestarted {
                            symbol: symbol.clone(),
                            last_seen,
                            snapshot_seq: msg.seq,
                        })
                    };
                    if let Some(gap) = gap {
                        self.emit(gap).await?;
                    }
                }
                self.epochs.insert(symbol.clone(), msg.epoch);
                self.last_seq.insert(symbol, msg.seq);
                if snapshot {
                    Event::Snapshot(msg)
                } else {
                    Event::Tick(msg)
                }
            }
            Kind::Subscribed => match self.last_seq.get(&symbol) {
                Some(&last_seen) if msg.recovered && msg.seq > last_seen => Event::Recovered {
                    symbol,
                    last_seen,
                    seq: msg.seq,
                },
                _ => Event::Subscribed(symbol),
            },
            Kind::Unsubscribed => Event::Unsubscribed(symbol),
            Kind::Rejected => {
                // Not resubscribed after a reconnect: the server said no.
                self.wanted.remove(&symbol);
                Event::Rejected {
                    symbol,
                    detail: msg.detail,
                }
            }
            Kind::Lagged => Event::Lagged {
                symbol,
                dropped: msg.dropped,
            },
            // Only answers an in-band token refresh, which this client does not send.
            Kind::TokenRefreshed => return Ok(()),
            Kind::Backlog | Kind::Stale | Kind::Live => Event::Warning {
                symbol,
                detail: msg.detail,
            },
        };
        self.emit(event).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_across_reconnects() {
        assert_eq!(continuity("A", 5, 6, false), None);
        assert_eq!(continuity("A", 5, 6, true), None);
        assert_eq!(continuity("A", 5, 5, true), None);
        assert_eq!(
            continuity("A", 5, 9, true),
            Some(Event::Missed {
                symbol: "A".into(),
                last_seen: 5,
                snapshot_seq: 9,
                missed: 3
            })
        );
        let restarted = Some(Event::SequenceRestarted {
            symbol: "A".into(),
            last_seen: 5,
            snapshot_seq: 2,
        });
        assert_eq!(continuity("A", 5, 2, true), restarted);
        assert_eq!(continuity("A", 5, 2, false), restarted);
    }
}
