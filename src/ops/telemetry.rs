//! Logging and tracing set-up shared by the binaries: tracing-subscriber, filtered by
//! `RUST_LOG` (default `info`), as text or JSON lines on stderr. Built with the `otel`
//! feature, spans are also exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set (the OpenTelemetry SDK reads its other `OTEL_*` variables too).

use tracing_subscriber::{
    filter::LevelFilter, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer,
};

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Keeps exporters alive; dropping it flushes them. Hold it for the life of `main`.
#[must_use = "dropping the guard stops span export"]
pub struct Guard {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("tickerd: flushing spans failed: {e}");
            }
        }
    }
}

/// Installs the global subscriber; a second call is a no-op.
pub fn init(format: LogFormat) -> Guard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let never_payloads = never_payloads(&filter);
    // A filtering layer vetoes events for the whole subscriber, wherever it sits.
    let registry = tracing_subscriber::registry().with(filter).with(fmt);

    #[cfg(feature = "otel")]
    {
        let (layer, provider) = match otel::layer() {
            Ok(Some((layer, provider))) => (Some(layer), Some(provider)),
            Ok(None) => (None, None),
            Err(e) => {
                eprintln!("tickerd: OpenTelemetry export disabled: {e}");
                (None, None)
            }
        };
        let _ = registry.with(layer).with(never_payloads).try_init();
        Guard { provider }
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = registry.with(never_payloads).try_init();
        Guard {}
    }
}

/// WebSocket frames carry tokens (a browser's first message): the WebSocket library's
/// debug and trace lines print frame payloads, so they never reach the log, whatever
/// RUST_LOG says.
///
/// The default is RUST_LOG's most verbose level, not TRACE: the subscriber's level hint
/// is the most verbose of its filters', and the `log` crate's max level is set from it,
/// so a TRACE default let every `log::trace!` of the WebSocket library (a few per frame)
/// reach the log bridge only to be dropped there (the cost, measured: `benches/README.md`,
/// changelog row 88f0aaa).
fn never_payloads(filter: &EnvFilter) -> tracing_subscriber::filter::Targets {
    let most_verbose = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let quiet = most_verbose.min(LevelFilter::INFO);
    tracing_subscriber::filter::Targets::new()
        .with_default(most_verbose)
        .with_target("tungstenite", quiet)
        .with_target("tokio_tungstenite", quiet)
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::{trace::SdkTracerProvider, Resource};
    use tracing_subscriber::Registry;

    type Layer = tracing_opentelemetry::OpenTelemetryLayer<
        tracing_subscriber::layer::Layered<
            Box<
                dyn tracing_subscriber::Layer<
                        tracing_subscriber::layer::Layered<tracing_subscriber::EnvFilter, Registry>,
                    > + Send
                    + Sync,
            >,
            tracing_subscriber::layer::Layered<tracing_subscriber::EnvFilter, Registry>,
        >,
        opentelemetry_sdk::trace::Tracer,
    >;

    /// The OTLP layer, when `OTEL_EXPORTER_OTLP_ENDPOINT` asks for one.
    pub fn layer() -> Result<Option<(Layer, SdkTracerProvider)>, Box<dyn std::error::Error>> {
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(env!("CARGO_PKG_NAME"))
                    .build(),
            )
            .build();
        let tracer = provider.tracer(env!("CARGO_PKG_NAME"));
        Ok(Some((
            tracing_opentelemetry::layer().with_tracer(tracer),
            provider,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::filter::Targets;

    fn hint(targets: &Targets) -> Option<LevelFilter> {
        Layer::<tracing_subscriber::Registry>::max_level_hint(targets)
    }

    #[test]
    fn payload_lines_stay_out_and_the_level_hint_is_rust_logs() {
        let info = never_payloads(&EnvFilter::new("info"));
        assert_eq!(hint(&info), Some(LevelFilter::INFO));
        assert!(!info.would_enable("tungstenite::protocol", &tracing::Level::DEBUG));

        let trace = never_payloads(&EnvFilter::new("trace"));
        assert_eq!(hint(&trace), Some(LevelFilter::TRACE));
        assert!(trace.would_enable("tickerd", &tracing::Level::TRACE));
        assert!(!trace.would_enable("tungstenite::protocol", &tracing::Level::DEBUG));
        assert!(!trace.would_enable("tokio_tungstenite", &tracing::Level::TRACE));
        assert!(trace.would_enable("tungstenite::protocol", &tracing::Level::INFO));

        let warn = never_payloads(&EnvFilter::new("warn"));
        assert_eq!(hint(&warn), Some(LevelFilter::WARN));
    }
}
