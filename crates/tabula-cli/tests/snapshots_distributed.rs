//! Snapshots and copy-on-write in distributed mode: one `tabula controller` process, two
//! `tabula agent` processes exporting the same vdisks, real NBD clients, `kill -9`.
//!
//! - `snapshots_under_writes_are_crash_consistent`: two writers (one per agent) overwrite
//!   identifiable 4 KiB blocks while snapshots are taken (and fio verify loads another vdisk);
//!   every snapshot must be a crash-consistent cut: each block holds a write issued before
//!   `snapshot create` returned, none older than what was acknowledged before it began, and
//!   none older than what was acknowledged before any write the snapshot holds was issued.
//! - `cow_concurrent_writes_same_segment`: for both copy-on-write policies, four writers on two
//!   agents write different blocks of the same shared segments, and one block of each segment
//!   from all of them; the snapshot keeps its content, the vdisk holds every acknowledged write
//!   (the common block one linearizable winner), both agents read the same bytes.
//! - `controller_killed_mid_snapshot_and_mid_cow`: `kill -9` of the controller in the pause
//!   between a snapshot's I/O hold and its commit (`TABULA_TEST_SNAPSHOT_COMMIT_PAUSE_MS`), and
//!   between an agent's copy-on-write copy and the table switch
//!   (`TABULA_TEST_COW_SWITCH_PAUSE_MS`), for both policies; after the restart nothing
//!   acknowledged is lost, writes work through both agents, the abandoned reservation is freed
//!   after the restart grace, `tabula check` passes and all the space comes back.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Controller, env_prefix};
use common::nbd::{Client, NbdErr, stamp_block};
use common::{BIN, fio, have, poll, run_timeout};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// The segment size of every vdisk here (64 KiB: many segments, cheap copies).
const SEG: u64 = 64 << 10;
const SEG_BLOCKS: u64 = SEG / BLOCK;

// ---------------------------------------------------------------------------------------------
// Helpers.

/// The version writer `writer` stamps on its `seq`th write: its id in the high bits. Versions
/// below `1 << 40` (the initial fills) belong to no writer.
fn ver(writer: usize, seq: u64) -> u64 {
    ((writer as u64 + 1) << 40) | seq
}

/// The sequence number part of a writer's version.
fn seq_of(version: u64) -> u64 {
    version & ((1 << 40) - 1)
}

fn writer_of(version: u64) -> Option<usize> {
    let w = version >> 40;
    (w >= 1).then(|| (w - 1) as usize)
}

/// What a 4 KiB block read back holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Zeros,
    /// `stamp_block(block, version)`.
    Stamp(u64, u64),
    /// Neither zeros nor a whole stamp (a torn or foreign block).
    Garbage,
}

fn content(chunk: &[u8]) -> Content {
    if chunk.iter().all(|&b| b == 0) {
        return Content::Zeros;
    }
    let b = u64::from_le_bytes(chunk[0..8].try_into().unwrap());
    let v = u64::from_le_bytes(chunk[8..16].try_into().unwrap());
    if chunk == stamp_block(b, v).as_slice() {
        Content::Stamp(b, v)
    } else {
        Content::Garbage
    }
}

/// `n` stamped blocks from `first`, all of `version`, as one buffer.
fn stamped(first: u64, n: u64, version: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity((n * BLOCK) as usize);
    for b in first..first + n {
        v.extend_from_slice(&stamp_block(b, version));
    }
    v
}

/// Writes blocks `[first, first + n)` stamped with `version`, in 1 MiB requests.
fn fill(c: &mut Client, first: u64, n: u64, version: u64) {
    let per = MIB / BLOCK;
    let mut b = first;
    while b < first + n {
        let k = (first + n - b).min(per);
        c.write(b * BLOCK, &stamped(b, k, version), false)
            .unwrap_or_else(|e| panic!("fill blocks {b}..{}: {e:?}", b + k));
        b += k;
    }
}

/// Reads blocks `[first, first + n)` in 1 MiB requests.
fn read_blocks(c: &mut Client, first: u64, n: u64) -> Result<Vec<u8>, NbdErr> {
    let per = MIB / BLOCK;
    let mut out = Vec::with_capacity((n * BLOCK) as usize);
    let mut b = first;
    while b < first + n {
        let k = (first + n - b).min(per);
        out.extend(c.read(b * BLOCK, (k * BLOCK) as u32)?);
        b += k;
    }
    Ok(out)
}

/// Reads a whole export through agent port `port`.
fn read_export(port: u16, export: &str) -> Vec<u8> {
    let mut c = Client::connect(port, export)
        .unwrap_or_else(|e| panic!("connect to export {export} on port {port}: {e:?}"));
    let n = c.size / BLOCK;
    let d = read_blocks(&mut c, 0, n).unwrap_or_else(|e| panic!("read {export}: {e:?}"));
    c.disconnect();
    d
}

/// Checks every block of `data` (read from block 0) against `want(block)`: `Some(v)` is
/// `stamp_block(block, v)`, `None` zeros.
fn expect_blocks(what: &str, data: &[u8], want: impl Fn(u64) -> Option<u64>) {
    for (i, chunk) in data.chunks(BLOCK as usize).enumerate() {
        let b = i as u64;
        let got = content(chunk);
        let exp = match want(b) {
            Some(v) => Content::Stamp(b, v),
            None => Content::Zeros,
        };
        assert_eq!(got, exp, "{what}: block {b} (byte {})", b * BLOCK);
    }
}

/// Waits until no freed space is being zeroed (after a restart that includes the restart
/// grace); returns `status --json`.
fn settled(ctl: &Controller, what: &str) -> Value {
    poll(
        &format!("{what}: freed space is zeroed"),
        Duration::from_secs(30),
        || {
            let st = ctl.status();
            (st["zeroing"].as_u64() == Some(0)).then_some(st)
        },
    )
}

/// `tabula check --json` on the running controller: must be OK, and account for every byte
/// of every container (mapped + free + zeroing + reserved for copies = capacity).
fn check_json(ctl: &Controller, what: &str) -> Value {
    let out = ctl.try_cli(&["check", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success() && v["ok"] == true,
        "{what}: tabula check failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let st = ctl.status();
    let sum: u64 = ["mapped", "free", "zeroing", "copying"]
        .iter()
        .map(|k| {
            v[k].as_u64()
                .unwrap_or_else(|| panic!("check --json has {k}: {v}"))
        })
        .sum();
    assert_eq!(
        Some(sum),
        st["capacity"].as_u64(),
        "{what}: mapped + free + zeroing + copying must be the capacity: {v}\nstatus: {st}"
    );
    v
}

/// `tabula check --data-dir DIR --json` on a stopped (or killed) controller's data.
fn check_offline(ctl: &Controller, what: &str) -> Value {
    let out = run_timeout(
        BIN,
        &[
            "check",
            "--data-dir",
            ctl.data_dir.to_str().unwrap(),
            "--json",
        ],
        Duration::from_secs(60),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success() && v["ok"] == true,
        "{what}: tabula check --data-dir failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    v
}

/// Runs the CLI against the controller at `url` on another thread (so the controller can be
/// killed meanwhile); the output comes through the channel.
fn cli_in_thread(url: String, args: &[&str]) -> mpsc::Receiver<std::process::Output> {
    let mut full = common::strings(&["--controller", &url]);
    full.extend(common::strings(args));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let a: Vec<&str> = full.iter().map(String::as_str).collect();
        let _ = tx.send(run_timeout(BIN, &a, Duration::from_secs(60)));
    });
    rx
}

fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// One write as its client saw it.
#[derive(Clone, Debug)]
struct Rec {
    block: u64,
    version: u64,
    /// Just before the request was sent.
    issued: Instant,
    /// Just after the reply arrived, if it reported success.
    acked: Option<Instant>,
    /// The error it got, if any.
    error: Option<String>,
}

/// A thread overwriting blocks through one connection, one request at a time, logging every
/// write in `log` (shared, so a test can watch progress).
struct Writer {
    id: usize,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Rec>>>,
    handle: std::thread::JoinHandle<()>,
}

/// How a [`Writer`] behaves.
#[derive(Clone, Copy)]
struct WriterCfg {
    id: usize,
    /// Keep going after a failed write (after a pause) instead of stopping.
    tolerate_errors: bool,
    /// Pause between writes.
    pace: Duration,
    /// Hard bounds: stop after this long or this many writes.
    limit: Duration,
    max_writes: usize,
}

fn spawn_writer(
    port: u16,
    export: &str,
    cfg: WriterCfg,
    mut pick: impl FnMut(u64) -> u64 + Send + 'static,
) -> Writer {
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut c = Client::connect(port, export).expect("writer connect");
    let (s, l) = (stop.clone(), log.clone());
    let handle = std::thread::spawn(move || {
        let started = Instant::now();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ ((cfg.id as u64 + 1) << 17);
        let mut seq = 0u64;
        while !s.load(Ordering::Relaxed)
            && started.elapsed() < cfg.limit
            && (seq as usize) < cfg.max_writes
        {
            let block = pick(xorshift(&mut seed));
            seq += 1;
            let version = ver(cfg.id, seq);
            let issued = Instant::now();
            let r = c.write(block * BLOCK, &stamp_block(block, version), seq % 8 == 0);
            let done = Instant::now();
            let (acked, error) = match &r {
                Ok(()) => (Some(done), None),
                Err(e) => (
                    None,
                    Some(format!(
                        "{e:?} after {:?} (at {:?} into the run)",
                        done - issued,
                        issued - started
                    )),
                ),
            };
            l.lock().unwrap().push(Rec {
                block,
                version,
                issued,
                acked,
                error,
            });
            match r {
                Ok(()) => {}
                Err(NbdErr::Errno(_)) if cfg.tolerate_errors => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(_) => return,
            }
            if seq % 64 == 0 && c.flush().is_err() && !cfg.tolerate_errors {
                return;
            }
            if !cfg.pace.is_zero() {
                std::thread::sleep(cfg.pace);
            }
        }
        let _ = c.flush();
        c.disconnect();
    });
    Writer {
        id: cfg.id,
        stop,
        log,
        handle,
    }
}

impl Writer {
    /// Writes acknowledged so far that were issued after `since`.
    fn acked_since(&self, since: Instant) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.acked.is_some() && r.issued > since)
            .count()
    }

    fn errors(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| r.error.clone())
            .collect()
    }

    /// Stops the thread (bounded: each request has a 60 s socket timeout) and returns its log.
    fn finish(self) -> Vec<Rec> {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(90);
        while !self.handle.is_finished() {
            assert!(
                Instant::now() < deadline,
                "writer {} did not stop within 90 s",
                self.id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.handle.join().expect("writer thread");
        Arc::try_unwrap(self.log)
            .expect("writer log has one owner")
            .into_inner()
            .unwrap()
    }
}

/// Every write of each block in the order issued (each block has one writer, whose requests
/// are sequential, so that is also the order in which they landed).
fn by_block(logs: &[Vec<Rec>]) -> HashMap<u64, Vec<Rec>> {
    let mut m: HashMap<u64, Vec<Rec>> = HashMap::new();
    for r in logs.iter().flatten() {
        m.entry(r.block).or_default().push(r.clone());
    }
    for list in m.values_mut() {
        list.sort_by_key(|r| r.issued);
        if let Some(w) = list.windows(2).find(|w| {
            writer_of(w[0].version) != writer_of(w[1].version)
                || w[0].acked.is_some_and(|a| a > w[1].issued)
        }) {
            panic!(
                "test bug: block {} has overlapping or foreign writes: {w:?}",
                w[0].block
            );
        }
    }
    m
}

/// Milliseconds from `base` to `t` (negative before), for messages.
fn ms(t: Instant, base: Instant) -> f64 {
    if t >= base {
        (t - base).as_secs_f64() * 1e3
    } else {
        -((base - t).as_secs_f64() * 1e3)
    }
}

/// A block's write history around a snapshot, for messages.
fn history(list: &[Rec], base: Instant) -> String {
    list.iter()
        .map(|r| {
            format!(
                "v{:#x} issued {:+.1} ms acked {}",
                r.version,
                ms(r.issued, base),
                r.acked
                    .map(|a| format!("{:+.1} ms", ms(a, base)))
                    .unwrap_or_else(|| "never".into())
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Checks that `data`, a snapshot taken by a `snapshot create` that began at `began` and
/// returned at `returned`, is a crash-consistent cut of the writes in `hist` (blocks no write
/// touched hold `base(block)`: `Some(v)` a stamp of version `v`, `None` zeros). Every block
/// holds a write issued before `returned` (or its base if none); let `cut` be the later of
/// `began` and the issue of the latest write the snapshot holds: every block holds the last
/// write acknowledged before `cut`, or a later one. Returns (blocks holding a writer's write,
/// blocks whose content was still undecided at the cut).
fn check_cut(
    what: &str,
    data: &[u8],
    hist: &HashMap<u64, Vec<Rec>>,
    base: impl Fn(u64) -> Option<u64>,
    began: Instant,
    returned: Instant,
) -> (usize, usize) {
    let base_content = |b: u64| match base(b) {
        Some(v) => Content::Stamp(b, v),
        None => Content::Zeros,
    };
    // Which write (index into the block's history) each block holds; None for its base.
    let mut held: HashMap<u64, Option<usize>> = HashMap::new();
    let mut cut = began;
    let mut cut_by = None;
    for (i, chunk) in data.chunks(BLOCK as usize).enumerate() {
        let b = i as u64;
        let got = content(chunk);
        let list = hist.get(&b).map(Vec::as_slice).unwrap_or(&[]);
        let idx = match got {
            Content::Stamp(sb, v) if sb == b && writer_of(v).is_some() => {
                list.iter().position(|r| r.version == v)
            }
            _ => None,
        };
        match idx {
            Some(k) => {
                let r = &list[k];
                assert!(
                    r.issued < returned,
                    "{what}: block {b} holds version {:#x}, issued {:.1} ms after snapshot \
                     create returned (it must hold only writes issued before); history \
                     (ms from the start of snapshot create): {}",
                    r.version,
                    ms(r.issued, returned),
                    history(list, began)
                );
                if r.issued > cut {
                    cut = r.issued;
                    cut_by = Some((b, r.version));
                }
                held.insert(b, Some(k));
            }
            None => {
                assert_eq!(
                    got,
                    base_content(b),
                    "{what}: block {b} holds neither a write of it nor its content before any \
                     write; history (ms from the start of snapshot create): {}",
                    history(list, began)
                );
                held.insert(b, None);
            }
        }
    }
    let mut undecided = 0;
    let mut from_writers = 0;
    for (&b, list) in hist {
        let Some(&h) = held.get(&b) else {
            panic!("{what}: block {b} lies outside the snapshot");
        };
        if h.is_some() {
            from_writers += 1;
        }
        let must = list.iter().rposition(|r| r.acked.is_some_and(|a| a < cut));
        if let Some(m) = must {
            assert!(
                h.is_some_and(|k| k >= m),
                "{what}: block {b} holds {}, but version {:#x} was acknowledged {:.1} ms before \
                 the cut ({:+.1} ms from the start of snapshot create, {}): the snapshot is not \
                 a point in time; history (ms from the start of snapshot create): {}",
                match h {
                    Some(k) => format!("the older version {:#x}", list[k].version),
                    None => "its content before any write".into(),
                },
                list[m].version,
                ms(cut, list[m].acked.unwrap()),
                ms(cut, began),
                match cut_by {
                    Some((cb, cv)) => format!(
                        "the issue of version {cv:#x} of block {cb}, which the snapshot holds"
                    ),
                    None => "the start of snapshot create".into(),
                },
                history(list, began)
            );
        }
        let first_possible = must.map_or(0, |m| m + 1);
        if list[first_possible..].iter().any(|r| r.issued < returned) {
            undecided += 1;
        }
    }
    (from_writers, undecided)
}

// ---------------------------------------------------------------------------------------------
// 1. Snapshots under writes from two agents.

/// Blocks of vdisk `s` (32 MiB).
const S_BLOCKS: u64 = 32 * MIB / BLOCK;

#[test]
fn snapshots_under_writes_are_crash_consistent() {
    let t0 = Instant::now();
    let with_fio = have("fio");
    let mut c = Cluster::start("1G", &["host-a", "host-b"]);
    c.controller.cli(&[
        "vdisk",
        "create",
        "s",
        "--size",
        "32M",
        "--segment-size",
        "64K",
    ]);
    let ports = [c.agent("host-a").nbd_port, c.agent("host-b").nbd_port];

    // Load on another vdisk through host-b: fio random writes, verified with crc32c.
    let fio_job = with_fio.then(|| {
        c.controller.cli(&[
            "vdisk",
            "create",
            "f",
            "--size",
            "64M",
            "--segment-size",
            "64K",
        ]);
        let args = fio::args(
            &c.agent("host-b").url("f"),
            "load",
            &["--rw=randwrite", "--bs=4k", "--size=24m", "--iodepth=8"],
        );
        (fio::spawn(&args, Duration::from_secs(150)), args)
    });

    // Writer i (through agent i) owns the blocks of parity i, so both write into every
    // segment; half of the writes go to a hot set of 256 blocks, rewritten often.
    let writers: Vec<Writer> = (0..2)
        .map(|i| {
            spawn_writer(
                ports[i],
                "s",
                WriterCfg {
                    id: i,
                    tolerate_errors: false,
                    pace: Duration::ZERO,
                    limit: Duration::from_secs(60),
                    max_writes: 200_000,
                },
                move |r| {
                    let idx = if r & 1 == 0 {
                        (r >> 1) % 256
                    } else {
                        (r >> 1) % (S_BLOCKS / 2)
                    };
                    idx * 2 + i as u64
                },
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    // Ten snapshots while both write; one of fio's vdisk in the middle.
    let mut snaps: Vec<(String, Instant, Instant)> = Vec::new();
    for n in 0..10 {
        for w in &writers {
            assert!(
                !w.handle.is_finished(),
                "writer {} stopped early: {:?}",
                w.id,
                w.errors()
            );
        }
        let name = format!("snap{n}");
        let began = Instant::now();
        let v = c.controller.json(&["snapshot", "create", "s", &name]);
        let returned = Instant::now();
        eprintln!(
            "s@{name}: hold {:.1} ms, create took {:?}",
            v["hold_ms"].as_f64().unwrap_or(f64::NAN),
            returned - began
        );
        assert_eq!(
            v["name"].as_str(),
            Some(format!("s@{name}").as_str()),
            "{v}"
        );
        snaps.push((name, began, returned));
        if n == 5 && fio_job.is_some() {
            c.controller.json(&["snapshot", "create", "f", "mid"]);
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    std::thread::sleep(Duration::from_millis(200));
    let logs: Vec<Vec<Rec>> = writers.into_iter().map(Writer::finish).collect();
    for (i, log) in logs.iter().enumerate() {
        let errors: Vec<&Rec> = log.iter().filter(|r| r.error.is_some()).collect();
        assert!(
            errors.is_empty(),
            "writer {i} through host-{}: failed writes: {errors:?}",
            ["a", "b"][i]
        );
        let span = log.last().unwrap().acked.unwrap() - log[0].issued;
        eprintln!(
            "writer {i}: {} writes in {span:?} ({:.0}/s)",
            log.len(),
            log.len() as f64 / span.as_secs_f64()
        );
        assert!(log.len() >= 200, "writer {i} wrote only {}", log.len());
    }
    let hist = by_block(&logs);

    if let Some((child, args)) = fio_job {
        fio::check(
            child.wait_with_output().unwrap(),
            &args,
            Some(24 * MIB),
            24 * MIB,
        );
        eprintln!(
            "fio verify on f through host-b passed after {:?}",
            t0.elapsed()
        );
    }

    // Every snapshot, read through alternating agents, is a crash-consistent cut.
    for (n, (name, began, returned)) in snaps.iter().enumerate() {
        let export = format!("s@{name}");
        let data = read_export(ports[n % 2], &export);
        assert_eq!(data.len() as u64, S_BLOCKS * BLOCK, "{export} size");
        let (written, undecided) = check_cut(
            &format!("{export} through host-{}", ["a", "b"][n % 2]),
            &data,
            &hist,
            |_| None,
            *began,
            *returned,
        );
        eprintln!(
            "{export}: consistent; {written} blocks hold writes, {undecided} were in flight at \
             its cut"
        );
    }

    // The vdisk holds every block's last write, through both agents.
    let last: HashMap<u64, u64> = hist
        .iter()
        .map(|(&b, l)| (b, l.last().unwrap().version))
        .collect();
    let a = read_export(ports[0], "s");
    let b = read_export(ports[1], "s");
    expect_blocks("s through host-a", &a, |blk| last.get(&blk).copied());
    assert!(a == b, "host-a and host-b read different contents of s");

    // Deleting the snapshots (each frees what only it held) leaves the vdisk as it is.
    for (name, _, _) in &snaps {
        c.controller
            .cli(&["snapshot", "delete", &format!("s@{name}")]);
    }
    let b = read_export(ports[1], "s");
    expect_blocks("s through host-b after deleting its snapshots", &b, |blk| {
        last.get(&blk).copied()
    });
    settled(&c.controller, "after deleting the snapshots");
    let v = check_json(&c.controller, "after deleting the snapshots");
    eprintln!("check: {v}");
    c.stop_and_check();
    eprintln!(
        "snapshots_under_writes_are_crash_consistent took {:?}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Concurrent copy-on-write of the same segments from two agents.

/// Writers in the copy-on-write race: three per agent.
const RACERS: usize = 6;
/// Rounds each racer makes over all segments in each phase (the first copies, the next
/// overwrite the copy).
const ROUNDS: u64 = 2;
/// Phases of the race: each starts with a new snapshot.
const PHASES: u64 = 2;

/// The racers of one phase: [`RACERS`] threads (the first half through host-a, the others
/// through host-b) each walking every segment [`ROUNDS`] times, writing block 0 of each
/// segment (all of them) and block 1 + k (racer k only) with version `ver(k, seq0 + round)`.
/// Returns each racer's log.
fn race_phase(ports: [u16; 2], name: &str, segs: u64, seq0: u64) -> Vec<Vec<Rec>> {
    let start = Arc::new(Barrier::new(RACERS));
    let (tx, rx) = mpsc::channel();
    for k in 0..RACERS {
        let port = ports[k * 2 / RACERS];
        let (name, start, tx) = (name.to_string(), start.clone(), tx.clone());
        std::thread::spawn(move || {
            let mut cl = Client::connect(port, &name).unwrap();
            let mut log: Vec<Rec> = Vec::new();
            start.wait();
            let mut result = Ok(());
            'all: for round in 1..=ROUNDS {
                for s in 0..segs {
                    let common = s * SEG_BLOCKS;
                    let own = common + 1 + k as u64;
                    let order = if (s + k as u64) % 2 == 0 {
                        [common, own]
                    } else {
                        [own, common]
                    };
                    for b in order {
                        let version = ver(k, seq0 + round);
                        let issued = Instant::now();
                        let r = cl.write(b * BLOCK, &stamp_block(b, version), false);
                        let acked = Instant::now();
                        if let Err(e) = r {
                            result = Err(format!(
                                "racer {k} round {round} block {b} (segment {s}): {e:?} after \
                                 {:?}",
                                acked - issued
                            ));
                            break 'all;
                        }
                        log.push(Rec {
                            block: b,
                            version,
                            issued,
                            acked: Some(acked),
                            error: None,
                        });
                    }
                }
            }
            if result.is_ok() {
                result = cl.flush().map_err(|e| format!("racer {k} flush: {e:?}"));
            }
            let _ = tx.send((k, result, log));
        });
    }
    drop(tx);
    let mut logs: Vec<Vec<Rec>> = vec![Vec::new(); RACERS];
    for _ in 0..RACERS {
        let (k, result, log) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("a racer did not finish within 120 s");
        result.unwrap_or_else(|e| panic!("{name}: {e}"));
        logs[k] = log;
    }
    logs
}

/// Checks the vdisk `d` (read through `via`) after a phase whose racers wrote `logs` with
/// last sequence `seq`, over `before` (the content when the phase began): every racer's own
/// block holds its last write; the common block one racer's last write, and no racer's last
/// write was issued after the winner's was acknowledged (it would have had to win); every
/// other block is as before.
fn check_race(what: &str, d: &[u8], before: &[u8], logs: &[Vec<Rec>], seq: u64) {
    for (n, chunk) in d.chunks(BLOCK as usize).enumerate() {
        let blk = n as u64;
        let (s, off) = (blk / SEG_BLOCKS, blk % SEG_BLOCKS);
        let got = content(chunk);
        if off == 0 {
            let w = match got {
                Content::Stamp(sb, v) if sb == blk && seq_of(v) == seq => writer_of(v),
                _ => None,
            };
            let Some(w) = w.filter(|&w| w < RACERS) else {
                panic!(
                    "{what}: common block {blk} (segment {s}) holds {got:?}, not a racer's last \
                     write"
                );
            };
            let last = |k: usize| {
                logs[k]
                    .iter()
                    .rfind(|r| r.block == blk)
                    .expect("each racer wrote each common block")
            };
            let won = last(w);
            for j in (0..RACERS).filter(|&j| j != w) {
                let other = last(j);
                assert!(
                    other.issued <= won.acked.unwrap(),
                    "{what}: common block {blk} (segment {s}) holds racer {w}'s last write, but \
                     racer {j}'s was issued {:.3} ms after that was acknowledged",
                    ms(other.issued, won.acked.unwrap())
                );
            }
        } else if off <= RACERS as u64 {
            let k = (off - 1) as usize;
            assert_eq!(
                got,
                Content::Stamp(blk, ver(k, seq)),
                "{what}: racer {k}'s block {blk} (segment {s})"
            );
        } else {
            let i = n * BLOCK as usize;
            assert_eq!(
                got,
                content(&before[i..i + BLOCK as usize]),
                "{what}: untouched block {blk} (segment {s}) changed (lost in the copy?)"
            );
        }
    }
}

/// One vdisk of `policy`, filled and held by both agents; then [`PHASES`] times: a snapshot,
/// and the racers of [`race_phase`] at once on every segment. After each phase both agents
/// read the same, as [`check_race`] wants; at the end every snapshot still reads what the
/// vdisk held when it was taken, through both agents.
fn cow_race(c: &Cluster, policy: &str) {
    let t0 = Instant::now();
    let name = format!("race-{policy}");
    let size = 8 * MIB;
    let blocks = size / BLOCK;
    let segs = blocks / SEG_BLOCKS;
    c.controller.cli(&[
        "vdisk",
        "create",
        &name,
        "--size",
        "8M",
        "--segment-size",
        "64K",
        "--cow",
        policy,
    ]);
    let ports = [c.agent("host-a").nbd_port, c.agent("host-b").nbd_port];
    // Both agents hold the vdisk (and see the fill) before the first snapshot.
    let mut ca = Client::connect(ports[0], &name).unwrap();
    fill(&mut ca, 0, blocks, 1);
    ca.flush().unwrap();
    let mut cb = Client::connect(ports[1], &name).unwrap();
    let mut state = read_blocks(&mut cb, 0, blocks).unwrap();
    expect_blocks(&format!("{name} filled, through host-b"), &state, |_| {
        Some(1)
    });
    // What each snapshot must read.
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    for phase in 1..=PHASES {
        let snap = format!("{name}@base{phase}");
        let v = c
            .controller
            .json(&["snapshot", "create", &name, &format!("base{phase}")]);
        eprintln!("{snap}: hold {} ms", v["hold_ms"]);
        let seq0 = (phase - 1) * ROUNDS;
        let t = Instant::now();
        let logs = race_phase(ports, &name, segs, seq0);
        eprintln!(
            "{name} phase {phase}: {RACERS} racers wrote {} blocks in {:?}",
            logs.iter().map(Vec::len).sum::<usize>(),
            t.elapsed()
        );
        let a = read_blocks(&mut ca, 0, blocks).unwrap();
        let b = read_blocks(&mut cb, 0, blocks).unwrap();
        let what = format!("{name} after phase {phase}");
        check_race(
            &format!("{what}, through host-a"),
            &a,
            &state,
            &logs,
            seq0 + ROUNDS,
        );
        check_race(
            &format!("{what}, through host-b"),
            &b,
            &state,
            &logs,
            seq0 + ROUNDS,
        );
        assert!(a == b, "{what}: host-a and host-b read different contents");
        snaps.push((snap, std::mem::replace(&mut state, a)));
    }
    // Every snapshot reads exactly what the vdisk held when it was taken.
    for (snap, want) in &snaps {
        for (i, &port) in ports.iter().enumerate() {
            let d = read_export(port, snap);
            if let Some(n) = (0..blocks as usize).find(|&n| {
                let r = n * BLOCK as usize..(n + 1) * BLOCK as usize;
                d[r.clone()] != want[r]
            }) {
                let r = n * BLOCK as usize..(n + 1) * BLOCK as usize;
                panic!(
                    "{snap} through host-{}: block {n} holds {:?}, it held {:?} when the \
                     snapshot was taken",
                    ["a", "b"][i],
                    content(&d[r.clone()]),
                    content(&want[r])
                );
            }
        }
    }
    // Every segment was written in every phase, so each was copied once per phase: nothing
    // is shared any more, and the vdisk and each snapshot map the whole size.
    let v = check_json(&c.controller, &name);
    assert_eq!(v["shared"].as_u64(), Some(0), "{name}: {v}");
    assert_eq!(v["copying"].as_u64(), Some(0), "{name}: {v}");
    assert_eq!(
        v["mapped"].as_u64(),
        Some((PHASES + 1) * size),
        "{name}: {v}"
    );
    drop((ca, cb));
    c.controller
        .cli(&["vdisk", "delete", &name, "--with-snapshots"]);
    eprintln!("{name} took {:?}", t0.elapsed());
}

#[test]
fn cow_concurrent_writes_same_segment() {
    let t0 = Instant::now();
    let mut c = Cluster::start("256M", &["host-a", "host-b"]);
    let free0 = settled(&c.controller, "at the start")["free"]
        .as_u64()
        .unwrap();
    for policy in ["redirect", "copy-out"] {
        cow_race(&c, policy);
    }
    let st = settled(&c.controller, "after deleting the race vdisks");
    assert_eq!(
        st["free"].as_u64(),
        Some(free0),
        "all the space came back: {st}"
    );
    check_json(&c.controller, "at the end");
    c.stop_and_check();
    eprintln!("cow_concurrent_writes_same_segment took {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 3. kill -9 of the controller in the middle of a snapshot and of a copy-on-write.

/// The lease of these tests: also the restart grace before freed space is reused.
const SHORT_LEASE: &str = "2s";

/// Restarts a killed controller without test hooks and waits for both agents.
fn restart_plain(c: &mut Cluster) -> Instant {
    c.controller.proc.prefix = env_prefix(&[]);
    c.controller.spawn();
    let at = Instant::now();
    c.wait_connected(&["host-a", "host-b"], Duration::from_secs(30));
    at
}

/// (a) The controller dies in the pause between a snapshot's I/O hold and its commit, while
/// a writer on each agent overwrites blocks of the vdisk.
fn killed_mid_snapshot() {
    let t0 = Instant::now();
    let mut c = Cluster::start_with_controller_env(
        "256M",
        &["host-a", "host-b"],
        SHORT_LEASE,
        &[("TABULA_TEST_SNAPSHOT_COMMIT_PAUSE_MS", "2000")],
    );
    let free0 = settled(&c.controller, "at the start")["free"]
        .as_u64()
        .unwrap();
    c.controller.cli(&[
        "vdisk",
        "create",
        "v",
        "--size",
        "16M",
        "--segment-size",
        "64K",
    ]);
    let ports = [c.agent("host-a").nbd_port, c.agent("host-b").nbd_port];
    // Blocks 0..2048 through host-a, 2048..2560 through host-b, flushed; the rest unwritten.
    let base = |b: u64| (b < 2560).then_some(1);
    let mut ca = Client::connect(ports[0], "v").unwrap();
    fill(&mut ca, 0, 2048, 1);
    ca.flush().unwrap();
    let mut cb = Client::connect(ports[1], "v").unwrap();
    fill(&mut cb, 2048, 512, 1);
    cb.flush().unwrap();

    // Writer i through agent i overwrites the blocks of parity i among 0..1024.
    let writers: Vec<Writer> = (0..2)
        .map(|i| {
            spawn_writer(
                ports[i],
                "v",
                WriterCfg {
                    id: i,
                    tolerate_errors: true,
                    pace: Duration::from_millis(2),
                    limit: Duration::from_secs(90),
                    max_writes: 100_000,
                },
                move |r| (r % 512) * 2 + i as u64,
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    let began = Instant::now();
    let snap = cli_in_thread(
        c.controller.url(),
        &["snapshot", "create", "v", "s1", "--json"],
    );
    std::thread::sleep(Duration::from_millis(800));
    if let Ok(out) = snap.try_recv() {
        panic!(
            "snapshot create returned within 800 ms despite the 2 s commit pause: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    c.controller.proc.kill9();
    let killed = Instant::now();
    eprintln!(
        "controller killed {:?} into snapshot create",
        killed - began
    );
    let out = snap
        .recv_timeout(Duration::from_secs(60))
        .expect("snapshot create returns once its controller is gone");
    assert!(
        !out.status.success(),
        "snapshot create succeeded although its controller was killed before the commit: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v = check_offline(&c.controller, "data of the controller killed mid-snapshot");
    eprintln!("offline check after the kill: {v}");

    let restarted = restart_plain(&mut c);
    eprintln!("controller back {:?} after the kill", restarted - killed);

    // Writes go on through both agents, to blocks mapped before the snapshot.
    let deadline = restarted + Duration::from_secs(20);
    let progress = loop {
        let n: Vec<usize> = writers.iter().map(|w| w.acked_since(restarted)).collect();
        if n.iter().all(|&n| n >= 20) {
            break n;
        }
        if Instant::now() > deadline {
            let errors: Vec<Vec<String>> = writers.iter().map(Writer::errors).collect();
            let st = c.controller.status();
            let map = c.controller.json(&["vdisk", "map", "v"]);
            // A copy newer than the controller's table: a change the crash lost (the
            // snapshot's SetState, pushed before its commit) that the agent still holds.
            let ahead: Vec<String> = st["agents"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|a| {
                    a["tables"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|t| {
                            let (g, cg) = (
                                t["generation"].as_u64()?,
                                t["controller_generation"].as_u64()?,
                            );
                            (g > cg).then(|| {
                            format!(
                                "agent {} holds {} at generation {g}, the restarted controller's \
                                 table is at {cg}",
                                a["name"], t["vdisk"]
                            )
                        })
                        })
                })
                .collect();
            panic!(
                "writes to v do not work again after the controller restarted mid-snapshot: \
                 acknowledged per writer in the 20 s since the restart: {n:?}; {}; the writers' \
                 errors (first 3 and last 3 of each): {:#?}\nagents as the controller sees \
                 them: {:#}\nv's table: {map}",
                if ahead.is_empty() {
                    "no agent's copy is ahead of the controller's table".to_string()
                } else {
                    ahead.join("; ")
                },
                errors
                    .iter()
                    .map(|e| {
                        let mut v: Vec<&String> = e.iter().take(3).collect();
                        v.extend(e.iter().skip(e.len().saturating_sub(3).max(3)));
                        v
                    })
                    .collect::<Vec<_>>(),
                st["agents"]
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "after the restart: {progress:?} writes acknowledged ({:?} after the restart); errors \
         while the controller was away: {:?}",
        restarted.elapsed(),
        writers.iter().map(Writer::errors).collect::<Vec<_>>()
    );
    let logs: Vec<Vec<Rec>> = writers.into_iter().map(Writer::finish).collect();
    let hist = by_block(&logs);

    // The snapshot does not exist, or is complete and a cut of what was written by the kill.
    let list = c.controller.json(&["snapshot", "list", "v"]);
    let names: Vec<&str> = list
        .as_array()
        .expect("snapshot list is an array")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    eprintln!("snapshots of v after the restart: {names:?}");
    if names.contains(&"v@s1") {
        let d = read_export(ports[1], "v@s1");
        check_cut("v@s1 after the restart", &d, &hist, base, began, killed);
    } else {
        assert!(names.is_empty(), "{list}");
    }

    // Every acknowledged write reads back through both agents (a failed write may or may
    // not have landed), and both agents read the same.
    let a = read_blocks(&mut ca, 0, 4096).expect("read v through host-a");
    let b = read_blocks(&mut cb, 0, 4096).expect("read v through host-b");
    for (i, d) in [&a, &b].into_iter().enumerate() {
        for (n, chunk) in d.chunks(BLOCK as usize).enumerate() {
            let blk = n as u64;
            let got = content(chunk);
            let list = hist.get(&blk).map(Vec::as_slice).unwrap_or(&[]);
            let last_ok = list.iter().rposition(|r| r.acked.is_some());
            let mut allowed: Vec<Content> = vec![match last_ok {
                Some(k) => Content::Stamp(blk, list[k].version),
                None => base(blk).map_or(Content::Zeros, |v| Content::Stamp(blk, v)),
            }];
            allowed.extend(
                list[last_ok.map_or(0, |k| k + 1)..]
                    .iter()
                    .map(|r| Content::Stamp(blk, r.version)),
            );
            assert!(
                allowed.contains(&got),
                "v through host-{} after the restart: block {blk} holds {got:?}, expected one \
                 of {allowed:?}; history (ms from the start of snapshot create): {}",
                ["a", "b"][i],
                history(list, began)
            );
        }
    }
    assert!(a == b, "host-a and host-b read different contents of v");

    // New writes through each agent, read through the other: in place, and allocating.
    for (w, r, blk) in [(0, 1, 100u64), (1, 0, 101), (0, 1, 3000), (1, 0, 4000)] {
        let (wc, rc) = if w == 0 {
            (&mut ca, &mut cb)
        } else {
            (&mut cb, &mut ca)
        };
        wc.write(blk * BLOCK, &stamp_block(blk, 7), true)
            .unwrap_or_else(|e| panic!("write of block {blk} after the restart: {e:?}"));
        let d = rc.read(blk * BLOCK, BLOCK as u32).unwrap();
        assert_eq!(
            content(&d),
            Content::Stamp(blk, 7),
            "block {blk} written through host-{}, read through host-{}",
            ["a", "b"][w],
            ["a", "b"][r]
        );
    }
    check_json(&c.controller, "after the restart mid-snapshot");
    drop((ca, cb));

    // Deleting everything gives back all the space.
    c.controller
        .cli(&["vdisk", "delete", "v", "--with-snapshots"]);
    let st = settled(&c.controller, "after deleting v");
    assert_eq!(
        st["free"].as_u64(),
        Some(free0),
        "all the space came back: {st}"
    );
    check_json(&c.controller, "after deleting v");
    c.stop_and_check();
    eprintln!("killed mid-snapshot took {:?}", t0.elapsed());
}

/// (b) The controller dies in the pause after an agent reported its copy-on-write copy and
/// before the tables switch.
fn killed_mid_cow(policy: &str) {
    let t0 = Instant::now();
    let mut c = Cluster::start_with_controller_env(
        "256M",
        &["host-a", "host-b"],
        SHORT_LEASE,
        &[("TABULA_TEST_COW_SWITCH_PAUSE_MS", "2000")],
    );
    let free0 = settled(&c.controller, "at the start")["free"]
        .as_u64()
        .unwrap();
    let blocks = 4 * MIB / BLOCK;
    c.controller.cli(&[
        "vdisk",
        "create",
        "w",
        "--size",
        "4M",
        "--segment-size",
        "64K",
        "--cow",
        policy,
    ]);
    let ports = [c.agent("host-a").nbd_port, c.agent("host-b").nbd_port];
    let mut ca = Client::connect(ports[0], "w").unwrap();
    fill(&mut ca, 0, blocks, 1);
    ca.flush().unwrap();
    let mut cb = Client::connect(ports[1], "w").unwrap();
    let d = read_blocks(&mut cb, 0, blocks).unwrap();
    expect_blocks("w through host-b", &d, |_| Some(1));
    c.controller.json(&["snapshot", "create", "w", "base"]);
    let v = check_json(&c.controller, "after the snapshot");
    assert_eq!(v["copying"].as_u64(), Some(0), "{v}");

    // A write to shared segment 0 through host-a: the copy is reserved, made, reported, and
    // the controller pauses before switching.
    let (tx, rx) = mpsc::channel();
    let issued = Instant::now();
    std::thread::spawn(move || {
        let r = ca.write(5 * BLOCK, &stamp_block(5, 2), true);
        let _ = tx.send((r, Instant::now(), ca));
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "the copy-on-write write completed within 1 s despite the 2 s switch pause"
    );
    c.controller.proc.kill9();
    let killed = Instant::now();
    // The reservation is durable in the store's `cow` table, and accounted for.
    let v = check_offline(&c.controller, "data of the controller killed mid-copy");
    assert_eq!(
        v["copying"].as_u64(),
        Some(SEG),
        "one segment reserved for the copy when the controller died: {v}"
    );
    let restarted = restart_plain(&mut c);
    eprintln!(
        "{policy}: controller killed {:?} after the write was issued, back {:?} later",
        killed - issued,
        restarted - killed
    );

    // The write completes (the agent retries its report, the restarted controller knows no
    // such copy, the agent faults afresh and copies again), or fails after the agent's fault
    // wait; then a retry succeeds.
    let (r, done, mut ca) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the write pending across the controller's death was answered");
    eprintln!(
        "{policy}: the write pending across the kill: {r:?} after {:?}",
        done - issued
    );
    match r {
        Ok(()) => {}
        Err(NbdErr::Errno(_)) => {
            let mut tries = 0;
            poll(
                "the failed write succeeds when repeated",
                Duration::from_secs(30),
                || {
                    tries += 1;
                    match ca.write(5 * BLOCK, &stamp_block(5, 2), true) {
                        Ok(()) => Some(()),
                        Err(NbdErr::Errno(_)) => None,
                        Err(e) => panic!("repeated write broke the connection: {e:?}"),
                    }
                },
            );
            eprintln!("{policy}: repeated write succeeded after {tries} tries");
        }
        Err(e) => panic!("the write pending across the kill broke the connection: {e:?}"),
    }
    // The restarted controller found the abandoned reservation and frees it after the grace.
    assert!(
        c.controller
            .proc
            .log_text()
            .contains("zeroing space freed before the last stop"),
        "the restarted controller should free the abandoned reservation; log tail:\n{}",
        c.controller.proc.log_tail(30)
    );
    settled(&c.controller, "after the restart mid-copy");
    let v = check_json(&c.controller, "after the restart mid-copy");
    assert_eq!(v["copying"].as_u64(), Some(0), "{v}");
    assert_eq!(v["zeroing"].as_u64(), Some(0), "{v}");

    // The snapshot reads its original content, the vdisk the write, through both agents.
    for (i, &port) in ports.iter().enumerate() {
        let agent = ["a", "b"][i];
        let d = read_export(port, "w@base");
        expect_blocks(&format!("w@base through host-{agent}"), &d, |_| Some(1));
        let d = read_export(port, "w");
        expect_blocks(&format!("w through host-{agent}"), &d, |b| {
            Some(if b == 5 { 2 } else { 1 })
        });
    }
    // Another copy-on-write (segment 3, through host-b), without the pause now.
    cb.write(
        (3 * SEG_BLOCKS + 2) * BLOCK,
        &stamp_block(3 * SEG_BLOCKS + 2, 3),
        true,
    )
    .expect("copy-on-write through host-b after the restart");
    let d = read_blocks(&mut ca, 0, blocks).unwrap();
    expect_blocks("w through host-a at the end", &d, |b| {
        Some(match b {
            5 => 2,
            b if b == 3 * SEG_BLOCKS + 2 => 3,
            _ => 1,
        })
    });
    let d = read_export(ports[0], "w@base");
    expect_blocks("w@base through host-a at the end", &d, |_| Some(1));
    let v = check_json(&c.controller, "after the second copy");
    assert_eq!(
        v["shared"].as_u64(),
        Some(4 * MIB - 2 * SEG),
        "two segments copied: {v}"
    );
    drop((ca, cb));

    c.controller
        .cli(&["vdisk", "delete", "w", "--with-snapshots"]);
    let st = settled(&c.controller, "after deleting w");
    assert_eq!(
        st["free"].as_u64(),
        Some(free0),
        "all the space came back: {st}"
    );
    check_json(&c.controller, "after deleting w");
    c.stop_and_check();
    eprintln!("{policy}: killed mid-copy took {:?}", t0.elapsed());
}

/// Each part runs on its own cluster; a failing part does not keep the others from running
/// (its panic message is printed when it happens), and the test fails at the end naming it.
#[test]
fn controller_killed_mid_snapshot_and_mid_cow() {
    let t0 = Instant::now();
    let parts: [(&str, fn()); 3] = [
        ("killed mid-snapshot", killed_mid_snapshot),
        ("killed mid-copy (redirect)", || killed_mid_cow("redirect")),
        ("killed mid-copy (copy-out)", || killed_mid_cow("copy-out")),
    ];
    let mut failed = Vec::new();
    for (what, part) in parts {
        if std::panic::catch_unwind(part).is_err() {
            eprintln!("===== part \"{what}\" FAILED (its panic is above)");
            failed.push(what);
        }
    }
    eprintln!(
        "controller_killed_mid_snapshot_and_mid_cow took {:?}",
        t0.elapsed()
    );
    assert!(
        failed.is_empty(),
        "failed parts: {failed:?} (see their panics above)"
    );
}
