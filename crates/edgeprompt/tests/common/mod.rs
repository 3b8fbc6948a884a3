//! What the service-level tests share: the binary under test and its processes.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edgeprompt"))
}

/// A child process killed on drop, its stderr (logging at info) kept in a file.
pub struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Runs the binary with `args`.
    pub fn start(args: &[&str], log: PathBuf) -> Proc {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        Proc::spawn(cmd, log)
    }

    /// Runs `cmd` (the binary wrapped, say, in `ip netns exec`).
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env("EDGEPROMPT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("binary starts");
        Proc { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The model the end-to-end tests run (`$EDGEPROMPT_MODEL`, else the fetched default).
pub fn model() -> String {
    ep_testutil::require_test_model()
        .to_string_lossy()
        .into_owned()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn dir_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `curl` with a JSON body (or none); returns (status, body).
pub fn curl(method: &str, url: &str, token: Option<&str>, body: Option<&Value>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "-S",
        "-X",
        method,
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        url,
    ]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        c.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &b.to_string(),
        ]);
    }
    let o: Output = c.output().expect("curl runs");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A `redis-server` (Debian's package) on loopback, killed on drop.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    /// On a free port, keeping nothing on disk.
    pub fn start(dir: &Path) -> Redis {
        Redis::start_at(dir, free_port(), false)
    }

    /// On `port`; with `persist`, its data in an append-only file in `dir` (a restart finds it).
    pub fn start_at(dir: &Path, port: u16, persist: bool) -> Redis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                if persist { "yes" } else { "no" },
                "--dir",
                &dir_str(dir),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/test.sh installs it)");
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "redis did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Redis { child, port }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `edgeprompt generate --json` at temperature 0 — the reference the services' answers must equal:
/// its JSON record (`text`, `prompt_tokens`, …).
pub fn generate_json(system: &str, user: &str, max_tokens: usize) -> Value {
    let o = Command::new(bin())
        .args([
            "generate",
            "--model",
            &model(),
            "--threads",
            "2",
            "--system",
            system,
            "--prompt",
            user,
            "--temperature",
            "0",
            "--max-tokens",
            &max_tokens.to_string(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

/// Waits (at most 120 s) until the cloud at `port` reports cloud prompt `name` ready; its info.
pub fn wait_ready(port: u16, token: &str, name: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let (_, b) = curl(
            "GET",
            &format!("http://127.0.0.1:{port}/v1/cloud-prompts/{name}"),
            Some(token),
            None,
        );
        let v: Value = serde_json::from_str(&b).unwrap_or(Value::Null);
        if v["status"] == "ready" {
            return v;
        }
        assert_ne!(v["status"], "failed", "{b}");
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{name} not ready on the cloud at {port}: {b}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The arguments of `edgeprompt edge` on `port` as the end-to-end tests run it: the test model on 2
/// threads as model id `smol`, fetching from the cloud on `cloud_port` with `token`, its disk cache in
/// `cache` when given, then `extra`.
pub fn edge_args(
    port: u16,
    cloud_port: u16,
    token: &str,
    cache: Option<&Path>,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "edge",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--model",
        &model(),
        "--threads",
        "2",
        "--model-id",
        "smol",
        "--cloud-url",
        &format!("http://127.0.0.1:{cloud_port}"),
        "--cloud-token",
        token,
    ]
    .map(str::to_string)
    .to_vec();
    if let Some(c) = cache {
        args.extend(["--cache-dir".to_string(), dir_str(c)]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}
