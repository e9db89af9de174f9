//! Test harness: runs the real `tabula` binary as a separate process on loopback, drives it
//! with real NBD clients, and stops it by process id.
#![allow(dead_code)] // Each test file uses a different part of the harness.

pub mod cluster;
pub mod fio;
pub mod ha;
pub mod nbd;
pub mod remote;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tabula");

/// Whether an external tool is installed. Under `CI=true` a missing tool fails the test: CI
/// must never pass by skipping.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "{tool} is not installed; CI needs it (see README: the test command installs it)"
            );
        }
        eprintln!("SKIP: {tool} is not installed (install it to run this test)");
    }
    found
}

/// Owned copies of `args` (a command line kept for later).
pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `tabula serve` process with its own data directory and ports.
pub struct Server {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub nbd_port: u16,
    pub api_port: u16,
    pub container_size: String,
    pub log: PathBuf,
    /// When set, NBD is served on this Unix socket instead of TCP.
    pub nbd_unix: Option<PathBuf>,
    /// Extra environment for the server process (test hooks).
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments.
    pub args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    pub fn start(container_size: &str) -> Server {
        Self::start_with(container_size, false)
    }

    /// Like [`start`](Self::start), with extra environment for the server.
    pub fn start_env(container_size: &str, env: &[(&str, &str)]) -> Server {
        let mut s = Self::prepare(container_size, false);
        s.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s.spawn();
        s
    }

    /// Like [`start`](Self::start), with extra arguments for `tabula serve`.
    pub fn start_args(container_size: &str, args: &[&str]) -> Server {
        let mut s = Self::prepare(container_size, false);
        s.args = strings(args);
        s.spawn();
        s
    }

    /// Like [`start`](Self::start), serving NBD on a Unix socket when `unix` is set.
    pub fn start_with(container_size: &str, unix: bool) -> Server {
        let mut s = Self::prepare(container_size, unix);
        s.spawn();
        s
    }

    fn prepare(container_size: &str, unix: bool) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        Server {
            child: None,
            data_dir,
            nbd_port: free_port(),
            api_port: free_port(),
            container_size: container_size.to_string(),
            log: tmp.path().join("serve.log"),
            nbd_unix: unix.then(|| tmp.path().join("nbd.sock")),
            env: Vec::new(),
            args: Vec::new(),
            _tmp: Some(tmp),
        }
    }

    /// Starts (or restarts) the process on the same data directory and ports. On the first
    /// start, a port taken by someone else in the meantime means new ports and another try.
    pub fn spawn(&mut self) {
        let first = !self.data_dir.exists();
        for _ in 0..5 {
            match self.try_spawn() {
                Ok(()) => return,
                Err(log) if first && log.contains("binding") => {
                    self.nbd_port = free_port();
                    self.api_port = free_port();
                }
                Err(log) => panic!("tabula serve exited; log:\n{log}"),
            }
        }
        panic!(
            "tabula serve could not bind free ports; log:\n{}",
            self.log_text()
        );
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(BIN)
            .args([
                "serve",
                "--data-dir",
                self.data_dir.to_str().unwrap(),
                "--nbd-listen",
                &match &self.nbd_unix {
                    Some(p) => format!("unix:{}", p.display()),
                    None => format!("127.0.0.1:{}", self.nbd_port),
                },
                "--api-listen",
                &format!("127.0.0.1:{}", self.api_port),
                "--container-size",
                &self.container_size,
            ])
            .args(&self.args)
            .env("TABULA_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log.try_clone().unwrap())
            .spawn()
            .expect("start tabula serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(_st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(self.log_text());
            }
            // Ready when *this* server answers (not another test's on a reused port).
            let out = self.try_cli(&["status", "--json"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                if v["data_dir"].as_str() == Some(self.data_dir.to_str().unwrap()) {
                    return Ok(());
                }
            }
            assert!(
                Instant::now() < deadline,
                "tabula serve did not start; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, vdisk: &str) -> String {
        match &self.nbd_unix {
            Some(p) => format!("nbd+unix:///{vdisk}?socket={}", p.display()),
            None => format!("nbd://127.0.0.1:{}/{vdisk}", self.nbd_port),
        }
    }

    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn try_cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--controller")
            .arg(self.api())
            .args(args)
            .output()
            .expect("run tabula")
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.try_cli(args);
        assert!(
            out.status.success(),
            "tabula {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.cli(&a)).unwrap()
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(c) = self.child.take() {
            kill_child(c);
        }
    }

    /// SIGTERM and wait (a clean stop).
    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            stop_child(c);
        }
    }

    /// Stops the server and runs `tabula check --data-dir` on its data; panics on violations.
    pub fn stop_and_check(&mut self) {
        self.stop();
        check_data_dir(&self.data_dir);
    }
}

/// Sends SIGTERM to `child` (asks it to stop cleanly) without waiting.
pub fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

/// SIGTERM, wait up to 20 s, then kill -9; reaps the child.
pub fn stop_child(mut child: Child) {
    sigterm(&child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.wait();
}

/// kill -9 and reap.
pub fn kill_child(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

pub fn check_data_dir(dir: &Path) {
    let out = Command::new(BIN)
        .args(["check", "--data-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert_success(&out, "tabula check");
}

/// Panics unless the command that gave `out` (`what`) succeeded; shows its status and output.
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs an external command that must succeed (with a time bound); returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = run_timeout(cmd, args, Duration::from_secs(300));
    assert_success(&out, &format!("{cmd} {args:?}"));
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn run_timeout(cmd: &str, args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new("timeout")
        .arg("-k")
        .arg("5")
        .arg(limit.as_secs().to_string())
        .arg(cmd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    let _ = &mut child;
    child.wait_with_output().unwrap()
}

/// qemu-io against a vdisk over NBD, each `-c` a command; fails the test on any error
/// (qemu-io exits 0 even when a command fails, so its output is checked too).
pub fn qemu_io(url: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(url);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io {cmds:?}:\n{out}"
    );
    out
}

/// Polls `f` every 100 ms until it returns `Some`, or panics with `what` after `limit`.
pub fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
