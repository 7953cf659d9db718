//! Several tickerd nodes on one real nats-server with JetStream: one market, the same
//! seq and epoch everywhere, resume on any node, interest-based reading, and the
//! faults (NATS killed and restarted, a node cut from NATS, a node killed).

use crate::common;

use std::{collections::BTreeSet, sync::atomic::Ordering, time::Duration};

use common::{
    eventually, http_get, nats::Nats, nats::Proxy, publish, quotes, ticks, within, Keys, Stream,
    TestServer, TickerCli, TickerdProcess,
};
use tickerd::{
    client::Kind,
    pb::{PublishRequest, SubscribeRequest, TickerRequest, TickerResponse},
    server::config::Config,
};
use tonic::Code;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};

/// A node of the cluster on `bus` (a nats-server or a proxy in front of one).
async fn node(bus: &str) -> TestServer {
    node_with(bus, |_| {}).await
}

async fn node_with(bus: &str, adjust: impl FnOnce(&mut Config)) -> TestServer {
    let bus = bus.to_string();
    TestServer::with(move |c| {
        c.cluster.urls = vec![bus];
        c.cluster.cluster_linger = Duration::from_millis(100);
        c.cluster.cluster_ping_interval = Duration::from_millis(300);
        c.cluster.cluster_unhealthy_after = Duration::from_millis(500);
        adjust(c);
    })
    .await
}

/// `N` nodes on `bus`.
async fn nodes<const N: usize>(bus: &str) -> [TestServer; N] {
    let mut started = Vec::with_capacity(N);
    for _ in 0..N {
        started.push(node(bus).await);
    }
    started
        .try_into()
        .unwrap_or_else(|_| unreachable!("N nodes were started"))
}

fn epoch(server: &TestServer) -> u64 {
    server.cluster.as_ref().expect("a cluster node").epoch()
}

/// Prices from `from` on, one tick each.
fn priced(symbol: &str, from: u64, n: u64) -> Vec<PublishRequest> {
    (from..from + n)
        .map(|p| PublishRequest::new(symbol, p as f64))
        .collect()
}

/// The next `n` live ticks of a stream, ignoring nothing: any other kind fails.
async fn next_ticks(stream: &mut Stream, n: usize) -> Vec<TickerResponse> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let msg = stream.next().await;
        assert_eq!(msg.kind(), Kind::Tick, "unexpected {msg:?}");
        out.push(msg);
    }
    out
}

fn seqs(ticks: &[TickerResponse]) -> Vec<u64> {
    ticks.iter().map(|t| t.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_published_on_one_node_reaches_every_node_with_the_same_seq_and_epoch() {
    let nats = Nats::start();
    let [a, b, c] = nodes(&nats.url()).await;
    assert_eq!(epoch(&a), epoch(&b), "one market, one epoch");
    publish(&mut a.client().await, ticks("X", 1)).await;
    let mut streams = Vec::new();
    for server in [&b, &c] {
        let mut stream = Stream::open(&mut server.client().await).await;
        stream.subscribe("X").await;
        let ack = stream.expect(Kind::Subscribed, "X").await;
        assert_eq!((ack.seq, ack.epoch), (1, epoch(&a)));
        let snapshot = stream.expect(Kind::Snapshot, "X").await;
        assert_eq!((snapshot.seq, snapshot.ltp), (1, 1.0));
        streams.push(stream);
    }
    let counts = publish(&mut a.client().await, priced("X", 2, 20)).await;
    assert_eq!((counts.accepted, counts.rejected), (20, 0));
    for stream in &mut streams {
        let got = next_ticks(stream, 20).await;
        assert_eq!(seqs(&got), (2..=21).collect::<Vec<_>>());
        for tick in &got {
            assert_eq!(
                tick.ltp, tick.seq as f64,
                "seq {} carries its price",
                tick.seq
            );
            assert_eq!(tick.epoch, epoch(&a));
            assert!(tick.event_time_unix_nanos > 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_two_nodes_make_one_contiguous_sequence() {
    let nats = Nats::start();
    let [a, b, c] = nodes(&nats.url()).await;
    publish(&mut c.client().await, ticks("X", 1)).await;
    let mut stream = Stream::open(&mut c.client().await).await;
    stream.subscribed("X").await;
    stream.expect(Kind::Snapshot, "X").await;
    const N: u64 = 200;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let (from_a, from_b) = tokio::join!(
        publish(&mut ca, priced("X", 10_000, N)),
        publish(&mut cb, priced("X", 20_000, N)),
    );
    assert_eq!((from_a.accepted, from_b.accepted), (N, N));
    let got = next_ticks(&mut stream, 2 * N as usize).await;
    assert_eq!(
        seqs(&got),
        (2..=2 * N + 1).collect::<Vec<_>>(),
        "one sequence, no gap, no duplicate"
    );
    let prices: BTreeSet<u64> = got.iter().map(|t| t.ltp as u64).collect();
    let sent: BTreeSet<u64> = (10_000..10_000 + N).chain(20_000..20_000 + N).collect();
    assert_eq!(prices, sent, "every tick of both publishers, once");
    let batches: u64 = [&a, &b]
        .iter()
        .filter_map(|n| n.cluster.as_ref())
        .map(|c| c.stats().batches.load(Ordering::Relaxed))
        .sum();
    assert!(batches > 0, "ticks that queue go out as atomic batches");
    // Each node's ticks keep their own order.
    let from_a: Vec<u64> = got
        .iter()
        .map(|t| t.ltp as u64)
        .filter(|p| *p < 20_000)
        .collect();
    assert!(from_a.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_from_the_buses_history() {
    let nats = Nats::start();
    let history = |c: &mut Config| c.history_size = 8;
    let a = node_with(&nats.url(), history).await;
    let b = node_with(&nats.url(), history).await;
    publish(&mut a.client().await, priced("X", 1, 10)).await;
    let mut on_a = Stream::open(&mut a.client().await).await;
    on_a.subscribed("X").await;
    assert_eq!(on_a.expect(Kind::Snapshot, "X").await.seq, 10);
    drop(on_a);
    publish(&mut a.client().await, priced("X", 11, 3)).await;

    let resume = |seq| TickerRequest {
        symbol: "X".into(),
        resume_from_seq: seq,
        epoch: epoch(&a),
        ..Default::default()
    };
    let mut on_b = Stream::open(&mut b.client().await).await;
    on_b.send(resume(10)).await;
    let ack = on_b.expect(Kind::Subscribed, "X").await;
    assert!(ack.recovered, "the bus still holds 11..=13: {ack:?}");
    assert_eq!(seqs(&next_ticks(&mut on_b, 3).await), [11, 12, 13]);
    publish(&mut a.client().await, priced("X", 14, 1)).await;
    assert_eq!(seqs(&next_ticks(&mut on_b, 1).await), [14], "then live");

    // Seq 3 is older than the 8 ticks kept: not recovered, and a snapshot says where
    // the stream stands.
    let mut late = Stream::open(&mut b.client().await).await;
    late.send(resume(3)).await;
    let ack = late.expect(Kind::Subscribed, "X").await;
    assert!(!ack.recovered);
    assert_eq!(late.expect(Kind::Snapshot, "X").await.seq, 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotes_and_acks_are_right_on_a_node_that_never_followed_the_symbol() {
    let nats = Nats::start();
    let [a, b] = nodes(&nats.url()).await;
    publish(&mut a.client().await, priced("X", 1, 3)).await;
    let mut client = b.client().await;
    let got = quotes(&mut client, &["X", "NOPE"]).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].kind(), got[0].seq, got[0].ltp, got[0].epoch),
        (Kind::Snapshot, 3, 3.0, epoch(&a))
    );
    let unknown = client
        .subscribe(SubscribeRequest {
            symbols: vec!["NOPE".into()],
        })
        .await
        .expect_err("unknown symbol");
    assert_eq!(unknown.code(), Code::NotFound);
    let mut rx = within(client.subscribe(SubscribeRequest {
        symbols: vec!["X".into()],
    }))
    .await
    .expect("subscribe")
    .into_inner();
    let ack = common::next(&mut rx).await;
    assert_eq!(
        (ack.kind(), ack.seq, ack.epoch),
        (Kind::Subscribed, 3, epoch(&a))
    );
    assert_eq!(common::next(&mut rx).await.seq, 3, "snapshot");
    // An unknown symbol on a TickerStream is refused in-band, as alone.
    let mut stream = Stream::open(&mut client).await;
    stream.subscribe("NOPE").await;
    let refused = stream.expect(Kind::Rejected, "NOPE").await;
    assert_eq!(refused.detail, "unknown symbol");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reads_from_the_bus_only_the_symbols_its_clients_want() {
    let nats = Nats::start();
    let [a, b] = nodes(&nats.url()).await;
    let received = || {
        b.cluster
            .as_ref()
            .map_or(0, |c| c.stats().received.load(Ordering::Relaxed))
    };
    publish(&mut a.client().await, priced("X", 1, 5)).await;
    publish(&mut a.client().await, priced("Y", 1, 5)).await;
    assert_eq!(received(), 0, "nobody on b wants anything");
    let mut on_b = Stream::open(&mut b.client().await).await;
    on_b.subscribed("X").await;
    on_b.expect(Kind::Snapshot, "X").await;
    publish(&mut a.client().await, priced("X", 6, 5)).await;
    publish(&mut a.client().await, priced("Y", 6, 5)).await;
    assert_eq!(seqs(&next_ticks(&mut on_b, 5).await), [6, 7, 8, 9, 10]);
    // Y's ten ticks went through the bus (a's own reader sees them) but not to b.
    let mut on_a = Stream::open(&mut a.client().await).await;
    on_a.subscribed("Y").await;
    assert_eq!(on_a.expect(Kind::Snapshot, "Y").await.seq, 10);
    assert_eq!(received(), 10, "X's 5 kept and 5 live ticks, none of Y's");
    let (_, metrics) = b.http_get("/metrics").await;
    assert!(
        metrics.contains("tickerd_cluster_ticks_received_total 10"),
        "{metrics}"
    );

    // Once nothing on b wants X (and the linger passed), b stops reading it.
    on_b.unsubscribe("X").await;
    on_b.expect(Kind::Unsubscribed, "X").await;
    let syncing = || {
        b.cluster
            .as_ref()
            .map_or(1, |c| c.stats().syncing.load(Ordering::Relaxed))
    };
    eventually("b stops reading X", || syncing() == 0).await;
    publish(&mut a.client().await, priced("X", 11, 5)).await;
    on_a.subscribed("X").await;
    assert_eq!(on_a.expect(Kind::Snapshot, "X").await.seq, 15);
    assert_eq!(received(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_is_announced_and_loses_nothing_acknowledged() {
    let mut nats = Nats::start();
    let [a, b] = nodes(&nats.url()).await;
    publish(&mut a.client().await, priced("X", 1, 3)).await;
    let mut on_b = Stream::open(&mut b.client().await).await;
    on_b.subscribed("X").await;
    assert_eq!(on_b.expect(Kind::Snapshot, "X").await.seq, 3);

    nats.kill();
    let stale = on_b.expect(Kind::Stale, "X").await;
    assert!(stale.detail.contains("bus"), "{stale:?}");
    let mut client = a.client().await;
    eventually("a notices", || {
        a.cluster.as_ref().is_some_and(|c| !c.is_connected())
    })
    .await;
    let refused = within(client.publish(tokio_stream::iter(priced("X", 4, 1))))
        .await
        .expect_err("no bus, no publish");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    nats.restart();
    on_b.expect(Kind::Live, "X").await;
    eventually("a reconnects", || {
        a.cluster.as_ref().is_some_and(|c| c.is_connected())
    })
    .await;
    let counts = publish(&mut client, priced("X", 4, 5)).await;
    assert_eq!(counts.accepted, 5);
    assert_eq!(
        seqs(&next_ticks(&mut on_b, 5).await),
        [4, 5, 6, 7, 8],
        "the 3 acknowledged before the crash kept their place"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_from_nats_tells_its_clients_goes_unhealthy_and_catches_up() {
    let nats = Nats::start();
    let proxy = Proxy::start(nats.port).await;
    let a = node(&nats.url()).await;
    let b = node(&proxy.url()).await;
    publish(&mut a.client().await, priced("X", 1, 1)).await;
    let mut on_b = Stream::open(&mut b.client().await).await;
    on_b.subscribed("X").await;
    on_b.expect(Kind::Snapshot, "X").await;
    let mut health = HealthClient::new(b.channel().await);
    let status = |health: &mut HealthClient<_>| {
        let mut health = health.clone();
        async move {
            let request = tonic_health::pb::HealthCheckRequest {
                service: "ticker.v1.TickerStreamService".into(),
            };
            within(health.check(request))
                .await
                .expect("health")
                .into_inner()
                .status()
        }
    };
    assert_eq!(status(&mut health).await, ServingStatus::Serving);

    proxy.cut();
    on_b.expect(Kind::Stale, "X").await;
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    while status(&mut health).await != ServingStatus::NotServing {
        assert!(tokio::time::Instant::now() < deadline, "never NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = http_get(b.metrics_addr, "/healthz").await;
    assert_eq!((code, body.trim()), (503, "market-data bus unreachable"));
    let counts = publish(&mut a.client().await, priced("X", 2, 5)).await;
    assert_eq!(counts.accepted, 5, "a still has the bus");

    proxy.heal();
    let mut ticks = Vec::new();
    let mut live = false;
    while !(live && ticks.len() == 5) {
        let msg = on_b.next().await;
        match msg.kind() {
            Kind::Live => live = true,
            Kind::Tick => ticks.push(msg.seq),
            other => panic!("unexpected {other:?}: {msg:?}"),
        }
    }
    assert_eq!(ticks, [2, 3, 4, 5, 6], "caught up from the bus, in order");
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    while status(&mut health).await != ServingStatus::Serving {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never SERVING again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tick whose store JetStream never confirms (the bus silent, the connection not yet
/// known lost) is refused after `--cluster-publish-timeout`, not the client library's own
/// 5 s default, and the Publish call goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_never_confirmed_is_refused_after_the_publish_timeout() {
    let nats = Nats::start();
    let proxy = Proxy::start(nats.port).await;
    let a = node_with(&proxy.url(), |c| {
        // Pings so rare the cut goes unnoticed: only the ack's wait can end the publish.
        c.cluster.cluster_ping_interval = Duration::from_secs(60);
        c.cluster.cluster_unhealthy_after = Duration::from_secs(120);
        c.cluster.cluster_publish_timeout = Duration::from_millis(300);
    })
    .await;
    let counts = publish(&mut a.client().await, priced("X", 1, 1)).await;
    assert_eq!((counts.accepted, counts.rejected), (1, 0));

    proxy.cut();
    let mut client = a.client().await;
    let refused = tokio::time::timeout(
        Duration::from_secs(4),
        client.publish(tokio_stream::iter(priced("X", 2, 2))),
    )
    .await
    .expect("refused before async-nats's own 5 s timeout")
    .expect("the Publish call ends with its counts")
    .into_inner();
    assert_eq!((refused.accepted, refused.rejected), (0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_history_is_announced_with_the_exact_count() {
    let nats = Nats::start();
    let proxy = Proxy::start(nats.port).await;
    let history = |c: &mut Config| c.history_size = 4;
    let a = node_with(&nats.url(), history).await;
    let b = node_with(&proxy.url(), history).await;
    publish(&mut a.client().await, priced("X", 1, 1)).await;
    let mut on_b = Stream::open(&mut b.client().await).await;
    on_b.subscribed("X").await;
    on_b.expect(Kind::Snapshot, "X").await;

    proxy.cut();
    on_b.expect(Kind::Stale, "X").await;
    // Seqs 2..=11 while b is cut off; the stream keeps only 8..=11.
    publish(&mut a.client().await, priced("X", 2, 10)).await;
    proxy.heal();
    let (mut lagged, mut ticks, mut live) = (None, Vec::new(), false);
    while !(live && ticks.len() == 4) {
        let msg = on_b.next().await;
        match msg.kind() {
            Kind::Live => live = true,
            Kind::Lagged => lagged = Some(msg.dropped),
            Kind::Tick => ticks.push(msg.seq),
            other => panic!("unexpected {other:?}: {msg:?}"),
        }
    }
    assert_eq!(lagged, Some(6), "seqs 2..=7 are gone, and said so exactly");
    assert_eq!(ticks, [8, 9, 10, 11]);
}

/// A JetStream client of the test's nats-server, to change the stream behind the nodes.
async fn jetstream(nats: &Nats) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(
        async_nats::connect(nats.url())
            .await
            .expect("a client of the test's nats-server"),
    )
}

/// The error a node stops with by itself.
async fn stopped_with_error(node: &mut TestServer) -> String {
    let stopped = within(node.serving())
        .await
        .expect("the serving task ended");
    stopped
        .expect_err("the node stops with an error")
        .to_string()
}

/// A stream the node ended as it stopped: UNAVAILABLE.
async fn ended_unavailable(stream: &mut Stream) {
    let end = common::end(&mut stream.rx)
        .await
        .expect_err("the stream is ended");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_stream_is_recreated_stops_and_says_why() {
    let nats = Nats::start();
    let mut a = node(&nats.url()).await;
    publish(&mut a.client().await, ticks("X", 3)).await;
    let mut stream = Stream::open(&mut a.client().await).await;
    stream.subscribed("X").await;
    stream.expect(Kind::Snapshot, "X").await;
    // The market's stream deleted and made again behind the node's back: its seqs start
    // again at 1, below the node's 3, which would take each new tick for an old one.
    let js = jetstream(&nats).await;
    js.delete_stream("TICKERD").await.expect("stream deleted");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "TICKERD".into(),
        subjects: vec!["TICKERD.t.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream created again");
    let error = stopped_with_error(&mut a).await;
    assert!(
        error.contains("TICKERD was created anew") && error.contains("start the node again"),
        "{error}"
    );
    ended_unavailable(&mut stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_stream_is_deleted_stops_once_it_stays_gone() {
    let nats = Nats::start();
    let mut a = node(&nats.url()).await;
    publish(&mut a.client().await, ticks("X", 1)).await;
    let js = jetstream(&nats).await;
    js.delete_stream("TICKERD").await.expect("stream deleted");
    let error = stopped_with_error(&mut a).await;
    assert!(error.contains("TICKERD was deleted"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_symbol_is_purged_stops_at_the_first_seq_that_goes_back() {
    let nats = Nats::start();
    let [a, mut b] = nodes(&nats.url()).await;
    publish(&mut a.client().await, ticks("X", 3)).await;
    let mut stream = Stream::open(&mut b.client().await).await;
    stream.subscribed("X").await;
    stream.expect(Kind::Snapshot, "X").await;
    let js = jetstream(&nats).await;
    let market = js.get_stream("TICKERD").await.expect("the stream");
    market.purge().await.expect("stream purged");
    // The publishing node finds X's subject empty and stamps seq 1 again: node B, which
    // holds seq 3 of X, must not take it (or what follows) for a tick it has.
    let counts = publish(&mut a.client().await, ticks("X", 1)).await;
    assert_eq!(counts.accepted, 1);
    let error = stopped_with_error(&mut b).await;
    assert!(
        error.contains("a new tick of X with seq 1") && error.contains("purged"),
        "{error}"
    );
    ended_unavailable(&mut stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_authenticates_to_nats_and_a_wrong_token_stops_start_up() {
    let nats = Nats::start_with_token(Some("s3cret-token"));
    let token =
        |t: &'static str| move |c: &mut Config| c.cluster.cluster_token = Some(t.to_string());
    let a = node_with(&nats.url(), token("s3cret-token")).await;
    let counts = publish(&mut a.client().await, ticks("X", 2)).await;
    assert_eq!(counts.accepted, 2);
    let mut config = tickerd::server::config::Config::defaults();
    config.cluster.urls = vec![nats.url()];
    config.cluster.cluster_token = Some("wrong".into());
    let refused = within(tickerd::server::Server::build(config))
        .await
        .err()
        .expect("a wrong token is refused");
    let message = refused.to_string();
    assert!(
        message.contains("cannot connect to NATS") && message.contains("authorization"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_nats_over_mutual_tls_and_an_untrusted_server_stops_start_up() {
    let keys = Keys::new();
    let client = keys
        .ca
        .client(
            "tickerd-node",
            tickerd::transport::devcerts::Validity::days(1),
        )
        .expect("client cert");
    let (cert, key) = (
        keys.write("node.pem", &client.cert),
        keys.write("node.key", &client.key),
    );
    let nats = Nats::start_with_tls([
        keys.path("server.pem"),
        keys.path("server.key"),
        keys.path("ca.pem"),
    ]);
    let tls = {
        let (ca, cert, key) = (keys.path("ca.pem"), cert.clone(), key.clone());
        move |c: &mut Config| {
            c.cluster.cluster_ca = Some(ca);
            c.cluster.cluster_cert = Some(cert);
            c.cluster.cluster_key = Some(key);
        }
    };
    let a = node_with(&nats.url(), tls).await;
    let counts = publish(&mut a.client().await, ticks("X", 2)).await;
    assert_eq!(counts.accepted, 2);
    // Trusting another CA: the server's certificate is refused.
    let other = Keys::new();
    let mut config = Config::defaults();
    config.cluster.urls = vec![nats.url()];
    config.cluster.cluster_ca = Some(other.path("ca.pem"));
    config.cluster.cluster_cert = Some(cert);
    config.cluster.cluster_key = Some(key);
    let refused = within(tickerd::server::Server::build(config))
        .await
        .err()
        .expect("an untrusted server is refused");
    assert!(
        refused.to_string().contains("cannot connect to NATS"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_survives_the_kill_of_its_node_without_a_gap() {
    let nats = Nats::start();
    let args = [
        "--feed",
        "none",
        "--metrics-listen",
        "127.0.0.1:0",
        "--cluster",
        &nats.url(),
    ];
    let mut nodes = vec![
        TickerdProcess::spawn(&args).await,
        TickerdProcess::spawn(&args).await,
    ];
    let mut client = tickerd::client::connect(nodes[0].url())
        .await
        .expect("connect");
    publish(&mut client, priced("X", 1, 1)).await;
    let mut cli = TickerCli::spawn(
        &nodes[0].url(),
        &["--server", &nodes[1].url(), "subscribe", "X"],
    );
    cli.err_line("subscribed X").await;
    // The node the CLI is on: the one with an open stream.
    let mut on = None;
    for (i, node) in nodes.iter().enumerate() {
        let (_, streams) = http_get(node.metrics_addr.expect("metrics"), "/streams").await;
        if streams.contains("TickerStream") {
            on = Some(i);
        }
    }
    let on = on.expect("the CLI's node");
    let other = 1 - on;
    let mut survivor = tickerd::client::connect(nodes[other].url())
        .await
        .expect("connect");
    let mut printed = Vec::new();
    publish(&mut survivor, priced("X", 2, 3)).await;
    read_seqs(&mut cli, &mut printed, 4).await;

    let mut killed = nodes.remove(on);
    killed.child.kill().expect("kill -9");
    let _ = killed.child.wait();
    publish(&mut survivor, priced("X", 5, 3)).await;
    cli.err_line("disconnected").await;
    publish(&mut survivor, priced("X", 8, 3)).await;
    read_seqs(&mut cli, &mut printed, 10).await;
    assert_eq!(
        printed,
        (2..=10).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    cli.child.start_kill().expect("stop the CLI");
    let (_, _, err) = cli.finish().await;
    assert!(!err.contains("gap on X"), "{err}");

    // The killed node, started again, serves the same market from the bus.
    let restarted = TickerdProcess::spawn(&args).await;
    let mut client = tickerd::client::connect(restarted.url())
        .await
        .expect("connect");
    let quote = quotes(&mut client, &["X"]).await;
    assert_eq!((quote[0].seq, quote[0].ltp), (10, 10.0));
}

/// Reads the CLI's tick lines into `seqs` until seq `until` is printed.
async fn read_seqs(cli: &mut TickerCli, seqs: &mut Vec<u64>, until: u64) {
    while seqs.last() != Some(&until) {
        let line = within(cli.stdout.recv())
            .await
            .expect("the CLI's output ended");
        let mut words = line.split_whitespace();
        if words.any(|w| w == "seq") {
            if let Some(seq) = words.next().and_then(|w| w.parse().ok()) {
                seqs.push(seq);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_series_a_cluster_node_exports() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/tickerd.json");
    let text = std::fs::read_to_string(path).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 7, "{exprs:?}");

    // A node with traffic, so every family has a series.
    let nats = Nats::start();
    let a = node(&nats.url()).await;
    publish(&mut a.client().await, ticks("X", 3)).await;
    let mut stream = Stream::open(&mut a.client().await).await;
    stream.subscribed("X").await;
    stream.expect(Kind::Snapshot, "X").await;
    publish(&mut a.client().await, priced("X", 4, 1)).await;
    next_ticks(&mut stream, 1).await;
    let (_, metrics) = a.http_get("/metrics").await;
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(
                exported.contains(name.as_str()),
                "the dashboard queries {name}, which /metrics does not export"
            );
        }
    }
}

/// The `tickerd_*` series names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tickerd_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}
