//! The one harness every integration test uses: a real server on 127.0.0.1:0 (in
//! process, or the real `tickerd` binary), real tonic clients, and helpers that wait
//! for messages with a deadline so a broken server fails a test instead of hanging it.
#![allow(dead_code)]

pub mod browser;
pub mod h2raw;
pub mod nats;
mod process;
pub mod web;

#[allow(unused_imports)]
pub use process::{TickerCli, TickerdProcess};

use std::{future::Future, net::SocketAddr, path::PathBuf, process::Stdio, time::Duration};

use tickerd::{
    auth::MintClaims,
    client::{self, Client, Kind},
    cluster::Cluster,
    hub::Hub,
    pb::{PublishRequest, PublishResponse, TickerRequest, TickerResponse},
    server::config::Config,
    server::Server,
    transport::devcerts::{DevCa, Pem, Validity, LOCAL_NAMES},
    transport::grpc::TickerService,
};
use tokio::{net::TcpListener, sync::mpsc, sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// Longest any single expected event may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    /// `https` when the config turned TLS on.
    pub scheme: &'static str,
    /// The operations endpoint (/metrics, /healthz, /streams).
    pub metrics_addr: SocketAddr,
    /// The web listener (WebSocket, gRPC-Web, board).
    pub web_addr: SocketAddr,
    pub hub: Hub,
    pub service: TickerService,
    /// The cluster's bus, for servers started with `--cluster`.
    pub cluster: Option<Cluster>,
    /// What SIGHUP does (re-read the TLS files), for servers with TLS.
    pub tls_reloader: Option<tickerd::server::TlsReloader>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tickerd::server::ServerError>>>,
}

/// The test defaults: no feed, so every tick is one the test published.
pub fn test_config() -> Config {
    let mut config = Config::defaults();
    config.feed = tickerd::feed::FeedKind::None;
    config.drain_timeout = Duration::from_secs(2);
    config
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::with(|_| {}).await
    }

    pub async fn with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = test_config();
        adjust(&mut config);
        let scheme = if config.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let server = Server::build(config).await.expect("server config");
        let mut server = Self::serve(server, "127.0.0.1:0".parse().unwrap()).await;
        server.scheme = scheme;
        server
    }

    /// A new server on `addr` (a port a stopped server used) around `hub`.
    pub async fn restart(addr: SocketAddr, hub: Hub) -> TestServer {
        let server = Server::with_hub(test_config(), hub).expect("server config");
        Self::serve(server, addr).await
    }

    async fn serve(server: Server, addr: SocketAddr) -> TestServer {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let metrics = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind metrics");
        let metrics_addr = metrics.local_addr().expect("metrics addr");
        let web = TcpListener::bind("127.0.0.1:0").await.expect("bind web");
        let web_addr = web.local_addr().expect("web addr");
        let server = server.metrics_listener(metrics).web_listener(web);
        let (hub, service) = (server.hub().clone(), server.service().clone());
        let cluster = server.cluster().cloned();
        let tls_reloader = server.tls_reloader();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            scheme: "http",
            metrics_addr,
            web_addr,
            hub,
            service,
            cluster,
            tls_reloader,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// GET `path` on the operations endpoint: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics_addr, path).await
    }

    /// An unlabelled counter's value on /metrics (`tickerd_ticks_delivered_total`).
    pub async fn counter(&self, name: &str) -> u64 {
        let (_, body) = self.http_get("/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics: {body}")) as u64
    }

    /// /metrics once it shows `needle`, polled like `eventually`: for counters the server
    /// bumps after the client has already seen the outcome (a refused handshake).
    pub async fn metrics_showing(&self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (_, metrics) = self.http_get("/metrics").await;
            if metrics.contains(needle) {
                return metrics;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/metrics never showed {needle}: {metrics}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A plain channel, for clients of other services (health, reflection, raw codecs).
    pub async fn channel(&self) -> tonic::transport::Channel {
        client::endpoint(self.url())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn client(&self) -> Client {
        client::connect(self.url()).await.expect("connect")
    }

    /// `serve`'s future, not asked to stop: for a server that stops by itself.
    pub fn serving(&mut self) -> JoinHandle<Result<(), tickerd::server::ServerError>> {
        self.task.take().expect("one owner of the serving task")
    }

    /// Signals shutdown and returns `serve`'s future to await.
    pub fn shutdown(&mut self) -> JoinHandle<Result<(), tickerd::server::ServerError>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("shutdown once")
    }
}

/// A minimal HTTP/1.1 GET (the operations endpoint is plain HTTP): (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = within(tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.expect("write");
    let mut raw = String::new();
    within(socket.read_to_string(&mut raw)).await.expect("read");
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A bidirectional TickerStream: requests go in through `tx`.
pub struct Stream {
    pub tx: Option<mpsc::Sender<TickerRequest>>,
    pub rx: Streaming<TickerResponse>,
}

impl Stream {
    pub async fn open(client: &mut Client) -> Stream {
        Self::try_open(client, None).await.expect("open stream")
    }

    /// Opens a stream, with `token` as its bearer token if given.
    pub async fn try_open(client: &mut Client, token: Option<&str>) -> Result<Stream, Status> {
        let (tx, rx) = mpsc::channel(64);
        let request = bearer(ReceiverStream::new(rx), token);
        let response = within(client.ticker_stream(request)).await?;
        Ok(Stream {
            tx: Some(tx),
            rx: response.into_inner(),
        })
    }

    pub async fn send(&self, request: TickerRequest) {
        self.tx
            .as_ref()
            .expect("not half-closed")
            .send(request)
            .await
            .expect("send request");
    }

    pub async fn subscribe(&self, symbol: &str) {
        self.send(TickerRequest::subscribe(symbol)).await;
    }

    pub async fn unsubscribe(&self, symbol: &str) {
        self.send(TickerRequest::unsubscribe(symbol)).await;
    }

    /// Ends the request side; the response side stays open.
    pub fn half_close(&mut self) {
        self.tx = None;
    }

    pub async fn next(&mut self) -> TickerResponse {
        next(&mut self.rx).await
    }

    /// Next message, which must be of `kind` for `symbol`.
    pub async fn expect(&mut self, kind: Kind, symbol: &str) -> TickerResponse {
        let msg = self.next().await;
        assert_eq!(
            (msg.kind(), msg.symbol.as_str()),
            (kind, symbol),
            "unexpected {msg:?}"
        );
        msg
    }

    /// Subscribes and consumes the ack.
    pub async fn subscribed(&mut self, symbol: &str) {
        self.subscribe(symbol).await;
        self.expect(Kind::Subscribed, symbol).await;
    }
}

/// The next message of a response stream, skipping advisory KIND_BACKLOG warnings
/// (see `next_any`); fails on error, end or deadline.
pub async fn next(rx: &mut Streaming<TickerResponse>) -> TickerResponse {
    loop {
        let msg = next_any(rx).await;
        if msg.kind() != Kind::Backlog {
            return msg;
        }
    }
}

/// The next message of a response stream, whatever its kind.
pub async fn next_any(rx: &mut Streaming<TickerResponse>) -> TickerResponse {
    match within(rx.message()).await {
        Ok(Some(msg)) => msg,
        Ok(None) => panic!("stream ended"),
        Err(status) => panic!("stream failed: {status:?}"),
    }
}

/// The stream's end: `Ok(())` for a clean end, else its status.
pub async fn end(rx: &mut Streaming<TickerResponse>) -> Result<(), Status> {
    loop {
        match within(rx.message()).await {
            Ok(Some(_)) => continue,
            Ok(None) => return Ok(()),
            Err(status) => return Err(status),
        }
    }
}

/// Awaits `f`, failing the test past `DEADLINE`.
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("timed out waiting for the server")
}

/// Polls `check` until it holds, failing past `DEADLINE`. For state with no event to
/// await (counters settling after a connection is torn down).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Publishes ticks over one Publish call and returns the server's counts.
pub async fn publish(client: &mut Client, ticks: Vec<PublishRequest>) -> PublishResponse {
    within(client.publish(tokio_stream::iter(ticks)))
        .await
        .expect("publish")
        .into_inner()
}

/// GetQuotes for `symbols`.
pub async fn quotes(client: &mut Client, symbols: &[&str]) -> Vec<TickerResponse> {
    let request = tickerd::pb::GetQuotesRequest {
        symbols: symbols.iter().map(|s| s.to_string()).collect(),
    };
    within(client.get_quotes(request))
        .await
        .expect("get quotes")
        .into_inner()
        .quotes
}

/// `n` server-stamped ticks of `symbol`, prices 1.0, 2.0, ...
pub fn ticks(symbol: &str, n: usize) -> Vec<PublishRequest> {
    (1..=n)
        .map(|i| PublishRequest::new(symbol, i as f64))
        .collect()
}

/// `message` with `authorization: Bearer <token>` when a token is given.
pub fn bearer<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("ascii token");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// The HS256 secret the tests' servers and tokens share.
pub const SECRET: &[u8] = b"tickerd-tests-secret-0123456789abcdef";

/// Files a secured test server reads: the JWT secret, and a fresh development PKI
/// (CA, server certificate for localhost, client CA), all in a temporary directory.
pub struct Keys {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
}

impl Keys {
    pub fn new() -> Keys {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("secret"), SECRET).expect("write secret");
        let ca = DevCa::new("tickerd test CA", Validity::days(1)).expect("CA");
        let keys = Keys { dir, ca };
        keys.write("ca.pem", &keys.ca.pem().cert);
        let server = keys
            .ca
            .server(&LOCAL_NAMES, Validity::days(1))
            .expect("server cert");
        keys.write("server.pem", &server.cert);
        keys.write("server.key", &server.key);
        keys
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write key file");
        path
    }

    /// Turns on JWT auth with the shared secret.
    pub fn jwt(&self, config: &mut Config) {
        config.jwt_secret_file = Some(self.path("secret"));
    }

    /// Turns on TLS with the server certificate (and mTLS against this CA if asked).
    pub fn tls(&self, config: &mut Config, mutual: bool) {
        config.tls_cert = Some(self.path("server.pem"));
        config.tls_key = Some(self.path("server.key"));
        if mutual {
            config.tls_client_ca = Some(self.path("ca.pem"));
        }
    }

    /// A client TLS config trusting this CA, presenting `identity` if given.
    pub fn client_tls(&self, identity: Option<&Pem>) -> tonic::transport::ClientTlsConfig {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca.pem().cert))
            .domain_name("localhost");
        if let Some(id) = identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(&id.cert, &id.key));
        }
        tls
    }
}

/// A client of `url` over TLS; `Err` carries the whole error chain.
pub async fn tls_client(
    url: &str,
    tls: tonic::transport::ClientTlsConfig,
) -> Result<Client, String> {
    let endpoint = client::endpoint(url.to_string())
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| chain(&e))?;
    let channel = within(endpoint.connect()).await.map_err(|e| chain(&e))?;
    Ok(Client::new(channel))
}

/// One GetQuotes over a fresh TLS connection: `Ok` if the server answered at all.
pub async fn tls_call(url: &str, tls: tonic::transport::ClientTlsConfig) -> Result<(), String> {
    let mut client = tls_client(url, tls).await?;
    let request = tickerd::pb::GetQuotesRequest {
        symbols: vec!["ANY".into()],
    };
    within(client.get_quotes(request))
        .await
        .map(|_| ())
        .map_err(|status| format!("{status:?}"))
}

/// An error with its sources, for assertions on what went wrong.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Runs the real `tickerd` to its exit (for start-up refusals): (exit code, stderr).
pub async fn tickerd_exit(args: &[&str]) -> (i32, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tickerd"))
        .args(["--feed", "none"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tickerd");
    let out = within(child.wait_with_output())
        .await
        .expect("tickerd output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A token signed with `SECRET` for `sub`, entitled to `symbols`, valid for `ttl`.
pub fn token(sub: &str, symbols: &str, scope: Option<&str>, ttl: Duration) -> String {
    let claims = MintClaims {
        sub: sub.into(),
        symbols: symbols.split_whitespace().map(String::from).collect(),
        scope: scope.map(String::from),
        ttl,
        issuer: None,
        audience: None,
    };
    tickerd::auth::mint(SECRET, &claims).expect("mint")
}

/// A token with arbitrary claims and header, signed with `SECRET` (HS256 unless the
/// header says otherwise; an `alg` of `none` leaves the signature empty).
pub fn raw_token(header: serde_json::Value, claims: serde_json::Value) -> String {
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let signing_input = format!("{}.{}", b64(&header), b64(&claims));
    if header["alg"] == "none" {
        return format!("{signing_input}.");
    }
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET);
    let signature = jsonwebtoken::crypto::sign(
        signing_input.as_bytes(),
        &key,
        jsonwebtoken::Algorithm::HS256,
    )
    .expect("sign");
    format!("{signing_input}.{signature}")
}

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}
