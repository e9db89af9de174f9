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
            !done.is_empty() && longest < Duration::from_secs(15),
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

/// What `tabula check --data-dir` finds in a stopped controller's store: the figures that
/// say what the metadata holds.
fn stored_summary(dir: &std::path::Path) -> serde_json::Value {
    let out = common::run_timeout(
        common::BIN,
        &["check", "--data-dir", dir.to_str().unwrap(), "--json"],
        Duration::from_secs(60),
    );
    common::assert_success(&out, "tabula check --data-dir");
    let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keep = [
        "ok",
        "containers",
        "vdisks",
        "entries",
        "mapped",
        "shared",
        "free",
        "zeroing",
        "copying",
    ];
    v.as_object_mut()
        .unwrap()
        .retain(|k, _| keep.contains(&k.as_str()));
    v
}

/// SIGSTOP of the leader past its lease: a standby takes over and first writes go on; the
/// resumed old leader answers nothing, steps down (re-executing itself as a standby) and ends
/// with the same metadata as the new leader.
#[test]
fn a_paused_leader_commits_nothing_and_becomes_a_standby() {
    let Some(mut c) = HaCluster::start(2, &["a1"]) else {
        return;
    };
    c.cli(&["vdisk", "create", "v", "--size", "1G"]);
    let port = c.agent("a1").nbd_port;
    let w = first_writer(port, "v", 0, Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(1));
    let old = c.leader().expect("one leader");
    let pid = c.controllers[old].proc.pid();
    c.controllers[old].proc.sigstop();
    let (new, took) = c.wait_leader(Some(old), Duration::from_secs(15));
    eprintln!(
        "{} leads {took:?} after {} was paused",
        c.controllers[new].name, c.controllers[old].name
    );
    std::thread::sleep(Duration::from_secs(3));
    let log_before = c.controllers[old].proc.log_text().len();
    c.controllers[old].proc.sigcont();
    common::poll(
        "the resumed leader steps down",
        Duration::from_secs(15),
        || {
            c.controllers[old].proc.log_text()[log_before..]
                .contains("stepping down")
                .then_some(())
        },
    );
    // The same process (re-executed, same pid) is now a standby following the new leader.
    common::poll(
        "the old leader is a standby",
        Duration::from_secs(20),
        || (c.controllers[old].role().as_deref() == Some("standby")).then_some(()),
    );
    assert_eq!(
        c.controllers[old].proc.pid(),
        pid,
        "stepping down keeps the pid"
    );
    std::thread::sleep(Duration::from_secs(1));
    let (done, longest) = w.finish();
    eprintln!("{} first writes, the longest took {longest:?}", done.len());
    assert!(
        longest < Duration::from_secs(15),
        "first writes stalled {longest:?}"
    );
    check_first_writes(port, "v", &done);
    assert_eq!(c.leader(), Some(new), "the new leader still leads");
    c.check_live();
    c.wait_caught_up(Duration::from_secs(20));
    c.stop_and_check();
    let a = stored_summary(&c.controllers[0].data_dir);
    let b = stored_summary(&c.controllers[1].data_dir);
    assert_eq!(a, b, "both controllers hold the same metadata");
    assert!(a["entries"].as_u64().unwrap() > 0, "{a}");
}

/// The leader is killed and its data dir deleted; it comes back empty, installs an image
/// from the new leader (the log in etcd was truncated meanwhile) and follows; then the new
/// leader is killed and the rebuilt one leads, with every acknowledged write intact.
#[test]
fn a_wiped_controller_catches_up_and_can_lead() {
    let env = |_| vec![("TABULA_TEST_HA_KEEP_RECORDS".to_string(), "5".to_string())];
    let Some(mut c) = HaCluster::start_with(2, &["a1"], env) else {
        return;
    };
    c.cli(&["vdisk", "create", "v", "--size", "16G"]);
    let port = c.agent("a1").nbd_port;
    let mut all = Vec::new();
    // 40 first writes: 40 records and more; truncation (every 5 s) keeps only 5.
    let w = first_writer(port, "v", 0, Duration::from_millis(5));
    std::thread::sleep(Duration::from_secs(2));
    all.extend(w.finish().0);
    c.wait_caught_up(Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(6));
    let old = c.leader().unwrap();
    c.controllers[old].proc.kill9();
    std::fs::remove_dir_all(&c.controllers[old].data_dir).unwrap();
    let (new, _) = c.wait_leader(Some(old), Duration::from_secs(15));
    let w = first_writer(port, "v", 4000, Duration::from_millis(5));
    std::thread::sleep(Duration::from_secs(1));
    all.extend(w.finish().0);
    c.controllers[old].spawn();
    c.wait_caught_up(Duration::from_secs(30));
    assert!(
        c.controllers[old]
            .proc
            .log_text()
            .contains("installed a metadata image"),
        "the wiped controller installed an image (the log was truncated)"
    );
    // Now the rebuilt controller must lead.
    c.controllers[new].proc.kill9();
    let (back, took) = c.wait_leader(Some(new), Duration::from_secs(15));
    assert_eq!(back, old);
    eprintln!("the rebuilt controller leads after {took:?}");
    let w = first_writer(port, "v", 8000, Duration::from_millis(5));
    std::thread::sleep(Duration::from_secs(3));
    let (more, longest) = w.finish();
    assert!(!more.is_empty() && longest < Duration::from_secs(15));
    all.extend(more);
    check_first_writes(port, "v", &all);
    c.check_live();
    c.controllers[new].spawn();
    c.wait_caught_up(Duration::from_secs(30));
    c.stop_and_check();
    assert_eq!(
        stored_summary(&c.controllers[0].data_dir),
        stored_summary(&c.controllers[1].data_dir)
    );
}

/// A fault the leader committed but never answered (killed while the answer waits, a test
/// hook): the agent retries at the new leader and gets the mapping the committed record
/// holds, not a second one.
#[test]
fn a_commit_whose_answer_is_lost_is_answered_the_same() {
    let env = |i| {
        if i == 0 {
            vec![(
                "TABULA_TEST_FAULT_ANSWER_PAUSE_MS".to_string(),
                "60000".to_string(),
            )]
        } else {
            Vec::new()
        }
    };
    let Some(mut c) = HaCluster::start_with(2, &["a1"], env) else {
        return;
    };
    c.cli(&["vdisk", "create", "v", "--size", "1G"]);
    let port = c.agent("a1").nbd_port;
    let seg = 700;
    let writer = std::thread::spawn(move || {
        let mut cl = Client::connect(port, "v").unwrap();
        let t = Instant::now();
        let r = cl.write(seg * MIB, &stamp_block(seg * 256, 1), true);
        (r, t.elapsed())
    });
    common::poll(
        "the leader holds the answer",
        Duration::from_secs(20),
        || {
            c.controllers[0]
                .proc
                .log_text()
                .contains("a committed fault waits before its answer")
                .then_some(())
        },
    );
    // What the leader committed: the record in etcd that maps the segment.
    let committed = committed_mapping(&c, seg);
    c.controllers[0].proc.kill9();
    let (r, took) = writer.join().unwrap();
    r.unwrap_or_else(|e| panic!("the first write failed after {took:?}: {e:?}"));
    eprintln!("the first write completed after {took:?}");
    let map = c.json(&["vdisk", "map", "v"]);
    let mapped: Vec<&serde_json::Value> = map["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e["container"].is_null())
        .collect();
    assert_eq!(mapped.len(), 1, "one mapped run: {map:#}");
    assert_eq!(mapped[0]["offset"].as_u64(), Some(seg * MIB));
    assert_eq!(
        mapped[0]["physical_offset"].as_u64(),
        Some(committed),
        "the retried fault got the committed mapping: {map:#}"
    );
    check_first_writes(port, "v", &[seg]);
    c.check_live();
    c.stop_and_check();
}

/// The physical byte offset the etcd log's records map virtual segment `seg` of vdisk 1 to.
fn committed_mapping(c: &HaCluster, seg: u64) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd = rt.block_on(c.etcd.client(Duration::from_secs(5)));
    let (kvs, _) = rt
        .block_on(etcd.range(
            b"/tabula/log/",
            &tabula_etcd::prefix_end(b"/tabula/log/"),
            0,
        ))
        .unwrap();
    let block = seg * 256;
    let mut found = None;
    for kv in kvs {
        assert_eq!(kv.value[0], 0, "small records are stored inline");
        let changes: serde_json::Value = serde_json::from_slice(&kv.value[1..]).unwrap();
        for ch in changes.as_array().unwrap() {
            let Some(r) = ch.get("ReplaceEntries") else {
                continue;
            };
            for e in r["entries"].as_array().unwrap() {
                let (b, end) = (e["begin"].as_u64().unwrap(), e["end"].as_u64().unwrap());
                if b <= block && block < end && !e["target"].is_null() {
                    found = Some((e["target"]["block"].as_u64().unwrap() + block - b) * 4096);
                }
            }
        }
    }
    found.expect("a committed record maps the segment")
}

/// etcd loses one member (nothing noticed), then quorum: allocated I/O goes on, first
/// writes fail after --fault-wait; quorum back, everything recovers.
#[test]
fn etcd_quorum_loss_and_return() {
    let Some(mut c) = HaCluster::start(2, &["a1"]) else {
        return;
    };
    c.cli(&["vdisk", "create", "v", "--size", "1G"]);
    let port = c.agent("a1").nbd_port;
    let mut cl = Client::connect(port, "v").unwrap();
    for seg in 0..4 {
        cl.write(seg * MIB, &stamp_block(seg * 256, 1), true)
            .unwrap();
    }
    // One member of three: nothing noticed.
    c.etcd.kill(2);
    for seg in 4..8 {
        cl.write(seg * MIB, &stamp_block(seg * 256, 1), true)
            .unwrap_or_else(|e| panic!("a first write with one etcd member down: {e:?}"));
    }
    // Two of three: allocated I/O continues (within the agents' lease).
    c.etcd.kill(1);
    let lost = Instant::now();
    while lost.elapsed() < Duration::from_secs(3) {
        cl.write(MIB, &stamp_block(256, 2), true)
            .unwrap_or_else(|e| panic!("an overwrite with etcd's quorum lost: {e:?}"));
        assert_eq!(cl.read(0, 4096).unwrap(), stamp_block(0, 1));
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut fresh = Client::connect(port, "v").unwrap();
    let t = Instant::now();
    let r = fresh.write(900 * MIB, &stamp_block(900 * 256, 1), false);
    assert!(r.is_err(), "a first write without etcd quorum fails");
    eprintln!("the first write failed after {:?} ({r:?})", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(40));
    // Quorum back: a leader again, first writes work.
    c.etcd.start_member(1);
    c.etcd.start_member(2);
    let back = Instant::now();
    let mut again = None;
    while back.elapsed() < Duration::from_secs(60) {
        let Ok(mut cl) = Client::connect(port, "v") else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        if cl
            .write(901 * MIB, &stamp_block(901 * 256, 1), true)
            .is_ok()
        {
            again = Some(back.elapsed());
            break;
        }
    }
    let again = again.expect("first writes work again after quorum returned");
    eprintln!("first writes work again {again:?} after quorum returned");
    check_first_writes(port, "v", &[0, 2, 3, 4, 5, 6, 7, 901]);
    c.check_live();
    c.stop_and_check();
}

/// A second controller under a running one's name is refused (it would take the other's
/// member key and confuse who leads); a restart of a killed controller under its own name
/// is accepted once the killed run's lease has ended.
#[test]
fn a_controller_name_in_use_is_refused() {
    let Some(mut c) = HaCluster::start(1, &[]) else {
        return;
    };
    let dir = c.dir.join("twin-data");
    let out = common::run_timeout(
        common::BIN,
        &[
            "controller",
            "--etcd",
            &c.etcd.endpoint_list(),
            "--name",
            "c1",
            "--data-dir",
            dir.to_str().unwrap(),
            "--api-listen",
            &format!("127.0.0.1:{}", common::free_port()),
            "--election-ttl",
            common::ha::ELECTION_TTL,
        ],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the twin must be refused: {err}");
    assert!(
        err.contains("another controller named c1 is running"),
        "the refusal says why: {err}"
    );
    assert_eq!(
        c.controllers[0].role().as_deref(),
        Some("leader"),
        "the first still leads"
    );
    c.controllers[0].proc.kill9();
    c.controllers[0].spawn();
    common::poll(
        "c1 leads again after its restart",
        Duration::from_secs(20),
        || (c.controllers[0].role().as_deref() == Some("leader")).then_some(()),
    );
    c.stop_and_check();
}
