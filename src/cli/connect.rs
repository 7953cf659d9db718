//! Connection options shared by every `ticker` subcommand, the channel they build, and the
//! errors (with their exit codes) that a user reads as sentences.

use std::{
    fmt,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use clap::Args;
use tonic::{
    metadata::MetadataValue,
    service::{interceptor::InterceptedService, Interceptor},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code, Request, Status,
};

use crate::pb::ticker_stream_service_client::TickerStreamServiceClient;

/// Exit codes, as documented in `ticker --help`.
pub mod exit {
    pub const OK: u8 = 0;
    /// A local file could not be read or written (`token`, `certs`).
    pub const LOCAL: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CANNOT_CONNECT: u8 = 3;
    pub const AUTH: u8 = 4;
    pub const REJECTED: u8 = 5;
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Args, Debug, Clone)]
pub struct ConnectOpts {
    /// Server URL; https:// uses TLS. Repeat it to spread clients over several servers:
    /// each connection (and reconnection) goes to the next one, skipping any that cannot
    /// be reached.
    #[arg(
        long = "server",
        global = true,
        default_value = "http://127.0.0.1:50051"
    )]
    pub servers: Vec<String>,
    /// PEM file of a CA to trust for https:// servers (a private CA).
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for servers that require mutual TLS (with --key).
    #[arg(long, global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Bearer token sent as `authorization: Bearer <token>`.
    #[arg(long, global = true, env = "TICKER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Deadline of unary calls (quote, health, and connecting).
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Client = TickerStreamServiceClient<InterceptedService<Channel, Bearer>>;

/// What went wrong, as a sentence, with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> CliError {
        CliError {
            code,
            message: message.into(),
        }
    }

    /// An RPC's failure: the gRPC code decides the exit code.
    pub fn from_status(what: &str, status: &Status) -> CliError {
        // A connection that broke under the call (a TLS alert, say) comes back as a
        // status wrapping the transport error: say what broke, and count it as a
        // connection failure.
        if let Some(source) = std::error::Error::source(status) {
            let cause = root_cause(source);
            let hint = hint(&cause);
            return CliError::new(exit::CANNOT_CONNECT, format!("{what}: {cause}{hint}"));
        }
        let code = match status.code() {
            Code::Unauthenticated | Code::PermissionDenied => exit::AUTH,
            Code::Unavailable | Code::DeadlineExceeded => exit::CANNOT_CONNECT,
            _ => exit::REJECTED,
        };
        let reason = match status.code() {
            Code::Unauthenticated => format!("not authenticated: {}", status.message()),
            Code::PermissionDenied => format!("permission denied: {}", status.message()),
            _ if status.message().is_empty() => format!("{:?}", status.code()),
            _ => status.message().to_string(),
        };
        CliError::new(code, format!("{what}: {reason}"))
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Whether a failed stream may be retried (subscribe/watch reconnects).
pub fn retryable(status: &Status) -> bool {
    !matches!(
        status.code(),
        Code::InvalidArgument
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::Unimplemented
            | Code::NotFound
    )
}

/// The host:port of a URL, for messages.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// The deepest cause of a transport error, lower-cased: "connection refused".
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let text = cause.to_string();
    // io errors read "Connection refused (os error 111)"
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

/// What a connection failure's cause most likely means for the command line, as a
/// parenthesis to append: TLS on one side only, an untrusted server, a missing client
/// certificate. Empty when the cause speaks for itself.
fn hint(cause: &str) -> &'static str {
    let cause = cause.to_lowercase();
    if cause.contains("certificaterequired") {
        " (the server requires a client certificate: give --cert and --key)"
    } else if cause.contains("unknownissuer") {
        " (the server's certificate is not signed by a CA this client trusts: give the CA \
         that signed it with --ca)"
    } else if cause.contains("invalidcontenttype") {
        " (the server does not speak TLS there: use http://)"
    } else if cause.contains("frame with invalid size") {
        " (if the server uses TLS, use https://)"
    } else if cause.contains("connection closed") || cause.contains("connection was not ready") {
        // hyper reports a refused TLS 1.3 handshake this way when the request was still
        // queued in its dispatcher as the alert arrived (the alert goes to the connection),
        // and a plaintext dial to a TLS port too when the server hangs up before the client
        // reads its alert as a frame ("was not ready": the connection died between hyper's
        // readiness check and the send). The cause cannot tell the two apart: name both.
        " (the server hung up: if the server uses TLS, use https://; if it requires a client \
         certificate, give --cert and --key)"
    } else {
        ""
    }
}

impl ConnectOpts {
    fn endpoint(&self, url: &str) -> Result<Endpoint, CliError> {
        let mut endpoint = crate::client::endpoint(url.to_string())
            .map_err(|e| {
                CliError::new(
                    exit::USAGE,
                    format!("bad --server {url:?}: {}", root_cause(&e)),
                )
            })?
            .connect_timeout(self.timeout);
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| {
                CliError::new(
                    exit::USAGE,
                    format!("TLS set-up failed: {}", root_cause(&e)),
                )
            })?;
        }
        Ok(endpoint)
    }

    /// Connects to one of the servers. With several, each call starts at the next one
    /// after a random per-process start (so clients spread out and a reconnect moves on)
    /// and falls through to the others when one cannot be reached. Errors read like
    /// "cannot reach 127.0.0.1:50051: connection refused".
    pub async fn connect(&self) -> Result<Client, CliError> {
        let channel = self.channel().await?;
        Ok(TickerStreamServiceClient::with_interceptor(
            channel,
            self.bearer()?,
        ))
    }

    /// The channel `connect` uses (also for the health service).
    pub async fn channel(&self) -> Result<Channel, CliError> {
        static NEXT: AtomicUsize = AtomicUsize::new(usize::MAX);
        let n = self.servers.len().max(1);
        let seed = (crate::clock::now_unix_nanos() as usize) ^ std::process::id() as usize;
        let _ = NEXT.compare_exchange(usize::MAX, seed % n, Ordering::Relaxed, Ordering::Relaxed);
        let start = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..self.servers.len() {
            let url = &self.servers[(start + i) % n];
            match self.endpoint(url)?.connect().await {
                Ok(channel) => return Ok(channel),
                Err(e) => {
                    let cause = root_cause(&e);
                    let hint = hint(&cause);
                    failures.push(format!("cannot reach {}: {cause}{hint}", authority(url)))
                }
            }
        }
        Err(CliError::new(exit::CANNOT_CONNECT, failures.join("; ")))
    }

    pub fn bearer(&self) -> Result<Bearer, CliError> {
        match &self.token {
            None => Ok(Bearer(None)),
            Some(token) => format!("Bearer {token}")
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| {
                    CliError::new(
                        exit::USAGE,
                        "the token has characters not allowed in a header",
                    )
                }),
        }
    }

    /// Where `connect` goes, for messages.
    pub fn target(&self) -> String {
        self.servers
            .iter()
            .map(|s| authority(s))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, CliError> {
    std::fs::read(path)
        .map_err(|e| CliError::new(exit::USAGE, format!("cannot read {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_documented_exit_codes() {
        let code = |c| CliError::from_status("x", &Status::new(c, "m")).code;
        assert_eq!(code(Code::Unauthenticated), exit::AUTH);
        assert_eq!(code(Code::PermissionDenied), exit::AUTH);
        assert_eq!(code(Code::Unavailable), exit::CANNOT_CONNECT);
        assert_eq!(code(Code::InvalidArgument), exit::REJECTED);
        assert!(!retryable(&Status::unauthenticated("")));
        assert!(retryable(&Status::unavailable("")));
        assert!(retryable(&Status::resource_exhausted("")));
    }

    #[test]
    fn authority_and_causes_read_well() {
        assert_eq!(authority("http://127.0.0.1:50051"), "127.0.0.1:50051");
        assert_eq!(authority("https://h:1/x"), "h:1");
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        assert_eq!(root_cause(&io), "connection refused");
    }

    #[test]
    fn tls_mismatches_come_with_a_hint() {
        // The causes as rustls and h2 word them, after root_cause.
        for (cause, needle) in [
            (
                "received fatal alert: CertificateRequired",
                "--cert and --key",
            ),
            ("invalid peer certificate: UnknownIssuer", "--ca"),
            (
                "received corrupt message of type InvalidContentType",
                "use http://",
            ),
            (
                "connection error detected: frame with invalid size",
                "https://",
            ),
            ("connection closed", "--cert and --key"),
            ("connection closed", "use https://"),
            ("connection was not ready", "use https://"),
        ] {
            assert!(hint(cause).contains(needle), "{cause}: {}", hint(cause));
        }
        assert_eq!(hint("connection refused"), "");
    }
}
