//! Agent identity (issue 17, finding 2): one name, one live session; and a session that
//! ended while its agent may still write is waited out, never skipped.
//!
//! - `a_second_agent_with_a_live_name_is_refused_and_the_first_keeps_serving`: a second
//!   `tabula agent --name A` exits non-zero with the controller's message naming the first's
//!   address; the first keeps its session and serves; a restarted A (after kill -9)
//!   registers at once, without waiting for its old lease.
//! - `a_snapshot_waits_out_a_replaced_session_that_may_still_write`: agent A writes through
//!   a TCP proxy to the controller; the proxy is cut (A keeps writing in place on its lease)
//!   and a new agent registers as A; a snapshot taken then must not change afterwards: it
//!   waits for the old session's lease, so it holds every write the old agent could land.
//! - `a_reconnect_refused_while_the_old_session_counts_is_retried`: the controller does not
//!   notice A's cut (the proxy keeps its side open) while A does and registers again: the
//!   controller refuses (A's old session is live until its lease runs out), A retries, and is
//!   accepted once that lease has run out; it serves again.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::cluster::{Agent, Cluster, agent_entry};
use common::nbd::{Client, stamp_block};
use common::{BIN, free_port, poll};

const BLOCK: u64 = 4096;

/// The local ports of the TCP connections process `pid` has to `127.0.0.1:remote_port`
/// (from /proc: its socket inodes, matched in /proc/net/tcp).
fn ports_to(pid: u32, remote_port: u16) -> Vec<u16> {
    let mut inodes = Vec::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(l) = std::fs::read_link(fd.path()) {
                let l = l.to_string_lossy().to_string();
                if let Some(i) = l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.push(i.to_string());
                }
            }
        }
    }
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut out = Vec::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // local_address rem_address st ... inode (field 9)
        let (local, remote, inode) = (f[1], f[2], f[9]);
        let port = |a: &str| u16::from_str_radix(a.split(':').nth(1).unwrap(), 16).unwrap();
        // 0100007F is 127.0.0.1; state 01 is ESTABLISHED.
        if remote.starts_with("0100007F:")
            && port(remote) == remote_port
            && f[3] == "01"
            && inodes.iter().any(|i| i == inode)
        {
            out.push(port(local));
        }
    }
    out
}

/// A TCP proxy in front of the controller, to cut one agent off it.
struct Proxy {
    port: u16,
    stop: Arc<AtomicBool>,
    /// While set, an end that closes is not passed on to the other side.
    frozen: Arc<AtomicBool>,
    /// (agent side, controller side) of every connection.
    conns: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
    /// Controller sides left open and silent by `cut_agent_side`.
    limbo: Vec<TcpStream>,
    accept: Option<JoinHandle<()>>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, frozen: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    if !frozen.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Write);
    }
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let frozen = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (stop, frozen, conns) = (stop.clone(), frozen.clone(), conns.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match l.accept() {
                        Ok((a, _)) => {
                            a.set_nonblocking(false).unwrap();
                            let Ok(c) = TcpStream::connect(("127.0.0.1", target)) else {
                                continue;
                            };
                            let _ = a.set_nodelay(true);
                            let _ = c.set_nodelay(true);
                            conns
                                .lock()
                                .unwrap()
                                .push((a.try_clone().unwrap(), c.try_clone().unwrap()));
                            let (a2, c2) = (a.try_clone().unwrap(), c.try_clone().unwrap());
                            let f = frozen.clone();
                            std::thread::spawn(move || pump(a, c, f));
                            let f = frozen.clone();
                            std::thread::spawn(move || pump(c2, a2, f));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Proxy {
            port,
            stop,
            frozen,
            conns,
            limbo: Vec::new(),
            accept: Some(accept),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes every connection on both sides and stops listening: new connections are
    /// refused.
    fn cut(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            t.join().unwrap();
        }
        for (a, c) in self.conns.lock().unwrap().drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = c.shutdown(Shutdown::Both);
        }
        for c in self.limbo.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Closes the agent's side of every connection, leaving the controller's side open and
    /// silent (it notices only when the heartbeats stop); new connections pass as before.
    fn cut_agent_side(&mut self) {
        self.frozen.store(true, Ordering::SeqCst);
        let conns: Vec<_> = self.conns.lock().unwrap().drain(..).collect();
        for (a, c) in conns {
            let _ = a.shutdown(Shutdown::Both);
            self.limbo.push(c);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// An agent named `name` in `dir`, talking to the controller at `url`, started and ready.
fn start_agent(dir: &std::path::Path, name: &str, url: &str) -> Agent {
    std::fs::create_dir_all(dir).unwrap();
    let mut a = Agent::prepare(dir, name, "127.0.0.1", free_port(), url, &[]);
    a.spawn(true);
    a
}

fn connected(c: &Cluster, name: &str) -> Option<bool> {
    let st = c.controller.status();
    agent_entry(&st, name).and_then(|a| a["connected"].as_bool())
}

#[test]
fn a_second_agent_with_a_live_name_is_refused_and_the_first_keeps_serving() {
    // A long lease, so a restart that waited for it would stand out from a slow start.
    let mut c = Cluster::start_with_lease("1G", &["A", "B"], "8s");
    c.controller
        .cli(&["vdisk", "create", "vd", "--size", "16M"]);
    let (a_port, b_port) = (c.agent("A").nbd_port, c.agent("B").nbd_port);
    let mut a = Client::connect(a_port, "vd").unwrap();
    a.write(0, &stamp_block(0, 1), true).unwrap();
    // Where A's process connects to the controller from.
    let ports = ports_to(c.agent("A").proc.pid(), c.controller.api_port);
    assert!(!ports.is_empty(), "A has a connection to the controller");

    // A second agent named A: refused at its start, with the reason, and exits non-zero.
    let t = Instant::now();
    let mut dup = Command::new(BIN)
        .args([
            "agent",
            "--controller",
            &c.controller.url(),
            "--nbd-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--name",
            "A",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(st) = dup.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(15) {
            let _ = dup.kill();
            let out = dup.wait_with_output().unwrap();
            panic!(
                "a second agent named A was not refused: still running after 15 s; its log:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    dup.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "the second agent A exited {status}");
    let addr = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .find(|a| stderr.contains(a.as_str()))
        .unwrap_or_else(|| {
            panic!(
                "the refusal names the live session's address (one of ports {ports:?}):\n{stderr}"
            )
        });
    assert!(
        stderr.contains("in use by a live session") && stderr.contains("--name"),
        "the refusal says why and what to do:\n{stderr}"
    );
    assert!(
        !stderr.contains("tabula agent ready"),
        "a refused agent never says it is ready:\n{stderr}"
    );

    // The first keeps its session and serves, through and for others.
    let after = c.controller.agent_view("A").expect("A listed");
    assert_eq!(after["connected"], true, "{after}");
    assert_eq!(after["address"].as_str(), Some(addr.as_str()), "{after}");
    let log = c.agent("A").proc.log_text();
    assert!(
        !log.contains("ended this agent's session")
            && !log.contains("session with the controller failed"),
        "A's session was disturbed:\n{log}"
    );
    a.write(BLOCK, &stamp_block(1, 2), true).unwrap();
    let mut b = Client::connect(b_port, "vd").unwrap();
    assert_eq!(b.read(0, BLOCK as u32).unwrap(), stamp_block(0, 1));
    assert_eq!(b.read(BLOCK, BLOCK as u32).unwrap(), stamp_block(1, 2));
    b.disconnect();
    a.disconnect();

    // A restarted A (its old process killed: the stream drops) registers at once, without
    // waiting for the old session's 8 s lease.
    c.agent_mut("A").proc.kill9();
    let killed = Instant::now();
    poll(
        "the controller sees A's stream end",
        Duration::from_secs(5),
        || (connected(&c, "A") == Some(false)).then_some(()),
    );
    c.agent_mut("A").spawn(false);
    poll("the restarted A connects", Duration::from_secs(20), || {
        connected(&c, "A").filter(|&x| x)
    });
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "a restarted agent waited {took:?} to register again"
    );
    let mut a = Client::connect(c.agent("A").nbd_port, "vd").unwrap();
    assert_eq!(a.read(BLOCK, BLOCK as u32).unwrap(), stamp_block(1, 2));
    a.disconnect();
    c.stop_and_check();
}

/// One write by the old agent: the block and version, and when it was issued.
struct Written {
    block: u64,
    version: u64,
    issued: Instant,
    acked: Instant,
}

#[test]
fn a_snapshot_waits_out_a_replaced_session_that_may_still_write() {
    const BLOCKS: u64 = 64;
    // The old agent writes for up to this lease after the cut: room for the new agent to
    // start and the snapshot to begin meanwhile, even on a loaded machine.
    let mut c = Cluster::start_with_lease("1G", &["B"], "5s");
    c.controller.cli(&[
        "vdisk",
        "create",
        "vd",
        "--size",
        "16M",
        "--segment-size",
        "64K",
    ]);
    // Every block written through B (version 1).
    let b_port = c.agent("B").nbd_port;
    let mut b = Client::connect(b_port, "vd").unwrap();
    for blk in 0..BLOCKS {
        b.write(blk * BLOCK, &stamp_block(blk, 1), false).unwrap();
    }
    b.flush().unwrap();
    b.disconnect();

    // Agent A, through a proxy that will cut it off the controller.
    let mut proxy = Proxy::start(c.controller.api_port);
    let mut a1 = start_agent(&c.dir.join("a1"), "A", &proxy.url());
    c.wait_connected(&["A"], Duration::from_secs(20));

    // A writes over the blocks, round and round, until its I/O fails or it is told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, port) = (stop.clone(), a1.nbd_port);
        std::thread::spawn(move || {
            let mut cl = Client::connect(port, "vd").unwrap();
            let mut log = Vec::new();
            let mut version = 2u64;
            while !stop.load(Ordering::SeqCst) {
                let block = version % BLOCKS;
                let issued = Instant::now();
                if cl
                    .write(block * BLOCK, &stamp_block(block, version), false)
                    .is_err()
                {
                    break;
                }
                log.push(Written {
                    block,
                    version,
                    issued,
                    acked: Instant::now(),
                });
                version += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            log
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    // Cut A off. It may go on writing in place until its lease runs out.
    proxy.cut();
    let cut = Instant::now();
    poll(
        "the controller sees A's session end",
        Duration::from_secs(10),
        || (connected(&c, "A") == Some(false)).then_some(()),
    );
    // A new agent registers as A (a second process with the same name, or a restart that
    // did not kill the old one): its old session is not live any more, so it is accepted.
    let mut a2 = start_agent(&c.dir.join("a2"), "A", &c.controller.url());
    c.wait_connected(&["A"], Duration::from_secs(10));

    let began = Instant::now();
    c.controller.cli(&["snapshot", "create", "vd", "s1"]);
    let returned = Instant::now();
    // Once the old agent's lease has surely run out (5 s plus margin, from before the cut),
    // stop the writer (its last write may wait out --fault-wait).
    std::thread::sleep(Duration::from_secs(6).saturating_sub(cut.elapsed()));
    stop.store(true, Ordering::SeqCst);
    let log = writer.join().unwrap();
    let late: Vec<&Written> = log.iter().filter(|w| w.issued > returned).collect();

    // The snapshot, read through B: every block holds a write issued before `snapshot
    // create` returned, and none older than what was acknowledged before it began.
    let mut b = Client::connect(b_port, "vd@s1").unwrap();
    for blk in 0..BLOCKS {
        let got = b.read(blk * BLOCK, BLOCK as u32).unwrap();
        let version = u64::from_le_bytes(got[8..16].try_into().unwrap());
        assert_eq!(
            got,
            stamp_block(blk, version),
            "snapshot block {blk} is not a whole write"
        );
        if version >= 2 {
            let w = log
                .iter()
                .find(|w| w.version == version)
                .expect("a version the writer wrote");
            assert!(
                w.issued < returned,
                "snapshot block {blk} holds version {version}, written by the replaced agent {:?} \
                 after `snapshot create` returned ({} of its writes landed after that): the \
                 snapshot did not wait for its lease",
                w.issued - returned,
                late.len()
            );
        }
        let floor = log
            .iter()
            .filter(|w| w.block == blk && w.acked < began)
            .map(|w| w.version)
            .max()
            .unwrap_or(1);
        assert!(
            version >= floor,
            "snapshot block {blk} holds version {version}, older than version {floor} acknowledged before the snapshot began"
        );
    }
    b.disconnect();
    assert!(
        log.iter()
            .any(|w| w.acked > began - Duration::from_millis(200)),
        "the old agent was still writing when the snapshot began (the test's premise)"
    );

    // The new A serves the vdisk; everything checks.
    let mut cl = Client::connect(a2.nbd_port, "vd").unwrap();
    cl.write(0, &stamp_block(0, 999_999), true).unwrap();
    cl.disconnect();
    let mut b = Client::connect(b_port, "vd").unwrap();
    assert_eq!(b.read(0, BLOCK as u32).unwrap(), stamp_block(0, 999_999));
    b.disconnect();
    a1.proc.kill9();
    a2.proc.stop();
    c.stop_and_check();
}

#[test]
fn a_reconnect_refused_while_the_old_session_counts_is_retried() {
    let mut c = Cluster::start("1G", &["B"]);
    c.controller
        .cli(&["vdisk", "create", "vd", "--size", "16M"]);
    let mut proxy = Proxy::start(c.controller.api_port);
    let mut a = start_agent(&c.dir.join("a"), "A", &proxy.url());
    c.wait_connected(&["A"], Duration::from_secs(20));
    let mut cl = Client::connect(a.nbd_port, "vd").unwrap();
    cl.write(0, &stamp_block(0, 1), true).unwrap();
    cl.disconnect();

    // A notices the cut at once; the controller only when A's heartbeats stop counting.
    proxy.cut_agent_side();
    let cut = Instant::now();
    poll("A registers again", Duration::from_secs(20), || {
        a.proc
            .log_text()
            .matches("session with the controller started")
            .nth(1)
            .map(|_| ())
    });
    let took = cut.elapsed();
    let log = a.proc.log_text();
    assert!(
        log.contains("refused to register this agent again"),
        "A's new registration was accepted while its old session was live (after {took:?}):\n{log}"
    );
    // The old session's lease at the controller (3 s plus margin) ran from its last
    // heartbeat (every 0.75 s) before the cut.
    assert!(
        took >= Duration::from_secs(2),
        "accepted {took:?} after the cut, before the old session's lease ran out"
    );
    assert!(
        a.proc.running(),
        "a refusal on reconnect must not stop the agent"
    );
    c.wait_connected(&["A"], Duration::from_secs(10));
    let mut cl = Client::connect(a.nbd_port, "vd").unwrap();
    assert_eq!(cl.read(0, BLOCK as u32).unwrap(), stamp_block(0, 1));
    cl.write(BLOCK, &stamp_block(1, 2), true).unwrap();
    cl.disconnect();
    a.proc.stop();
    drop(proxy);
    c.stop_and_check();
}
