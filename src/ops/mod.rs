//! Operations: what operators see and steer by. `metrics` (the Prometheus registry,
//! per-stream counters, the open-stream table), `admin` (the HTTP endpoint: /metrics,
//! /healthz, /streams), `observe` (a tower layer counting RPCs by method and status),
//! `telemetry` (logging, OTLP export). Sessions and transports write into `metrics`;
//! nothing here imports a transport.

pub mod admin;
pub mod metrics;
pub mod observe;
pub mod telemetry;
