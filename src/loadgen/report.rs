//! What `tickerd-bench` prints: a readable summary, or the same figures as JSON.

use std::{fmt, time::Duration};

use serde::Serialize;

use super::{reader::StepStats, Options, Step};

#[derive(Debug, Serialize)]
#[serde(tag = "scenario", rename_all = "snake_case")]
pub enum Report {
    Run {
        options: OptionsEcho,
        steps: Vec<StepReport>,
        slow: Option<SlowReport>,
    },
    Idle(IdleReport),
}

/// The options that shape a run, repeated in its report.
#[derive(Debug, Serialize)]
pub struct OptionsEcho {
    pub server: String,
    pub conns: usize,
    pub streams: usize,
    pub subs_per_stream: usize,
    pub symbols: usize,
    pub slow_streams: usize,
}

impl From<&Options> for OptionsEcho {
    fn from(o: &Options) -> Self {
        OptionsEcho {
            server: match &o.web {
                Some(web) if o.web_binary => format!("{web} (WebSocket, ticker.v1+proto)"),
                Some(web) => format!("{web} (WebSocket, JSON)"),
                None => o.servers.join(","),
            },
            // A WebSocket session is a connection of its own.
            conns: if o.web.is_some() { o.streams } else { o.conns },
            streams: o.streams,
            subs_per_stream: o.subs_per_stream,
            symbols: o.symbols,
            slow_streams: o.slow_streams,
        }
    }
}

/// One measured step (the whole run without --ramp), over the reading streams.
#[derive(Debug, Serialize)]
pub struct StepReport {
    pub rate: f64,
    pub seconds: f64,
    pub offered: u64,
    pub published: u64,
    /// published / offered: below 1, the server slowed the publisher.
    pub publisher_accept_ratio: f64,
    pub expected: u64,
    pub delivered: u64,
    pub delivery_ratio: f64,
    pub delivered_per_sec: f64,
    pub lag_notices: u64,
    pub dropped: u64,
    pub unannounced_gaps: u64,
    pub latency_us: Percentiles,
    pub server_cpu_seconds: Option<f64>,
    pub server_cpu_us_per_delivery: Option<f64>,
    pub loadgen_cpu_seconds: Option<f64>,
    /// The bus's (a cluster's nats-server) CPU, with `--bus-pid`.
    pub bus_cpu_seconds: Option<f64>,
    /// Each server's CPU, in `--server-pid` order (a cluster's nodes).
    pub server_cpu_seconds_each: Vec<f64>,
    /// The servers' threads going to sleep, per second (voluntary context switches).
    pub server_sleeps_per_sec: Option<f64>,
    /// The servers' threads preempted while they had work, per second (involuntary
    /// context switches): on a shared machine, the load generator taking their core.
    pub server_preemptions_per_sec: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl StepReport {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        step: &Step,
        seconds: f64,
        offered: u64,
        published: u64,
        expected: u64,
        stats: &StepStats,
        server_cpu: Option<f64>,
        loadgen_cpu: Option<f64>,
    ) -> StepReport {
        let h = &stats.latency_us;
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        StepReport {
            rate: step.rate,
            seconds,
            offered,
            published,
            publisher_accept_ratio: ratio(published, offered),
            expected,
            delivered: stats.delivered,
            delivery_ratio: ratio(stats.delivered, expected),
            delivered_per_sec: stats.delivered as f64 / seconds,
            lag_notices: stats.lag_notices,
            dropped: stats.dropped,
            unannounced_gaps: stats.unannounced_gaps,
            latency_us: Percentiles {
                p50: h.value_at_quantile(0.5),
                p90: h.value_at_quantile(0.9),
                p99: h.value_at_quantile(0.99),
                p999: h.value_at_quantile(0.999),
                max: h.max(),
            },
            server_cpu_seconds: server_cpu,
            server_cpu_us_per_delivery: server_cpu
                .filter(|_| stats.delivered > 0)
                .map(|c| c * 1e6 / stats.delivered as f64),
            loadgen_cpu_seconds: loadgen_cpu,
            bus_cpu_seconds: None,
            server_cpu_seconds_each: Vec::new(),
            server_sleeps_per_sec: None,
            server_preemptions_per_sec: None,
        }
    }

    /// The servers' context switches over the step: (voluntary, involuntary).
    pub fn with_server_switches(mut self, switches: Option<(u64, u64)>) -> StepReport {
        if let Some((voluntary, involuntary)) = switches.filter(|_| self.seconds > 0.0) {
            self.server_sleeps_per_sec = Some(voluntary as f64 / self.seconds);
            self.server_preemptions_per_sec = Some(involuntary as f64 / self.seconds);
        }
        self
    }

    pub fn with_each_server_cpu(mut self, each: Vec<f64>) -> StepReport {
        self.server_cpu_seconds_each = each;
        self
    }

    pub fn with_bus_cpu(mut self, bus_cpu: Option<f64>) -> StepReport {
        self.bus_cpu_seconds = bus_cpu;
        self
    }

    /// Whether this step meets the ramp's bar.
    pub fn passes(&self, min_delivery: f64, max_p99: Duration) -> bool {
        self.delivery_ratio >= min_delivery && self.latency_us.p99 <= max_p99.as_micros() as u64
    }
}

/// The streams that stopped reading, after their catch-up.
#[derive(Debug, Default, Serialize)]
pub struct SlowReport {
    pub streams: usize,
    pub received: u64,
    pub dropped: u64,
    pub lag_notices: u64,
    pub unannounced_gaps: u64,
    /// (stream, symbol) pairs where received + dropped differs from what was published.
    pub inexact_symbols: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct IdleReport {
    pub streams: usize,
    pub conns: usize,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub bytes_per_stream: f64,
}

impl IdleReport {
    pub fn new(streams: usize, conns: usize, before: u64, after: u64) -> IdleReport {
        IdleReport {
            streams,
            conns,
            rss_before_bytes: before,
            rss_after_bytes: after,
            bytes_per_stream: after.saturating_sub(before) as f64 / streams.max(1) as f64,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Report::Idle(r) => writeln!(
                f,
                "idle streams: {} on {} connections; server RSS {:.1} MiB -> {:.1} MiB: {:.0} bytes per stream",
                r.streams,
                r.conns,
                r.rss_before_bytes as f64 / 1048576.0,
                r.rss_after_bytes as f64 / 1048576.0,
                r.bytes_per_stream
            ),
            Report::Run { options: o, steps, slow } => {
                writeln!(
                    f,
                    "{}: {} streams on {} connections, {} subscriptions each over {} symbols{}",
                    o.server,
                    o.streams,
                    o.conns,
                    o.subs_per_stream,
                    o.symbols,
                    if o.slow_streams > 0 { format!(", {} of them not reading", o.slow_streams) } else { String::new() }
                )?;
                for s in steps {
                    writeln!(
                        f,
                        "rate {:>9.0}/s  published {:>9} ({:.1}% of offered)  delivered {:>10} of {:>10} ({:.2}%)  {:>10.0}/s  lag notices {} dropped {} bad gaps {}",
                        s.rate,
                        s.published,
                        s.publisher_accept_ratio * 100.0,
                        s.delivered,
                        s.expected,
                        s.delivery_ratio * 100.0,
                        s.delivered_per_sec,
                        s.lag_notices,
                        s.dropped,
                        s.unannounced_gaps
                    )?;
                    let l = &s.latency_us;
                    write!(
                        f,
                        "    latency us: p50 {} p90 {} p99 {} p99.9 {} max {}",
                        l.p50, l.p90, l.p99, l.p999, l.max
                    )?;
                    if let (Some(cpu), Some(per)) = (s.server_cpu_seconds, s.server_cpu_us_per_delivery) {
                        write!(f, "  server CPU {cpu:.2}s = {per:.3} us/delivery")?;
                    }
                    if let (Some(sleeps), Some(preempted)) =
                        (s.server_sleeps_per_sec, s.server_preemptions_per_sec)
                    {
                        write!(f, ", {sleeps:.0} sleeps/s, {preempted:.0} preemptions/s")?;
                    }
                    if s.server_cpu_seconds_each.len() > 1 {
                        let each: Vec<String> = s
                            .server_cpu_seconds_each
                            .iter()
                            .map(|c| format!("{c:.2}s"))
                            .collect();
                        write!(f, " (each: {})", each.join(", "))?;
                    }
                    if let Some(cpu) = s.loadgen_cpu_seconds {
                        write!(f, "  loadgen CPU {cpu:.2}s")?;
                    }
                    if let Some(cpu) = s.bus_cpu_seconds {
                        write!(f, "  bus CPU {cpu:.2}s")?;
                    }
                    writeln!(f)?;
                }
                if let Some(r) = slow {
                    writeln!(
                        f,
                        "slow streams: {} caught up: received {}, reported dropped {} in {} lag notices; bad gaps {}; inexact counts {}",
                        r.streams, r.received, r.dropped, r.lag_notices, r.unannounced_gaps, r.inexact_symbols
                    )?;
                }
                Ok(())
            }
        }
    }
}
