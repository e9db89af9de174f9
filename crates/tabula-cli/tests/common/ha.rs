//! High-availability harness: a real 3-member etcd cluster, several `tabula controller
//! --etcd` processes and `tabula agent`s given every controller's address, all on loopback,
//! started and stopped by process id.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use tabula_etcd::testing::EtcdCluster;

use super::cluster::{Agent, Proc};
use super::{BIN, assert_success, check_data_dir, free_port, run_timeout, strings};

/// Agents' lease: longer than a failover (election TTL plus catch-up), so allocated I/O
/// rides through it.
pub const LEASE: &str = "10s";
pub const ELECTION_TTL: &str = "1s";
pub const FAULT_WAIT: &str = "20s";

/// One `tabula controller --etcd`.
pub struct HaController {
    pub proc: Proc,
    pub name: String,
    pub data_dir: PathBuf,
    pub api_port: u16,
    pub etcd: String,
    pub lease: String,
    /// Extra environment (test hooks), through `env`.
    pub env: Vec<(String, String)>,
}

impl HaController {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    fn set_args(&mut self) {
        let mut prefix = Vec::new();
        if !self.env.is_empty() {
            prefix.push("env".to_string());
            prefix.extend(self.env.iter().map(|(k, v)| format!("{k}={v}")));
        }
        self.proc.prefix = prefix;
        self.proc.args = strings(&[
            "controller",
            "--etcd",
            &self.etcd,
            "--name",
            &self.name,
            "--data-dir",
            self.data_dir.to_str().unwrap(),
            "--api-listen",
            &format!("127.0.0.1:{}", self.api_port),
            "--lease",
            &self.lease,
            "--election-ttl",
            ELECTION_TTL,
            "--refresh-interval",
            "5s",
        ]);
    }

    /// Starts (or restarts) it and waits until its admin port answers.
    pub fn spawn(&mut self) {
        self.set_args();
        let from = self.proc.start();
        self.proc
            .wait_marker(from, "control plane on etcd", Duration::from_secs(30))
            .unwrap_or_else(|log| panic!("{log}"));
        super::poll(
            &format!("{} answers /v1/ha", self.name),
            Duration::from_secs(20),
            || self.ha(),
        );
    }

    /// Its own view (`GET /v1/ha`): name, role, applied, epoch, leader, controllers.
    pub fn ha(&self) -> Option<Value> {
        let (status, body) = http_get(self.api_port, "/v1/ha")?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }

    pub fn role(&self) -> Option<String> {
        self.ha()
            .and_then(|v| v["role"].as_str().map(str::to_string))
    }

    pub fn applied(&self) -> Option<u64> {
        self.ha().and_then(|v| v["applied"].as_u64())
    }
}

/// A GET on loopback: status and body, or `None` if nothing answers within 2 s.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// etcd, controllers and agents.
pub struct HaCluster {
    pub etcd: EtcdCluster,
    pub controllers: Vec<HaController>,
    pub agents: Vec<Agent>,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl HaCluster {
    /// A 3-member etcd, `n` controllers (the first one started leads), a 2 GiB file
    /// container, and agents named `agents` given every controller's address. `None` when
    /// etcd is not installed (outside CI).
    pub fn start(n: usize, agents: &[&str]) -> Option<HaCluster> {
        Self::start_with(n, agents, |_| Vec::new())
    }

    /// Like [`start`](Self::start), controller `i` (from 0) with the environment `env(i)`
    /// (test hooks).
    pub fn start_with(
        n: usize,
        agents: &[&str],
        env: impl Fn(usize) -> Vec<(String, String)>,
    ) -> Option<HaCluster> {
        let etcd = EtcdCluster::try_start(3)?;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut c = HaCluster {
            etcd,
            controllers: Vec::new(),
            agents: Vec::new(),
            dir: dir.clone(),
            _tmp: tmp,
        };
        for i in 0..n {
            let name = format!("c{}", i + 1);
            let mut ctl = HaController {
                proc: Proc::new(
                    &format!("controller {name}"),
                    dir.join(format!("{name}.log")),
                    &[],
                    Vec::new(),
                ),
                name: name.clone(),
                data_dir: dir.join(format!("{name}-data")),
                api_port: free_port(),
                etcd: c.etcd.endpoint_list(),
                lease: LEASE.into(),
                env: env(i),
            };
            ctl.spawn();
            if i == 0 {
                super::poll("c1 leads", Duration::from_secs(20), || {
                    (ctl.role().as_deref() == Some("leader")).then_some(())
                });
            }
            c.controllers.push(ctl);
        }
        let img = dir.join("pool.img");
        c.cli(&[
            "container",
            "add",
            "pool",
            "--path",
            img.to_str().unwrap(),
            "--size",
            "2G",
        ]);
        for name in agents {
            let mut a = Agent::prepare(
                &dir,
                name,
                "127.0.0.1",
                free_port(),
                &c.controller_list(),
                &[],
            );
            a.fault_wait = FAULT_WAIT.into();
            a.spawn(true);
            c.agents.push(a);
        }
        c.wait_agents(agents, Duration::from_secs(30));
        Some(c)
    }

    /// Every controller's address, comma-separated (what agents and the CLI are given).
    pub fn controller_list(&self) -> String {
        self.controllers
            .iter()
            .map(HaController::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The admin CLI with every controller's address (it finds the leader itself).
    pub fn try_cli(&self, args: &[&str]) -> Output {
        let list = self.controller_list();
        let mut full = vec!["--controller", &list];
        full.extend(args);
        run_timeout(BIN, &full, Duration::from_secs(60))
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.try_cli(args);
        assert!(
            out.status.success(),
            "tabula {args:?} failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let text = self.cli(&a);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON from {a:?} ({e}):\n{text}"))
    }

    /// The index of the controller that says it leads, if exactly one does.
    pub fn leader(&self) -> Option<usize> {
        let leaders: Vec<usize> = (0..self.controllers.len())
            .filter(|&i| self.controllers[i].role().as_deref() == Some("leader"))
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    }

    /// Waits until a controller other than `not` leads; returns it and how long it took.
    pub fn wait_leader(&self, not: Option<usize>, limit: Duration) -> (usize, Duration) {
        let t = Instant::now();
        let i = super::poll("a new leader", limit, || {
            self.leader().filter(|&i| Some(i) != not)
        });
        (i, t.elapsed())
    }

    /// Waits until every named agent is connected to the leader.
    pub fn wait_agents(&self, names: &[&str], limit: Duration) -> Value {
        super::poll(
            &format!("agents {names:?} connected to the leader"),
            limit,
            || {
                let out = self.try_cli(&["status", "--json"]);
                let st: Value = serde_json::from_slice(&out.stdout).ok()?;
                names
                    .iter()
                    .all(|n| {
                        st["agents"].as_array().is_some_and(|a| {
                            a.iter().any(|a| {
                                a["name"].as_str() == Some(n)
                                    && a["connected"].as_bool() == Some(true)
                            })
                        })
                    })
                    .then_some(st)
            },
        )
    }

    /// Waits until every running controller has applied as much as the leader.
    pub fn wait_caught_up(&self, limit: Duration) {
        super::poll("every controller caught up", limit, || {
            let applied: Vec<u64> = self
                .controllers
                .iter()
                .filter_map(HaController::applied)
                .collect();
            (applied.len()
                == self
                    .controllers
                    .iter()
                    .filter(|c| c.proc.child.is_some())
                    .count()
                && applied.windows(2).all(|w| w[0] == w[1]))
            .then_some(())
        });
    }

    /// `tabula check` through the leader.
    pub fn check_live(&self) {
        assert_success(&self.try_cli(&["check"]), "tabula check (live, leader)");
    }

    pub fn agent(&self, name: &str) -> &Agent {
        self.agents.iter().find(|a| a.name == name).unwrap()
    }

    /// Stops agents and controllers cleanly and checks every controller's data dir.
    pub fn stop_and_check(&mut self) {
        for a in &mut self.agents {
            a.proc.stop();
        }
        for c in &mut self.controllers {
            c.proc.stop();
        }
        for c in &self.controllers {
            if c.data_dir.exists() {
                check_data_dir(&c.data_dir);
            }
        }
    }
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for c in &self.controllers {
                eprintln!("===== {} log tail:\n{}", c.proc.what, c.proc.log_tail(60));
            }
            for a in &self.agents {
                eprintln!("===== {} log tail:\n{}", a.proc.what, a.proc.log_tail(40));
            }
        }
        for a in &mut self.agents {
            a.proc.kill9();
        }
        for c in &mut self.controllers {
            c.proc.kill9();
        }
    }
}
