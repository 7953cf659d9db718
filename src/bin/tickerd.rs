//! `tickerd`: parses the configuration, binds the listener and runs the server until
//! SIGINT or SIGTERM, reloading TLS files on SIGHUP. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use tickerd::{
    ops::telemetry,
    server::{config::Config, Server},
};

fn main() -> ExitCode {
    // Single-threaded: this thread is the first of --io-threads; the server starts the
    // others. One thread keeps a connection's wake-ups in order, so its ticks batch.
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run(Config::parse())),
        Err(e) => {
            eprintln!("tickerd: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> ExitCode {
    let _telemetry = telemetry::init(config.log_format);
    if let Err(e) = config.check_exposure() {
        tracing::error!("cannot start: {e}");
        return ExitCode::FAILURE;
    }
    let (listen, metrics_listen, web_listen) =
        (config.listen, config.metrics_listen, config.web_listen);
    let mut server = match Server::build(config).await {
        Ok(server) => server,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = metrics_listen {
        let says = "metrics endpoint listening (/metrics, /healthz, /streams)";
        match bind(addr, "metrics", says).await {
            Some(metrics) => server = server.metrics_listener(metrics),
            None => return ExitCode::FAILURE,
        }
    }
    if let Some(addr) = web_listen {
        let says = "web listening (board /, WebSocket /v1/stream, gRPC-Web)";
        match bind(addr, "the web", says).await {
            Some(web) => server = server.web_listener(web),
            None => return ExitCode::FAILURE,
        }
    }
    if let Some(reloader) = server.tls_reloader() {
        tokio::spawn(reload_on_sighup(reloader));
    }
    let addr = listener
        .local_addr()
        .map_or_else(|_| listen.to_string(), |a| a.to_string());
    tracing::info!(%addr, "tickerd listening");
    match server.serve(listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Binds an extra listener (`what` it is for) and logs `says` with its address; logs
/// why not and returns `None` when it cannot.
async fn bind(
    addr: std::net::SocketAddr,
    what: &str,
    says: &str,
) -> Option<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            let bound = listener
                .local_addr()
                .map_or_else(|_| addr.to_string(), |a| a.to_string());
            tracing::info!(addr = %bound, "{says}");
            Some(listener)
        }
        Err(e) => {
            tracing::error!("cannot listen on {addr} for {what}: {e}");
            None
        }
    }
}

/// Re-reads the TLS files on every SIGHUP.
async fn reload_on_sighup(reloader: tickerd::server::TlsReloader) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(hup) => hup,
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP ({e}); TLS reload on signal is off");
                return;
            }
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading TLS files");
            reloader.reload();
        }
    }
    #[cfg(not(unix))]
    drop(reloader);
}

/// Resolves on SIGINT or SIGTERM (Ctrl-C elsewhere).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(term) => term,
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM ({e}); Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
