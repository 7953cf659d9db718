//! The subscribing streams of a run: which symbols each stream wants (`--layout`), how
//! they are spread over connections, and which reader reads them (`--reader`).
//! Neighbours: `mod.rs` runs the scenario over them, `reader` and `frames` read.

use std::sync::{Arc, Mutex, OnceLock};

use futures_util::{stream, StreamExt};
use rand::{rngs::SmallRng, SeedableRng};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{
    frames,
    reader::{self, Conn, Reader, SharedStats, StepStats},
    wire::SymbolTable,
    Error, Layout, Options, ReaderKind, ScheduleCell,
};

/// The subscribing streams. The fast (reading) ones share one set of statistics, and the
/// slow ones another: a histogram per stream would be 1,000 cold ones (~24 KB each at
/// this range), each tick's record a cache miss in the tool that should cost the least.
pub(super) struct Fleet {
    pub(super) fast: SharedStats,
    pub(super) fast_tasks: Vec<tokio::task::JoinHandle<reader::CatchUp>>,
    /// With `--reader frames`: one task per connection for all its reading streams.
    pub(super) fast_conns: Vec<tokio::task::JoinHandle<Vec<reader::CatchUp>>>,
    pub(super) slow: SharedStats,
    pub(super) slow_tasks: Vec<tokio::task::JoinHandle<reader::CatchUp>>,
    /// Fast (reading) subscribers per symbol index.
    pub(super) subscribers: Vec<u64>,
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn open_fleet(
    opts: &Options,
    channels: &[Channel],
    table: &Arc<SymbolTable>,
    cell: &ScheduleCell,
    stop: &CancellationToken,
    resume: &CancellationToken,
    until: &Arc<OnceLock<Vec<u64>>>,
) -> Result<Fleet, Error> {
    let buckets = if opts.ramp { opts.ramp_steps.max(1) } else { 1 };
    let subs_per_stream = opts.subs_per_stream.max(1);
    let mut subscribers = vec![0u64; table.len()];
    let fast: SharedStats = Arc::new(Mutex::new(vec![StepStats::new(); buckets]));
    let slow_stats: SharedStats = Arc::new(Mutex::new(vec![StepStats::new(); buckets]));
    let mut plans = Vec::new();
    // Fixed seed: the same flags give the same subscriptions, run after run.
    let mut rng = SmallRng::seed_from_u64(1);
    for j in 0..opts.streams {
        let indices: Vec<usize> = match opts.layout {
            Layout::Random => {
                rand::seq::index::sample(&mut rng, table.len(), subs_per_stream.min(table.len()))
                    .into_vec()
            }
            Layout::Blocks => (0..subs_per_stream)
                .map(|k| (j * subs_per_stream + k) % table.len())
                .collect(),
        };
        let slow = j < opts.slow_streams;
        if !slow {
            indices.iter().for_each(|&i| subscribers[i] += 1);
        }
        let stats = if slow { &slow_stats } else { &fast };
        plans.push((j, indices, stats.clone(), slow));
    }
    let mut fleet = Fleet {
        fast,
        fast_tasks: Vec::new(),
        fast_conns: Vec::new(),
        slow: slow_stats,
        slow_tasks: Vec::new(),
        subscribers,
    };
    let reader = |subs, stats: &SharedStats, slow: bool| Reader {
        symbols: subs,
        table: table.clone(),
        stats: stats.clone(),
        resume: slow.then(|| resume.clone()),
        stop: stop.clone(),
        schedule: cell.clone(),
    };
    if frames_reader(opts) {
        let conns = opts.conns.max(1);
        let mut per_conn: Vec<Vec<Reader>> = (0..conns).map(|_| Vec::new()).collect();
        let mut rest = Vec::new();
        for (j, subs, stats, slow) in plans {
            if slow {
                rest.push((j, subs, stats, slow));
            } else {
                per_conn[j % conns].push(reader(subs, &stats, false));
            }
        }
        let opened: Vec<_> = stream::iter(per_conn.into_iter().enumerate())
            .map(|(c, readers)| {
                let server = opts.servers[c % opts.servers.len().max(1)].clone();
                async move {
                    let authority = plaintext_authority(&server)?;
                    frames::start(authority, opts.stream_window, readers).await
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        for r in opened {
            fleet.fast_conns.push(r?);
        }
        plans = rest;
    }
    let opened: Vec<_> = stream::iter(plans)
        .map(|(j, subs, stats, slow)| {
            let conn = match &opts.web {
                Some(url) => Conn::Web(url.clone(), opts.web_binary),
                None => Conn::Grpc(channels[j % channels.len()].clone()),
            };
            let reader = reader(subs, &stats, slow);
            let until = until.clone();
            async move { reader.start(conn, until).await.map(|task| (task, slow)) }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for r in opened {
        let (task, slow) = r?;
        if slow {
            fleet.slow_tasks.push(task);
        } else {
            fleet.fast_tasks.push(task);
        }
    }
    Ok(fleet)
}

/// Whether the reading streams use the own HTTP/2 reader: asked for, and over gRPC.
pub(super) fn frames_reader(opts: &Options) -> bool {
    opts.reader == ReaderKind::Frames && opts.web.is_none() && opts.idle_streams.is_none()
}

/// `host:port` of an `http://` server URL, for the own reader (which speaks no TLS).
pub(super) fn plaintext_authority(server: &str) -> Result<String, Error> {
    let uri: http::Uri = server
        .parse()
        .map_err(|e| format!("{server} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "--reader frames speaks plaintext HTTP/2 only; {server} needs --reader tonic"
        )
        .into());
    }
    let authority = uri.authority().ok_or(format!("{server} names no host"))?;
    Ok(match authority.port_u16() {
        Some(_) => authority.to_string(),
        None => format!("{}:80", authority.host()),
    })
}
