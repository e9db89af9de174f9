//! High availability (issue 18): several `tabula controller --etcd` on a real 3-member etcd
//! cluster, agents given every controller's address. Leaders are killed, paused and wiped
//! under I/O; nothing acknowledged may be lost, no allocated I/O may fail, and every
//! controller must end with the same metadata.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::ha::HaCluster;
use common::nbd::{Client, stamp_block};
use common::{fio, have};

const MIB: u64 = 1 << 20;

/// Writes one stamped 4K block at the start of segment `first`, `first + 1`, ... (each a
/// first write: it needs an allocation from the leader), one every `every`, until stopped.
/// Returns the segments acknowledged, the longest single write and any error.
struct FirstWriter {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Vec<u64>, Duration, Option<String>)>,
}

fn first_writer(port: u16, vdisk: &str, first: u64, every: Duration) -> FirstWriter {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let vdisk = vdisk.to_string();
    let handle = std::thread::spawn(move || {
        let mut c = Client::connect(port, &vdisk).expect("connect the first writer");
        let (mut done, mut longest) = (Vec::new(), Duration::ZERO);
        let mut seg = first;
        while !s.load(Ordering::Relaxed) {
            let t = Instant::now();
            if let Err(e) = c.write(seg * MIB, &stamp_block(seg * 256, 1), true) {
                return (
                    done,
                    longest.max(t.elapsed()),
                    Some(format!("segment {seg}: {e:?}")),
                );
            }
            longest = longest.max(t.elapsed());
            done.push(seg);
            seg += 1;
            std::thread::sleep(every);
        }
        (done, longest, None)
    });
    FirstWriter { stop, handle }
}

impl FirstWriter {
    fn finish(self) -> (Vec<u64>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let (done, longest, err) = self.handle.join().unwrap();
        if let Some(e) = err {
            panic!("a first write failed: {e} (after {} succeeded)", done.len());
        }
        (done, longest)
    }
}

/// Every segment in `done` reads back its stamp through a new connection.
fn check_first_writes(port: u16, vdisk: &str, done: &[u64]) {
    let mut c = Client::connect(port, vdisk).unwrap();
    for &seg in done {
        let got = c.read(seg * MIB, 4096).unwrap();
        assert!(
            got == stamp_block(seg * 256, 1),
            "{vdisk}: the acknowledged first write to segment {seg} is not there"
        );
    }
}

/// fio: random 4K writes over 48 MiB of `vdisk` (first writes and overwrites), verified.
fn fio_job(port: u16, vdisk: &str) -> Vec<String> {
    fio::args(
        &format!("nbd://127.0.0.1:{port}/{vdisk}"),
        vdisk,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=48m",
            "--iodepth=8",
            "--fsync=64",
        ],
    )
}

/// kill -9 of the leader while two agents write (fio verify and a stream of first writes):
/// a standby takes over, no I/O fails, every acknowledged write reads back, and every
/// controller ends with the same metadata.
#[test]
fn leader_killed_under_io_loses_nothing() {
    if !have("fio") {
        return;
    }
    let Some(mut c) = HaCluster::start(3, &["a1", "a2"]) else {
        return;
    };
    for a in ["a1", "a2"] {
        c.cli(&["vdisk", "create", &format!("v-{a}"), "--size", "1G"]);
    }
    let mut jobs = Vec::new();
    let mut writers = Vec::new();
    for a in ["a1", "a2"] {
        let port = c.agent(a).nbd_port;
        let job = fio_job(port, &format!("v-{a}"));
        jobs.push((fio::spawn(&job, Duration::from_secs(120)), job));
        writers.push((
            a,
            port,
            first_writer(port, &format!("v-{a}"), 512, Duration::from_millis(20)),
        ));
    }
    std::thread::sleep(Duration::from_secs(2));
    let old = c.leader().expect("one leader");
    let killed = Instant::now();
    c.controllers[old].proc.kill9();
    let (new, took) = c.wait_leader(Some(old), Duration::from_secs(15));
    eprintln!(
        "failover: {} leads {took:?} after {} was killed",
        c.controllers[new].name, c.controllers[old].name
    );
    // First writes keep going through the failover.
    std::thread::sleep(Duration::from_secs(3));
    for (child, job) in jobs {
        fio::check(
            child.wait_with_output().unwrap(),
            &job,
            Some(48 * MIB),
            48 * MIB,
        );
    }
    for (a, port, w) in writers {
        let (done, longest) = w.finish();
        eprintln!(
            "{a}: {} first writes, the longest took {longest:?}",
            done.len()
        );
        assert!(
            done.iter().any(|_| true) && longest < Duration::from_secs(15),
            "{a}: first writes stalled {longest:?} (killed {:?} ago)",
            killed.elapsed()
        );
        check_first_writes(port, &format!("v-{a}"), &done);
    }
    c.check_live();
    // The killed controller comes back as a standby and catches up.
    c.controllers[old].spawn();
    c.wait_caught_up(Duration::from_secs(20));
    assert_eq!(c.controllers[old].role().as_deref(), Some("standby"));
    c.stop_and_check();
}
