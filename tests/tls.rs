//! TLS and mutual TLS with certificates made by the test: what connects, what is
//! refused, the handshake bound, rotation on SIGHUP, and start-up refusals.

use crate::common;

use common::{
    tickerd_exit, ticks, tls_call, tls_client, within, Keys, Stream, TestServer, TickerdProcess,
};
use std::time::Duration;
use tickerd::{
    client::{self, Kind},
    transport::devcerts::{DevCa, Validity, LOCAL_NAMES},
};
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn tls_serves_trusting_clients_and_plaintext_fails() {
    let keys = Keys::new();
    let server = TestServer::with(|c| keys.tls(c, false)).await;
    tls_call(&server.url(), keys.client_tls(None))
        .await
        .expect("a client trusting the CA is served");

    let plaintext = format!("http://{}", server.addr);
    let refused = match client::connect(plaintext).await {
        Err(_) => true,
        Ok(mut c) => {
            let request = tickerd::pb::GetQuotesRequest {
                symbols: vec!["ANY".into()],
            };
            within(c.get_quotes(request)).await.is_err()
        }
    };
    assert!(refused, "plaintext HTTP/2 against the TLS port must fail");

    let stranger = DevCa::new("another CA", Validity::days(1)).unwrap();
    let untrusting = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            &stranger.pem().cert,
        ))
        .domain_name("localhost");
    let e = tls_call(&server.url(), untrusting).await.unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // The operator sees why, by reason.
    let failures = "tickerd_tls_handshake_failures_total";
    server
        .metrics_showing(&format!(r#"{failures}{{reason="not_tls"}}"#))
        .await;
    server
        .metrics_showing(&format!(r#"{failures}{{reason="refused_by_client"}} 1"#))
        .await;
}

#[tokio::test]
async fn mtls_accepts_only_valid_client_certificates_and_names_the_caller() {
    let keys = Keys::new();
    // Two I/O threads: the handshakes, failed and good, happen on both.
    let server = TestServer::with(|c| {
        keys.tls(c, true);
        c.io_threads = 2;
    })
    .await;
    let url = server.url();

    assert!(
        tls_call(&url, keys.client_tls(None)).await.is_err(),
        "no client certificate"
    );
    let other_ca = DevCa::new("other CA", Validity::days(1)).unwrap();
    let foreign = other_ca.client("mallory", Validity::days(1)).unwrap();
    assert!(
        tls_call(&url, keys.client_tls(Some(&foreign)))
            .await
            .is_err(),
        "certificate from another CA"
    );
    let expired = keys.ca.client("old", Validity::expired()).unwrap();
    assert!(
        tls_call(&url, keys.client_tls(Some(&expired)))
            .await
            .is_err(),
        "expired certificate"
    );

    let failures = "tickerd_tls_handshake_failures_total";
    server
        .metrics_showing(&format!(
            r#"{failures}{{reason="no_client_certificate"}} 1"#
        ))
        .await;
    server
        .metrics_showing(&format!(
            r#"{failures}{{reason="bad_client_certificate"}} 2"#
        ))
        .await;

    let alice = keys.ca.client("alice", Validity::days(1)).unwrap();
    tls_call(&url, keys.client_tls(Some(&alice)))
        .await
        .expect("valid client certificate");
    let mut client = tls_client(&url, keys.client_tls(Some(&alice)))
        .await
        .unwrap();
    server.hub.publish("ID", 1.0, 0).unwrap();
    let mut stream = Stream::open(&mut client).await;
    stream.subscribed("ID").await;
    let (_, streams) = server.http_get("/streams").await;
    assert!(streams.contains(r#""principal": "CN=alice""#), "{streams}");
}

#[tokio::test]
async fn a_silent_connection_is_dropped_after_the_handshake_bound_without_holding_others() {
    let keys = Keys::new();
    let server = TestServer::with(|c| {
        keys.tls(c, false);
        c.tls_handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Others are served while the silent one waits out its bound.
    tls_call(&server.url(), keys.client_tls(None))
        .await
        .expect("served while another handshake is pending");
    let mut buf = [0u8; 64];
    let n = within(silent.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "the server closes a connection that never handshakes");
    let (_, metrics) = server.http_get("/metrics").await;
    assert!(
        metrics.contains(r#"tickerd_tls_handshake_failures_total{reason="timeout"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn sighup_rotates_certificates_while_open_streams_keep_flowing() {
    let keys = Keys::new();
    let (cert, key) = (keys.path("server.pem"), keys.path("server.key"));
    let mut tickerd = TickerdProcess::spawn(&[
        "--feed",
        "none",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
    .await;
    let url = tickerd.tls_url();
    let mut old_client = tls_client(&url, keys.client_tls(None)).await.unwrap();
    common::publish(&mut old_client, ticks("ROT", 1)).await;
    let mut stream = Stream::open(&mut old_client).await;
    stream.subscribed("ROT").await;
    stream.expect(Kind::Snapshot, "ROT").await;

    // A new CA and certificate replace the files in place.
    let new_ca = DevCa::new("rotated CA", Validity::days(1)).unwrap();
    let new_cert = new_ca.server(&LOCAL_NAMES, Validity::days(1)).unwrap();
    keys.write("server.pem", &new_cert.cert);
    keys.write("server.key", &new_cert.key);
    tickerd.signal("HUP");
    tickerd.log_line(&["TLS certificates reloaded"]).await;

    let trusts_new = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&new_ca.pem().cert))
        .domain_name("localhost");
    tls_call(&url, trusts_new.clone())
        .await
        .expect("new handshakes use the new certificate");
    assert!(
        tls_call(&url, keys.client_tls(None)).await.is_err(),
        "the old certificate is no longer served"
    );
    // The stream opened before the rotation still receives ticks.
    let mut new_client = tls_client(&url, trusts_new.clone()).await.unwrap();
    common::publish(&mut new_client, ticks("ROT", 3)).await;
    for _ in 0..3 {
        stream.expect(Kind::Tick, "ROT").await;
    }

    // A bad file is refused and the rotated certificate stays in service.
    keys.write("server.key", "not a key");
    tickerd.signal("HUP");
    let refused = tickerd.log_line(&["TLS reload refused"]).await;
    assert!(refused.contains("server.key"), "{refused}");
    tls_call(&url, trusts_new)
        .await
        .expect("still serving after a refused reload");
}

#[tokio::test]
async fn bad_tls_and_key_files_stop_start_up_naming_the_file() {
    let keys = Keys::new();
    let expired = keys.ca.server(&LOCAL_NAMES, Validity::expired()).unwrap();
    let other = keys.ca.server(&LOCAL_NAMES, Validity::days(1)).unwrap();
    keys.write("expired.pem", &expired.cert);
    keys.write("expired.key", &expired.key);
    keys.write("other.key", &other.key);
    keys.write("short-secret", "tooshort");
    let p = |name: &str| keys.path(name).to_str().unwrap().to_string();
    let cases: [(Vec<String>, &[&str]); 5] = [
        (
            vec![
                "--tls-cert".into(),
                p("missing.pem"),
                "--tls-key".into(),
                p("server.key"),
            ],
            &["missing.pem", "cannot read"],
        ),
        (
            vec![
                "--tls-cert".into(),
                p("server.pem"),
                "--tls-key".into(),
                p("other.key"),
            ],
            &["do not match", "other.key"],
        ),
        (
            vec![
                "--tls-cert".into(),
                p("expired.pem"),
                "--tls-key".into(),
                p("expired.key"),
            ],
            &["expired.pem", "expired on"],
        ),
        (
            vec![
                "--tls-cert".into(),
                p("server.pem"),
                "--tls-key".into(),
                p("server.key"),
                "--tls-client-ca".into(),
                p("nothing-here.pem"),
            ],
            &["nothing-here.pem", "cannot read"],
        ),
        (
            vec!["--jwt-secret-file".into(), p("short-secret")],
            &["short-secret", "at least 32"],
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = tickerd_exit(&args).await;
        assert_ne!(code, 0, "{args:?} started");
        for needle in expected {
            assert!(stderr.contains(needle), "{args:?}: {stderr}");
        }
    }
}

#[tokio::test]
async fn a_plaintext_unauthenticated_public_listener_is_refused() {
    let (code, stderr) = tickerd_exit(&["--listen", "0.0.0.0:0"]).await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("without TLS and without authentication") && stderr.contains("--insecure"),
        "{stderr}"
    );
}
