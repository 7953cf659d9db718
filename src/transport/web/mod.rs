//! The web listener (`--web-listen`): browsers' way in. HTTP/1.1 and HTTP/2 (TLS with
//! ALPN `h2` and `http/1.1` when TLS is on) on its own port, serving the WebSocket
//! stream (`ws`), gRPC-Web for GetQuotes and Subscribe (tonic-web, CORS for the allowed
//! origins), and the board page (`board`). Connections come from `incoming` like the
//! gRPC port's; the server (`server`) starts it; sessions and the gRPC service do
//! the work, so a browser gets exactly what a gRPC client gets.

mod board;
pub mod ws;

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{ws::WebSocketUpgrade, Extension, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use futures_util::StreamExt as _;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected as _;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_layer::Layer as _;
use tower_service::Service as _;

use crate::{
    auth::PeerInfo,
    pb::ticker_stream_service_server::TickerStreamServiceServer,
    transport::{grpc::TickerService, incoming::Incoming},
};

/// How the web listener behaves; see the `--web-*` flags.
#[derive(Debug, Clone)]
pub struct WebOptions {
    /// Origins (`https://desk.example.com`) allowed besides the page's own.
    pub allowed_origins: Vec<String>,
    /// How long a WebSocket may take to send its token when auth is on.
    pub auth_timeout: Duration,
    /// How often a WebSocket is pinged; three intervals of silence drop it.
    pub ping_interval: Duration,
    /// Whether the listener speaks TLS (same-origin checks compare `https://`).
    pub tls: bool,
    pub max_decoding_message_size: usize,
    pub max_encoding_message_size: usize,
}

#[derive(Clone)]
struct Web {
    service: TickerService,
    options: Arc<WebOptions>,
}

/// The routes of the web listener.
pub fn router(service: TickerService, options: WebOptions) -> Router {
    let grpc = TickerStreamServiceServer::new(service.clone())
        .max_decoding_message_size(options.max_decoding_message_size)
        .max_encoding_message_size(options.max_encoding_message_size);
    let origins: Vec<HeaderValue> = options
        .allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::HeaderName::from_static("x-grpc-web"),
            header::HeaderName::from_static("x-user-agent"),
            header::HeaderName::from_static("grpc-timeout"),
        ])
        .expose_headers([
            header::HeaderName::from_static("grpc-status"),
            header::HeaderName::from_static("grpc-message"),
            header::HeaderName::from_static("grpc-status-details-bin"),
        ]);
    let grpc_web = cors.layer(tonic_web::GrpcWebLayer::new().layer(grpc));
    let web = Web {
        service,
        options: Arc::new(options),
    };
    Router::new()
        .route("/", get(board::page))
        .route("/board.js", get(board::script))
        .route("/board.css", get(board::style))
        .route("/v1/info", get(info))
        .route("/v1/stream", get(stream))
        // Only the RPCs a browser can make: fetch cannot stream a request body.
        .route_service("/ticker.v1.TickerStreamService/GetQuotes", grpc_web.clone())
        .route_service("/ticker.v1.TickerStreamService/Subscribe", grpc_web)
        .with_state(web)
}

/// What the board needs to know before it connects.
async fn info(State(web): State<Web>) -> impl IntoResponse {
    let auth = web.service.authenticator().requires_token();
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{{\"auth\":{auth}}}"),
    )
}

/// `/v1/stream`: checks the Origin, picks the encoding and upgrades.
async fn stream(
    State(web): State<Web>,
    Extension(peer): Extension<PeerInfo>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Err(origin) = check_origin(&headers, &web.options) {
        tracing::debug!(%origin, "WebSocket from a foreign origin refused");
        return (
            StatusCode::FORBIDDEN,
            format!("origin {origin} is not allowed (see --web-allowed-origin)\n"),
        )
            .into_response();
    }
    let upgrade = upgrade
        .protocols([ws::PROTO_SUBPROTOCOL])
        .max_message_size(ws::MAX_REQUEST_BYTES)
        .max_frame_size(ws::MAX_REQUEST_BYTES)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(1024 * 1024);
    let encoding = match upgrade.selected_protocol() {
        Some(_) => ws::Encoding::Proto,
        None => ws::Encoding::Json,
    };
    let keeping = ws::Keeping {
        auth_timeout: web.options.auth_timeout,
        ping_every: web.options.ping_interval,
    };
    upgrade.on_upgrade(move |socket| ws::run(socket, encoding, web.service, peer, keeping))
}

/// A browser's Origin must be the page's own (scheme, Host) or an allowed one. Clients
/// that send none are not browsers, and no other page can ride on them.
fn check_origin(headers: &HeaderMap, options: &WebOptions) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("(not text)");
    if options.allowed_origins.iter().any(|o| o == origin) {
        return Ok(());
    }
    let scheme = if options.tls { "https" } else { "http" };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host.is_empty() && origin == format!("{scheme}://{host}") {
        return Ok(());
    }
    Err(origin.to_string())
}

/// Serves `router` on `incoming` until `stop`; open connections then finish their
/// requests (WebSocket sessions end with the server's shutdown, like gRPC streams).
pub async fn serve(mut incoming: Incoming, router: Router, stop: CancellationToken) {
    loop {
        let io = tokio::select! {
            _ = stop.cancelled() => return,
            io = incoming.next() => match io {
                Some(Ok(io)) => io,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "web connection not accepted");
                    continue;
                }
                None => return,
            },
        };
        let peer = io.connect_info();
        let router = router.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut request: http::Request<_>| {
                request.extensions_mut().insert(peer.clone());
                let mut router = router.clone();
                async move {
                    let request = request.map(Body::new);
                    Ok::<_, Infallible>(router.call(request).await.into_response())
                }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "web connection ended");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}
