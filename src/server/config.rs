//! Command-line and environment configuration of `tickerd`. Every flag reads a
//! `TICKERD_*` variable too; `--help` is the reference. The server consumes it.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

use crate::{
    auth::{JwtKey, JwtSettings},
    cluster::ClusterArgs,
    feed::FeedKind,
    ops::telemetry::LogFormat,
    transport::tls::TlsFiles,
};

/// tickerd: real-time market-data fan-out over gRPC (ticker.v1.TickerStreamService).
///
/// Clients open one TickerStream, subscribe and unsubscribe by symbol at will, and
/// receive every tick of those symbols. Every flag can also be set through the
/// environment variable named in its help. Durations take units: 500ms, 5s, 2m.
#[derive(Parser, Debug, Clone)]
#[command(name = "tickerd", version, max_term_width = 100)]
pub struct Config {
    /// Address to listen on for gRPC (host:port).
    #[arg(long, env = "TICKERD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Where ticks come from: `sim` (random-walk simulator), `none` (only the Publish
    /// RPC) or `replay:PATH` (a CSV file of `symbol,price[,unix_nanos]` lines).
    /// Publish works with every feed.
    #[arg(long, env = "TICKERD_FEED", default_value = "sim")]
    pub feed: FeedKind,

    /// Number of simulated symbols (SYM00, SYM01, ...); ignored with --symbols-file.
    #[arg(long, env = "TICKERD_SYMBOLS", default_value_t = 100)]
    pub symbols: usize,

    /// File of symbols, one per line (`#` starts a comment). They are known from
    /// start-up, so clients can subscribe before their first tick; the simulator
    /// ticks exactly these.
    #[arg(long, env = "TICKERD_SYMBOLS_FILE")]
    pub symbols_file: Option<PathBuf>,

    /// Feed rate in ticks per second over all symbols: the simulator's rate, and the
    /// pace of replayed lines that carry no timestamp.
    #[arg(long, env = "TICKERD_RATE", default_value_t = 1000.0)]
    pub rate: f64,

    /// Seed of the simulator's random walk: the same seed gives the same prices.
    #[arg(long, env = "TICKERD_SEED", default_value_t = 1)]
    pub seed: u64,

    /// Replay pace relative to the file's timestamps: 1 = real time, 10 = ten times
    /// faster, 0 = as fast as possible.
    #[arg(long, env = "TICKERD_REPLAY_SPEED", default_value_t = 1.0)]
    pub replay_speed: f64,

    /// Accept subscriptions to symbols never seen yet (they count against
    /// --max-symbols and wait for their first tick) instead of rejecting them as
    /// "unknown symbol".
    #[arg(long, env = "TICKERD_ALLOW_UNKNOWN_SYMBOLS")]
    pub allow_unknown_symbols: bool,

    /// Most distinct symbols the server keeps; a new symbol past it is rejected.
    #[arg(long, env = "TICKERD_MAX_SYMBOLS", default_value_t = 100_000)]
    pub max_symbols: usize,

    /// Ticks kept per symbol for subscribers that fall behind. A stream further behind
    /// loses the oldest and is told with KIND_LAGGED and the exact count.
    #[arg(long, env = "TICKERD_CHANNEL_CAPACITY", default_value_t = 4096,
          value_parser = positive)]
    pub channel_capacity: usize,

    /// Ticks kept per symbol so that a client reconnecting with `resume_from_seq` and
    /// `epoch` gets exactly what it missed (0: no resume; clients get a snapshot).
    /// Memory: about 200 bytes per kept tick, per symbol that ticked.
    #[arg(long, env = "TICKERD_HISTORY_SIZE", default_value_t = 1024)]
    pub history_size: usize,

    /// Kept ticks older than this are not replayed: a resume further back gets a
    /// snapshot and `recovered = false`.
    #[arg(long, env = "TICKERD_HISTORY_TTL", default_value = "5m",
          value_parser = humantime::parse_duration)]
    pub history_ttl: Duration,

    /// Most symbols one stream may subscribe to; past it KIND_REJECTED (Subscribe:
    /// INVALID_ARGUMENT).
    #[arg(
        long,
        env = "TICKERD_MAX_SUBSCRIPTIONS_PER_STREAM",
        default_value_t = 1000
    )]
    pub max_subscriptions_per_stream: usize,

    /// Server-wide cap on open TickerStream, Subscribe and Publish calls; past it new
    /// calls fail with RESOURCE_EXHAUSTED.
    #[arg(long, env = "TICKERD_MAX_STREAMS", default_value_t = 20_000)]
    pub max_streams: usize,

    /// Threads serving connections. Each runs a single-threaded runtime and serves
    /// whole connections, handed out in turn as they are accepted, so a connection's
    /// streams and its socket stay on one thread and a burst of ticks leaves in one
    /// write per connection. 1 (the default) uses the least CPU per delivered tick;
    /// raise it when one core is not enough (`benches/README.md`).
    #[arg(long, env = "TICKERD_IO_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub io_threads: u16,

    /// Lets a publish frame each tick straight into the connection buffer of every
    /// idle gRPC stream that wants it, instead of waking the stream to do it (the
    /// NATS server's publish; `--http2 tickerd` only). Streams that are behind, have
    /// replies queued or no window left are served from their rings as always.
    #[arg(long, env = "TICKERD_DIRECT_PUBLISH", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub direct_publish: bool,

    /// The HTTP/2 implementation of the gRPC port: `tickerd`, the server's own (one
    /// task and one write buffer per connection, for all its streams), or `hyper`
    /// (hyper and h2, as tonic serves). Both serve the same RPCs under the same limits.
    #[arg(long, env = "TICKERD_HTTP2", value_enum, default_value_t = Http2::Tickerd)]
    pub http2: Http2,

    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: streams one connection may open at once.
    #[arg(long, env = "TICKERD_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    pub max_concurrent_streams: u32,

    /// HTTP/2: streams a client may open and reset before the server accepts them
    /// (rapid-reset guard); past it the connection is closed.
    #[arg(
        long,
        env = "TICKERD_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS",
        default_value_t = 32
    )]
    pub http2_max_pending_accept_reset_streams: usize,

    /// HTTP/2: streams the server may reset for protocol errors on one connection
    /// before closing it.
    #[arg(
        long,
        env = "TICKERD_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS",
        default_value_t = 256
    )]
    pub http2_max_local_error_reset_streams: usize,

    /// HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE in bytes.
    #[arg(long, env = "TICKERD_HTTP2_MAX_HEADER_LIST_SIZE", default_value_t = 16 * 1024)]
    pub http2_max_header_list_size: u32,

    /// HTTP/2 PING interval on idle connections, so dead peers are found.
    #[arg(long, env = "TICKERD_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Duration,

    /// How long a PING may go unanswered before the connection is closed.
    #[arg(long, env = "TICKERD_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Duration,

    /// TCP keepalive idle time on accepted connections.
    #[arg(long, env = "TICKERD_TCP_KEEPALIVE", default_value = "60s",
          value_parser = humantime::parse_duration)]
    pub tcp_keepalive: Duration,

    /// Largest request message accepted, in bytes (a GetQuotes of 1000 symbols is
    /// about 34 KiB).
    #[arg(long, env = "TICKERD_MAX_DECODING_MESSAGE_SIZE", default_value_t = 64 * 1024)]
    pub max_decoding_message_size: usize,

    /// Largest response message sent, in bytes.
    #[arg(long, env = "TICKERD_MAX_ENCODING_MESSAGE_SIZE", default_value_t = 4 * 1024 * 1024)]
    pub max_encoding_message_size: usize,

    /// On SIGINT/SIGTERM, how long open streams get to end before the process exits
    /// regardless (a client that stopped reading cannot hold it longer).
    #[arg(long, env = "TICKERD_DRAIN_TIMEOUT", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// How often the fold state of symbols without CONFLATE subscribers is freed (a
    /// symbol's ring of live ticks is freed as soon as its last subscriber leaves).
    #[arg(long, env = "TICKERD_PRUNE_INTERVAL", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub prune_interval: Duration,

    /// Close connections after this age (GOAWAY, then forced close after
    /// --max-connection-age-grace), so long-lived streams re-spread over replicas when
    /// their clients reconnect. Off unless given.
    #[arg(long, env = "TICKERD_MAX_CONNECTION_AGE", value_parser = humantime::parse_duration)]
    pub max_connection_age: Option<Duration>,

    /// After --max-connection-age, how long open streams may go on before the
    /// connection is closed under them. Without it, a connection with a stream open
    /// would never close (streams here do not end by themselves).
    #[arg(long, env = "TICKERD_MAX_CONNECTION_AGE_GRACE", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub max_connection_age_grace: Duration,

    /// Spread of --max-connection-age: this process uses age × (1 ± jitter), picked at
    /// start-up, so replicas do not recycle their clients at the same moment (tonic
    /// applies one age to all of a server's connections).
    #[arg(long, env = "TICKERD_MAX_CONNECTION_AGE_JITTER", default_value_t = 0.1)]
    pub max_connection_age_jitter: f64,

    /// Address of the operations HTTP endpoint: /metrics (Prometheus), /healthz (200
    /// while serving, 503 while draining) and /streams (JSON list of open streams).
    /// Off unless given; keep it on loopback or a private network.
    #[arg(long, env = "TICKERD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Address of the web listener, for browsers: the WebSocket stream (/v1/stream),
    /// gRPC-Web (GetQuotes, Subscribe) and the live board page (/). HTTP/1.1 and
    /// HTTP/2, with the same TLS certificates as the gRPC port. Off unless given.
    #[arg(long, env = "TICKERD_WEB_LISTEN")]
    pub web_listen: Option<SocketAddr>,

    /// An origin (e.g. `https://desk.example.com`) whose pages may open WebSockets and
    /// call gRPC-Web here, besides the board's own origin. Repeatable (comma-separated
    /// in the variable).
    #[arg(
        long = "web-allowed-origin",
        env = "TICKERD_WEB_ALLOWED_ORIGIN",
        value_delimiter = ','
    )]
    pub web_allowed_origins: Vec<String>,

    /// With auth on, how long a WebSocket may take to send its first message, which
    /// must carry `token`; it is closed (4016) otherwise.
    #[arg(long, env = "TICKERD_WEB_AUTH_TIMEOUT", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub web_auth_timeout: Duration,

    /// How often each WebSocket is pinged. One that stays silent (no pong, no frame),
    /// or cannot take a write, for three intervals is dropped.
    #[arg(long, env = "TICKERD_WEB_PING_INTERVAL", default_value = "15s",
          value_parser = humantime::parse_duration)]
    pub web_ping_interval: Duration,

    /// Also export per-symbol series (ticks and subscribers per symbol). Off by
    /// default: one series per symbol can be many.
    #[arg(long, env = "TICKERD_METRICS_PER_SYMBOL")]
    pub metrics_per_symbol: bool,

    /// Server certificate chain (PEM). With --tls-key, turns on TLS (1.2 and 1.3 only).
    #[arg(long, env = "TICKERD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "TICKERD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM) that client certificates must chain to: every client must
    /// present one (mutual TLS). Its subject (e.g. `CN=alice`) is the caller's identity
    /// when no token is used.
    #[arg(long, env = "TICKERD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// A TLS handshake not finished within this is dropped (a client that connects and
    /// sends nothing holds nothing longer).
    #[arg(long, env = "TICKERD_TLS_HANDSHAKE_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// Also re-read the TLS files this often (they are always re-read on SIGHUP). New
    /// handshakes use the new files; open connections keep theirs; bad new files are
    /// refused with a logged error and the old ones stay in service.
    #[arg(long, env = "TICKERD_TLS_RELOAD_INTERVAL", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Option<Duration>,

    /// HS256 secret file (at least 32 bytes; surrounding whitespace ignored). Turns on
    /// JWT bearer auth: every call but health needs `authorization: Bearer <token>`.
    #[arg(
        long,
        env = "TICKERD_JWT_SECRET_FILE",
        conflicts_with = "jwt_public_key"
    )]
    pub jwt_secret_file: Option<PathBuf>,

    /// PEM public key of the token issuer: RSA (RS256), P-256 (ES256) or Ed25519
    /// (EdDSA); only that algorithm is accepted. Turns on JWT bearer auth.
    #[arg(long, env = "TICKERD_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Required `iss` claim.
    #[arg(long, env = "TICKERD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim.
    #[arg(long, env = "TICKERD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew tolerated on `exp` and `nbf`. A stream ends when its token's `exp`
    /// plus this has passed.
    #[arg(long, env = "TICKERD_JWT_LEEWAY", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub jwt_leeway: Duration,

    /// Allow listening on a non-loopback address without TLS and without auth. Without
    /// it tickerd refuses: anyone who can reach the port could read every symbol and
    /// publish prices.
    #[arg(long, env = "TICKERD_INSECURE")]
    pub insecure: bool,

    #[command(flatten)]
    pub cluster: ClusterArgs,

    /// Log line format; the level comes from RUST_LOG (default `info`).
    #[arg(long, env = "TICKERD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a positive whole number")),
    }
}

impl Config {
    /// The JWT settings, when auth is on.
    pub fn jwt(&self) -> Option<JwtSettings> {
        let key = match (&self.jwt_secret_file, &self.jwt_public_key) {
            (Some(secret), _) => JwtKey::Secret(secret.clone()),
            (None, Some(public)) => JwtKey::Public(public.clone()),
            (None, None) => return None,
        };
        Some(JwtSettings {
            key,
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            leeway: self.jwt_leeway,
        })
    }

    /// The TLS files, when TLS is on.
    pub fn tls(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// Refuses a plaintext, unauthenticated server on a non-loopback `listen` address
    /// unless --insecure says the risk is accepted.
    pub fn check_exposure(&self) -> Result<(), String> {
        let open = self.tls().is_none() && self.jwt().is_none() && !self.insecure;
        for addr in std::iter::once(self.listen).chain(self.web_listen) {
            if open && !addr.ip().is_loopback() {
                return Err(format!(
                    "refusing to listen on {addr} without TLS and without authentication: \
                     anyone who can reach it could read every symbol and publish prices. Give \
                     --tls-cert and --tls-key, or --jwt-secret-file / --jwt-public-key, or \
                     --insecure to accept the risk (or listen on 127.0.0.1)"
                ));
            }
        }
        Ok(())
    }

    /// The configuration of a start with no flags (`TICKERD_*` variables still apply),
    /// for embedding and tests; `listen` is unused when the caller binds the listener.
    pub fn defaults() -> Config {
        Config::parse_from(["tickerd"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Config::command().debug_assert();
    }

    #[test]
    fn plaintext_without_auth_is_refused_off_loopback() {
        let parse = |args: &[&str]| Config::parse_from([&["tickerd"], args].concat());
        assert!(parse(&[]).check_exposure().is_ok());
        let msg = parse(&["--listen", "0.0.0.0:50051"])
            .check_exposure()
            .unwrap_err();
        assert!(
            msg.contains("without TLS and without authentication"),
            "{msg}"
        );
        let web = parse(&["--web-listen", "0.0.0.0:8080"]).check_exposure();
        assert!(web.unwrap_err().contains("0.0.0.0:8080"));
        assert!(parse(&["--listen", "0.0.0.0:1", "--insecure"])
            .check_exposure()
            .is_ok());
        assert!(parse(&["--listen", "0.0.0.0:1", "--jwt-secret-file", "s"])
            .check_exposure()
            .is_ok());
        assert!(
            parse(&["--listen", "[::]:1", "--tls-cert", "c", "--tls-key", "k"])
                .check_exposure()
                .is_ok()
        );
    }

    #[test]
    fn every_flag_has_a_tickerd_env_var() {
        use clap::CommandFactory;
        for arg in Config::command().get_arguments() {
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert!(
                env.as_deref().is_some_and(|e| e.starts_with("TICKERD_")),
                "--{} has env {env:?}",
                arg.get_id()
            );
        }
    }
}

/// The HTTP/2 implementation of the gRPC port (`--http2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Http2 {
    /// The server's own: `transport::http2`.
    Tickerd,
    /// hyper and h2, through tonic's server.
    Hyper,
}
