//! The operations HTTP endpoint (`--metrics-listen`): /metrics in Prometheus text format,
//! /healthz (200 while serving, 503 once draining) for balancers that do not speak gRPC
//! health, /streams, the JSON list of open streams, and /streams/ended, the last
//! streams to end with their final counts. Plain HTTP/1.1 with hyper; it
//! runs until the server has finished draining.

use std::convert::Infallible;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use tokio::sync::watch;

use super::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Serves until `stop` is cancelled. `draining`, or `healthy` turning false (a
/// cluster node cut from its bus), turns /healthz to 503.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    draining: Shutdown,
    healthy: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    loop {
        let (socket, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    continue;
                }
            },
        };
        let (metrics, draining, stop) = (metrics.clone(), draining.clone(), stop.clone());
        let healthy = healthy.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = respond(&req, &metrics, &draining, *healthy.borrow());
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(socket), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                result = connection => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "metrics endpoint connection ended");
                    }
                }
            }
        });
    }
}

fn respond(
    req: &Request<Incoming>,
    metrics: &Metrics,
    draining: &Shutdown,
    healthy: bool,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" if draining.is_triggered() => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining\n".into(),
        ),
        "/healthz" if !healthy => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "market-data bus unreachable\n".into(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "serving\n".into()),
        "/streams" => match serde_json::to_string_pretty(&metrics.stream_list()) {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        "/streams/ended" => match serde_json::to_string_pretty(&metrics.ended_list()) {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz, /streams or /streams/ended\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
