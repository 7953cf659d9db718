//! `ticker`: the command-line client. Everything lives in `tickerd::cli`.

use std::process::ExitCode;

use clap::Parser;
use tickerd::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    match cli::run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.code != cli::exit::INTERRUPTED {
                eprintln!("ticker: {e}");
            }
            ExitCode::from(e.code)
        }
    }
}
