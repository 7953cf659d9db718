//! The load generator (`tickerd-bench`'s library) against a real server: what it reports
//! must be exact, or no figure in the README's Performance section can be trusted.
//! Small, bounded runs: a few streams for well under a second of publishing.

use crate::common;

use clap::Parser;
use common::{TestServer, TickerdProcess};
use tickerd::loadgen::{self, Options, Report};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    options: Options,
}

fn options(url: &str, extra: &[&str]) -> Options {
    let mut args = vec![
        "tickerd-bench",
        "--server",
        url,
        "--conns",
        "2",
        "--streams",
        "6",
        "--symbols",
        "10",
        "--subs-per-stream",
        "5",
        "--rate",
        "2000",
        "--warmup",
        "100ms",
        "--duration",
        "400ms",
        // In-flight ticks get this long after publishing ends; generous for a loaded CI box.
        "--grace",
        "2s",
    ];
    args.extend_from_slice(extra);
    Cli::parse_from(args).options
}

#[tokio::test]
async fn every_published_tick_is_counted_delivered_with_its_latency() {
    // The default reader: the load generator's own HTTP/2 frames.
    every_tick_counted(&[]).await;
}

#[tokio::test]
async fn the_servers_cpu_and_context_switches_are_reported() {
    // A process of its own: in this one, other tests' threads come and go, and a thread
    // that ends takes its context switches out of the sum over the live ones.
    let server = TickerdProcess::spawn(&["--feed", "none"]).await;
    let pid = server.child.id().to_string();
    // Busier than the other runs, for several of /proc's 10 ms CPU ticks (a debug build
    // used 20-30 ms of CPU at 2,000 ticks/s).
    let mut opts = options(&server.url(), &["--server-pid", &pid]);
    opts.rate = 5000.0;
    let Report::Run { steps, .. } = loadgen::run(opts).await.unwrap() else {
        panic!("a run report was expected");
    };
    let [step] = &steps[..] else {
        panic!("one step expected, got {}", steps.len())
    };
    assert!(step.server_cpu_seconds.is_some_and(|c| c > 0.0), "{step:?}");
    // Publishing in 1 ms rounds, the server's threads sleep between them.
    assert!(
        step.server_sleeps_per_sec.is_some_and(|s| s > 0.0),
        "{step:?}"
    );
    assert!(step.server_preemptions_per_sec.is_some(), "{step:?}");
    // Without --server-pid there is nothing to read.
    let Report::Run { steps, .. } = loadgen::run(options(&server.url(), &[])).await.unwrap() else {
        panic!("a run report was expected");
    };
    assert!(steps[0].server_sleeps_per_sec.is_none() && steps[0].server_cpu_seconds.is_none());
}

#[tokio::test]
async fn the_tonic_reader_counts_the_same() {
    every_tick_counted(&["--reader", "tonic"]).await;
}

#[tokio::test]
async fn the_frames_reader_refuses_https_with_a_hint() {
    let server = TestServer::start().await;
    let mut opts = options(&server.url(), &[]);
    opts.servers = vec![server.url().replace("http://", "https://")];
    let Err(err) = loadgen::run(opts).await else {
        panic!("https with --reader frames must fail");
    };
    assert!(err.to_string().contains("--reader tonic"), "{err}");
}

async fn every_tick_counted(extra: &[&str]) {
    let server = TestServer::start().await;
    let Report::Run { steps, slow, .. } =
        loadgen::run(options(&server.url(), extra)).await.unwrap()
    else {
        panic!("a run report was expected");
    };
    assert!(slow.is_none());
    let [step] = &steps[..] else {
        panic!("one step expected, got {}", steps.len())
    };
    assert!(step.published > 0 && step.published == step.offered);
    // 6 streams x 5 of 10 symbols: each tick reaches 3 streams on average, and the
    // report's expectation follows the actual subscriptions.
    assert!(step.expected >= step.published, "{step:?}");
    assert_eq!(step.delivered, step.expected, "{step:?}");
    assert_eq!(
        (step.lag_notices, step.dropped, step.unannounced_gaps),
        (0, 0, 0)
    );
    assert!(step.latency_us.p50 >= 1 && step.latency_us.max >= step.latency_us.p99);
}

#[tokio::test]
async fn stalled_streams_get_exact_lag_counts_when_they_catch_up() {
    // A 16-tick ring and a 4 KiB stream window: the two stalled streams must lose ticks.
    let server = TestServer::with(|c| c.channel_capacity = 16).await;
    let opts = options(
        &server.url(),
        &["--slow-streams", "2", "--stream-window", "4096"],
    );
    let Report::Run { steps, slow, .. } = loadgen::run(opts).await.unwrap() else {
        panic!("a run report was expected");
    };
    let slow = slow.expect("a slow-stream report");
    assert_eq!(slow.streams, 2);
    assert!(slow.lag_notices > 0 && slow.dropped > 0, "{slow:?}");
    assert_eq!(
        (slow.unannounced_gaps, slow.inexact_symbols),
        (0, 0),
        "{slow:?}"
    );
    // The readers' own accounting holds too: whatever they missed was announced.
    assert!(steps.iter().all(|s| s.unannounced_gaps == 0), "{steps:?}");
}
