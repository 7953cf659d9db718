//! JWT bearer auth against the real server: every refused token, the accepted
//! algorithms, entitlements on every RPC, expiry mid-stream, in-band refresh, health
//! and reflection, and the token never reaching the log.

use crate::common;

use std::time::Duration;

use common::{
    bearer, end, raw_token, token, unix_now, within, Keys, Stream, TestServer, TickerdProcess,
    SECRET,
};
use serde_json::json;
use tickerd::{
    client::{Client, Kind},
    pb::{GetQuotesRequest, PublishRequest, SubscribeRequest, TickerRequest},
};
use tonic::Code;

const GENERIC: &str = "missing or invalid credentials";
const ISSUER: &str = "tickerd-tests";
const AUDIENCE: &str = "market";

async fn jwt_server(keys: &Keys, leeway: Duration) -> TestServer {
    let server = TestServer::with(|c| {
        keys.jwt(c);
        c.jwt_issuer = Some(ISSUER.into());
        c.jwt_audience = Some(AUDIENCE.into());
        c.jwt_leeway = leeway;
    })
    .await;
    for s in ["AAPL", "MSFTX", "GOOG", "A", "B"] {
        server.hub.publish(s, 100.0, 0).unwrap();
    }
    server
}

/// Claims the test server accepts, for `sub`, valid for a minute.
fn claims(sub: &str, symbols: &str) -> serde_json::Value {
    json!({"sub": sub, "exp": unix_now() + 60, "iss": ISSUER, "aud": AUDIENCE, "symbols": symbols})
}

fn hs256() -> serde_json::Value {
    json!({"alg": "HS256", "typ": "JWT"})
}

/// A token for the test server's issuer and audience.
fn good(sub: &str, symbols: &str, scope: Option<&str>, ttl: Duration) -> String {
    let mut c = claims(sub, symbols);
    c["exp"] = json!(unix_now() + ttl.as_secs());
    if let Some(scope) = scope {
        c["scope"] = json!(scope);
    }
    raw_token(hs256(), c)
}

async fn quotes(
    client: &mut Client,
    token: Option<&str>,
    symbols: &[&str],
) -> Result<(), tonic::Status> {
    let request = GetQuotesRequest {
        symbols: symbols.iter().map(|s| s.to_string()).collect(),
    };
    within(client.get_quotes(bearer(request, token)))
        .await
        .map(|_| ())
}

/// GetQuotes with a raw `authorization` value (or none).
async fn with_header(client: &mut Client, value: Option<&str>) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(GetQuotesRequest {
        symbols: vec!["AAPL".into()],
    });
    if let Some(v) = value {
        request
            .metadata_mut()
            .insert("authorization", v.parse().unwrap());
    }
    within(client.get_quotes(request)).await.map(|_| ())
}

#[tokio::test]
async fn every_bad_token_is_unauthenticated_with_a_generic_message() {
    let keys = Keys::new();
    let server = jwt_server(&keys, Duration::from_secs(30)).await;
    let mut client = server.client().await;
    let now = unix_now();
    let with = |patch: serde_json::Value| {
        let mut c = claims("alice", "*");
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let other_secret = {
        let key = jsonwebtoken::EncodingKey::from_secret(b"some-other-secret-0123456789abcdef");
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims("alice", "*"),
            &key,
        )
        .unwrap()
    };
    let valid = raw_token(hs256(), claims("alice", "*"));
    let huge = raw_token(hs256(), with(json!({"pad": "x".repeat(9000)})));
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no authorization", None, "missing"),
        ("not a JWT", Some("Bearer abc.def".into()), "malformed"),
        (
            "signed with another secret",
            Some(format!("Bearer {other_secret}")),
            "signature",
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                raw_token(hs256(), with(json!({"exp": now - 120})))
            )),
            "expired",
        ),
        (
            "not yet valid",
            Some(format!(
                "Bearer {}",
                raw_token(hs256(), with(json!({"nbf": now + 120})))
            )),
            "not_yet_valid",
        ),
        (
            "wrong issuer",
            Some(format!(
                "Bearer {}",
                raw_token(hs256(), with(json!({"iss": "evil"})))
            )),
            "issuer",
        ),
        (
            "wrong audience",
            Some(format!(
                "Bearer {}",
                raw_token(hs256(), with(json!({"aud": "other"})))
            )),
            "audience",
        ),
        (
            "alg none",
            Some(format!(
                "Bearer {}",
                raw_token(json!({"alg": "none"}), claims("alice", "*"))
            )),
            "algorithm",
        ),
        (
            "exp as a string",
            Some(format!(
                "Bearer {}",
                raw_token(hs256(), with(json!({"exp": "99999999999"})))
            )),
            "claims",
        ),
        (
            "nbf as a string",
            Some(format!(
                "Bearer {}",
                raw_token(hs256(), with(json!({"nbf": "99999999999"})))
            )),
            "claims",
        ),
        (
            "no exp",
            Some(format!(
                "Bearer {}",
                raw_token(hs256(), with(json!({"exp": null})))
            )),
            "claims",
        ),
        (
            "no sub",
            Some(format!(
                "Bearer {}",
                raw_token(hs256(), with(json!({"sub": null})))
            )),
            "claims",
        ),
        ("over 8 KiB", Some(format!("Bearer {huge}")), "too_large"),
        (
            "lowercase bearer",
            Some(format!("bearer {valid}")),
            "scheme",
        ),
        ("no scheme", Some(valid.clone()), "scheme"),
    ];
    for (what, header, _) in &cases {
        let status = with_header(&mut client, header.as_deref())
            .await
            .expect_err(what);
        assert_eq!(
            (status.code(), status.message()),
            (Code::Unauthenticated, GENERIC),
            "{what}"
        );
    }
    // The same refusal opens no stream.
    let status = Stream::try_open(&mut client, Some("abc"))
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), Code::Unauthenticated);
    // The reason is counted (and logged) on the server side only.
    let (_, metrics) = server.http_get("/metrics").await;
    for (what, _, reason) in &cases {
        assert!(
            metrics.contains(&format!(
                "tickerd_auth_failures_total{{reason=\"{reason}\"}}"
            )),
            "{what}: no {reason} in {metrics}"
        );
    }
    with_header(&mut client, Some(&format!("Bearer {valid}")))
        .await
        .expect("the valid token works");
}

#[tokio::test]
async fn asymmetric_keys_accept_their_algorithm_only() {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let keys = Keys::new();
    let rsa = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
    let rsa_public = rsa
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let rsa_private = rsa.to_pkcs8_pem(LineEnding::LF).unwrap();
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let cases = [
        (
            "rsa.pem",
            rsa_public.clone(),
            jsonwebtoken::EncodingKey::from_rsa_pem(rsa_private.as_bytes()).unwrap(),
            jsonwebtoken::Algorithm::RS256,
        ),
        (
            "ec.pem",
            ec.public_key_pem(),
            jsonwebtoken::EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
            jsonwebtoken::Algorithm::ES256,
        ),
        (
            "ed.pem",
            ed.public_key_pem(),
            jsonwebtoken::EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap(),
            jsonwebtoken::Algorithm::EdDSA,
        ),
    ];
    let body = json!({"sub": "alice", "exp": unix_now() + 60, "symbols": "*"});
    for (file, public, signing, alg) in cases {
        let path = keys.write(file, &public);
        let server = TestServer::with(|c| c.jwt_public_key = Some(path)).await;
        server.hub.publish("AAPL", 1.0, 0).unwrap();
        let mut client = server.client().await;
        let signed =
            jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &body, &signing).unwrap();
        quotes(&mut client, Some(&signed), &["AAPL"])
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e:?}"));
        // The classic confusion: HS256 signed with the public key as the secret.
        let key = jsonwebtoken::EncodingKey::from_secret(public.as_bytes());
        let confused = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &body,
            &key,
        )
        .unwrap();
        let status = quotes(&mut client, Some(&confused), &["AAPL"])
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "HS256 to a {alg:?} server"
        );
        let hs = token("alice", "*", None, Duration::from_secs(60));
        let status = quotes(&mut client, Some(&hs), &["AAPL"]).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{alg:?}");
    }
}

#[tokio::test]
async fn entitlements_hold_on_every_rpc() {
    let keys = Keys::new();
    let server = jwt_server(&keys, Duration::from_secs(30)).await;
    let mut client = server.client().await;
    let reader = good("alice", "AAPL MSFT*", None, Duration::from_secs(60));

    let mut stream = Stream::try_open(&mut client, Some(&reader)).await.unwrap();
    stream.subscribe("GOOG").await;
    let r = stream.expect(Kind::Rejected, "GOOG").await;
    assert_eq!(r.detail, "not entitled to GOOG");
    stream.subscribed("MSFTX").await;
    stream.expect(Kind::Snapshot, "MSFTX").await;
    stream.subscribed("AAPL").await;
    stream.expect(Kind::Snapshot, "AAPL").await;

    let request = SubscribeRequest {
        symbols: vec!["AAPL".into(), "GOOG".into()],
    };
    let status = within(client.subscribe(bearer(request, Some(&reader))))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::PermissionDenied, "not entitled to GOOG")
    );

    let status = quotes(&mut client, Some(&reader), &["AAPL", "GOOG"])
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::PermissionDenied, "not entitled to GOOG")
    );
    quotes(&mut client, Some(&reader), &["AAPL", "MSFTX"])
        .await
        .unwrap();

    let ticks = || {
        tokio_stream::iter(vec![
            PublishRequest::new("AAPL", 101.0),
            PublishRequest::new("GOOG", 1.0),
        ])
    };
    let status = within(client.publish(bearer(ticks(), Some(&reader))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("publish"), "{}", status.message());
    let publisher = good("feed", "AAPL", Some("publish"), Duration::from_secs(60));
    let counts = within(client.publish(bearer(ticks(), Some(&publisher))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (counts.accepted, counts.rejected),
        (1, 1),
        "GOOG is outside the publisher's symbols"
    );
    let tick = stream.expect(Kind::Tick, "AAPL").await;
    assert_eq!(tick.ltp, 101.0);
}

#[tokio::test]
async fn a_stream_ends_unauthenticated_when_its_token_expires() {
    let keys = Keys::new();
    let server = jwt_server(&keys, Duration::ZERO).await;
    let mut client = server.client().await;
    let short = good("alice", "*", None, Duration::from_secs(2));
    let mut stream = Stream::try_open(&mut client, Some(&short)).await.unwrap();
    stream.subscribed("A").await;
    stream.expect(Kind::Snapshot, "A").await;
    server.hub.publish("A", 1.0, 0).unwrap();
    stream.expect(Kind::Tick, "A").await;
    let status = end(&mut stream.rx).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unauthenticated, "token expired")
    );
    let (_, metrics) = server.http_get("/metrics").await;
    assert!(
        metrics.contains(r#"tickerd_streams_ended_total{reason="auth_expiry"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_in_band_token_extends_the_stream_and_narrows_its_entitlements() {
    let keys = Keys::new();
    let server = jwt_server(&keys, Duration::ZERO).await;
    let mut client = server.client().await;
    let first_exp = unix_now() + 2;
    let short = good("alice", "A B", None, Duration::from_secs(2));
    let mut stream = Stream::try_open(&mut client, Some(&short)).await.unwrap();
    for s in ["A", "B"] {
        stream.subscribed(s).await;
        stream.expect(Kind::Snapshot, s).await;
    }
    let longer = good("alice", "A", None, Duration::from_secs(60));
    stream.send(TickerRequest::refresh_token(longer)).await;
    let gone = stream.expect(Kind::Unsubscribed, "B").await;
    assert_eq!(gone.detail, "not entitled under the refreshed token");
    let ack = stream.expect(Kind::TokenRefreshed, "").await;
    assert!(
        ack.detail.starts_with("token accepted; valid until "),
        "{}",
        ack.detail
    );

    // Past the first token's expiry (no event marks it), the stream still flows.
    let wait = (first_exp + 1).saturating_sub(unix_now());
    tokio::time::sleep(Duration::from_secs(wait)).await;
    server.hub.publish("A", 2.0, 0).unwrap();
    server.hub.publish("B", 2.0, 0).unwrap();
    let tick = stream.expect(Kind::Tick, "A").await;
    assert_eq!(tick.ltp, 2.0);
}

#[tokio::test]
async fn a_refresh_with_another_subject_or_a_bad_token_ends_the_stream() {
    let keys = Keys::new();
    let server = jwt_server(&keys, Duration::from_secs(30)).await;
    let mut client = server.client().await;
    let alice = good("alice", "*", None, Duration::from_secs(60));
    let expired = {
        let mut c = claims("alice", "*");
        c["exp"] = json!(unix_now() - 120);
        raw_token(hs256(), c)
    };
    for (what, refresh) in [
        (
            "another subject",
            good("bob", "*", None, Duration::from_secs(60)),
        ),
        ("expired", expired),
        ("garbage", "x.y.z".to_string()),
    ] {
        let mut stream = Stream::try_open(&mut client, Some(&alice)).await.unwrap();
        stream.subscribed("A").await;
        stream.send(TickerRequest::refresh_token(refresh)).await;
        let status = end(&mut stream.rx).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{what}");
        assert!(
            status.message().contains("refresh refused"),
            "{what}: {}",
            status.message()
        );
    }
}

#[tokio::test]
async fn a_refresh_on_a_server_without_tokens_is_rejected_in_band() {
    let server = TestServer::start().await;
    server.hub.publish("A", 1.0, 0).unwrap();
    let mut client = server.client().await;
    let mut stream = Stream::open(&mut client).await;
    stream.send(TickerRequest::refresh_token("whatever")).await;
    let r = stream.expect(Kind::Rejected, "").await;
    assert!(r.detail.contains("does not use tokens"), "{}", r.detail);
    stream.subscribed("A").await;
}

#[tokio::test]
async fn health_needs_no_token_and_reflection_needs_one() {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    use tonic_reflection::pb::v1;
    let keys = Keys::new();
    let server = jwt_server(&keys, Duration::from_secs(30)).await;
    let channel = server.channel().await;
    let status = within(
        HealthClient::new(channel.clone()).check(HealthCheckRequest {
            service: "ticker.v1.TickerStreamService".into(),
        }),
    )
    .await
    .expect("health without a token")
    .into_inner();
    assert_eq!(status.status, 1, "SERVING");

    let list = || {
        tokio_stream::once(v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        })
    };
    let mut reflection = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let status = within(reflection.server_reflection_info(bearer(list(), None)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let ok = good("alice", "", None, Duration::from_secs(60));
    let mut replies = within(reflection.server_reflection_info(bearer(list(), Some(&ok))))
        .await
        .expect("reflection with a token")
        .into_inner();
    let reply = within(replies.message()).await.unwrap().unwrap();
    assert!(format!("{reply:?}").contains("ticker.v1.TickerStreamService"));
}

#[tokio::test]
async fn tokens_never_reach_the_log_even_at_trace_level() {
    let keys = Keys::new();
    let secret = keys.path("secret");
    let mut tickerd = TickerdProcess::spawn_with_env(
        &[
            "--feed",
            "none",
            "--jwt-secret-file",
            secret.to_str().unwrap(),
            "--web-listen",
            "127.0.0.1:0",
        ],
        &[("RUST_LOG", "trace")],
    )
    .await;
    let mut client = tickerd::client::connect(tickerd.url()).await.unwrap();
    let good_token = token("alice", "*", Some("publish"), Duration::from_secs(60));
    let forged = {
        let key = jsonwebtoken::EncodingKey::from_secret(b"forged-forged-forged-forged-forged");
        let body = json!({"sub": "alice", "exp": unix_now() + 60});
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &body, &key).unwrap()
    };
    let ticks = tokio_stream::iter(vec![PublishRequest::new("LOG", 1.0)]);
    within(client.publish(bearer(ticks, Some(&good_token))))
        .await
        .unwrap();
    quotes(&mut client, Some(&good_token), &["LOG"])
        .await
        .unwrap();
    quotes(&mut client, Some(&forged), &["LOG"])
        .await
        .unwrap_err();
    let mut stream = Stream::try_open(&mut client, Some(&good_token))
        .await
        .unwrap();
    stream
        .send(TickerRequest::refresh_token(good_token.clone()))
        .await;
    stream.expect(Kind::TokenRefreshed, "").await;
    // The same tokens over the WebSocket: first message, in-band refresh, a forged one.
    let web = tickerd.web_addr.expect("web listener");
    let mut ws = common::web::Ws::connect(web).await;
    let mut first = TickerRequest::subscribe("LOG");
    first.token = good_token.clone();
    ws.send(&first).await;
    ws.expect(Kind::Subscribed, "LOG").await;
    ws.expect(Kind::Snapshot, "LOG").await;
    ws.send(&TickerRequest::refresh_token(good_token.clone()))
        .await;
    ws.expect(Kind::TokenRefreshed, "").await;
    let mut bad = common::web::Ws::connect(web).await;
    bad.send(&TickerRequest::refresh_token(forged.clone()))
        .await;
    assert_eq!(bad.closed().await.code, 4016);

    tickerd.signal("TERM");
    let mut lines = Vec::new();
    while let Some(line) = within(tickerd.log.recv()).await {
        lines.push(line);
    }
    assert!(
        lines.len() > 10,
        "trace logging produced {} lines",
        lines.len()
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("credentials refused") && l.contains("signature")),
        "the refusal and its reason are logged"
    );
    for secret_part in [&good_token, &forged, SECRET_STR] {
        let signature = secret_part.rsplit('.').next().unwrap();
        let leaked: Vec<&String> = lines.iter().filter(|l| l.contains(signature)).collect();
        assert!(
            leaked.is_empty(),
            "a token or secret reached the log: {leaked:#?}"
        );
    }
}

const SECRET_STR: &str = match std::str::from_utf8(SECRET) {
    Ok(s) => s,
    Err(_) => panic!("the test secret is ASCII"),
};
