//! Chaos soak with exact accounting: a real server (TLS, JWT auth, small rings so
//! streams lag) driven for `TICKERD_SOAK_SECONDS` (default 20) by a seeded random mix of
//! publishers at bursty rates and clients that subscribe, unsubscribe, resume from old
//! and new seqs, switch policies, stall, drop their connection, refresh their token
//! in-band and let it expire, while the server reloads its certificates (what SIGHUP
//! does) twice a second. `tests/run.sh` runs it for 120 s with the fixed seed;
//! `TICKERD_SOAK_SEED` picks another; a failure prints the seed.
//!
//! Checked all along, per client and symbol: seqs increase; every gap is announced
//! exactly (KIND_LAGGED with the right count, or `recovered = false` with a snapshot);
//! no duplicate; CONFLATE ranges are contiguous; nothing follows KIND_UNSUBSCRIBED; a
//! stream ends only with UNAUTHENTICATED (its token expired) or RESOURCE_EXHAUSTED
//! (STRICT); memory stays under `MEMORY_BOUND`; no panic. At the end, each client's
//! counts equal the server's for its open stream (/streams: ticks sent and dropped).

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{token, Keys, TestServer};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use tickerd::{
    client::Kind,
    ops::metrics::StreamView,
    pb::{ticker_request::DeliveryPolicy, PublishRequest, TickerRequest, TickerResponse},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const SYMBOLS: usize = 12;
const CLIENTS: usize = 16;
const PUBLISHERS: usize = 3;
/// Resident memory the whole process (server and clients) stays under.
const MEMORY_BOUND: u64 = 512 * 1024 * 1024;

fn symbol(i: usize) -> String {
    format!("S{i:02}")
}

/// Violations found, with the client that found them.
type Faults = Arc<Mutex<Vec<String>>>;

/// What happened, over all clients: shows that the mix did what it says.
static TALLY: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());

fn tally(what: &'static str, n: u64) {
    let mut tally = TALLY.lock().unwrap();
    match tally.iter_mut().find(|(w, _)| *w == what) {
        Some((_, count)) => *count += n,
        None => tally.push((what, n)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: tests/run.sh runs it for 120 s (TICKERD_SOAK_SECONDS)"]
async fn chaos_soak_with_exact_accounting() {
    let seconds: u64 = std::env::var("TICKERD_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("TICKERD_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(42);
    eprintln!("soak: seed {seed}, {seconds} s");
    let panics: Faults = Arc::default();
    {
        let panics = Arc::clone(&panics);
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut p) = panics.lock() {
                p.push(info.to_string());
            }
            default(info);
        }));
    }
    let keys = Keys::new();
    let server = TestServer::with(|c| {
        keys.jwt(c);
        keys.tls(c, false);
        // Tokens of a few seconds really expire (the default leeway is 30 s).
        c.jwt_leeway = Duration::ZERO;
        c.channel_capacity = 64;
        c.history_size = 256;
        c.max_subscriptions_per_stream = 6;
    })
    .await;
    let faults: Faults = Arc::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);

    let tls = keys.client_tls(None);
    let connect = |tls: tonic::transport::ClientTlsConfig, url: String| async move {
        common::tls_client(&url, tls).await.expect("TLS connect")
    };
    // Every symbol ticks once first, so all are known.
    let mut admin = connect(tls.clone(), server.url()).await;
    let publisher_token = token("publisher", "*", Some("publish"), Duration::from_secs(3600));
    let seed_ticks: Vec<PublishRequest> = (0..SYMBOLS)
        .map(|i| PublishRequest::new(symbol(i), 100.0))
        .collect();
    common::within(admin.publish(common::bearer(
        tokio_stream::iter(seed_ticks),
        Some(&publisher_token),
    )))
    .await
    .expect("seed publish");

    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let (url, token) = (server.url(), publisher_token.clone());
        let mut rng = SmallRng::seed_from_u64(seed ^ (0x5eed_0000 + p as u64));
        let client = connect(tls.clone(), url);
        tasks.push(tokio::spawn(async move {
            let mut client = client.await;
            while tokio::time::Instant::now() < deadline {
                let burst: Vec<PublishRequest> = (0..rng.random_range(1..400))
                    .map(|_| {
                        PublishRequest::new(
                            symbol(rng.random_range(0..SYMBOLS)),
                            rng.random_range(1.0..500.0),
                        )
                    })
                    .collect();
                let sent = burst.len() as u64;
                let counts = client
                    .publish(common::bearer(tokio_stream::iter(burst), Some(&token)))
                    .await
                    .expect("publish")
                    .into_inner();
                assert_eq!(counts.accepted, sent, "every good tick is accepted");
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
            }
        }));
    }
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let rng = SmallRng::seed_from_u64(seed ^ (0xc11e_0000 + c as u64));
        let client = connect(tls.clone(), server.url()).await;
        clients.push(tokio::spawn(Client::run(
            client,
            c,
            rng,
            deadline,
            Arc::clone(&faults),
        )));
    }
    let (mut peak, mut reloads) = (0, 0u64);
    let reloader = server.tls_reloader.clone().expect("TLS on");
    while tokio::time::Instant::now() < deadline {
        peak = peak.max(rss());
        // What SIGHUP does: re-read the certificate files while streams run.
        if !reloader.reload() {
            faults
                .lock()
                .unwrap()
                .push("a TLS reload was refused".into());
        }
        reloads += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tally("TLS reloads", reloads);
    for task in tasks {
        task.await.expect("publisher");
    }
    let mut finals = Vec::new();
    for client in clients {
        finals.push(client.await.expect("client"));
    }
    // Exact accounting: each client's open stream, as the server counted it.
    let (_, body) = server.http_get("/streams").await;
    let streams: Vec<StreamView> = serde_json::from_str(&body).expect("/streams JSON");
    for Final {
        name, got, dropped, ..
    } in &finals
    {
        let open: Vec<&StreamView> = streams
            .iter()
            .filter(|s| &s.principal == name && s.rpc == "TickerStream")
            .collect();
        match open.as_slice() {
            [view] => {
                if (view.ticks_sent, view.ticks_dropped) != (*got, *dropped) {
                    faults.lock().unwrap().push(format!(
                        "{name}: server counted sent {} dropped {}, the client got {got} and was told of {dropped} dropped",
                        view.ticks_sent, view.ticks_dropped
                    ));
                }
            }
            other => faults
                .lock()
                .unwrap()
                .push(format!("{name}: {} open streams at the end", other.len())),
        }
    }
    drop(finals);
    let faults = faults.lock().unwrap().clone();
    let panics = panics.lock().unwrap().clone();
    eprintln!("soak: peak resident memory {} MiB", peak >> 20);
    let mut tally = TALLY.lock().unwrap().clone();
    tally.sort();
    eprintln!("soak: {tally:?}");
    assert!(
        peak < MEMORY_BOUND,
        "seed {seed}: resident memory peaked at {peak} bytes"
    );
    assert!(panics.is_empty(), "seed {seed}: panics: {panics:#?}");
    assert!(
        faults.is_empty(),
        "seed {seed}: {} violations: {faults:#?}",
        faults.len()
    );
}

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

/// A client's end state.
struct Final {
    name: String,
    got: u64,
    dropped: u64,
    /// Its last stream, kept open (held, not read) until the server's counts are read.
    _open: (
        mpsc::Sender<TickerRequest>,
        tonic::Streaming<TickerResponse>,
    ),
}

struct Client {
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
    async fn run(
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
        loop {
            let ttl = Duration::from_millis(me.rng.random_range(500..6000));
            let (tx, rx) = mpsc::channel(64);
            let request = common::bearer(
                ReceiverStream::new(rx),
                Some(&token(&me.name, "*", None, ttl)),
            );
            let Ok(response) = client.ticker_stream(request).await else {
                me.fault("could not open a stream".into());
                continue;
            };
            let mut rx = response.into_inner();
            let mut state = StreamState::default();
            let ended = loop {
                if tokio::time::Instant::now() >= deadline {
                    break false;
                }
                me.act(&tx, &mut state, ttl).await;
                if me.rng.random_ratio(1, 60) {
                    tally("streams dropped by their client", 1);
                    break true; // drop the stream abruptly
                }
                if me.rng.random_ratio(1, 8) {
                    // Stall: read nothing for a while.
                    tokio::time::sleep(Duration::from_millis(me.rng.random_range(0..300))).await;
                }
                let until =
                    tokio::time::Instant::now() + Duration::from_millis(me.rng.random_range(5..80));
                if !me.read(&mut rx, until, &mut state).await {
                    break true; // the server ended it
                }
            };
            if ended {
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
                let (tx, requests) = mpsc::channel(1);
                let request = common::bearer(
                    ReceiverStream::new(requests),
                    Some(&token(&me.name, "*", None, Duration::from_secs(60))),
                );
                let response = client.ticker_stream(request).await.expect("last stream");
                return Final {
                    name: me.name,
                    got: 0,
                    dropped: 0,
                    _open: (tx, response.into_inner()),
                };
            }
            return Final {
                name: me.name,
                got: state.got,
                dropped: state.dropped,
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

/// This process's resident memory (the server runs in it).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}
