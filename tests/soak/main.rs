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
//! (STRICT); memory stays under `MEMORY_BOUND`; no panic.
//!
//! Exact accounting, at the end: every stream the server ever opened is found (the open
//! ones in /streams, the ended ones in /streams/ended, read twice a second), and the
//! server's totals (`tickerd_ticks_delivered_total`, `tickerd_ticks_dropped_total`) are
//! exactly their sums. Each client's streams pair up, in order, with its principal's
//! streams on the server: a stream still open, or ended by the server, was received
//! exactly as the server counted it (ticks sent, ticks announced dropped); a stream its
//! client cut received at most that, the rest being in flight when it was cut.

mod client;
#[path = "../common/mod.rs"]
mod common;
mod stall;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use client::{Client, End, Final};
use common::{token, Keys, TestServer};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use tickerd::{ops::metrics::StreamView, pb::PublishRequest};

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
    let seconds = env_or("TICKERD_SOAK_SECONDS", 20);
    let seed = env_or("TICKERD_SOAK_SEED", 42);
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
    // Outlives the run, however long (the leeway is zero).
    let lifetime = Duration::from_secs(seconds + 600);
    let publisher_token = token("publisher", "*", Some("publish"), lifetime);
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
    // Every stream that ends, by id, with its final counts.
    let mut ended = Ledger::default();
    while tokio::time::Instant::now() < deadline {
        peak = peak.max(rss());
        collect_ended(&server, &mut ended).await;
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
    account(&server, &finals, &mut ended, &faults).await;
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

/// The number in the variable `name`, or `default` when it is unset or not a number.
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// What the accounting keeps of one stream: a few words, not the whole view, so that
/// an hour's 400k+ streams cost the harness about 10 MiB and the peak memory is mostly
/// the server's.
#[derive(Clone, Copy)]
struct Seen {
    id: u64,
    sent: u64,
    dropped: u64,
    /// The principal, interned in `Ledger::words`; `None` when not a TickerStream.
    principal: Option<u32>,
    /// Why it ended, interned; `None` while open.
    ended: Option<u32>,
}

/// Every ended stream, by id, plus the interned strings its records point at.
#[derive(Default)]
struct Ledger {
    ended: HashMap<u64, Seen>,
    words: Vec<String>,
    index: HashMap<String, u32>,
}

impl Ledger {
    fn intern(&mut self, word: &str) -> u32 {
        if let Some(&i) = self.index.get(word) {
            return i;
        }
        let i = self.words.len() as u32;
        self.words.push(word.to_string());
        self.index.insert(word.to_string(), i);
        i
    }

    fn seen(&mut self, view: &StreamView) -> Seen {
        Seen {
            id: view.id,
            sent: view.ticks_sent,
            dropped: view.ticks_dropped,
            principal: (view.rpc == "TickerStream").then(|| self.intern(&view.principal)),
            ended: view.ended.as_deref().map(|e| self.intern(e)),
        }
    }

    fn word(&self, i: Option<u32>) -> &str {
        i.and_then(|i| self.words.get(i as usize))
            .map_or("-", String::as_str)
    }
}

/// Adds the streams /streams/ended lists now (it keeps the last 1024) to `ended`.
async fn collect_ended(server: &TestServer, ended: &mut Ledger) {
    let (status, body) = server.http_get("/streams/ended").await;
    assert_eq!(status, 200, "/streams/ended: {body}");
    let list: Vec<StreamView> = serde_json::from_str(&body).expect("/streams/ended JSON");
    for view in list {
        let seen = ended.seen(&view);
        ended.ended.insert(view.id, seen);
    }
}

/// The server's total of a counter from /metrics.
/// The exact accounting described at the top.
async fn account(server: &TestServer, finals: &[Final], ended: &mut Ledger, faults: &Faults) {
    let fault = |what: String| faults.lock().unwrap().push(what);
    // A stream its client cut ends on the server a moment later: wait for every
    // client's streams to be there, open or ended.
    let opened: usize = finals.iter().map(|f| f.streams.len()).sum();
    let mut views: Vec<Seen>;
    let wait = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        collect_ended(server, ended).await;
        let (_, body) = server.http_get("/streams").await;
        let open: Vec<StreamView> = serde_json::from_str(&body).expect("/streams JSON");
        views = open.iter().map(|v| ended.seen(v)).collect();
        views.extend(ended.ended.values().copied());
        let streams = views.iter().filter(|v| v.principal.is_some()).count();
        if streams == opened || tokio::time::Instant::now() >= wait {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    views.sort_by_key(|v| v.id);
    // Every stream the server opened is here: the ids run 1..=n without a hole.
    let ids: Vec<u64> = views.iter().map(|v| v.id).collect();
    if ids != (1..=ids.len() as u64).collect::<Vec<_>>() {
        fault(format!(
            "streams missing from /streams and /streams/ended: {} of ids up to {:?}",
            ids.len(),
            ids.last()
        ));
    }
    // The totals are exactly the streams' sums, once nothing moves (publishers are done,
    // every open stream has sent all it had: the clients drained them).
    let (sent, dropped) = views
        .iter()
        .fold((0, 0), |(s, d), v| (s + v.sent, d + v.dropped));
    let server_sent = server.counter("tickerd_ticks_delivered_total").await;
    let server_dropped = server.counter("tickerd_ticks_dropped_total").await;
    if (server_sent, server_dropped) != (sent, dropped) {
        fault(format!(
            "server totals sent {server_sent} dropped {server_dropped}, its streams' sums {sent} {dropped}"
        ));
    }
    let (mut got, mut told, mut in_flight) = (0, 0, 0);
    for Final { name, streams, .. } in finals {
        let theirs: Vec<&Seen> = views
            .iter()
            .filter(|v| v.principal.is_some() && ended.word(v.principal) == name)
            .collect();
        if theirs.len() != streams.len() {
            fault(format!(
                "{name}: opened {} streams, the server shows {}",
                streams.len(),
                theirs.len()
            ));
            continue;
        }
        for (i, (record, view)) in streams.iter().zip(theirs).enumerate() {
            got += record.got;
            told += record.dropped;
            let server = (view.sent, view.dropped);
            let client = (record.got, record.dropped);
            let exact = match record.end {
                End::Open | End::Server => server == client,
                End::Client => server.0 >= client.0 && server.1 >= client.1,
            };
            if !exact {
                fault(format!(
                    "{name}, stream {i} ({:?}, server: {:?}): the server counted sent {} dropped {}, the client got {} and was told of {} dropped",
                    record.end,
                    ended.word(view.ended),
                    server.0,
                    server.1,
                    client.0,
                    client.1
                ));
            }
            if record.end == End::Client {
                in_flight += server.0.saturating_sub(client.0);
            }
        }
    }
    eprintln!(
        "soak: the harness kept {} ended streams (~{} KiB)",
        ended.ended.len(),
        ended.ended.len() * (std::mem::size_of::<Seen>() + 16) / 1024
    );
    eprintln!(
        "soak: server delivered {server_sent} and dropped {server_dropped} over {} streams; clients got {got} (+{in_flight} in flight on streams their client cut) and were told of {told} dropped",
        views.len()
    );
    if got + in_flight != server_sent && faults.lock().unwrap().is_empty() {
        fault(format!(
            "clients got {got} + {in_flight} in flight, the server delivered {server_sent}"
        ));
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
