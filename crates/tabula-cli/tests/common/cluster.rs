//! Distributed-mode harness: one `tabula controller` process and any number of `tabula agent`
//! processes, each with its own log file, started and stopped by process id. Processes may run
//! inside a network namespace (`ip netns exec NS ...`, which execs, so the pid is tabula's).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    BIN, assert_success, check_data_dir, free_port, kill_child, run_timeout, sigterm, stop_child,
    strings,
};

/// Lease, table refresh and fault wait used by the tests unless they say otherwise.
pub const LEASE: &str = "3s";
pub const REFRESH: &str = "5s";
pub const FAULT_WAIT: &str = "5s";

/// One tabula process: its command line, log file and (while running) its child.
pub struct Proc {
    pub what: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    /// Run before the binary, e.g. `ip netns exec NS`.
    pub prefix: Vec<String>,
    pub args: Vec<String>,
    pub stopped: bool,
}

impl Proc {
    pub fn new(what: &str, log: PathBuf, prefix: &[String], args: Vec<String>) -> Proc {
        Proc {
            what: what.to_string(),
            child: None,
            log,
            prefix: prefix.to_vec(),
            args,
            stopped: false,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_len(&self) -> usize {
        std::fs::metadata(&self.log)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// Starts the process (appending to its log) and returns the log length before the start,
    /// so readiness is judged on this run's lines only.
    pub fn start(&mut self) -> usize {
        assert!(self.child.is_none(), "{} already running", self.what);
        let from = self.log_len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args(&self.args)
            .env("TABULA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.what));
        self.child = Some(child);
        self.stopped = false;
        from
    }

    /// Waits until the log, after byte `from`, contains `marker`. `Err(log)` if the process
    /// exited first.
    pub fn wait_marker(
        &mut self,
        from: usize,
        marker: &str,
        limit: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.log_text();
            if text.get(from..).is_some_and(|t| t.contains(marker)) {
                return Ok(());
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "{} exited ({st}) before \"{marker}\"; log:\n{}",
                    self.what,
                    self.log_text()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} printed no \"{marker}\" within {limit:?}; log:\n{}",
                    self.what,
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.what))
            .id()
    }

    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {}", self.what);
    }

    pub fn sigstop(&mut self) {
        self.signal("STOP");
        self.stopped = true;
    }

    pub fn sigcont(&mut self) {
        self.signal("CONT");
        self.stopped = false;
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(c) = self.child.take() {
            kill_child(c);
        }
        self.stopped = false;
    }

    /// SIGTERM, wait up to 20 s, then kill -9.
    pub fn stop(&mut self) {
        if self.stopped {
            self.sigcont();
        }
        if let Some(c) = self.child.take() {
            stop_child(c);
        }
    }

    /// SIGTERM; returns how long the process took to exit, or `None` if it still runs after
    /// `limit` (it is left running: Drop or `kill9` ends it).
    pub fn terminate_within(&mut self, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        let c = self.child.as_mut()?;
        sigterm(c);
        while t.elapsed() < limit {
            if c.try_wait().unwrap().is_some() {
                self.child = None;
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn binding_failed(log: &str) -> bool {
    let l = log.to_lowercase();
    l.contains("binding") || l.contains("address already in use") || l.contains("addrinuse")
}

/// A tabula process a test starts and restarts on its own port: the controller or an agent.
trait Daemon {
    /// The log line that says the process is ready.
    const READY: &'static str;

    fn proc(&mut self) -> &mut Proc;

    /// Sets the process's command line from its current settings.
    fn set_args(&mut self);

    /// Picks a new free port for the process to listen on.
    fn rebind(&mut self);

    /// Starts the process and waits (30 s) for its ready line. When `may_rebind` and the port
    /// was taken by someone else in the meantime, a new port and another try, five in all.
    fn start_ready(&mut self, may_rebind: bool) {
        for _ in 0..5 {
            self.set_args();
            let from = self.proc().start();
            match self
                .proc()
                .wait_marker(from, Self::READY, Duration::from_secs(30))
            {
                Ok(()) => return,
                Err(log) if may_rebind && binding_failed(&log) => {
                    self.proc().kill9();
                    self.rebind();
                }
                Err(log) => panic!("{log}"),
            }
        }
        let proc = self.proc();
        panic!(
            "{} could not bind a free port:\n{}",
            proc.what,
            proc.log_text()
        );
    }
}

/// A `tabula controller`.
pub struct Controller {
    pub proc: Proc,
    pub data_dir: PathBuf,
    /// Host part of the API address (127.0.0.1, or a namespace's address).
    pub host: String,
    pub api_port: u16,
    pub container_size: String,
    pub lease: String,
    pub refresh: String,
}

impl Controller {
    pub fn prepare(dir: &Path, host: &str, api_port: u16, prefix: &[String]) -> Controller {
        let mut c = Controller {
            proc: Proc::new("controller", dir.join("controller.log"), prefix, Vec::new()),
            data_dir: dir.join("ctl-data"),
            host: host.to_string(),
            api_port,
            container_size: "2G".into(),
            lease: LEASE.into(),
            refresh: REFRESH.into(),
        };
        c.set_args();
        c
    }

    /// Starts (or restarts, on the same data directory and port) the controller and waits
    /// until it is ready and answers as *this* controller. On the first start a port taken in
    /// the meantime means a new port and another try (`rebind` may pick it).
    pub fn spawn(&mut self) {
        let first = !self.data_dir.exists();
        self.start_ready(first && self.host == "127.0.0.1");
        self.wait_answers();
    }

    fn wait_answers(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.try_cli(&["status", "--json"]);
            if out.status.success() {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                if v["data_dir"].as_str() == Some(self.data_dir.to_str().unwrap()) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline && self.proc.running(),
                "controller printed ready but does not answer status; last CLI stderr: {}\nlog:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.api_port)
    }

    /// Runs the admin CLI against this controller (in the controller's namespace, if any),
    /// bounded to 60 s.
    pub fn try_cli(&self, args: &[&str]) -> Output {
        self.try_cli_within(args, Duration::from_secs(60))
    }

    pub fn try_cli_within(&self, args: &[&str], limit: Duration) -> Output {
        let url = self.url();
        let mut full: Vec<&str> = self.proc.prefix.iter().map(String::as_str).collect();
        full.extend([BIN, "--controller", &url]);
        full.extend(args);
        run_timeout(full[0], &full[1..], limit)
    }

    /// A CLI command that must succeed; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.try_cli(args);
        assert!(
            out.status.success(),
            "tabula {args:?} failed ({}): {}\n{}\ncontroller log tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            self.proc.log_tail(40)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let text = self.cli(&a);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON from {a:?} ({e}):\n{text}"))
    }

    pub fn status(&self) -> Value {
        self.json(&["status"])
    }

    /// The `agents` entry named `name` in `status --json`, if listed.
    pub fn agent_view(&self, name: &str) -> Option<Value> {
        let st = self.status();
        assert!(
            st["agents"].is_array(),
            "status --json has an agents array: {st}"
        );
        agent_entry(&st, name).cloned()
    }

    /// `tabula check` against the running controller must pass.
    pub fn check_live(&self) {
        assert_success(&self.try_cli(&["check"]), "tabula check (live)");
    }

    /// Stops the controller cleanly and runs `tabula check --data-dir` on its data.
    pub fn stop_and_check(&mut self) {
        self.proc.stop();
        check_data_dir(&self.data_dir);
    }
}

impl Daemon for Controller {
    const READY: &'static str = "tabula controller ready";

    fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    fn set_args(&mut self) {
        self.proc.args = strings(&[
            "controller",
            "--data-dir",
            self.data_dir.to_str().unwrap(),
            "--api-listen",
            &format!("{}:{}", self.host, self.api_port),
            "--container-size",
            &self.container_size,
            "--lease",
            &self.lease,
            "--refresh-interval",
            &self.refresh,
        ]);
    }

    fn rebind(&mut self) {
        self.api_port = free_port();
    }
}

/// A `tabula agent`.
pub struct Agent {
    pub proc: Proc,
    pub name: String,
    /// Host part of the NBD address.
    pub host: String,
    pub nbd_port: u16,
    pub controller_url: String,
    pub fault_wait: String,
}

impl Agent {
    pub fn prepare(
        dir: &Path,
        name: &str,
        host: &str,
        nbd_port: u16,
        controller_url: &str,
        prefix: &[String],
    ) -> Agent {
        Agent {
            proc: Proc::new(
                &format!("agent {name}"),
                dir.join(format!("agent-{name}.log")),
                prefix,
                Vec::new(),
            ),
            name: name.to_string(),
            host: host.to_string(),
            nbd_port,
            controller_url: controller_url.to_string(),
            fault_wait: FAULT_WAIT.into(),
        }
    }

    /// Starts (or restarts, on the same port) the agent and waits for its ready line. On the
    /// first start (`first`) on loopback, a port taken in the meantime means a new port.
    pub fn spawn(&mut self, first: bool) {
        self.start_ready(first && self.host == "127.0.0.1");
    }

    pub fn url(&self, vdisk: &str) -> String {
        format!("nbd://{}:{}/{vdisk}", self.host, self.nbd_port)
    }

    /// A minimal-client connection to one of its exports (loopback only).
    pub fn client(&self, vdisk: &str) -> super::nbd::Client {
        super::nbd::Client::connect(self.nbd_port, vdisk)
            .unwrap_or_else(|e| panic!("connect to {} export {vdisk}: {e:?}", self.proc.what))
    }
}

impl Daemon for Agent {
    const READY: &'static str = "tabula agent ready";

    fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    fn set_args(&mut self) {
        self.proc.args = strings(&[
            "agent",
            "--controller",
            &self.controller_url,
            "--nbd-listen",
            &format!("{}:{}", self.host, self.nbd_port),
            "--name",
            &self.name,
            "--fault-wait",
            &self.fault_wait,
        ]);
    }

    fn rebind(&mut self) {
        self.nbd_port = free_port();
    }
}

/// A controller and agents on loopback, in one temporary directory.
pub struct Cluster {
    pub agents: Vec<Agent>,
    pub controller: Controller,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    /// A controller with a `container_size` default container, and agents named `names`,
    /// all started and ready; waits until every agent shows as connected.
    pub fn start(container_size: &str, names: &[&str]) -> Cluster {
        Self::start_with_lease(container_size, names, LEASE)
    }

    /// Like [`start`](Self::start) with the controller's `--lease`.
    pub fn start_with_lease(container_size: &str, names: &[&str], lease: &str) -> Cluster {
        Cluster::start_with_controller_env(container_size, names, lease, &[])
    }

    pub fn agent(&self, name: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.name == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    pub fn agent_mut(&mut self, name: &str) -> &mut Agent {
        self.agents
            .iter_mut()
            .find(|a| a.name == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    /// Waits until `status --json` lists every named agent as connected over gRPC.
    pub fn wait_connected(&self, names: &[&str], limit: Duration) -> Value {
        wait_connected(&self.controller, names, limit)
    }

    /// Stops the agents, then the controller, and checks the data directory.
    pub fn stop_and_check(&mut self) {
        stop_and_check(&mut self.controller, &mut self.agents);
    }
}

/// Stops the agents, then the controller, cleanly, and checks the controller's data directory.
pub fn stop_and_check(controller: &mut Controller, agents: &mut [Agent]) {
    for a in agents {
        a.proc.stop();
    }
    controller.stop_and_check();
}

/// Kills (-9) the agents, then the controller; first, when the test is failing, prints the
/// tail of every log for the report.
pub fn kill_all(controller: &mut Controller, agents: &mut [Agent]) {
    if std::thread::panicking() {
        eprintln!(
            "===== controller log ({}) tail:\n{}",
            controller.proc.log.display(),
            controller.proc.log_tail(60)
        );
        for a in agents.iter() {
            eprintln!(
                "===== {} log ({}) tail:\n{}",
                a.proc.what,
                a.proc.log.display(),
                a.proc.log_tail(60)
            );
        }
    }
    for a in agents {
        a.proc.kill9();
    }
    controller.proc.kill9();
}

/// The `agents` entry named `name` in a `status --json` report, if listed.
pub fn agent_entry<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["agents"]
        .as_array()?
        .iter()
        .find(|a| a["name"].as_str() == Some(name))
}

/// Waits until `status --json` lists every named agent as connected over gRPC; returns the
/// last status.
pub fn wait_connected(ctl: &Controller, names: &[&str], limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let out = ctl.try_cli(&["status", "--json"]);
        let st: Value = if out.status.success() {
            serde_json::from_slice(&out.stdout).unwrap_or_default()
        } else {
            Value::Null
        };
        let ok = names.iter().all(|n| {
            st["agents"].as_array().is_some_and(|agents| {
                agents.iter().any(|a| {
                    a["name"].as_str() == Some(n)
                        && a["connected"].as_bool() == Some(true)
                        && a["transport"].as_str() == Some("grpc")
                })
            })
        });
        if ok {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "agents {names:?} not all connected (transport grpc) within {limit:?}; status: {st}\n\
             controller log tail:\n{}",
            ctl.proc.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        kill_all(&mut self.controller, &mut self.agents);
    }
}

/// A prefix that runs a process with extra environment (`env NAME=VALUE ... BIN`; `env`
/// execs, so the pid stays the process's). For test hooks such as
/// `TABULA_TEST_SNAPSHOT_COMMIT_PAUSE_MS`: set it as `controller.proc.prefix` before a
/// (re)start, and clear the prefix to restart without them. The CLI run through
/// [`Controller::try_cli`] gets the same environment, which it ignores. Loopback only (a
/// namespace prefix would be replaced).
pub fn env_prefix(env: &[(&str, &str)]) -> Vec<String> {
    if env.is_empty() {
        return Vec::new();
    }
    let mut p = vec!["env".to_string()];
    p.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    p
}

impl Cluster {
    /// Like [`start_with_lease`](Self::start_with_lease), with the controller started with the
    /// extra environment `env` (see [`env_prefix`]).
    pub fn start_with_controller_env(
        container_size: &str,
        names: &[&str],
        lease: &str,
        env: &[(&str, &str)],
    ) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut controller = Controller::prepare(&dir, "127.0.0.1", free_port(), &env_prefix(env));
        controller.container_size = container_size.to_string();
        controller.lease = lease.to_string();
        controller.spawn();
        let mut agents = Vec::new();
        for name in names {
            let mut a =
                Agent::prepare(&dir, name, "127.0.0.1", free_port(), &controller.url(), &[]);
            a.spawn(true);
            agents.push(a);
        }
        let c = Cluster {
            agents,
            controller,
            dir,
            _tmp: tmp,
        };
        c.wait_connected(names, Duration::from_secs(30));
        c
    }
}
