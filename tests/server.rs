//! Server-level behaviour: health, reflection, the stream cap, junk on the port,
//! feeds, and the shutdown drain (in process and as the real binary under SIGTERM).

use crate::common;

use common::{end, publish, ticks, within, Stream, TestServer, TickerdProcess};
use tickerd::{client::Kind, pb::GetQuotesRequest, pb::SubscribeRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const SERVICE: &str = "ticker.v1.TickerStreamService";

#[tokio::test]
async fn health_reports_serving_and_reflection_lists_the_services() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", SERVICE] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }

    use tonic_reflection::pb::{v1, v1alpha};
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut v1_client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let mut replies = v1_client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let reply = within(replies.next()).await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&SERVICE.to_string())
            && names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                SERVICE.into(),
            ),
        ),
    };
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let mut replies = alpha
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let reply = within(replies.next()).await.unwrap().unwrap();
    assert!(
        matches!(
            reply.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "{reply:?}"
    );
}

#[tokio::test]
async fn the_global_stream_cap_answers_resource_exhausted() {
    let server = TestServer::with(|c| c.max_streams = 2).await;
    let mut client = server.client().await;
    publish(&mut client, ticks("CAP", 1)).await;
    let first = Stream::open(&mut client).await;
    let _second = Stream::open(&mut client).await;

    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    let err = client
        .ticker_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message()
            .contains("server stream limit reached (2 open streams)"),
        "{}",
        err.message()
    );
    let err = client
        .subscribe(SubscribeRequest {
            symbols: vec!["CAP".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let err = client
        .publish(tokio_stream::iter(ticks("CAP", 1)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // Unary calls are not streams.
    client
        .get_quotes(GetQuotesRequest {
            symbols: vec!["CAP".into()],
        })
        .await
        .unwrap();

    drop(first);
    common::eventually("a slot frees up", || server.service.active_streams() == 1).await;
    let mut third = Stream::open(&mut client).await;
    third.subscribed("CAP").await;
}

#[tokio::test]
async fn junk_on_the_port_is_dropped_and_hurts_nobody() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("JUNK", 1)).await;
    let mut stream = Stream::open(&mut client).await;
    stream.subscribed("JUNK").await;
    stream.expect(Kind::Snapshot, "JUNK").await;

    let junk: [&[u8]; 4] = [
        &[0xde, 0xad, 0xbe, 0xef].repeat(4096),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x08\x00\x00\x00\x00\x00garbage-frame",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    ];
    for bytes in junk {
        let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let _ = socket.write_all(bytes).await;
        // The server closes the connection (after an error reply, if any).
        let mut sink = Vec::new();
        let _ = within(socket.read_to_end(&mut sink)).await;
    }

    publish(&mut client, ticks("JUNK", 1)).await;
    assert_eq!(stream.expect(Kind::Tick, "JUNK").await.seq, 2);
    assert_eq!(server.service.active_streams(), 1);
}

#[tokio::test]
async fn the_simulator_ticks_its_symbols() {
    let server = TestServer::with(|c| {
        c.feed = tickerd::feed::FeedKind::Sim;
        c.symbols = 3;
        c.rate = 3000.0;
    })
    .await;
    assert_eq!(server.hub.symbol_count(), 3);
    let mut stream = Stream::open(&mut server.client().await).await;
    stream.subscribe("SYM2").await;
    stream.expect(Kind::Subscribed, "SYM2").await;
    let mut last = 0;
    for _ in 0..20 {
        let msg = stream.next().await;
        assert_eq!(msg.symbol, "SYM2");
        assert!(msg.seq > last && msg.ltp > 0.0, "{msg:?}");
        last = msg.seq;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_streams_even_with_a_stalled_client() {
    drains_with_a_stalled_client(1).await;
}

/// The streams and the stalled client sit on the second I/O thread (connections are
/// handed out in turn: 1st to the second thread, 2nd to the listening one, ...).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_streams_on_every_io_thread() {
    drains_with_a_stalled_client(2).await;
}

#[tokio::test]
async fn connections_spread_over_io_threads_each_get_every_tick() {
    let server = TestServer::with(|c| c.io_threads = 3).await;
    let mut publisher = server.client().await;
    publish(&mut publisher, ticks("SPREAD", 1)).await;
    let mut streams = Vec::new();
    for _ in 0..6 {
        let mut stream = Stream::open(&mut server.client().await).await;
        stream.subscribed("SPREAD").await;
        stream.expect(Kind::Snapshot, "SPREAD").await;
        streams.push(stream);
    }
    publish(&mut publisher, ticks("SPREAD", 200)).await;
    for stream in &mut streams {
        for seq in 2..=201 {
            let tick = stream.expect(Kind::Tick, "SPREAD").await;
            assert_eq!(tick.seq, seq);
        }
    }
}

async fn drains_with_a_stalled_client(io_threads: u16) {
    let mut server = TestServer::with(|c| c.io_threads = io_threads).await;
    let mut client = server.client().await;
    publish(&mut client, ticks("BYE", 1)).await;
    let channel = server.channel().await;
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        within(watch.message()).await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let mut reading = Stream::open(&mut client).await;
    reading.subscribed("BYE").await;
    reading.expect(Kind::Snapshot, "BYE").await;
    // A client that stopped reading, with its flow-control window full of ticks.
    let mut stalled = Stream::open(&mut server.client().await).await;
    stalled.subscribed("BYE").await;
    publish(&mut client, ticks("BYE", 40_000)).await;
    // The reading client keeps up: it has taken the last tick before the shutdown, so its
    // UNAVAILABLE is not queued behind a full flow-control window, where it would race
    // the drain timeout on a loaded machine (it lost, 1 run in ~70, before this wait).
    loop {
        let msg = reading.next().await;
        if (msg.kind(), msg.seq) == (Kind::Tick, 40_001) {
            break;
        }
    }

    let serving = server.shutdown();
    assert_eq!(
        within(watch.message()).await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    let status = end(&mut reading.rx).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unavailable, "server shutting down")
    );
    // serve() returns once the drain timeout (2 s in tests) has passed, stalled client or not.
    within(serving).await.unwrap().unwrap();
    drop(stalled);
}

#[tokio::test]
async fn tickerd_exits_on_sigterm_within_the_drain_timeout() {
    let mut tickerd = TickerdProcess::spawn(&[
        "--feed",
        "none",
        "--drain-timeout",
        "1s",
        "--channel-capacity",
        "65536",
    ])
    .await;
    let mut client = tickerd::client::connect(tickerd.url()).await.unwrap();
    publish(&mut client, ticks("SIG", 1)).await;
    let mut stream = Stream::open(&mut client).await;
    stream.subscribed("SIG").await;
    stream.expect(Kind::Snapshot, "SIG").await;
    let mut stalled =
        Stream::open(&mut tickerd::client::connect(tickerd.url()).await.unwrap()).await;
    stalled.subscribed("SIG").await;
    publish(&mut client, ticks("SIG", 40_000)).await;
    for seq in 2..=40_001 {
        assert_eq!(stream.expect(Kind::Tick, "SIG").await.seq, seq);
    }

    tickerd.signal("TERM");
    let status = end(&mut stream.rx).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    tickerd.log_line(&["shutting down"]).await;
    let exit = within(tokio::task::spawn_blocking(move || {
        let status = tickerd.child.wait();
        (status, tickerd)
    }))
    .await
    .unwrap()
    .0
    .unwrap();
    assert!(exit.success(), "{exit:?}");
    drop(stalled);
}

#[tokio::test]
async fn replay_feed_publishes_a_file_and_reports_bad_lines_by_number() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ticks.csv");
    std::fs::write(
        &path,
        "# symbol,price,unix_nanos\nAAA,10.5,1000\nAAA,not-a-price\nBBB,20,2000\nAAA,11,3000\n",
    )
    .unwrap();
    let feed = format!("replay:{}", path.display());
    // Configured through the environment, as every flag can be.
    let mut tickerd = TickerdProcess::spawn_with_env(
        &[],
        &[("TICKERD_FEED", &feed), ("TICKERD_REPLAY_SPEED", "0")],
    )
    .await;
    let warning = tickerd.log_line(&["malformed replay line"]).await;
    assert!(
        warning.contains("\"line\":3") && warning.contains("not a number"),
        "{warning}"
    );
    let done = tickerd.log_line(&["replay finished"]).await;
    assert!(
        done.contains("\"published\":3") && done.contains("\"malformed\":1"),
        "{done}"
    );

    let mut client = tickerd::client::connect(tickerd.url()).await.unwrap();
    let quotes = common::quotes(&mut client, &["AAA", "BBB"]).await;
    let got: Vec<_> = quotes
        .iter()
        .map(|q| (q.symbol.as_str(), q.seq, q.ltp))
        .collect();
    assert_eq!(got, vec![("AAA", 2, 11.0), ("BBB", 1, 20.0)]);
}

#[tokio::test]
async fn bad_start_up_inputs_exit_non_zero_naming_the_file() {
    for (args, expect) in [
        (
            vec!["--symbols-file", "/nonexistent/syms.txt"],
            "cannot read symbols file /nonexistent/syms.txt",
        ),
        (
            vec!["--feed", "replay:/nonexistent/t.csv"],
            "cannot open replay file /nonexistent/t.csv",
        ),
        (vec!["--feed", "bogus"], "unknown feed \"bogus\""),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tickerd"))
            .args(["--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn symbols_file_makes_symbols_known_before_their_first_tick() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("symbols.txt");
    std::fs::write(&path, "# listed\nAAPL\nBRK.B  # class B\n\nEUR/USD\n").unwrap();
    let server = TestServer::with(|c| c.symbols_file = Some(path.clone())).await;
    assert_eq!(server.hub.symbol_count(), 3);
    let mut client = server.client().await;
    let mut stream = Stream::open(&mut client).await;
    stream.subscribed("BRK.B").await;
    publish(&mut client, ticks("BRK.B", 1)).await;
    assert_eq!(stream.expect(Kind::Tick, "BRK.B").await.seq, 1);
    // Quotes omit listed symbols that never ticked.
    let quotes = common::quotes(&mut client, &["AAPL", "BRK.B"]).await;
    assert_eq!(quotes.len(), 1);
}
