//! Headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`,
//! fantoccini as the client), for the board page's test. A missing browser fails the
//! test with the install hint; nothing here downloads one.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
};

use fantoccini::{Client, ClientBuilder};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const HINT: &str = "the board's test needs Debian's Chromium: apt-get install chromium \
                    chromium-driver (tests/run.sh installs them)";
/// How long chromedriver and Chromium get to start: the browser's own start-up, not an
/// answer of the server's, so longer than `DEADLINE`. Two Chromiums starting beside a
/// busy server on a loaded 2-core machine have taken over 10 s.
const BROWSER_START: std::time::Duration = std::time::Duration::from_secs(60);

/// A chromedriver process and a headless Chromium session through it.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> Browser {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(path).exists(),
                "{path} is missing: {HINT}"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // A process group of its own, so that dropping the browser can end Chromium too:
        // killed alone, chromedriver leaves its Chromium processes running (each page
        // still reconnecting and redrawing), and they load the machine for every test
        // and benchmark after.
        let mut driver = Command::new(CHROMEDRIVER)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}; {HINT}"));
        // It says so on stdout once it listens.
        let stdout = driver.stdout.take().expect("stdout");
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("started successfully") {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        tokio::time::timeout(BROWSER_START, ready)
            .await
            .unwrap_or_else(|_| panic!("chromedriver did not start within {BROWSER_START:?}"))
            .expect("chromedriver started");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-quic",
                    "--window-size=1200,520",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            BROWSER_START,
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{port}")),
        )
        .await
        .unwrap_or_else(|_| panic!("Chromium did not start a session within {BROWSER_START:?}"))
        .unwrap_or_else(|e| panic!("no WebDriver session: {e}; {HINT}"));
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Runs `script` in the page and returns its value as text.
    pub async fn eval(&self, script: &str) -> String {
        let value = super::within(self.client.execute(script, vec![]))
            .await
            .expect("script");
        match value {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        }
    }

    /// Waits (polling the page, as a user's eyes would) until `script` returns true.
    pub async fn until(&self, what: &str, script: &str) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if self.eval(script).await == "true" {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let state = self
                    .eval("return document.getElementById('state')?.textContent + ' | ' + document.body.innerText;")
                    .await;
                panic!("the board never showed: {what}; it shows: {state}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver and the Chromium processes it started.
        let group = format!("-{}", self.driver.id());
        let killed = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !killed {
            let _ = self.driver.kill();
        }
        let _ = self.driver.wait();
    }
}
