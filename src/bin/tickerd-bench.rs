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
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = Cli::parse().options;
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
