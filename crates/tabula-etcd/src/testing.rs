//! Test harness: a real etcd cluster of `etcd` processes on loopback ports, data in a
//! temporary directory, stopped by process id when dropped. Only for tests (feature
//! `testing`).

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::Etcd;

/// The etcd server binary (Debian/Ubuntu: package `etcd-server`).
pub const ETCD_BIN: &str = "etcd";

/// How long a new cluster gets to accept its first write.
const START_WITHIN: Duration = Duration::from_secs(20);

/// Whether the `etcd` binary is installed. Under `CI=true` a missing binary panics: CI must
/// never pass by skipping. Otherwise prints a skip notice; the test then returns.
pub fn have_etcd() -> bool {
    let found = Command::new(ETCD_BIN)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "{ETCD_BIN} is not installed; CI needs it (apt-get install etcd-server; scripts/test.sh installs it)"
            );
        }
        eprintln!(
            "SKIP: {ETCD_BIN} is not installed (apt-get install etcd-server to run this test)"
        );
    }
    found
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster for tests.
pub struct EtcdCluster {
    members: Vec<Member>,
    token: String,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// `members` etcd processes forming one cluster, ready: a write has succeeded. Panics
    /// (with the members' logs) when the cluster does not come up within 20 s, and when
    /// `etcd` is not installed: call [`have_etcd`] first, or use [`try_start`](Self::try_start).
    pub fn start(members: usize) -> EtcdCluster {
        assert!(members > 0, "an etcd cluster needs at least one member");
        // A port picked as free may be taken before etcd binds it: then new ports.
        let mut failure = String::new();
        for _ in 0..3 {
            let mut cluster = EtcdCluster::prepare(members);
            match cluster.boot() {
                Ok(()) => return cluster,
                Err(e) if e.contains("address already in use") => failure = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("etcd could not bind free ports:\n{failure}");
    }

    /// [`start`](Self::start), or `None` (after a skip notice) when `etcd` is not installed
    /// outside CI.
    pub fn try_start(members: usize) -> Option<EtcdCluster> {
        have_etcd().then(|| EtcdCluster::start(members))
    }

    fn prepare(members: usize) -> EtcdCluster {
        static CLUSTERS: AtomicU64 = AtomicU64::new(0);
        let dir = tempfile::tempdir().expect("creating a temporary directory for etcd");
        let ports = free_ports(2 * members);
        let members = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.path().join(format!("m{i}")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        EtcdCluster {
            members,
            // A cluster's members only talk to members with the same token, so a member of
            // another test's cluster on a reused port is never mistaken for one of ours.
            token: format!(
                "tabula-test-{}-{}",
                std::process::id(),
                CLUSTERS.fetch_add(1, Ordering::Relaxed)
            ),
            dir,
        }
    }

    fn boot(&mut self) -> Result<(), String> {
        for i in 0..self.members.len() {
            self.spawn(i);
        }
        let endpoints = self.endpoints();
        let ready = std::thread::spawn(move || wait_writable(endpoints, START_WITHIN));
        loop {
            if ready.is_finished() {
                return match ready.join() {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!(
                        "the etcd cluster did not accept a write within {START_WITHIN:?}: {e}\n{}",
                        self.logs()
                    )),
                    Err(_) => Err(format!("the readiness check panicked\n{}", self.logs())),
                };
            }
            for i in 0..self.members.len() {
                let exited = self.members[i]
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                if let Some(status) = exited {
                    self.members[i].child = None;
                    let logs = self.logs();
                    self.stop_all();
                    // The readiness thread gives up on its own within START_WITHIN.
                    return Err(format!(
                        "etcd member {i} exited ({status}) while starting\n{logs}"
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn(&mut self, i: usize) {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        assert!(m.child.is_none(), "etcd member {i} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("opening the etcd member's log");
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new(ETCD_BIN);
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            // Ignored when the data directory exists (a restarted member).
            .args(["--initial-cluster-state", "new"])
            // Fast elections, so tests that kill members take seconds.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args([
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log);
        if cfg!(target_arch = "aarch64") {
            // etcd 3.4 refuses to start on arm64 unless told it is fine.
            cmd.env("ETCD_UNSUPPORTED_ARCH", "arm64");
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ETCD_BIN}: {e}; is etcd-server installed?"));
        self.members[i].child = Some(child);
    }

    /// The members' client URLs, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The client URLs joined with commas (the form command lines take).
    pub fn endpoint_list(&self) -> String {
        self.endpoints().join(",")
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Never true: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A client for every member's endpoint.
    pub async fn client(&self, timeout: Duration) -> Etcd {
        Etcd::connect(&self.endpoints(), timeout)
            .await
            .expect("connecting to the test etcd cluster")
    }

    /// Member `i`'s process id. Panics when it is not running.
    pub fn pid(&self, i: usize) -> u32 {
        self.members[i]
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("etcd member {i} is not running"))
            .id()
    }

    /// Whether member `i`'s process is running.
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Kills member `i` with SIGKILL and waits for it to exit.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.members[i]
            .child
            .take()
            .unwrap_or_else(|| panic!("etcd member {i} is not running"));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Restarts killed member `i` on its ports and data directory, and waits (up to 10 s)
    /// until it accepts client connections. It serves requests once it has a leader, which
    /// needs a majority of members running.
    pub fn start_member(&mut self, i: usize) {
        self.spawn(i);
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = format!("127.0.0.1:{}", self.members[i].client_port);
        while TcpStream::connect(&addr).is_err() {
            let exited = self.members[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.members[i].child = None;
                panic!(
                    "restarted etcd member {i} exited ({status})\n{}",
                    self.log(i)
                );
            }
            assert!(
                Instant::now() < deadline,
                "restarted etcd member {i} does not listen on {addr} after 10 s\n{}",
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Member `i`'s log (etcd's stderr).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    /// Every member's log, labelled.
    pub fn logs(&self) -> String {
        (0..self.members.len())
            .map(|i| format!("--- etcd member {i} log ---\n{}", self.log(i)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The temporary directory holding the members' data and logs.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn stop_all(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// `n` distinct ports that were free a moment ago (all held open together while picking, so
/// none is picked twice).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

/// Retries a put until one succeeds or `within` has passed. Runs its own runtime, so it works
/// from synchronous tests and from inside an async test alike.
fn wait_writable(endpoints: Vec<String>, within: Duration) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("building a runtime: {e}"))?;
    rt.block_on(async move {
        let deadline = Instant::now() + within;
        let etcd = Etcd::connect(&endpoints, Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match etcd.put(b"/tabula-test/ready", b"", 0).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
}
