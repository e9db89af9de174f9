//! Remote containers for tests: an NBD server in its own process (`tabula container serve` or
//! `qemu-nbd`) on a loopback port, killed and restarted by process id.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{BIN, free_port, kill_child};

/// Which server exports the file.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// `tabula container serve`
    Tabula,
    /// `qemu-nbd` (a peer NBD server)
    QemuNbd,
}

/// One exported file, served on a fixed port across restarts.
pub struct NbdServer {
    pub kind: Kind,
    pub file: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
}

impl NbdServer {
    /// Creates `file` (sparse, `size` bytes) and serves it as export `disk0`.
    pub fn start(kind: Kind, file: &Path, size: u64) -> NbdServer {
        let f = std::fs::File::create(file).unwrap();
        f.set_len(size).unwrap();
        let mut s = NbdServer {
            kind,
            file: file.to_path_buf(),
            port: free_port(),
            log: file.with_extension("log"),
            child: None,
        };
        s.spawn();
        s
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/disk0", self.port)
    }

    /// Starts the server (again, on the same port) and waits until it accepts connections.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let port = self.port.to_string();
        let file = self.file.to_str().unwrap();
        let mut cmd = match self.kind {
            Kind::Tabula => {
                let mut c = Command::new(BIN);
                c.args([
                    "container",
                    "serve",
                    file,
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                ]);
                c
            }
            Kind::QemuNbd => {
                let mut c = Command::new("qemu-nbd");
                // --persistent: keep serving after a client disconnects; --shared: many
                // clients (agents, the controller) at once.
                c.args([
                    "-f",
                    "raw",
                    "-x",
                    "disk0",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "--persistent",
                    "--shared=16",
                    "--cache=writeback",
                    file,
                ]);
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {:?}: {e}", self.kind));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{:?} exited ({st}); log:\n{}",
                    self.kind,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{:?} did not listen on {}",
                self.kind,
                self.port
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {pid}");
    }

    /// Freezes the server: connections stay open and nothing answers (a hung device).
    pub fn sigstop(&self) {
        self.signal("STOP");
    }

    pub fn sigcont(&self) {
        self.signal("CONT");
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(c) = self.child.take() {
            kill_child(c);
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped process must be continued to die promptly under some kernels.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill9();
    }
}
