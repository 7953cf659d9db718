//! The load generator behind `tickerd-bench`: drives any `ticker.v1` server (tickerd or
//! the grpc-go reference) the way a busy market does, and measures delivery, loss and
//! end-to-end latency, plus the server's CPU and memory when given its pid.
//!
//! Scenarios: a fixed rate (`--rate`), a ramp that raises the rate step by step until
//! delivery or p99 fails (`--ramp`), slow consumers among fast ones (`--slow-streams`),
//! and idle scale (`--idle-streams`, resident memory per stream).

mod fleet;
mod frames;
mod procfs;
mod publisher;
mod reader;
mod report;
mod websocket;
mod wire;

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use clap::{Args, ValueEnum};
use futures_util::{stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::{
    client::{self, Client},
    clock,
    pb::{GetQuotesRequest, PublishRequest},
};
use fleet::{frames_reader, open_fleet, plaintext_authority};
use publisher::{PublishCounts, Publishing};
use reader::{Conn, Reader, SharedStats, StepStats};
pub use report::{IdleReport, Report, SlowReport, StepReport};
use tonic::transport::Channel;
use wire::SymbolTable;

/// Options of `tickerd-bench`. Durations take units: 500ms, 5s.
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Server to load, as http://host:port. Repeat it (or separate with commas) to load
    /// a cluster: connections go to the servers in turn, so streams spread evenly, and
    /// the publisher uses the first.
    #[arg(
        long = "server",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:50051"
    )]
    pub servers: Vec<String>,
    /// Client connections; streams are spread over them round-robin.
    #[arg(long, default_value_t = 50)]
    pub conns: usize,
    /// Subscribing TickerStreams.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// Symbols each stream subscribes to (distinct; which ones: --layout).
    #[arg(long, default_value_t = 10)]
    pub subs_per_stream: usize,
    /// How streams pick their symbols. `random`: a seeded random set per stream, so the
    /// streams sharing a connection want different symbols, as a desk's would.
    /// `blocks`: consecutive symbols from stream index × --subs-per-stream (every symbol
    /// gets the same count); with the default shape every stream of a connection then
    /// wants the same 10 symbols, so each write carries a whole connection's ticks (the
    /// layout of the figures before 2026-11-25, kept to compare with them).
    #[arg(long, value_enum, default_value_t = Layout::Random)]
    pub layout: Layout,
    /// Symbols published (named B000, B001, ...; published once before the run so the
    /// server knows them).
    #[arg(long, default_value_t = 100)]
    pub symbols: usize,
    /// Ticks per second published through one Publish call (the first step's rate with --ramp).
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// Measured time (per step with --ramp).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured time before the measurement (and at the start of each ramp step).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// How long to wait after publishing ends for ticks still in flight.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Raise the rate step by step (x --ramp-factor) until delivery falls below
    /// --min-delivery or p99 passes --max-p99; report the highest rate that passed.
    #[arg(long)]
    pub ramp: bool,
    /// Rate multiplier between ramp steps.
    #[arg(long, default_value_t = 1.25)]
    pub ramp_factor: f64,
    /// Most ramp steps.
    #[arg(long, default_value_t = 12)]
    pub ramp_steps: usize,
    /// A step passes only with p99 latency at most this.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub max_p99: Duration,
    /// A step passes only if this share of expected deliveries arrived.
    #[arg(long, default_value_t = 0.95)]
    pub min_delivery: f64,
    /// Streams that stop reading after subscribing (the first N, one per connection
    /// while N <= --conns); reported apart, and checked for exact KIND_LAGGED counts
    /// when they catch up at the end.
    #[arg(long, default_value_t = 0)]
    pub slow_streams: usize,
    /// Idle-scale scenario instead: open this many streams subscribed to one quiet
    /// symbol each and report the server's resident memory per stream (needs --server-pid).
    #[arg(long)]
    pub idle_streams: Option<usize>,
    /// HTTP/2 stream window of the client connections, in bytes (default: tonic's, 2 MiB).
    /// A small window makes stalled streams back up into the server sooner.
    #[arg(long)]
    pub stream_window: Option<u32>,
    /// The server's pid, to report its CPU per delivered tick and its memory. Repeat it
    /// for a cluster: the CPU of all of them is added up (per delivery it is then the
    /// nodes' average, as each delivers its own streams' ticks).
    #[arg(long = "server-pid", value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// The message bus's pid (a cluster's nats-server), to report its CPU apart.
    #[arg(long)]
    pub bus_pid: Option<u32>,
    /// Open the streams as WebSocket sessions on this web listener (http://host:port of
    /// `tickerd --web-listen`), in proto3 JSON as a browser does; publishing still goes
    /// to --server over gRPC.
    #[arg(long)]
    pub web: Option<String>,
    /// With --web: the `ticker.v1+proto` binary subprotocol instead of JSON.
    #[arg(long, requires = "web")]
    pub web_binary: bool,
    /// How the reading streams read. `frames`: one task per connection over the load
    /// generator's own HTTP/2 reader, the cheapest to run, so the tool takes the least CPU
    /// from a server sharing its machine (plaintext servers only). `tonic`: a tonic client
    /// per connection and a task per stream, as an application would read. Slow streams,
    /// idle streams and https servers always use tonic.
    #[arg(long, value_enum, default_value_t = ReaderKind::Frames)]
    pub reader: ReaderKind,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The timeline shared by the publisher and every reader, in Unix nanoseconds.
#[derive(Debug)]
pub struct Schedule {
    pub start: i64,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub rate: f64,
    /// Ticks stamped in [measure_from, end) count for this step; earlier ones of the
    /// step are warm-up.
    pub measure_from: i64,
    pub end: i64,
}

impl Schedule {
    fn new(opts: &Options, start: i64) -> Schedule {
        let (warmup, measured) = (
            opts.warmup.as_nanos() as i64,
            opts.duration.as_nanos() as i64,
        );
        let count = if opts.ramp { opts.ramp_steps.max(1) } else { 1 };
        let steps = (0..count)
            .map(|i| {
                let begin = start + i as i64 * (warmup + measured);
                Step {
                    rate: opts.rate * opts.ramp_factor.powi(i as i32),
                    measure_from: begin + warmup,
                    end: begin + warmup + measured,
                }
            })
            .collect();
        Schedule { start, steps }
    }

    /// The step whose measured window holds `t`; `steps.len()` for none.
    pub fn step_of(&self, t: i64) -> usize {
        self.steps
            .iter()
            .position(|s| t >= s.measure_from && t < s.end)
            .unwrap_or(self.steps.len())
    }

    /// The publishing rate at `t` (0 outside the schedule).
    pub fn rate_at(&self, t: i64) -> f64 {
        if t < self.start {
            return 0.0;
        }
        self.steps
            .iter()
            .find(|s| t < s.end)
            .map_or(0.0, |s| s.rate)
    }

    pub fn end(&self) -> i64 {
        self.steps.last().map_or(self.start, |s| s.end)
    }
}

/// Errors that end a run.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The schedule, set once every stream is open; ticks before that count in no step.
pub type ScheduleCell = Arc<OnceLock<Schedule>>;

fn step_of(cell: &ScheduleCell, t: i64) -> usize {
    cell.get().map_or(usize::MAX, |s| s.step_of(t))
}

/// Runs the scenario the options describe and returns its report.
pub async fn run(opts: Options) -> Result<Report, Error> {
    let table = Arc::new(SymbolTable::numbered(opts.symbols));
    let symbols: Arc<Vec<String>> = Arc::new(table.names().to_vec());
    if frames_reader(&opts) {
        // Before connecting, so an https server gets the hint, not a handshake error.
        for server in &opts.servers {
            plaintext_authority(server)?;
        }
    }
    // The own reader needs a tonic connection only to publish (and for slow streams).
    let tonic_conns = if frames_reader(&opts) && opts.slow_streams == 0 {
        1
    } else {
        opts.conns.max(1)
    };
    let mut channels = Vec::with_capacity(tonic_conns);
    for i in 0..tonic_conns {
        let server = &opts.servers[i % opts.servers.len().max(1)];
        let endpoint =
            client::quiet_endpoint(server.clone())?.initial_stream_window_size(opts.stream_window);
        channels.push(endpoint.connect().await?);
    }
    let clients: Vec<Client> = channels.iter().cloned().map(Client::new).collect();
    let seed: Vec<PublishRequest> = symbols
        .iter()
        .map(|s| PublishRequest::new(s.clone(), 100.0))
        .collect();
    clients[0].clone().publish(tokio_stream::iter(seed)).await?;
    let pids: Vec<String> = opts.server_pids.iter().map(|p| p.to_string()).collect();
    let pid = pids.first().cloned();
    let bus = opts.bus_pid.map(|p| p.to_string());
    if let Some(n) = opts.idle_streams {
        return idle(&channels, &table, pid.as_deref(), n)
            .await
            .map(Report::Idle);
    }

    let cell: ScheduleCell = Arc::new(OnceLock::new());
    let stop = CancellationToken::new();
    let resume = CancellationToken::new();
    let until = Arc::new(OnceLock::new());
    let fleet = open_fleet(&opts, &channels, &table, &cell, &stop, &resume, &until).await?;

    let start = clock::now_unix_nanos() + 100_000_000;
    let _ = cell.set(Schedule::new(&opts, start));
    let schedule = cell.get().ok_or("schedule unset")?;
    let counts = Arc::new(Mutex::new(PublishCounts::default()));
    let publishing = Publishing::spawn(
        client::quiet_endpoint(opts.servers.first().ok_or("no --server given")?.clone())?,
        symbols.clone(),
        cell.clone(),
        counts.clone(),
        stop.clone(),
    )?;

    let mut steps = Vec::new();
    for (i, step) in schedule.steps.iter().enumerate() {
        sleep_until_unix(step.measure_from).await;
        let each_start: Vec<Option<f64>> = pids.iter().map(|p| procfs::cpu_seconds(p)).collect();
        let switches_start = procfs::context_switches_of(&pids);
        let cpu_start = (
            procfs::cpu_seconds_of(&pids),
            procfs::cpu_seconds("self"),
            bus.as_deref().and_then(procfs::cpu_seconds),
        );
        sleep_until_unix(step.end).await;
        let each_end: Vec<Option<f64>> = pids.iter().map(|p| procfs::cpu_seconds(p)).collect();
        let switches_end = procfs::context_switches_of(&pids);
        let cpu_end = (
            procfs::cpu_seconds_of(&pids),
            procfs::cpu_seconds("self"),
            bus.as_deref().and_then(procfs::cpu_seconds),
        );
        tokio::time::sleep(opts.grace).await;
        let stats = step_stats(&fleet.fast, i);
        let (offered, sent) = {
            let c = counts.lock().unwrap_or_else(|e| e.into_inner());
            (
                c.offered.get(i).copied().unwrap_or(0),
                c.sent_per_symbol.get(i).cloned().unwrap_or_default(),
            )
        };
        let expected: u64 = sent
            .iter()
            .zip(&fleet.subscribers)
            .map(|(n, subs)| n * subs)
            .sum();
        let report = StepReport::new(
            step,
            (step.end - step.measure_from) as f64 / 1e9,
            offered,
            sent.iter().sum(),
            expected,
            &stats,
            cpu_end.0.zip(cpu_start.0).map(|(e, s)| e - s),
            cpu_end.1.zip(cpu_start.1).map(|(e, s)| e - s),
        )
        .with_bus_cpu(cpu_end.2.zip(cpu_start.2).map(|(e, s)| e - s))
        .with_each_server_cpu(
            each_end
                .iter()
                .zip(&each_start)
                .filter_map(|(e, s)| e.zip(*s).map(|(e, s)| e - s))
                .collect(),
        )
        .with_server_switches(
            switches_end
                .zip(switches_start)
                .map(|(e, s)| (e.0.saturating_sub(s.0), e.1.saturating_sub(s.1))),
        );
        let passed = report.passes(opts.min_delivery, opts.max_p99);
        steps.push(report);
        if opts.ramp && !passed {
            break;
        }
    }
    stop_publishing(&stop, publishing, &counts).await?;

    let slow = catch_up(
        &clients[0],
        &table,
        (&fleet.slow, fleet.slow_tasks),
        &resume,
        &until,
    )
    .await?;
    stop.cancel();
    for task in fleet.fast_tasks {
        let _ = task.await;
    }
    for task in fleet.fast_conns {
        let _ = task.await;
    }
    Ok(Report::Run {
        options: report::OptionsEcho::from(&opts),
        steps,
        slow,
    })
}

/// How the reading streams read (`--reader`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReaderKind {
    Frames,
    Tonic,
}

/// How streams pick their symbols (`--layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    Random,
    Blocks,
}

fn step_stats(stats: &SharedStats, step: usize) -> StepStats {
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner());
    stats.get(step).cloned().unwrap_or_default()
}

async fn stop_publishing(
    stop: &CancellationToken,
    publishing: Publishing,
    counts: &Mutex<PublishCounts>,
) -> Result<(), Error> {
    // The publisher ends by itself at the schedule's end, or early for a failed ramp.
    if !publishing.is_finished() {
        stop.cancel();
    }
    let reply = publishing.reply().await?;
    let sent = counts.lock().unwrap_or_else(|e| e.into_inner()).total_sent;
    if reply.accepted != sent {
        return Err(format!("server accepted {} of {sent} ticks sent", reply.accepted).into());
    }
    Ok(())
}

/// Lets the slow streams read up to the last published seq of their symbols, and checks
/// that every tick is either received or reported dropped by a KIND_LAGGED notice.
async fn catch_up(
    client: &Client,
    table: &SymbolTable,
    (stats, slow): (&SharedStats, Vec<tokio::task::JoinHandle<reader::CatchUp>>),
    resume: &CancellationToken,
    until: &OnceLock<Vec<u64>>,
) -> Result<Option<SlowReport>, Error> {
    if slow.is_empty() {
        return Ok(None);
    }
    let quotes = client
        .clone()
        .get_quotes(GetQuotesRequest {
            symbols: table.names().to_vec(),
        })
        .await?
        .into_inner()
        .quotes;
    let mut last = vec![0u64; table.len()];
    for q in quotes {
        if let Some(i) = table.find(q.symbol.as_bytes()) {
            last[i] = q.seq;
        }
    }
    let _ = until.set(last.clone());
    resume.cancel();
    let mut report = SlowReport {
        streams: slow.len(),
        ..SlowReport::default()
    };
    for task in slow {
        let done = tokio::time::timeout(Duration::from_secs(60), task).await??;
        for track in &done {
            let to = last.get(track.symbol).copied().unwrap_or(0);
            report.received += track.received;
            report.dropped += track.dropped;
            if track.received + track.dropped != to.saturating_sub(track.snapshot_seq) {
                report.inexact_symbols += 1;
            }
        }
    }
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner());
    report.lag_notices = stats.iter().map(|s| s.lag_notices).sum();
    report.unannounced_gaps = stats.iter().map(|s| s.unannounced_gaps).sum();
    Ok(Some(report))
}

/// Opens `n` streams, each subscribed to one symbol that never ticks, and reports the
/// server's resident memory growth per stream.
async fn idle(
    channels: &[Channel],
    table: &Arc<SymbolTable>,
    pid: Option<&str>,
    n: usize,
) -> Result<IdleReport, Error> {
    let pid = pid.ok_or("--idle-streams needs --server-pid")?;
    let before = procfs::rss_bytes(pid).ok_or("cannot read the server's memory")?;
    let stop = CancellationToken::new();
    let cell: ScheduleCell = Arc::new(OnceLock::new());
    let until = Arc::new(OnceLock::new());
    let opened: Vec<_> = stream::iter(0..n)
        .map(|j| {
            let channel = Conn::Grpc(channels[j % channels.len()].clone());
            let reader = Reader {
                symbols: vec![j % table.len()],
                table: table.clone(),
                stats: Arc::new(Mutex::new(Vec::new())),
                resume: None,
                stop: stop.clone(),
                schedule: cell.clone(),
            };
            let until = until.clone();
            async move { reader.start(channel, until).await }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let mut tasks = Vec::new();
    for r in opened {
        tasks.push(r?);
    }
    // Let allocator and runtime settle before reading the resident size.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = procfs::rss_bytes(pid).ok_or("cannot read the server's memory")?;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    Ok(IdleReport::new(n, channels.len(), before, after))
}

async fn sleep_until_unix(t: i64) {
    let wait = t - clock::now_unix_nanos();
    if wait > 0 {
        tokio::time::sleep(Duration::from_nanos(wait as u64)).await;
    }
}
