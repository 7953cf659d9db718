//! The `ticker` command-line client: argument parsing and dispatch. Each subcommand lives
//! in its own file; `live` is the resilient stream behind `subscribe` and `watch`.

mod backoff;
mod connect;
mod keys;
mod live;
mod oneshot;
mod streams;
mod subscribe;
mod watch;

use clap::{Parser, Subcommand};

pub use connect::{exit, CliError, ConnectOpts};
pub use live::{Command, Event};

/// ticker: the command-line client of tickerd (ticker.v1).
///
/// Exit codes: 0 success; 1 a local file could not be read or written; 2 usage error; 3 cannot connect (or gave up reconnecting);
/// 4 authentication or permission refused; 5 the server rejected the request (or, for
/// `health`, is not SERVING); 130 interrupted (Ctrl-C).
///
/// `subscribe` and `watch` reconnect on UNAVAILABLE or a broken connection with
/// exponential backoff and full jitter (100 ms initial, x1.6, 10 s cap, reset after a
/// healthy minute; RESOURCE_EXHAUSTED waits at least 2 s), resubscribe, and report the
/// ticks missed across the outage. INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED,
/// PERMISSION_DENIED and UNIMPLEMENTED are never retried.
#[derive(Parser, Debug)]
#[command(name = "ticker", version, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub connect: ConnectOpts,
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Subcommand, Debug)]
pub enum Commands {
    /// Stream ticks as lines (or --json); type +SYM / -SYM on stdin to add or remove.
    Subscribe(subscribe::SubscribeArgs),
    /// A live full-screen quote board; keys: q quit, a add, d remove, arrows select.
    Watch(watch::WatchArgs),
    /// The last tick of each symbol (GetQuotes), as a table or --json.
    Quote(oneshot::QuoteArgs),
    /// Publish ticks from a CSV file (symbol,price[,unix_nanos]) or stdin.
    Publish(oneshot::PublishArgs),
    /// grpc.health.v1 status of the server; exits 0 only when SERVING.
    Health(oneshot::HealthArgs),
    /// Open streams (peer, principal, age, subscriptions, sent, dropped, behind) from
    /// the server's operations endpoint (--metrics-listen).
    Streams(streams::StreamsArgs),
    /// Mint a development JWT (HS256) with the server's --jwt-secret-file; prints it.
    Token(keys::TokenArgs),
    /// Make a development CA, a server certificate (localhost, 127.0.0.1, ::1) and a
    /// client certificate, as PEM files for --tls-* and --ca/--cert/--key.
    Certs(keys::CertsArgs),
}

/// Runs the parsed command line; Ctrl-C ends it with exit code 130.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let work = async move {
        match cli.command {
            Commands::Subscribe(args) => subscribe::run(cli.connect, args).await,
            Commands::Watch(args) => watch::run(cli.connect, args).await,
            Commands::Quote(args) => oneshot::quote(cli.connect, args).await,
            Commands::Publish(args) => oneshot::publish(cli.connect, args).await,
            Commands::Health(args) => oneshot::health(cli.connect, args).await,
            Commands::Streams(args) => streams::run(args, cli.connect.timeout).await,
            Commands::Token(args) => keys::token(args),
            Commands::Certs(args) => keys::certs(args),
        }
    };
    tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => Err(CliError::new(exit::INTERRUPTED, "interrupted")),
    }
}
