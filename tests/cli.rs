//! The real `ticker` binary against a real server.

use crate::common;

use common::{publish, ticks, token, Keys, Stream, TestServer, TickerCli};
use std::time::Duration;
use tickerd::{client::Kind, pb::PublishRequest};

#[tokio::test]
async fn subscribe_prints_ticks_of_exactly_its_symbols_and_follows_stdin() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for s in ["AAA", "BBB", "CCC"] {
        publish(&mut client, ticks(s, 1)).await;
    }
    let mut cli = TickerCli::spawn(&server.url(), &["subscribe", "AAA", "BBB"]);
    cli.err_line("subscribed AAA").await;
    cli.err_line("subscribed BBB").await;
    cli.err_line("snapshot BBB").await;
    publish(
        &mut client,
        vec![
            PublishRequest::new("CCC", 9.0),
            PublishRequest::new("AAA", 5.0),
        ],
    )
    .await;
    publish(&mut client, vec![PublishRequest::new("BBB", 7.0)]).await;
    let a = cli.stdout.recv().await.unwrap();
    let b = cli.stdout.recv().await.unwrap();
    assert!(
        a.contains("AAA") && a.contains("5.0000") && a.contains("+4.0000") && a.contains("seq 2"),
        "{a}"
    );
    assert!(b.contains("BBB") && b.contains("7.0000"), "{b}");

    // +SYM / -SYM on stdin change the subscription
    cli.type_line("+CCC").await;
    cli.err_line("subscribed CCC").await;
    cli.type_line("-AAA").await;
    cli.err_line("unsubscribed AAA").await;
    cli.type_line("nonsense").await;
    cli.err_line("type +SYMBOL to subscribe").await;
    publish(
        &mut client,
        vec![
            PublishRequest::new("AAA", 6.0),
            PublishRequest::new("CCC", 10.0),
        ],
    )
    .await;
    let c = cli.stdout.recv().await.unwrap();
    assert!(
        c.contains("CCC") && c.contains("seq 3"),
        "AAA must not print after -AAA: {c}"
    );
}

#[tokio::test]
async fn subscribe_json_lines_parse_and_rejections_are_explained() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("JSN", 1)).await;
    let mut cli = TickerCli::spawn(&server.url(), &["subscribe", "--json", "NOPE", "JSN"]);
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(common::within(cli.stderr.recv()).await.unwrap());
    }
    for expected in [
        "rejected \"NOPE\": unknown symbol",
        "subscribed JSN",
        "snapshot JSN",
    ] {
        assert!(
            events.iter().any(|e| e.contains(expected)),
            "{expected:?} not in {events:?}"
        );
    }
    publish(&mut client, vec![PublishRequest::new("JSN", 2.5)]).await;
    let line = cli.stdout.recv().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
    assert_eq!(
        (v["symbol"].as_str(), v["ltp"].as_f64(), v["seq"].as_u64()),
        (Some("JSN"), Some(2.5), Some(2))
    );
    assert!(
        v["latency_us"].is_i64() && v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{v}"
    );
}

#[tokio::test]
async fn quote_and_health() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("QQQ", 3)).await;
    let (code, out, err) = TickerCli::spawn(&server.url(), &["quote", "QQQ", "NOPE"])
        .finish()
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines().next().is_some_and(|h| h.starts_with("SYMBOL")),
        "{out}"
    );
    assert!(
        out.contains("QQQ") && out.contains("3.0000") && out.contains(" 3 "),
        "{out}"
    );
    assert!(err.contains("no quote for \"NOPE\""), "{err}");

    let (code, out, _) = TickerCli::spawn(&server.url(), &["quote", "--json", "QQQ"])
        .finish()
        .await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(v["seq"].as_u64(), Some(3));

    let (code, out, _) = TickerCli::spawn(&server.url(), &["health"]).finish().await;
    assert_eq!((code, out.as_str()), (0, "SERVING"));
    let (code, _, err) = TickerCli::spawn(&server.url(), &["quote", "BAD SYM"])
        .finish()
        .await;
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("not allowed"), "{err}");
}

#[tokio::test]
async fn unreachable_server_is_a_sentence_and_exit_3() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let (code, _, err) = TickerCli::spawn(&url, &["health"]).finish().await;
    assert_eq!(code, 3);
    assert_eq!(
        err,
        format!("ticker: cannot reach 127.0.0.1:{port}: connection refused")
    );
    let (code, _, err) = TickerCli::spawn(&url, &["subscribe", "--max-retries", "2", "X"])
        .finish()
        .await;
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("reconnecting in") && err.contains("giving up after 3 attempts"),
        "{err}"
    );
}

#[tokio::test]
async fn tls_on_one_side_only_or_an_untrusted_server_comes_with_a_hint() {
    let keys = Keys::new();
    let tls = TestServer::with(|c| keys.tls(c, false)).await;
    let plain = TestServer::start().await;
    let ca = keys.path("ca.pem");
    let ca = ca.to_str().unwrap();
    let cases = [
        (
            format!("http://{}", tls.addr),
            vec![],
            "if the server uses TLS, use https://",
        ),
        (tls.url(), vec![], "give the CA that signed it with --ca"),
        (
            format!("https://{}", plain.addr),
            vec!["--ca", ca],
            "the server does not speak TLS there: use http://",
        ),
    ];
    for (url, mut args, hint) in cases {
        args.push("health");
        let (code, _, err) = TickerCli::spawn(&url, &args).finish().await;
        assert_eq!(code, 3, "{url}: {err}");
        assert!(err.contains(hint), "{url}: {err}");
    }
}

#[tokio::test]
async fn publish_from_a_file_lands_in_subscribers() {
    let server = TestServer::with(|c| c.allow_unknown_symbols = true).await;
    let mut client = server.client().await;
    let mut watcher = Stream::open(&mut client).await;
    watcher.subscribed("PUB").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ticks.csv");
    std::fs::write(
        &path,
        "PUB,1.5\nPUB,oops\nPUB,2.5,1700000000000000000\n# done\n",
    )
    .unwrap();
    let file = path.to_str().unwrap();
    let (code, out, err) = TickerCli::spawn(&server.url(), &["publish", file])
        .finish()
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "sent 2: accepted 2, rejected 0; 1 malformed lines skipped"
    );
    assert!(
        err.contains("line 2: price \"oops\" is not a number; skipped"),
        "{err}"
    );
    assert_eq!(watcher.expect(Kind::Tick, "PUB").await.ltp, 1.5);
    let second = watcher.expect(Kind::Tick, "PUB").await;
    assert_eq!(
        (second.ltp, second.event_time_unix_nanos),
        (2.5, 1_700_000_000_000_000_000)
    );
}

/// Subscribes with the CLI, takes the server down while 4 ticks are published, brings
/// it back on the same port and hub; returns the CLI and the new server.
async fn outage(history_size: usize) -> (TickerCli, TestServer) {
    let mut server = TestServer::with(|c| c.history_size = history_size).await;
    let (addr, hub) = (server.addr, server.hub.clone());
    let mut client = server.client().await;
    publish(&mut client, ticks("GAP", 1)).await;
    let mut cli = TickerCli::spawn(&server.url(), &["subscribe", "GAP"]);
    cli.err_line("snapshot GAP").await;
    publish(&mut client, ticks("GAP", 2)).await;
    cli.out_line("seq 3").await;

    // Stop the server; ticks keep arriving in the hub while it is down.
    server.shutdown().await.unwrap().unwrap();
    cli.err_line("disconnected").await;
    for price in [10.0, 11.0, 12.0, 13.0] {
        hub.publish("GAP", price, 0).unwrap();
    }
    let server = TestServer::restart(addr, hub).await;
    cli.err_line("reconnected; resubscribing to 1 symbols")
        .await;
    (cli, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_resumes_after_a_restart_without_losing_a_tick() {
    let (mut cli, server) = outage(1024).await;
    let resumed = cli.err_line("resumed GAP").await;
    assert!(
        resumed.contains("replays the 4 ticks published during the outage (seq 4 to 7)"),
        "{resumed}"
    );
    for seq in 4..=7 {
        cli.out_line(&format!("seq {seq} ")).await;
    }
    let mut client = server.client().await;
    publish(&mut client, ticks("GAP", 1)).await;
    cli.out_line("seq 8 ").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_reports_the_gap_when_the_outage_outlasts_the_history() {
    let (mut cli, server) = outage(2).await;
    let gap = cli.err_line("gap on GAP").await;
    assert!(
        gap.contains("missed 3 ticks during the outage (last seen seq 3, now seq 7)"),
        "{gap}"
    );
    cli.err_line("snapshot GAP: last 13.0000 (seq 7").await;
    let mut client = server.client().await;
    publish(&mut client, ticks("GAP", 1)).await;
    cli.out_line("seq 8").await;
}

#[tokio::test]
async fn a_bad_token_exits_4_without_retrying_and_a_good_one_works() {
    let keys = Keys::new();
    let server = TestServer::with(|c| keys.jwt(c)).await;
    server.hub.publish("TOK", 1.0, 0).unwrap();
    let url = server.url();
    let (code, _, err) = TickerCli::spawn(&url, &["--token", "bad", "subscribe", "TOK"])
        .finish()
        .await;
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("not authenticated: missing or invalid credentials")
            && !err.contains("reconnecting"),
        "{err}"
    );
    let (code, _, err) = TickerCli::spawn_env(&url, &["quote", "TOK"], &[("TICKER_TOKEN", "bad")])
        .finish()
        .await;
    assert_eq!(code, 4, "{err}");
    let good = token("alice", "TOK", None, Duration::from_secs(60));
    let (code, out, err) =
        TickerCli::spawn_env(&url, &["quote", "TOK"], &[("TICKER_TOKEN", &good)])
            .finish()
            .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("TOK"), "{out}");
    let (code, _, err) =
        TickerCli::spawn_env(&url, &["quote", "OTHER"], &[("TICKER_TOKEN", &good)])
            .finish()
            .await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("not entitled to OTHER"), "{err}");
}

#[tokio::test]
async fn ctrl_c_ends_subscribe_with_130() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("INT", 1)).await;
    let mut cli = TickerCli::spawn(&server.url(), &["subscribe", "INT"]);
    cli.err_line("snapshot INT").await;
    let pid = cli.child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-s", "INT", &pid])
        .status()
        .unwrap()
        .success());
    let (code, _, _) = cli.finish().await;
    assert_eq!(code, 130);
}

#[tokio::test]
async fn several_servers_are_balanced_and_a_dead_one_is_routed_around() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("LB", 2)).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    for _ in 0..3 {
        let (code, out, err) = TickerCli::spawn(&server.url(), &["--server", &dead, "quote", "LB"])
            .finish()
            .await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("LB"), "{out}");
    }
}

#[tokio::test]
async fn streams_lists_the_open_streams() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    publish(&mut client, ticks("ST", 1)).await;
    let mut stream = Stream::open(&mut client).await;
    stream.subscribed("ST").await;
    let metrics = server.metrics_addr.to_string();
    let (code, out, err) = TickerCli::spawn(&server.url(), &["streams", "--metrics", &metrics])
        .finish()
        .await;
    assert_eq!(code, 0, "{err}");
    let row = out.lines().nth(1).expect(&out);
    assert!(
        row.contains("TickerStream") && row.contains("anonymous") && row.contains("127.0.0.1:"),
        "{out}"
    );
    let (code, out, _) =
        TickerCli::spawn(&server.url(), &["streams", "--json", "--metrics", &metrics])
            .finish()
            .await;
    assert_eq!(code, 0);
    let list: Vec<tickerd::ops::metrics::StreamView> = serde_json::from_str(&out).expect(&out);
    assert_eq!(list.len(), 1);
}

/// The README's "Securing tickerd" quickstart, end to end: `ticker certs`, `ticker
/// token`, a TLS + mTLS + JWT server on those files, and the CLI with all of them.
#[tokio::test]
async fn the_security_quickstart_works_with_certs_and_tokens_made_by_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dev");
    let out_s = out.to_str().unwrap();
    let (code, _, err) = TickerCli::spawn("unused", &["certs", "--out", out_s])
        .finish()
        .await;
    assert_eq!(code, 0, "{err}");
    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ] {
        assert!(out.join(f).exists(), "{f} missing: {err}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("client.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private keys are owner-only");
    }
    // A second run reuses the CA and adds another client.
    let (code, _, err) = TickerCli::spawn("unused", &["certs", "--out", out_s, "--client", "bob"])
        .finish()
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("using the existing CA") && out.join("bob.pem").exists(),
        "{err}"
    );

    let secret = dir.path().join("jwt.secret");
    std::fs::write(&secret, "a-development-secret-of-more-than-32-bytes\n").unwrap();
    let server = TestServer::with(|c| {
        c.tls_cert = Some(out.join("server.pem"));
        c.tls_key = Some(out.join("server.key"));
        c.tls_client_ca = Some(out.join("ca.pem"));
        c.jwt_secret_file = Some(secret.clone());
    })
    .await;
    server.hub.publish("AAPL", 190.0, 0).unwrap();
    let (code, token, err) = TickerCli::spawn(
        "unused",
        &[
            "token",
            "--secret-file",
            secret.to_str().unwrap(),
            "--sub",
            "alice",
            "--symbols",
            "AAPL MSFT*",
            "--ttl",
            "1h",
            "--scope",
            "publish",
        ],
    )
    .finish()
    .await;
    assert_eq!(code, 0, "{err}");
    let p = |f: &str| out.join(f).to_str().unwrap().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client.key"));
    let tls_args = [
        "--ca",
        ca.as_str(),
        "--cert",
        cert.as_str(),
        "--key",
        key.as_str(),
    ];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = tls_args.to_vec();
        args.extend_from_slice(extra);
        TickerCli::spawn_env(&server.url(), &args, &[("TICKER_TOKEN", token.trim())])
    };
    let (code, out_text, err) = run(&["quote", "AAPL"]).finish().await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out_text.contains("AAPL") && out_text.contains("190"),
        "{out_text}"
    );
    let (code, _, err) = run(&["quote", "GOOG"]).finish().await;
    assert_eq!(code, 4, "{err}");

    // Without the client certificate the TLS handshake is refused.
    let (code, _, err) = TickerCli::spawn_env(
        &server.url(),
        &["--ca", ca.as_str(), "quote", "AAPL"],
        &[("TICKER_TOKEN", token.trim())],
    )
    .finish()
    .await;
    // A connection failure, not a rejected request, with the way out: the alert's hint,
    // or, when hyper still held the request as the alert arrived, "connection closed"'s.
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("give --cert and --key"), "{err}");
}
