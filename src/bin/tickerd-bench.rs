//! `tickerd-bench`: the load generator. Drives a running `ticker.v1` server (tickerd or
//! the grpc-go reference) and prints what it measured. See `loadgen::Options`.

use std::process::ExitCode;

use clap::Parser;
use tickerd::loadgen::{self, Options};

/// Load generator for ticker.v1 servers: publishes through Publish at a set rate while
/// many TickerStreams subscribe, and reports delivery, loss, end-to-end latency (HDR
/// histogram) and, given --server-pid, the server's CPU per delivered tick.
#[derive(Parser)]
#[command(name = "tickerd-bench", version, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    options: Options,
    /// Runtime threads of the load generator. 1 (the default): a single-threaded
    /// runtime, which spends the least CPU per received tick and so leaves the most of
    /// a shared machine to the server under test; more: a work-stealing runtime with
    /// that many workers, for when one core cannot keep up.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match cli.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(n))
            .enable_all()
            .build(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(run(cli.options)),
        Err(e) => {
            eprintln!("tickerd-bench: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> ExitCode {
    let json = options.json;
    match loadgen::run(options).await {
        Ok(report) if json => match serde_json::to_string_pretty(&report) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tickerd-bench: cannot write the report: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tickerd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
