//! The WebSocket stream (`/v1/stream`) with a real WebSocket client (tokio-tungstenite)
//! against the real server on port 0: the TickerStream semantics in JSON and binary,
//! resume across a reconnect, policies, backpressure (LAGGED for a stalled socket, the
//! STRICT close), auth by first message, origins, and bad frames.

use crate::common;

use std::time::Duration;

use common::{
    publish, ticks, token,
    web::{request, stalled, Closed, Ws},
    Keys, TestServer,
};
use tickerd::{
    client::Kind,
    pb::{ticker_request::DeliveryPolicy, TickerRequest},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_session_subscribes_and_gets_every_tick_in_order() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("AAPL", 1)).await;
    let mut ws = Ws::connect(server.web_addr).await;
    ws.subscribe("AAPL").await;
    let ack = ws.expect(Kind::Subscribed, "AAPL").await;
    assert_eq!(ack.seq, 1);
    ws.expect(Kind::Snapshot, "AAPL").await;
    publish(&mut client, ticks("AAPL", 100)).await;
    for seq in 2..=101 {
        let tick = ws.expect(Kind::Tick, "AAPL").await;
        assert_eq!(tick.seq, seq);
    }
    ws.send(&TickerRequest::unsubscribe("AAPL")).await;
    ws.expect(Kind::Unsubscribed, "AAPL").await;
    // The wire format is the proto3 JSON mapping: 64-bit integers as strings, enum
    // names, lowerCamelCase, the zero kind (a tick) omitted.
    ws.subscribe("AAPL").await;
    let raw = loop {
        match common::within(futures_util::StreamExt::next(&mut ws.socket)).await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => break t.to_string(),
            other => assert!(matches!(other, Some(Ok(_))), "{other:?}"),
        }
    };
    assert!(raw.contains(r#""kind":"KIND_SUBSCRIBED""#), "{raw}");
    assert!(raw.contains(r#""seq":"101""#), "{raw}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_subprotocol_carries_the_same_messages_as_protobuf() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("MSFT", 1)).await;
    let mut ws = Ws::connect_binary(server.web_addr).await;
    ws.subscribe("MSFT").await;
    ws.expect(Kind::Subscribed, "MSFT").await;
    ws.expect(Kind::Snapshot, "MSFT").await;
    publish(&mut client, ticks("MSFT", 50)).await;
    for seq in 2..=51 {
        assert_eq!(ws.expect(Kind::Tick, "MSFT").await.seq, seq);
    }
    // Text has no place on a binary session.
    ws.send_text(r#"{"symbol":"MSFT"}"#).await;
    let closed = ws.closed().await;
    assert_eq!(closed.code, 1003, "{closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_socket_resumes_from_its_last_seq() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("IBM", 10)).await;
    let mut ws = Ws::connect(server.web_addr).await;
    ws.subscribe("IBM").await;
    ws.expect(Kind::Subscribed, "IBM").await;
    let snapshot = ws.expect(Kind::Snapshot, "IBM").await;
    assert_eq!(snapshot.seq, 10);
    drop(ws);
    publish(&mut client, ticks("IBM", 20)).await;
    let mut ws = Ws::connect(server.web_addr).await;
    let mut resume = TickerRequest::subscribe("IBM");
    resume.resume_from_seq = 10;
    resume.epoch = snapshot.epoch;
    ws.send(&resume).await;
    let ack = ws.expect(Kind::Subscribed, "IBM").await;
    assert!(ack.recovered, "{ack:?}");
    for seq in 11..=30 {
        assert_eq!(ws.expect(Kind::Tick, "IBM").await.seq, seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflate_folds_and_a_policy_out_of_range_is_rejected_in_band() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("FX", 1)).await;
    let mut ws = Ws::connect(server.web_addr).await;
    let mut bad = TickerRequest::subscribe("FX");
    bad.policy = DeliveryPolicy::Conflate as i32;
    bad.max_rate_hz = 5000.0;
    ws.send(&bad).await;
    let rejected = ws.expect(Kind::Rejected, "FX").await;
    assert!(rejected.detail.contains("max_rate_hz"), "{rejected:?}");
    let mut conflate = TickerRequest::subscribe("FX");
    conflate.policy = DeliveryPolicy::Conflate as i32;
    conflate.max_rate_hz = 2.0;
    ws.send(&conflate).await;
    ws.expect(Kind::Subscribed, "FX").await;
    ws.expect(Kind::Snapshot, "FX").await;
    publish(&mut client, ticks("FX", 500)).await;
    let (mut covered, mut next) = (0, 2);
    while covered < 500 {
        let msg = ws.expect(Kind::Tick, "FX").await;
        assert_eq!(msg.first_seq, next, "contiguous ranges: {msg:?}");
        covered += msg.count;
        next = msg.seq + 1;
    }
    assert_eq!(next, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_socket_lags_with_exact_counts_while_a_reader_gets_everything() {
    const N: u64 = 40_000;
    let server = TestServer::with(|c| c.channel_capacity = 1024).await;
    let mut client = server.client().await;
    publish(&mut client, ticks("HOT", 1)).await;
    let mut reader = Ws::connect_binary(server.web_addr).await;
    let mut stalled = stalled(server.web_addr, None).await;
    for ws in [&mut reader, &mut stalled] {
        ws.subscribe("HOT").await;
        ws.expect(Kind::Subscribed, "HOT").await;
        ws.expect(Kind::Snapshot, "HOT").await;
    }
    // The reading socket must get every tick however busy the machine: the publisher
    // waits for its acknowledged progress, so it is never more than PACE + 300 ticks
    // ahead of it, well inside the ring (1024); the stalled socket still falls behind.
    const PACE: u64 = 400;
    let (seen, mut progress) = tokio::sync::watch::channel(1u64);
    let publisher = tokio::spawn(async move {
        for batch in 0..N / 200 {
            let published = 1 + batch * 200;
            if progress.wait_for(|&s| published <= s + PACE).await.is_err() {
                return;
            }
            publish(&mut client, ticks("HOT", 200)).await;
        }
    });
    let mut seq = 2;
    while seq <= N + 1 {
        let msg = reader.next().await;
        match msg.kind() {
            // An early warning only; nothing is lost.
            Kind::Backlog => continue,
            Kind::Tick => assert_eq!(msg.seq, seq, "the reading socket missed a tick"),
            other => panic!("the reading socket got {other:?}: {msg:?}"),
        }
        if seq % 100 == 0 {
            seen.send_replace(seq);
        }
        seq += 1;
    }
    publisher.await.expect("publisher");
    // Now the stalled socket reads: every tick either arrives or is announced.
    let (mut got, mut dropped, mut last) = (0, 0, 1);
    while last < N + 1 {
        let msg = stalled.next().await;
        match msg.kind() {
            Kind::Tick => {
                assert_eq!(msg.seq, last + 1, "a gap nobody announced");
                got += 1;
                last = msg.seq;
            }
            Kind::Lagged => {
                dropped += msg.dropped;
                last += msg.dropped;
            }
            Kind::Backlog => {}
            other => panic!("{other:?}: {msg:?}"),
        }
    }
    assert!(dropped > 0, "the socket did stall");
    assert_eq!(got + dropped, N, "every tick arrived or was announced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_subscription_that_falls_behind_closes_the_socket_with_4008() {
    let server = TestServer::with(|c| c.channel_capacity = 64).await;
    let mut client = server.client().await;
    publish(&mut client, ticks("HOT", 1)).await;
    let mut ws = stalled(server.web_addr, None).await;
    let mut strict = TickerRequest::subscribe("HOT");
    strict.policy = DeliveryPolicy::Strict as i32;
    ws.send(&strict).await;
    ws.expect(Kind::Subscribed, "HOT").await;
    ws.expect(Kind::Snapshot, "HOT").await;
    for _ in 0..40 {
        publish(&mut client, ticks("HOT", 1000)).await;
    }
    let mut last = 1;
    let closed = loop {
        match common::within(futures_util::StreamExt::next(&mut ws.socket)).await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let msg: tickerd::pb::TickerResponse =
                    serde_json::from_str(t.as_str()).expect("JSON");
                if msg.kind() == Kind::Backlog {
                    continue;
                }
                assert_eq!(msg.seq, last + 1, "STRICT never skips: {msg:?}");
                last = msg.seq;
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame)))) => {
                break Closed {
                    code: frame.code.into(),
                    reason: frame.reason.to_string(),
                }
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(closed.code, 4008, "{closed:?}");
    assert!(closed.reason.contains("STRICT"), "{closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_the_first_message_must_carry_a_good_token() {
    let keys = Keys::new();
    let server = TestServer::with(|c| {
        keys.jwt(c);
        c.web_auth_timeout = Duration::from_millis(300);
    })
    .await;
    let hour = Duration::from_secs(3600);
    let publisher = token("feed", "*", Some("publish"), hour);
    let mut client = server.client().await;
    common::within(client.publish(common::bearer(
        tokio_stream::iter(ticks("AAPL", 1)),
        Some(&publisher),
    )))
    .await
    .expect("publish");

    // A request before the token.
    let mut ws = Ws::connect(server.web_addr).await;
    ws.subscribe("AAPL").await;
    let closed = ws.closed().await;
    assert_eq!(closed.code, 4016, "{closed:?}");
    assert!(closed.reason.contains("token"), "{closed:?}");
    // A bad token: a generic reason.
    let mut ws = Ws::connect(server.web_addr).await;
    ws.send_text(r#"{"token":"not.a.jwt"}"#).await;
    let closed = ws.closed().await;
    assert_eq!(
        closed,
        Closed {
            code: 4016,
            reason: "missing or invalid credentials".into()
        }
    );
    // Silence past --web-auth-timeout.
    let mut ws = Ws::connect(server.web_addr).await;
    let closed = ws.closed().await;
    assert_eq!(closed.code, 4016, "{closed:?}");
    assert!(closed.reason.contains("no token within"), "{closed:?}");

    // A good token (entitled to AAPL only), with the first subscribe in the same message.
    let mut ws = Ws::connect(server.web_addr).await;
    let mut first = TickerRequest::subscribe("AAPL");
    first.token = token("alice", "AAPL", None, hour);
    ws.send(&first).await;
    ws.expect(Kind::Subscribed, "AAPL").await;
    ws.expect(Kind::Snapshot, "AAPL").await;
    ws.subscribe("MSFT").await;
    let refused = ws.expect(Kind::Rejected, "MSFT").await;
    assert!(refused.detail.contains("not entitled"), "{refused:?}");
    // In-band refresh, as on gRPC.
    ws.send(&TickerRequest {
        token: token("alice", "AAPL", None, hour),
        ..Default::default()
    })
    .await;
    ws.expect(Kind::TokenRefreshed, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_origin_is_refused_with_403() {
    let server = TestServer::with(|c| {
        c.web_allowed_origins = vec!["https://desk.example".into()];
    })
    .await;
    let addr = server.web_addr;
    let refused =
        tokio_tungstenite::connect_async(request(addr, Some("https://evil.example"), None))
            .await
            .expect_err("refused");
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("{other:?}"),
    }
    for origin in ["https://desk.example", &format!("http://{addr}")] {
        let ws = Ws::open(request(addr, Some(origin), None), false).await;
        drop(ws);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_an_in_band_rejection_or_a_clear_close() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("OK", 1)).await;
    let mut ws = Ws::connect(server.web_addr).await;
    for (frame, says) in [
        (r#"{"symbol": 5}"#, "malformed request"),
        (
            r#"{"symbol":"OK","policy":"DELIVERY_POLICY_NOPE"}"#,
            "malformed request",
        ),
        (r#"{"symbol":"OK","surprise":true}"#, "surprise"),
        ("not json", "malformed request"),
    ] {
        ws.send_text(frame).await;
        let msg = ws.expect(Kind::Rejected, "").await;
        assert!(msg.detail.contains(says), "{frame}: {msg:?}");
    }
    // The session is still usable.
    ws.subscribe("OK").await;
    ws.expect(Kind::Subscribed, "OK").await;
    ws.expect(Kind::Snapshot, "OK").await;
    // Binary on a JSON session.
    futures_util::SinkExt::send(
        &mut ws.socket,
        tokio_tungstenite::tungstenite::Message::binary(vec![1, 2, 3]),
    )
    .await
    .expect("send");
    assert_eq!(ws.closed().await.code, 1003);
    // Over the frame limit.
    let mut ws = Ws::connect(server.web_addr).await;
    let huge = format!(r#"{{"symbol":"{}"}}"#, "X".repeat(70 * 1024));
    ws.send_text(&huge).await;
    let closed = ws.closed().await;
    assert_eq!(closed.code, 1009, "{closed:?}");
    // Nobody else noticed.
    let quotes = common::quotes(&mut client, &["OK"]).await;
    assert_eq!(quotes.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_a_reading_socket_and_a_silent_one_is_dropped() {
    let server = TestServer::with(|c| c.web_ping_interval = Duration::from_millis(100)).await;
    let mut client = server.client().await;
    publish(&mut client, ticks("P", 1)).await;
    let mut reading = Ws::connect(server.web_addr).await;
    reading.subscribe("P").await;
    reading.expect(Kind::Subscribed, "P").await;
    reading.expect(Kind::Snapshot, "P").await;
    // A socket that never reads answers no ping.
    let mut silent = Ws::connect(server.web_addr).await;
    silent.subscribe("P").await;
    common::eventually("both sessions open", || {
        server.service.active_streams() == 2
    })
    .await;
    // The reading one sees pings (its client answers them) and stays for ten intervals.
    let (mut pings, until) = (0, tokio::time::Instant::now() + Duration::from_secs(1));
    while let Ok(frame) =
        tokio::time::timeout_at(until, futures_util::StreamExt::next(&mut reading.socket)).await
    {
        match frame {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) => pings += 1,
            other => panic!("the reading socket got {other:?}"),
        }
    }
    assert!(pings >= 5, "{pings} pings in ten intervals");
    common::eventually("the silent socket dropped", || {
        server.service.active_streams() == 1
    })
    .await;
    publish(&mut client, ticks("P", 1)).await;
    assert_eq!(reading.expect(Kind::Tick, "P").await.seq, 2);
    drop(silent);
}
