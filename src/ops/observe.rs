//! Feeds the metrics from the transport: a tower layer that counts every RPC by method
//! and gRPC status (from the headers of a trailers-only reply, else the trailers) with
//! its duration and a span. The server installs it; `metrics` holds what it counts
//! (`incoming` counts the connections).

use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame};
use tower_layer::Layer;
use tower_service::Service;

use super::metrics::{MethodCodeLabel, MethodLabel, Metrics};

#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: Metrics,
}

impl RpcMetricsLayer {
    pub fn new(metrics: Metrics) -> RpcMetricsLayer {
        RpcMetricsLayer { metrics }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Metrics,
}

/// One RPC being measured; recorded once, when its status is known.
struct Record {
    method: String,
    start: Instant,
    metrics: Metrics,
    span: tracing::Span,
}

impl Record {
    fn finish(self, code: &'static str) {
        let seconds = self.start.elapsed().as_secs_f64();
        self.metrics
            .rpcs
            .get_or_create(&MethodCodeLabel {
                method: self.method.clone(),
                code,
            })
            .inc();
        self.metrics
            .rpc_seconds
            .get_or_create(&MethodLabel {
                method: self.method.clone(),
            })
            .observe(seconds);
        self.span.record("grpc.status", code);
        tracing::debug!(parent: &self.span, grpc.status = code, seconds, "rpc finished");
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = request.uri().path().to_string();
        let span =
            tracing::info_span!("rpc", method = %method, grpc.status = tracing::field::Empty);
        let record = Record {
            method,
            start: Instant::now(),
            metrics: self.metrics.clone(),
            span,
        };
        RpcFuture {
            inner: self.inner.call(request),
            record: Some(record),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct RpcFuture<F> {
        #[pin]
        inner: F,
        record: Option<Record>,
    }
}

impl<F, B, E> Future for RpcFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<MeteredBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let record = this.record.take();
        Poll::Ready(match result {
            Ok(response) => {
                // A trailers-only reply carries its status in the headers.
                let record = match (record, status_name(response.headers())) {
                    (Some(r), Some(code)) => {
                        r.finish(code);
                        None
                    }
                    (record, _) => record,
                };
                Ok(response.map(|inner| MeteredBody {
                    inner,
                    record: record.map(Box::new),
                }))
            }
            Err(e) => {
                if let Some(r) = record {
                    r.finish("INTERNAL");
                }
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// The response body, watched for the trailers that carry the gRPC status.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        // Boxed: the connection keeps a body where it reads it per woken stream, and
        // this is read once, at the end.
        record: Option<Box<Record>>,
    }

    impl<B> PinnedDrop for MeteredBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its trailers: the client went away.
            if let Some(r) = this.project().record.take() {
                r.finish("CANCELLED");
            }
        }
    }
}

impl<B> MeteredBody<B> {
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The body itself, for what it writes without frames (data only: the trailers,
    /// which this counts, still come through `poll_frame`).
    pub fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B: Body<Data = Bytes>> Body for MeteredBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    if let Some(r) = this.record.take() {
                        r.finish(status_name(trailers).unwrap_or("UNKNOWN"));
                    }
                }
            }
            Some(Err(_)) => {
                if let Some(r) = this.record.take() {
                    r.finish("UNKNOWN");
                }
            }
            None => {
                if let Some(r) = this.record.take() {
                    r.finish("UNKNOWN");
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The canonical name of the `grpc-status` in `headers`, if any.
fn status_name(headers: &http::HeaderMap) -> Option<&'static str> {
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    })
}
