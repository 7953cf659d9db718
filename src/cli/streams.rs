//! `ticker streams`: who is connected and who is falling behind, from the server's
//! operations endpoint (`tickerd --metrics-listen`, path /streams).

use std::time::Duration;

use clap::Args;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::connect::{exit, CliError};
use crate::ops::metrics::StreamView;

#[derive(Args, Debug, Clone)]
pub struct StreamsArgs {
    /// The server's operations endpoint (its --metrics-listen address), host:port.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub metrics: String,
    /// Print the JSON as the server sent it.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: StreamsArgs, timeout: Duration) -> Result<(), CliError> {
    let body = tokio::time::timeout(timeout, get(&args.metrics, "/streams"))
        .await
        .map_err(|_| {
            CliError::new(
                exit::CANNOT_CONNECT,
                format!("{} did not answer within {timeout:?}", args.metrics),
            )
        })??;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let streams: Vec<StreamView> = serde_json::from_str(&body).map_err(|e| {
        CliError::new(
            exit::REJECTED,
            format!("{} sent no stream list: {e}", args.metrics),
        )
    })?;
    println!(
        "{:>6} {:<13} {:<22} {:<16} {:>9} {:>5} {:>12} {:>10} {:>8}",
        "ID", "RPC", "PEER", "PRINCIPAL", "AGE", "SUBS", "SENT", "DROPPED", "BEHIND"
    );
    for s in &streams {
        println!(
            "{:>6} {:<13} {:<22} {:<16} {:>8.0}s {:>5} {:>12} {:>10} {:>8}",
            s.id,
            s.rpc,
            s.peer,
            s.principal,
            s.age_seconds,
            s.subscriptions,
            s.ticks_sent,
            s.ticks_dropped,
            s.behind
        );
    }
    Ok(())
}

/// A plain HTTP/1.1 GET; the endpoint answers with `Connection: close` semantics.
async fn get(addr: &str, path: &str) -> Result<String, CliError> {
    let cannot = |e: std::io::Error| {
        CliError::new(
            exit::CANNOT_CONNECT,
            format!("cannot reach {addr}: {}", super::connect::root_cause(&e)),
        )
    };
    let mut socket = TcpStream::connect(addr).await.map_err(cannot)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.map_err(cannot)?;
    let mut raw = Vec::new();
    socket.read_to_end(&mut raw).await.map_err(cannot)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or_default();
        return Err(CliError::new(
            exit::REJECTED,
            format!("{addr}{path}: {status}"),
        ));
    }
    Ok(body.to_string())
}
