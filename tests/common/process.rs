//! The real binaries for the tests that need them: `tickerd` on 127.0.0.1:0 (its
//! address read from its log) and the `ticker` CLI (its output readable line by line).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
};

use tokio::sync::mpsc;

use super::within;

/// The real `tickerd` binary on 127.0.0.1:0, its address read from its log.
pub struct TickerdProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// The operations endpoint, when started with `--metrics-listen`.
    pub metrics_addr: Option<SocketAddr>,
    /// The web listener, when started with `--web-listen`.
    pub web_addr: Option<SocketAddr>,
    pub log: mpsc::UnboundedReceiver<String>,
}

impl TickerdProcess {
    pub async fn spawn(args: &[&str]) -> TickerdProcess {
        Self::spawn_with_env(args, &[]).await
    }

    pub async fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> TickerdProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tickerd"))
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tickerd");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, mut log) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut metrics_addr, mut web_addr) = (None, None);
        let addr = loop {
            let line = within(log.recv())
                .await
                .expect("tickerd exited before listening");
            let addr_of = |line: &str| {
                let start = line.find("\"addr\":\"").expect("addr field") + 8;
                let rest = &line[start..];
                rest[..rest.find('"').expect("addr end")].parse().ok()
            };
            if line.contains("metrics endpoint listening") {
                metrics_addr = addr_of(&line);
            }
            if line.contains("web listening") {
                web_addr = addr_of(&line);
            }
            if line.contains("tickerd listening") {
                let start = line.find("\"addr\":\"").expect("addr field") + 8;
                let rest = &line[start..];
                break rest[..rest.find('"').expect("addr end")]
                    .parse()
                    .expect("addr");
            }
        };
        TickerdProcess {
            child,
            addr,
            metrics_addr,
            web_addr,
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn tls_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Waits for a log line containing every one of `needles`; returns it.
    pub async fn log_line(&mut self, needles: &[&str]) -> String {
        loop {
            let line = within(self.log.recv()).await.expect("tickerd log closed");
            if needles.iter().all(|n| line.contains(n)) {
                return line;
            }
        }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for TickerdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real `ticker` binary, its output lines readable as they come.
pub struct TickerCli {
    pub child: tokio::process::Child,
    pub stdout: mpsc::UnboundedReceiver<String>,
    pub stderr: mpsc::UnboundedReceiver<String>,
    stdin: Option<tokio::process::ChildStdin>,
}

impl TickerCli {
    pub fn spawn(server: &str, args: &[&str]) -> TickerCli {
        Self::spawn_env(server, args, &[])
    }

    pub fn spawn_env(server: &str, args: &[&str], env: &[(&str, &str)]) -> TickerCli {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ticker"))
            .args(["--server", server])
            .args(args)
            .env_remove("TICKER_TOKEN")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn ticker");
        let stdout = lines(child.stdout.take().expect("stdout"));
        let stderr = lines(child.stderr.take().expect("stderr"));
        let stdin = child.stdin.take();
        TickerCli {
            child,
            stdout,
            stderr,
            stdin,
        }
    }

    /// Waits for a stdout line containing `needle`; returns it.
    pub async fn out_line(&mut self, needle: &str) -> String {
        wait_line(&mut self.stdout, needle).await
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub async fn err_line(&mut self, needle: &str) -> String {
        wait_line(&mut self.stderr, needle).await
    }

    pub async fn type_line(&mut self, line: &str) {
        use tokio::io::AsyncWriteExt;
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write stdin");
        stdin.flush().await.expect("flush stdin");
    }

    /// Waits for the exit; returns the code and everything printed.
    pub async fn finish(mut self) -> (i32, String, String) {
        drop(self.stdin.take());
        let status = within(self.child.wait()).await.expect("wait ticker");
        // The readers end at EOF, which follows the exit.
        let mut out = Vec::new();
        while let Some(line) = within(self.stdout.recv()).await {
            out.push(line);
        }
        let mut err = Vec::new();
        while let Some(line) = within(self.stderr.recv()).await {
            err.push(line);
        }
        (status.code().unwrap_or(-1), out.join("\n"), err.join("\n"))
    }
}

fn lines(
    pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> mpsc::UnboundedReceiver<String> {
    use tokio::io::AsyncBufReadExt;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

async fn wait_line(rx: &mut mpsc::UnboundedReceiver<String>, needle: &str) -> String {
    loop {
        let line = within(rx.recv())
            .await
            .unwrap_or_else(|| panic!("output ended before {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}
