//! The soak's random client: subscribes, unsubscribes, resumes, switches policies,
//! stalls, drops its stream and refreshes its token, checking every message it gets
//! against what it knows (see `main.rs` for the invariants).

use std::{collections::HashMap, time::Duration};

use rand::{rngs::SmallRng, Rng};
use tickerd::{
    client::Kind,
    pb::{ticker_request::DeliveryPolicy, TickerRequest, TickerResponse},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::{common, symbol, tally, Faults, SYMBOLS};
use common::token;

/// What one client knows of a symbol it subscribed to on its current stream.
#[derive(Default, Clone)]
struct Sub {
    /// Seq of the last tick (or snapshot) seen; the next tick must follow it.
    last: u64,
    /// Announced by KIND_LAGGED, to be skipped by the next tick.
    lagged: u64,
    conflate: bool,
}

/// What a client knows of its current stream.
#[derive(Default)]
struct StreamState {
    subs: HashMap<String, Sub>,
    /// The seq each pending resuming subscribe resumes after.
    resumes: HashMap<String, u64>,
    /// Ticks received, and announced dropped, on this stream.
    got: u64,
    dropped: u64,
}

/// How a client's stream ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum End {
    /// Still open (the last one).
    Open,
    /// The server ended it (a status the client read to the end).
    Server,
    /// The client dropped it abruptly, with ticks possibly in flight.
    Client,
}

/// One of a client's streams, as the client saw it.
#[derive(Debug)]
pub struct Record {
    pub got: u64,
    pub dropped: u64,
    pub end: End,
}

/// A client's end state.
pub struct Final {
    pub name: String,
    /// Every stream it opened, in order.
    pub streams: Vec<Record>,
    /// Its last stream, kept open (held, not read) until the server's counts are read.
    _open: (
        mpsc::Sender<TickerRequest>,
        tonic::Streaming<TickerResponse>,
    ),
}

pub struct Client {
    name: String,
    rng: SmallRng,
    faults: Faults,
    /// The last seq seen per symbol, kept across streams, to resume from.
    seen: HashMap<String, (u64, u64)>,
}

impl Client {
    /// Runs until `deadline`, then drains its stream and returns its name, the ticks
    /// got on its last stream and the ticks announced dropped on it, and that stream
    /// (kept open until the server's counts are read).
    pub async fn run(
        mut client: tickerd::client::Client,
        id: usize,
        rng: SmallRng,
        deadline: tokio::time::Instant,
        faults: Faults,
    ) -> Final {
        let mut me = Client {
            name: format!("client{id}"),
            rng,
            faults,
            seen: HashMap::new(),
        };
        let mut streams = Vec::new();
        loop {
            let ttl = Duration::from_millis(me.rng.random_range(500..6000));
            let (tx, rx) = mpsc::channel(64);
            let minted = token(&me.name, "*", None, ttl);
            let request = common::bearer(ReceiverStream::new(rx), Some(&minted));
            let response = match client.ticker_stream(request).await {
                Ok(response) => response,
                // A short-lived token can expire before a loaded server checks it (the
                // leeway is zero, and `exp` is in whole seconds, so a 1.9 s token may live
                // 0.1 s): the right answer, not a fault.
                Err(status) if status.code() == Code::Unauthenticated && expired(&minted) => {
                    tally("opens refused: the token expired on the way", 1);
                    continue;
                }
                Err(status) => {
                    me.fault(format!("could not open a stream: {status:?}"));
                    continue;
                }
            };
            let mut rx = response.into_inner();
            let mut state = StreamState::default();
            let ended = loop {
                if tokio::time::Instant::now() >= deadline {
                    break None;
                }
                me.act(&tx, &mut state, ttl).await;
                if me.rng.random_ratio(1, 60) {
                    tally("streams dropped by their client", 1);
                    break Some(End::Client); // drop the stream abruptly
                }
                if me.rng.random_ratio(1, 8) {
                    // Stall: read nothing for a while.
                    tokio::time::sleep(Duration::from_millis(me.rng.random_range(0..300))).await;
                }
                let until =
                    tokio::time::Instant::now() + Duration::from_millis(me.rng.random_range(5..80));
                if !me.read(&mut rx, until, &mut state).await {
                    break Some(End::Server);
                }
            };
            if let Some(end) = ended {
                streams.push(Record {
                    got: state.got,
                    dropped: state.dropped,
                    end,
                });
                continue;
            }
            // The end: a token that outlives the check (an expiry would end the stream
            // before the server's counts are read), then read everything left and
            // report this stream's counts.
            let lasting = TickerRequest {
                token: token(&me.name, "*", None, Duration::from_secs(120)),
                ..Default::default()
            };
            let _ = tx.send(lasting).await;
            let until = tokio::time::Instant::now() + Duration::from_millis(1500);
            if !me.read(&mut rx, until, &mut state).await {
                // It ended (token expiry) during the drain: a new, idle stream reports 0.
                streams.push(Record {
                    got: state.got,
                    dropped: state.dropped,
                    end: End::Server,
                });
                let (tx, requests) = mpsc::channel(1);
                let request = common::bearer(
                    ReceiverStream::new(requests),
                    Some(&token(&me.name, "*", None, Duration::from_secs(60))),
                );
                let response = client.ticker_stream(request).await.expect("last stream");
                streams.push(Record {
                    got: 0,
                    dropped: 0,
                    end: End::Open,
                });
                return Final {
                    name: me.name,
                    streams,
                    _open: (tx, response.into_inner()),
                };
            }
            streams.push(Record {
                got: state.got,
                dropped: state.dropped,
                end: End::Open,
            });
            return Final {
                name: me.name,
                streams,
                _open: (tx, rx),
            };
        }
    }

    fn fault(&self, what: String) {
        self.faults
            .lock()
            .unwrap()
            .push(format!("{}: {what}", self.name));
    }

    /// One random request: subscribe (some policy, sometimes resuming), unsubscribe, or
    /// refresh the token.
    async fn act(
        &mut self,
        tx: &mpsc::Sender<TickerRequest>,
        state: &mut StreamState,
        ttl: Duration,
    ) {
        let (subs, resumes) = (&state.subs, &mut state.resumes);
        let roll = self.rng.random_range(0..40);
        let request = if roll < 20 {
            let name = symbol(self.rng.random_range(0..SYMBOLS));
            let mut request = TickerRequest::subscribe(name.clone());
            match self.rng.random_range(0..6) {
                0 => {
                    request.policy = DeliveryPolicy::Conflate as i32;
                    request.max_rate_hz = self.rng.random_range(1.0..50.0);
                }
                1 => request.policy = DeliveryPolicy::Strict as i32,
                _ => {}
            }
            if !subs.contains_key(&name) && self.rng.random_ratio(1, 2) {
                if let Some(&(epoch, seq)) = self.seen.get(&name) {
                    // Resume: from the last seq seen, or from an older one.
                    let seq = seq.saturating_sub(self.rng.random_range(0..120));
                    request.resume_from_seq = seq;
                    request.epoch = epoch;
                    resumes.insert(name, seq);
                }
            }
            request
        } else if roll < 38 {
            match subs.keys().nth(self.rng.random_range(0..subs.len().max(1))) {
                Some(name) => TickerRequest::unsubscribe(name.clone()),
                None => return,
            }
        } else {
            TickerRequest {
                token: token(&self.name, "*", None, ttl),
                ..Default::default()
            }
        };
        let _ = tx.send(request).await;
    }

    /// Reads and checks messages until `until`; `false` once the stream ended.
    async fn read(
        &mut self,
        rx: &mut tonic::Streaming<TickerResponse>,
        until: tokio::time::Instant,
        state: &mut StreamState,
    ) -> bool {
        loop {
            let msg = match tokio::time::timeout_at(until, rx.message()).await {
                Err(_) => return true,
                Ok(Ok(Some(msg))) => msg,
                Ok(Ok(None)) => {
                    self.fault("the stream ended without a status".into());
                    return false;
                }
                Ok(Err(status)) => {
                    tally(
                        match status.code() {
                            Code::Unauthenticated => "streams ended: token expired",
                            Code::ResourceExhausted => "streams ended: STRICT fell behind",
                            _ => "streams ended: other",
                        },
                        1,
                    );
                    if !matches!(
                        status.code(),
                        Code::Unauthenticated | Code::ResourceExhausted
                    ) {
                        self.fault(format!("the stream ended with {status:?}"));
                    }
                    return false;
                }
            };
            self.check(msg, state);
        }
    }

    fn check(&mut self, msg: TickerResponse, state: &mut StreamState) {
        let StreamState {
            subs,
            resumes,
            got,
            dropped,
        } = state;
        let name = msg.symbol.clone();
        match msg.kind() {
            Kind::Subscribed if msg.detail == "already subscribed" => {}
            Kind::Subscribed => {
                let resumed = resumes.remove(&name);
                let switched = msg.detail.starts_with("policy");
                let previous = subs.get(&name).map(|s| s.last);
                if resumed.is_some() {
                    tally(
                        if msg.recovered {
                            "resumes recovered"
                        } else {
                            "resumes not recovered"
                        },
                        1,
                    );
                }
                let last = match (msg.recovered, switched, previous, resumed) {
                    // A policy switch resumes from where this stream was.
                    (true, true, Some(last), _) => last,
                    (true, _, _, Some(from)) => from,
                    _ => msg.seq,
                };
                subs.insert(
                    name.clone(),
                    Sub {
                        last,
                        lagged: 0,
                        conflate: false,
                    },
                );
            }
            Kind::Snapshot => {
                if let Some(sub) = subs.get_mut(&name) {
                    sub.last = msg.seq;
                }
                self.seen.insert(name, (msg.epoch, msg.seq));
            }
            Kind::Tick => {
                *got += 1;
                let Some(sub) = subs.get_mut(&name) else {
                    self.fault(format!(
                        "a tick of {name} (seq {}) it is not subscribed to",
                        msg.seq
                    ));
                    return;
                };
                tally("ticks", 1);
                if msg.count > 0 {
                    tally("conflated messages", 1);
                    sub.conflate = true;
                    if msg.first_seq != sub.last + 1 {
                        self.fault(format!(
                            "{name}: CONFLATE range {}..={} after seq {}",
                            msg.first_seq, msg.seq, sub.last
                        ));
                    }
                } else if msg.seq != sub.last + 1 + sub.lagged {
                    self.fault(format!(
                        "{name}: seq {} after {} with {} announced dropped",
                        msg.seq, sub.last, sub.lagged
                    ));
                }
                sub.last = msg.seq;
                sub.lagged = 0;
                self.seen.insert(name, (msg.epoch, msg.seq));
            }
            Kind::Lagged => {
                tally("lag notices", 1);
                tally("ticks announced dropped", msg.dropped);
                *dropped += msg.dropped;
                match subs.get_mut(&name) {
                    Some(sub) if msg.dropped > 0 => sub.lagged += msg.dropped,
                    _ => self.fault(format!("a lag notice for {name}: {msg:?}")),
                }
            }
            Kind::Unsubscribed => {
                subs.remove(&name);
            }
            Kind::TokenRefreshed => tally("tokens refreshed in-band", 1),
            Kind::Rejected | Kind::Backlog => {}
            Kind::Stale | Kind::Live => {
                self.fault(format!("a bus notice on a single node: {msg:?}"))
            }
        }
    }
}

/// Whether `token`'s `exp` (whole seconds since the epoch) has passed.
fn expired(token: &str) -> bool {
    use base64::Engine as _;
    let exp = token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .and_then(|claims| claims["exp"].as_u64());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    exp.is_some_and(|exp| now >= exp)
}
