//! Distributed mode as separate processes: one `tabula controller` and several `tabula agent`s
//! on loopback and, where `ip netns` works (root), in separate network namespaces as separate
//! hosts. fio verify load on three agents; kill -9 of the controller (allocated I/O continues,
//! allocating I/O waits --fault-wait and fails, everything resyncs on restart); kill -9 of an
//! agent (the others are unaffected, its lease lets the controller finish changes without it);
//! SIGSTOP/SIGCONT of an agent across a free and reuse of its mapped segments (no stale read,
//! no write through a stale entry); two agents writing one vdisk and reading each other's data;
//! in namespaces: a silent partition and a refused one (the cut-off agent fences itself when its
//! lease runs out, by its own clock), and a controller stopping promptly with an agent cut off.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::cluster::{self, Agent, Cluster, Controller, agent_entry, wait_connected};
use common::nbd::{Client, NbdErr, stamp_block};
use common::{fio, have, poll, run_timeout};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// 4 KiB blocks per 1 MiB segment (the default segment size).
const SEG_BLOCKS: u64 = 256;

// ---------------------------------------------------------------------------------------------
// Helpers.

/// `n` stamped blocks starting at `first` (all of one version), as one buffer.
fn stamped(first: u64, n: u64, version: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity((n * 4096) as usize);
    for b in first..first + n {
        v.extend_from_slice(&stamp_block(b, version));
    }
    v
}

/// What a 4 KiB block holds, in words.
fn describe(data: &[u8]) -> String {
    if data.iter().all(|&b| b == 0) {
        return "zeros".into();
    }
    let b = u64::from_le_bytes(data[0..8].try_into().unwrap());
    let v = u64::from_le_bytes(data[8..16].try_into().unwrap());
    if data == stamp_block(b, v).as_slice() {
        format!("stamp(block {b}, version {v})")
    } else {
        "bytes that are neither zeros nor a whole stamp".into()
    }
}

/// Checks `data`, read from block `first` on, against `want(block)`: `Some(v)` means
/// `stamp_block(block, v)` (with `block` shifted by `stamp_base`), `None` means zeros.
fn expect_blocks(
    what: &str,
    data: &[u8],
    first: u64,
    stamp_base: u64,
    want: impl Fn(u64) -> Option<u64>,
) {
    assert_eq!(data.len() % 4096, 0);
    for (i, chunk) in data.chunks(4096).enumerate() {
        let block = first + i as u64;
        let ok = match want(block) {
            Some(v) => chunk == stamp_block(block + stamp_base, v).as_slice(),
            None => chunk.iter().all(|&b| b == 0),
        };
        assert!(
            ok,
            "{what}: block {block} (byte {}) holds {}, expected {}",
            block * 4096,
            describe(chunk),
            match want(block) {
                Some(v) => format!("stamp(block {}, version {v})", block + stamp_base),
                None => "zeros".into(),
            }
        );
    }
}

/// Reads `blocks` blocks from `first` in 1 MiB requests.
fn read_blocks(c: &mut Client, first: u64, blocks: u64) -> Result<Vec<u8>, NbdErr> {
    let mut out = Vec::with_capacity((blocks * 4096) as usize);
    let mut b = first;
    while b < first + blocks {
        let n = (first + blocks - b).min(SEG_BLOCKS);
        out.extend(c.read(b * 4096, (n * 4096) as u32)?);
        b += n;
    }
    Ok(out)
}

/// Writes stamped blocks `[first, first + blocks)` of `version` in 1 MiB requests.
fn write_blocks(c: &mut Client, first: u64, blocks: u64, version: u64, stamp_base: u64) {
    let mut b = first;
    while b < first + blocks {
        let n = (first + blocks - b).min(SEG_BLOCKS);
        c.write(b * 4096, &stamped(b + stamp_base, n, version), false)
            .unwrap_or_else(|e| panic!("write blocks {b}..{}: {e:?}", b + n));
        b += n;
    }
}

/// `what`, a free that had to wait for a cut-off co-holder's lease (3 s) to run out, took
/// `took`: it must be well under 20 s. Then waits until the freed space is zeroed.
fn freed_after_lease(ctl: &Controller, what: &str, took: Duration) {
    eprintln!("{what} took {took:?}");
    assert!(
        took < Duration::from_secs(20),
        "{what} took {took:?} (lease 3s)"
    );
    poll("freed space is zeroed", Duration::from_secs(20), || {
        (ctl.status()["zeroing"].as_u64() == Some(0)).then_some(())
    });
}

/// Waits until every listed agent reports, for each listed vdisk, a table copy at the
/// controller's generation, and no table mismatch. Returns the agents' views.
fn wait_tables_current(ctl: &Controller, want: &[(&str, &[&str])], limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let st = ctl.status();
        let ok = want.iter().all(|(agent, vdisks)| {
            let Some(a) = agent_entry(&st, agent) else {
                return false;
            };
            vdisks.iter().all(|vd| {
                a["tables"].as_array().is_some_and(|t| {
                    t.iter().any(|t| {
                        t["vdisk"].as_str() == Some(vd)
                            && t["generation"].as_u64().is_some()
                            && t["generation"] == t["controller_generation"]
                    })
                })
            })
        });
        if ok {
            for (agent, _) in want {
                let a = agent_entry(&st, agent).unwrap();
                assert_eq!(
                    a["table_mismatches"].as_u64(),
                    Some(0),
                    "agent {agent}: a periodic replacement found its copy different from the \
                     controller's table at the same generation: {a}"
                );
            }
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "agents' tables did not reach the controller's generations {want:?} within \
             {limit:?}; last status: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn spawn_fio(args: &[String]) -> std::process::Child {
    fio::spawn(args, Duration::from_secs(150))
}

/// The segments of a vdisk mapped to a container (`vdisk map --json`), by index.
fn mapped_segments(ctl: &Controller, vdisk: &str) -> Vec<u64> {
    let map = ctl.json(&["vdisk", "map", vdisk]);
    let mut segs = Vec::new();
    for e in map["entries"].as_array().expect("map entries") {
        if e["container"].is_null() {
            continue;
        }
        let off = e["offset"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        segs.extend(off / MIB..(off + len).div_ceil(MIB));
    }
    segs
}

// ---------------------------------------------------------------------------------------------
// 1. Controller + 3 agents under fio verify load.

/// The agents of the fio tests.
const THREE: [&str; 3] = ["host-a", "host-b", "host-c"];

/// A 2G pool and the agents [`THREE`], each with its own 64M vdisk `own-NAME`, and a vdisk
/// `shared` of `shared_size`.
fn three_agents(shared_size: &str) -> Cluster {
    let c = Cluster::start("2G", &THREE);
    for n in &THREE {
        c.controller
            .cli(&["vdisk", "create", &format!("own-{n}"), "--size", "64M"]);
    }
    c.controller
        .cli(&["vdisk", "create", "shared", "--size", shared_size]);
    c
}

/// fio's job on `own-NAME` (agent `n`'s own vdisk) through `via`: random 4K writes, 32 MiB.
fn own_job(via: &Agent, n: &str) -> Vec<String> {
    fio::args(
        &via.url(&format!("own-{n}")),
        &format!("own-{n}"),
        &["--rw=randwrite", "--bs=4k", "--size=32m", "--iodepth=16"],
    )
}

/// fio's job on the `i`th third of `shared` (agent `n`'s) through `via`: sequential 64K
/// writes, 16 MiB.
fn shared_job(via: &Agent, i: usize, n: &str) -> Vec<String> {
    fio::args(
        &via.url("shared"),
        &format!("shared-{n}"),
        &[
            "--rw=write",
            "--bs=64k",
            "--size=16m",
            &format!("--offset={}m", i * 16),
            "--iodepth=8",
        ],
    )
}

/// Verifies (only) what a finished fio `job` wrote: `bytes` per job read back intact.
fn fio_verify(job: &[String], bytes: u64) {
    let out = spawn_fio(&fio::verify_only(job))
        .wait_with_output()
        .unwrap();
    fio::check(out, job, None, bytes);
}

#[test]
fn three_agents_under_fio_verify_load() {
    if !have("fio") {
        return;
    }
    let t0 = Instant::now();
    let names = THREE;
    let mut c = three_agents("48M");

    // Keep a connection to each agent's vdisks open for the whole test, so each agent holds
    // its tables when the status is checked at the end.
    let mut held = Vec::new();
    for n in &names {
        let a = c.agent(n);
        let mut own = a.client(&format!("own-{n}"));
        own.read(0, 4096).unwrap();
        let mut sh = a.client("shared");
        sh.read(0, 4096).unwrap();
        held.push((own, sh));
    }

    // On every agent at once: random 4K writes on its own vdisk, and sequential 64K writes
    // on its third of the shared vdisk, each verified with crc32c after writing.
    let mut jobs = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let a = c.agent(n);
        let own = own_job(a, n);
        let shared = shared_job(a, i, n);
        jobs.push((spawn_fio(&own), own, 32 * MIB));
        jobs.push((spawn_fio(&shared), shared, 16 * MIB));
    }
    for (child, args, bytes) in jobs {
        fio::check(child.wait_with_output().unwrap(), &args, Some(bytes), bytes);
    }
    eprintln!("fio load on 3 agents done after {:?}", t0.elapsed());

    // Each agent's data verifies through the *next* agent: another process, another table
    // copy, the same bytes.
    for (i, n) in names.iter().enumerate() {
        let other = c.agent(names[(i + 1) % 3]);
        fio_verify(&own_job(other, n), 32 * MIB);
        fio_verify(&shared_job(other, i, n), 16 * MIB);
    }

    // The controller lists three connected gRPC agents with leases, holding their tables at
    // the controller's generations.
    let st = c.wait_connected(&names, Duration::from_secs(10));
    let own: Vec<String> = names.iter().map(|n| format!("own-{n}")).collect();
    let want: Vec<(&str, Vec<&str>)> = names
        .iter()
        .zip(&own)
        .map(|(n, o)| (*n, vec![o.as_str(), "shared"]))
        .collect();
    let want_refs: Vec<(&str, &[&str])> = want.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    let st2 = wait_tables_current(&c.controller, &want_refs, Duration::from_secs(20));
    for (n, o) in names.iter().zip(&own) {
        let a = agent_entry(&st2, n).unwrap();
        let vdisks: Vec<&str> = a["vdisks"]
            .as_array()
            .unwrap_or_else(|| panic!("agent {n} has no vdisks array: {a}"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            vdisks.contains(&o.as_str()) && vdisks.contains(&"shared"),
            "agent {n} should list {o} and shared: {a}"
        );
        assert!(
            a["lease_ms_left"].as_u64().is_some(),
            "a gRPC agent holds a lease: {a}"
        );
        assert!(a["gaps_healed"].as_u64().is_some(), "{a}");
    }
    let agents = st["agents"].as_array().unwrap();
    assert_eq!(
        agents
            .iter()
            .filter(|a| a["connected"].as_bool() == Some(true))
            .count(),
        3,
        "exactly three connected agents: {st:#}"
    );

    drop(held);
    c.controller.check_live();
    c.stop_and_check();
    eprintln!("three_agents_under_fio_verify_load took {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 2. kill -9 of the controller mid-run.

/// Overwrites random blocks of `[first, first + blocks)` (all allocated) one at a time,
/// recording the last acknowledged version of each, until `stop` is set or a write fails.
struct Overwriter {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    last: Arc<Mutex<HashMap<u64, u64>>>,
    handle: std::thread::JoinHandle<Result<(), String>>,
}

fn overwriter(port: u16, vdisk: &str, first: u64, blocks: u64) -> Overwriter {
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let last = Arc::new(Mutex::new(HashMap::new()));
    let mut c = Client::connect(port, vdisk).expect("overwriter connect");
    let (s, w, l) = (stop.clone(), writes.clone(), last.clone());
    let handle = std::thread::spawn(move || {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut version = 100;
        while !s.load(Ordering::Relaxed) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let block = first + seed % blocks;
            version += 1;
            let t = Instant::now();
            c.write(block * 4096, &stamp_block(block, version), version % 7 == 0)
                .map_err(|e| {
                    format!(
                        "overwrite of allocated block {block} failed after {:?}: {e:?}",
                        t.elapsed()
                    )
                })?;
            if t.elapsed() > Duration::from_secs(2) {
                return Err(format!(
                    "overwrite of allocated block {block} took {:?}",
                    t.elapsed()
                ));
            }
            l.lock().unwrap().insert(block, version);
            w.fetch_add(1, Ordering::Relaxed);
            if version % 64 == 0 {
                c.flush().map_err(|e| format!("flush failed: {e:?}"))?;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    });
    Overwriter {
        stop,
        writes,
        last,
        handle,
    }
}

#[test]
fn controller_kill9_allocated_io_continues_and_everything_resyncs() {
    let t0 = Instant::now();
    // Agents ride through a controller outage for as long as their lease: this one is long
    // enough for the whole outage below (about 7 s).
    let mut c = Cluster::start_with_lease("1G", &["host-a"], "30s");
    c.controller.cli(&["vdisk", "create", "k", "--size", "64M"]);
    let port = c.agent("host-a").nbd_port;

    // Allocate segments 0..8: 0..4 for this connection, 4..8 for the background overwriter.
    let mut c1 = c.agent("host-a").client("k");
    write_blocks(&mut c1, 0, 8 * SEG_BLOCKS, 1, 0);
    c1.flush().unwrap();
    let mapped = mapped_segments(&c.controller, "k");
    for s in 0..8 {
        assert!(mapped.contains(&s), "segment {s} is mapped: {mapped:?}");
    }
    // Two segments nobody mapped (not even ahead of the sequential stream).
    let unmapped: Vec<u64> = (0..64u64)
        .rev()
        .filter(|s| !mapped.contains(s))
        .take(2)
        .collect();
    assert_eq!(unmapped.len(), 2, "mapped: {mapped:?}");
    let (u_fail, u_after) = (unmapped[0], unmapped[1]);

    let ow = overwriter(port, "k", 4 * SEG_BLOCKS, 4 * SEG_BLOCKS);
    std::thread::sleep(Duration::from_millis(500));
    c.controller.proc.kill9();
    let killed_at = Instant::now();
    let writes_at_kill = ow.writes.load(Ordering::Relaxed);

    // Allocated I/O keeps working: reads, an overwrite with FUA, a flush.
    let d =
        read_blocks(&mut c1, 0, 4 * SEG_BLOCKS).expect("read of allocated space, controller down");
    expect_blocks("controller down, segments 0..4", &d, 0, 0, |_| Some(1));
    c1.write(SEG_BLOCKS * 4096, &stamped(SEG_BLOCKS, SEG_BLOCKS, 2), true)
        .expect("FUA overwrite of allocated segment 1 with the controller down");
    c1.flush().expect("flush with the controller down");
    let d = read_blocks(&mut c1, SEG_BLOCKS, SEG_BLOCKS).unwrap();
    expect_blocks(
        "controller down, rewritten segment 1",
        &d,
        SEG_BLOCKS,
        0,
        |_| Some(2),
    );

    // An allocating write waits about --fault-wait (5 s), then fails with an NBD error.
    let t = Instant::now();
    let r = c1.write(u_fail * MIB, &stamp_block(u_fail * SEG_BLOCKS, 9), false);
    let waited = t.elapsed();
    match r {
        Err(NbdErr::Errno(e)) => {
            eprintln!("allocating write failed with errno {e} after {waited:?}")
        }
        other => panic!(
            "allocating write with the controller down: expected an NBD error after about 5 s, \
             got {other:?} after {waited:?}"
        ),
    }
    assert!(
        waited >= Duration::from_millis(4000) && waited <= Duration::from_secs(15),
        "allocating write failed after {waited:?}; --fault-wait is 5s"
    );
    // The connection is still good for allocated I/O.
    let d = read_blocks(&mut c1, 0, SEG_BLOCKS).expect("read after the failed allocating write");
    expect_blocks("after failed allocating write", &d, 0, 0, |_| Some(1));

    // A new connection to the agent still serves the vdisk it holds.
    let mut c3 = Client::connect(port, "k").expect("new connection with the controller down");
    let d = read_blocks(&mut c3, 2 * SEG_BLOCKS, SEG_BLOCKS)
        .expect("read on a new connection with the controller down");
    expect_blocks(
        "new connection, controller down",
        &d,
        2 * SEG_BLOCKS,
        0,
        |_| Some(1),
    );
    c3.disconnect();

    let writes_down = ow.writes.load(Ordering::Relaxed) - writes_at_kill;
    if ow.handle.is_finished() {
        panic!(
            "the overwriter stopped while the controller was down: {:?}",
            ow.handle.join()
        );
    }
    assert!(
        writes_down > 0,
        "no overwrite completed while the controller was down"
    );
    eprintln!(
        "{writes_down} overwrites completed during {:?} without a controller",
        killed_at.elapsed()
    );

    // Restart the controller on the same data and port: the agent reconnects by itself and
    // allocating writes succeed again.
    c.controller.spawn();
    let restarted = Instant::now();
    let mut failures = 0;
    poll(
        "an allocating write succeeds after the controller restarted",
        Duration::from_secs(45),
        || match c1.write(u_after * MIB, &stamp_block(u_after * SEG_BLOCKS, 10), true) {
            Ok(()) => Some(()),
            Err(NbdErr::Errno(_)) => {
                failures += 1;
                None
            }
            Err(e) => panic!("allocating write after restart broke the connection: {e:?}"),
        },
    );
    eprintln!(
        "allocating writes work again {:?} after the restart ({failures} failed attempts)",
        restarted.elapsed()
    );
    c.wait_connected(&["host-a"], Duration::from_secs(30));

    ow.stop.store(true, Ordering::Relaxed);
    ow.handle
        .join()
        .unwrap()
        .expect("overwrites of allocated space never fail");
    let last = ow.last.lock().unwrap().clone();
    c1.flush().unwrap();

    // Everything reads back, on a fresh connection.
    let mut v = c.agent("host-a").client("k");
    let d = read_blocks(&mut v, 0, 8 * SEG_BLOCKS).unwrap();
    expect_blocks("after restart, segments 0..8", &d, 0, 0, |b| {
        if (SEG_BLOCKS..2 * SEG_BLOCKS).contains(&b) {
            Some(2)
        } else {
            Some(*last.get(&b).unwrap_or(&1))
        }
    });
    let d = read_blocks(&mut v, u_after * SEG_BLOCKS, SEG_BLOCKS).unwrap();
    expect_blocks(
        "after restart, the segment allocated after it",
        &d,
        u_after * SEG_BLOCKS,
        0,
        |b| (b == u_after * SEG_BLOCKS).then_some(10),
    );
    let d = read_blocks(&mut v, u_fail * SEG_BLOCKS, SEG_BLOCKS).unwrap();
    expect_blocks(
        "the segment whose allocating write failed",
        &d,
        u_fail * SEG_BLOCKS,
        0,
        |_| None,
    );
    wait_tables_current(
        &c.controller,
        &[("host-a", &["k"])],
        Duration::from_secs(20),
    );
    c.controller.check_live();
    drop((c1, v));
    c.stop_and_check();
    eprintln!("controller kill test took {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 3. kill -9 of one agent while the others do I/O.

#[test]
fn killing_one_agent_leaves_the_others_unaffected() {
    if !have("fio") {
        return;
    }
    let t0 = Instant::now();
    let names = THREE;
    let mut c = three_agents("16M");
    // Every agent holds the shared vdisk: agent i writes segment i.
    let mut shared: Vec<Client> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let mut cl = c.agent(n).client("shared");
        write_blocks(&mut cl, i as u64 * SEG_BLOCKS, SEG_BLOCKS, 1, 0);
        cl.flush().unwrap();
        shared.push(cl);
    }

    let mut fios = Vec::new();
    for n in &names {
        let args = own_job(c.agent(n), n);
        fios.push((spawn_fio(&args), args));
    }
    std::thread::sleep(Duration::from_millis(1500));
    c.agent_mut("host-c").proc.kill9();
    let killed = Instant::now();
    eprintln!("killed host-c after {:?}", t0.elapsed());

    // A change that needs every holder's acknowledgement completes once host-c's lease has
    // expired: host-a zeroes its own segment of the shared vdisk.
    let t = Instant::now();
    shared[0]
        .write_zeroes(0, MIB as u32)
        .expect("write-zeroes of a whole segment with a dead co-holder");
    eprintln!("write-zeroes with host-c dead took {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "a free waited {:?} for a dead agent (lease 3s)",
        t.elapsed()
    );
    let d = read_blocks(&mut shared[0], 0, 3 * SEG_BLOCKS).unwrap();
    expect_blocks("shared after zeroing through host-a", &d, 0, 0, |b| {
        (b >= SEG_BLOCKS).then_some(1)
    });
    let d = read_blocks(&mut shared[1], 0, 3 * SEG_BLOCKS).unwrap();
    expect_blocks("shared through host-b", &d, 0, 0, |b| {
        (b >= SEG_BLOCKS).then_some(1)
    });

    // The others' fio runs are unaffected; host-c's own fails or is cut short.
    let (fc, _) = fios.pop().unwrap();
    for (child, args) in fios {
        fio::check(
            child.wait_with_output().unwrap(),
            &args,
            Some(32 * MIB),
            32 * MIB,
        );
    }
    let _ = fc.wait_with_output();
    eprintln!("fio on host-a and host-b passed after {:?}", t0.elapsed());

    // The controller sees host-c as disconnected (or forgets it).
    let seen = poll(
        "the controller shows host-c as not connected",
        Duration::from_secs(20),
        || match c.controller.agent_view("host-c") {
            None => Some("gone".to_string()),
            Some(a) if a["connected"].as_bool() == Some(false) => Some(a.to_string()),
            Some(_) => None,
        },
    );
    eprintln!("{:?} after the kill, host-c: {seen}", killed.elapsed());
    let st = c.controller.status();
    for n in ["host-a", "host-b"] {
        let a = agent_entry(&st, n).unwrap_or_else(|| panic!("{n} listed: {st:#}"));
        assert_eq!(
            a["connected"].as_bool(),
            Some(true),
            "{n} still connected: {a}"
        );
    }

    // Deleting the vdisk the dead agent held completes (its lease is long gone).
    let t = Instant::now();
    let out = c
        .controller
        .try_cli_within(&["vdisk", "delete", "own-host-c"], Duration::from_secs(30));
    assert!(
        out.status.success(),
        "deleting a vdisk held only by a dead agent: {} {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("delete of host-c's vdisk took {:?}", t.elapsed());

    // host-c comes back on the same port and name and sees the current data.
    c.agent_mut("host-c").spawn(false);
    c.wait_connected(&names, Duration::from_secs(30));
    let mut back = c.agent("host-c").client("shared");
    let d = read_blocks(&mut back, 0, 3 * SEG_BLOCKS).unwrap();
    expect_blocks("shared through the restarted host-c", &d, 0, 0, |b| {
        (b >= SEG_BLOCKS).then_some(1)
    });
    back.write(5 * 4096, &stamp_block(5, 2), true).unwrap();
    let d = shared[1].read(5 * 4096, 4096).unwrap();
    expect_blocks("host-c's new write through host-b", &d, 5, 0, |_| Some(2));

    drop((shared, back));
    c.controller.check_live();
    c.stop_and_check();
    eprintln!("agent kill test took {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 4. SIGSTOP / SIGCONT of an agent across a free and reuse of segments it has mapped.

/// Sends one request on another thread; the answer comes through the channel.
fn in_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

#[test]
fn stopped_agent_never_uses_a_stale_entry_after_resume() {
    let t0 = Instant::now();
    // A small pool, so that freed segments must be reused.
    let mut c = Cluster::start("32M", &["host-a", "host-b"]);
    c.controller.cli(&["vdisk", "create", "v", "--size", "8M"]);

    // host-b maps segments 0..4 of v (version 1) and keeps two connections open.
    let mut b1 = c.agent("host-b").client("v");
    write_blocks(&mut b1, 0, 4 * SEG_BLOCKS, 1, 0);
    b1.flush().unwrap();
    let mut b2 = c.agent("host-b").client("v");
    b2.read(0, 4096).unwrap();
    // host-a exports v too and sees host-b's data.
    let mut a = c.agent("host-a").client("v");
    let d = read_blocks(&mut a, 0, 4 * SEG_BLOCKS).unwrap();
    expect_blocks("host-b's data through host-a", &d, 0, 0, |_| Some(1));
    let old_map = c.controller.json(&["vdisk", "map", "v"]);

    c.agent_mut("host-b").proc.sigstop();
    let stopped = Instant::now();

    // Trim all of v through host-a: the free completes only once host-b's lease expired.
    let t = Instant::now();
    a.trim(0, (8 * MIB) as u32)
        .expect("trim with a stopped co-holder must complete after its lease expires");
    freed_after_lease(&c.controller, "trim with host-b stopped", t.elapsed());
    let d = read_blocks(&mut a, 0, 8 * SEG_BLOCKS).unwrap();
    expect_blocks("v after the trim", &d, 0, 0, |_| None);

    // New data in v segment 2, then a second vdisk filling all but 2 MiB of the pool: at
    // least two of host-b's old segments now hold other data.
    write_blocks(&mut a, 2 * SEG_BLOCKS, SEG_BLOCKS, 2, 0);
    let st = c.controller.status();
    let free = st["free"].as_u64().unwrap();
    assert!(free >= 3 * MIB, "free space after the trim: {st:#}");
    let w_size = free - 2 * MIB;
    let w_blocks = w_size / 4096;
    c.controller
        .cli(&["vdisk", "create", "w", "--size", &w_size.to_string()]);
    // w's stamps name block 1_000_000 + b, so they can never pass for v's.
    const WB: u64 = 1_000_000;
    let mut aw = c.agent("host-a").client("w");
    write_blocks(&mut aw, 0, w_blocks, 7, WB);
    aw.flush().unwrap();
    let st = c.controller.status();
    assert!(
        st["free"].as_u64().unwrap() <= 2 * MIB,
        "w should have taken all but 2 MiB: {st:#}"
    );
    let new_map = c.controller.json(&["vdisk", "map", "v"]);
    let w_map = c.controller.json(&["vdisk", "map", "w"]);
    eprintln!(
        "v before: {old_map}\nv now: {new_map}\nw: {w_map}\nhost-b stopped for {:?}",
        stopped.elapsed()
    );

    // Requests queued to host-b while it is stopped: they are read off the socket the moment
    // it resumes, before it can have heard from the controller.
    let rx_read = in_thread(move || {
        let r1 = b1.read(0, (2 * MIB) as u32);
        let r2 = b1.read(3 * MIB, MIB as u32);
        (b1, r1, r2)
    });
    let rx_write = in_thread(move || {
        let r = b2.write(
            (2 * SEG_BLOCKS + 17) * 4096,
            &stamp_block(2 * SEG_BLOCKS + 17, 3),
            true,
        );
        (b2, r)
    });
    std::thread::sleep(Duration::from_millis(300));
    c.agent_mut("host-b").proc.sigcont();
    let resumed = Instant::now();

    let (mut b1, r1, r2) = rx_read
        .recv_timeout(Duration::from_secs(40))
        .expect("reads queued to the stopped host-b never completed after SIGCONT");
    let (mut b2, rw) = rx_write
        .recv_timeout(Duration::from_secs(40))
        .expect("write queued to the stopped host-b never completed after SIGCONT");
    eprintln!(
        "queued requests answered {:?} after SIGCONT: read {:?}/{:?}, write {:?}",
        resumed.elapsed(),
        r1.as_ref().map(|_| "data").map_err(|e| format!("{e:?}")),
        r2.as_ref().map(|_| "data").map_err(|e| format!("{e:?}")),
        rw.as_ref().map_err(|e| format!("{e:?}"))
    );
    // A resumed agent may refuse I/O until it has resynced (an NBD error), but what it does
    // return is the current table's content: zeros, never host-b's old data or w's.
    if let Ok(d) = &r1 {
        expect_blocks("queued read of v 0..2M on resumed host-b", d, 0, 0, |_| {
            None
        });
    }
    if let Ok(d) = &r2 {
        expect_blocks(
            "queued read of v 3M..4M on resumed host-b",
            d,
            3 * SEG_BLOCKS,
            0,
            |_| None,
        );
    }
    let mut wrote_17 = rw.is_ok();
    match &rw {
        Ok(()) | Err(NbdErr::Errno(_)) => {}
        Err(e) => panic!("queued write on resumed host-b broke the connection: {e:?}"),
    }

    // Once resynced, host-b serves I/O again, through the current table.
    let d = poll(
        "host-b serves reads again after SIGCONT",
        Duration::from_secs(30),
        || match read_blocks(&mut b1, 0, 8 * SEG_BLOCKS) {
            Ok(d) => Some(d),
            Err(NbdErr::Errno(_)) => None,
            Err(e) => panic!("read on resumed host-b broke the connection: {e:?}"),
        },
    );
    let v_now = |b: u64, seventeen: bool| -> Option<u64> {
        if seventeen && b == 2 * SEG_BLOCKS + 17 {
            Some(3)
        } else if (2 * SEG_BLOCKS..3 * SEG_BLOCKS).contains(&b) {
            Some(2)
        } else {
            None
        }
    };
    expect_blocks("v through resumed host-b", &d, 0, 0, |b| v_now(b, wrote_17));
    if !wrote_17 {
        poll(
            "host-b takes writes again",
            Duration::from_secs(30),
            || match b2.write(
                (2 * SEG_BLOCKS + 17) * 4096,
                &stamp_block(2 * SEG_BLOCKS + 17, 3),
                true,
            ) {
                Ok(()) => Some(()),
                Err(NbdErr::Errno(_)) => None,
                Err(e) => panic!("write on resumed host-b broke the connection: {e:?}"),
            },
        );
        wrote_17 = true;
    }
    // An allocating write through host-b (segment 0, unmapped now; 2 MiB of the pool are free).
    b2.write(3 * 4096, &stamp_block(3, 4), true)
        .expect("allocating write through resumed host-b");

    // host-a sees host-b's writes where the current table says, and w is intact: host-b wrote
    // through no stale entry.
    let mut a2 = c.agent("host-a").client("v");
    let d = read_blocks(&mut a2, 0, 8 * SEG_BLOCKS).unwrap();
    expect_blocks("v through host-a after host-b's writes", &d, 0, 0, |b| {
        if b == 3 { Some(4) } else { v_now(b, wrote_17) }
    });
    let mut aw2 = c.agent("host-a").client("w");
    let d = read_blocks(&mut aw2, 0, w_blocks).unwrap();
    expect_blocks("w after host-b resumed and wrote", &d, 0, WB, |_| Some(7));
    let d = read_blocks(&mut b1, 0, 4 * SEG_BLOCKS).unwrap();
    expect_blocks("v through host-b at the end", &d, 0, 0, |b| {
        if b == 3 { Some(4) } else { v_now(b, wrote_17) }
    });

    c.wait_connected(&["host-a", "host-b"], Duration::from_secs(20));
    wait_tables_current(
        &c.controller,
        &[("host-a", &["v", "w"]), ("host-b", &["v"])],
        Duration::from_secs(20),
    );
    drop((a, a2, aw, aw2, b1, b2));
    c.controller.check_live();
    c.stop_and_check();
    eprintln!("SIGSTOP test took {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 5. Two agents, one vdisk, disjoint regions, each reading the other's data.

#[test]
fn two_agents_write_disjoint_regions_of_one_vdisk_and_read_each_others() {
    let t0 = Instant::now();
    let mut c = Cluster::start("1G", &["host-a", "host-b"]);
    c.controller.cli(&["vdisk", "create", "d", "--size", "32M"]);
    let (pa, pb) = (c.agent("host-a").nbd_port, c.agent("host-b").nbd_port);

    // Segments 0..8: host-a's; 16..24: host-b's; 8..16: even blocks host-a's, odd blocks
    // host-b's, so both agents fault for the same segments at the same moment and must end up
    // with one allocation.
    fn owner(b: u64) -> Option<usize> {
        match b / SEG_BLOCKS {
            0..8 => Some(0),
            8..16 => Some((b % 2) as usize),
            16..24 => Some(1),
            _ => None,
        }
    }
    let writers: Vec<_> = [pa, pb]
        .into_iter()
        .enumerate()
        .map(|(i, port)| {
            std::thread::spawn(move || {
                let mut cl = Client::connect(port, "d").unwrap();
                // The shared segments first, so the faults race.
                for b in 8 * SEG_BLOCKS..16 * SEG_BLOCKS {
                    if owner(b) == Some(i) {
                        cl.write(b * 4096, &stamp_block(b, 1 + i as u64), false)
                            .unwrap_or_else(|e| panic!("agent {i} write block {b}: {e:?}"));
                    }
                }
                let own = if i == 0 { 0 } else { 16 };
                for s in own..own + 8 {
                    cl.write(
                        s * MIB,
                        &stamped(s * SEG_BLOCKS, SEG_BLOCKS, 1 + i as u64),
                        false,
                    )
                    .unwrap_or_else(|e| panic!("agent {i} write segment {s}: {e:?}"));
                }
                cl.flush().unwrap();
                cl
            })
        })
        .collect();
    let mut clients: Vec<Client> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!("both agents wrote after {:?}", t0.elapsed());

    // Each agent reads everything, including the other's blocks.
    for (i, cl) in clients.iter_mut().enumerate() {
        let d = read_blocks(cl, 0, 32 * SEG_BLOCKS).unwrap();
        expect_blocks(&format!("vdisk d read through agent {i}"), &d, 0, 0, |b| {
            owner(b).map(|o| 1 + o as u64)
        });
    }
    // Ping-pong: a write through one agent is read at once through the other.
    for round in 0..20u64 {
        let (w, r) = if round % 2 == 0 { (0, 1) } else { (1, 0) };
        let b = 17 * SEG_BLOCKS + round * 13;
        clients[w]
            .write(b * 4096, &stamp_block(b, 10 + round), round % 3 == 0)
            .unwrap();
        let d = clients[r].read(b * 4096, 4096).unwrap();
        expect_blocks(&format!("ping-pong round {round}"), &d, b, 0, |_| {
            Some(10 + round)
        });
    }
    // Every segment written was allocated once: 24 MiB, plus at most what was allocated ahead
    // of sequential streams (never beyond the vdisk).
    let vd = c.controller.json(&["vdisk", "show", "d"]);
    let allocated = vd["allocated"].as_u64().unwrap();
    assert!(
        (24 * MIB..=32 * MIB).contains(&allocated),
        "allocated {allocated}: {vd}"
    );
    drop(clients);
    c.controller.check_live();
    c.stop_and_check();
    eprintln!("two-agent test took {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 6. Controller and agents in separate network namespaces, 7. a partitioned agent.

/// Network namespaces that are deleted on drop.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn sh(args: &[&str]) {
    let out = run_timeout(args[0], &args[1..], Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this test can create network namespaces. Not root: skip. Root with `ip` under
/// CI=true: it must work.
fn netns_usable() -> bool {
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("SKIP: network namespace test needs root");
        return false;
    }
    if !have("ip") {
        return false;
    }
    // Tests run in parallel threads of one process: each probe needs its own name.
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let probe = format!(
        "tabula-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    );
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        let _ = Command::new("ip").args(["netns", "del", &probe]).status();
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("running as root with `ip`, but `ip netns add` fails; CI must run this test");
    }
    eprintln!("SKIP: `ip netns add` does not work here");
    false
}

/// A controller in one namespace with a bridge, and agents each in their own namespace hung
/// off the bridge by a veth pair: separate hosts on one subnet. Processes are killed first,
/// namespaces deleted last (fields drop in order, after `Drop::drop` below).
struct NetCluster {
    agents: Vec<Agent>,
    controller: Controller,
    ctl_ns: String,
    agent_ns: Vec<String>,
    _ns: Namespaces,
    tmp: tempfile::TempDir,
}

impl NetCluster {
    /// Namespaces `tabula-{tag}ctl-PID`, `tabula-{tag}{i}-PID`; the controller on
    /// 10.231.0.1:7700, agent i (`host-i`) on 10.231.0.(10+i):10809. The agents start first:
    /// they keep trying until the controller is up.
    fn start(tag: &str, agents: usize, container_size: &str) -> NetCluster {
        Self::start_with_lease(
            tag,
            agents,
            container_size,
            cluster::LEASE,
            cluster::FAULT_WAIT,
        )
    }

    /// Like [`start`](Self::start), with the controller's `--lease` and the agents'
    /// `--fault-wait`.
    fn start_with_lease(
        tag: &str,
        agents: usize,
        container_size: &str,
        lease: &str,
        fault_wait: &str,
    ) -> NetCluster {
        let pid = std::process::id();
        let ctl_ns = format!("tabula-{tag}ctl-{pid}");
        let agent_ns: Vec<String> = (0..agents)
            .map(|i| format!("tabula-{tag}{i}-{pid}"))
            .collect();
        let mut created = Namespaces(Vec::new());
        for ns in std::iter::once(&ctl_ns).chain(&agent_ns) {
            sh(&["ip", "netns", "add", ns]);
            created.0.push(ns.clone());
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // Veth pairs are created straight into the namespaces, so nothing is left in ours.
        sh(&["ip", "-n", &ctl_ns, "link", "add", "br0", "type", "bridge"]);
        sh(&[
            "ip",
            "-n",
            &ctl_ns,
            "addr",
            "add",
            "10.231.0.1/24",
            "dev",
            "br0",
        ]);
        sh(&["ip", "-n", &ctl_ns, "link", "set", "br0", "up"]);
        let mut ips = Vec::new();
        for (i, ns) in agent_ns.iter().enumerate() {
            let (near, far) = (format!("tvc{i}"), format!("tva{i}"));
            sh(&[
                "ip", "link", "add", &near, "netns", &ctl_ns, "type", "veth", "peer", "name", &far,
                "netns", ns,
            ]);
            sh(&["ip", "-n", &ctl_ns, "link", "set", &near, "master", "br0"]);
            sh(&["ip", "-n", &ctl_ns, "link", "set", &near, "up"]);
            let ip = format!("10.231.0.{}", 10 + i);
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                &far,
            ]);
            sh(&["ip", "-n", ns, "link", "set", &far, "up"]);
            ips.push(ip);
        }

        let tmp = tempfile::tempdir().unwrap();
        let prefix = |ns: &str| -> Vec<String> { common::strings(&["ip", "netns", "exec", ns]) };
        let mut controller = Controller::prepare(tmp.path(), "10.231.0.1", 7700, &prefix(&ctl_ns));
        controller.container_size = container_size.into();
        controller.lease = lease.into();
        let agents = agent_ns
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                Agent::prepare(
                    tmp.path(),
                    &format!("host-{i}"),
                    &ips[i],
                    10809,
                    &controller.url(),
                    &prefix(ns),
                )
            })
            .map(|mut a: Agent| {
                a.fault_wait = fault_wait.into();
                a
            })
            .collect();
        let mut nc = NetCluster {
            agents,
            controller,
            ctl_ns,
            agent_ns,
            _ns: created,
            tmp,
        };
        for a in &mut nc.agents {
            a.spawn(false);
        }
        nc.controller.spawn();
        let names = nc.names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        wait_connected(&nc.controller, &names, Duration::from_secs(30));
        nc
    }

    fn names(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.name.clone()).collect()
    }

    /// qemu-io run on agent `i`'s host against agent `i`; returns its output and whether it
    /// exited 0 (qemu-io exits 0 even when a command fails).
    fn try_qio(&self, i: usize, vdisk: &str, cmds: &[&str]) -> (String, bool) {
        let url = self.agents[i].url(vdisk);
        let mut args: Vec<&str> = vec!["netns", "exec", &self.agent_ns[i], "qemu-io", "-f", "raw"];
        // A snapshot's export is read-only.
        if vdisk.contains('@') {
            args.push("-r");
        }
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(&url);
        let out = run_timeout("ip", &args, Duration::from_secs(60));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (text, out.status.success())
    }

    /// qemu-io on agent `i`'s host; every command must complete without error.
    fn qio(&self, i: usize, vdisk: &str, cmds: &[&str]) -> String {
        let (text, ok) = self.try_qio(i, vdisk, cmds);
        let done = text
            .lines()
            .filter(|l| {
                l.starts_with("read ") || l.starts_with("wrote ") || l.starts_with("discard ")
            })
            .count();
        assert!(
            ok && done == cmds.len()
                && !text.contains("Pattern verification failed")
                && !text.contains("failed:"),
            "qemu-io on host-{i} {cmds:?}:\n{text}"
        );
        text
    }

    /// Cuts agent `i`'s host off the network silently (its packets are dropped: timeouts, not
    /// refusals), or reconnects it.
    fn set_link(&self, i: usize, up: bool) {
        sh(&[
            "ip",
            "-n",
            &self.ctl_ns,
            "link",
            "set",
            &format!("tvc{i}"),
            if up { "up" } else { "down" },
        ]);
    }

    /// Makes agent `i`'s host answer every connection to the controller's address itself,
    /// with a refusal (as a firewall's REJECT would), while the controller keeps running; or
    /// undoes that.
    fn set_refused(&self, i: usize, refused: bool) {
        sh(&[
            "ip",
            "-n",
            &self.agent_ns[i],
            "addr",
            if refused { "add" } else { "del" },
            "10.231.0.1/32",
            "dev",
            "lo",
        ]);
    }

    fn stop_and_check(&mut self) {
        cluster::stop_and_check(&mut self.controller, &mut self.agents);
    }

    /// The end of a test: `tabula check` live, a clean stop, `tabula check` on the data, the
    /// namespaces gone; then how long the test (`what`, started at `t0`) took.
    fn finish(mut self, what: &str, t0: Instant) {
        self.controller.check_live();
        self.stop_and_check();
        drop(self);
        eprintln!("{what} took {:?}", t0.elapsed());
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        cluster::kill_all(&mut self.controller, &mut self.agents);
    }
}

#[test]
fn controller_and_agents_in_separate_network_namespaces() {
    if !netns_usable() || !have("qemu-io") {
        return;
    }
    let t0 = Instant::now();
    let nc = NetCluster::start("n", 2, "1G");
    nc.controller
        .cli(&["vdisk", "create", "nd", "--size", "64M"]);

    // Each host writes through its own agent; the other host reads it back through its own.
    nc.qio(0, "nd", &["write -P 0x5a 0 4M", "write -P 0x3c 5M 64k"]);
    nc.qio(1, "nd", &["write -P 0xa5 8M 4M"]);
    nc.qio(
        1,
        "nd",
        &[
            "read -P 0x5a 0 4M",
            "read -P 0x3c 5M 64k",
            "read -P 0 4M 1M",
        ],
    );
    nc.qio(0, "nd", &["read -P 0xa5 8M 4M", "read -P 0 12M 4M"]);
    nc.qio(0, "nd", &["discard 8M 2M"]);
    nc.qio(1, "nd", &["read -P 0 8M 2M", "read -P 0xa5 10M 2M"]);

    wait_connected(
        &nc.controller,
        &["host-0", "host-1"],
        Duration::from_secs(10),
    );
    wait_tables_current(
        &nc.controller,
        &[("host-0", &["nd"]), ("host-1", &["nd"])],
        Duration::from_secs(20),
    );
    nc.finish("network namespace test", t0);
}

/// How the two tests below cut host-1 off from the controller.
#[derive(Clone, Copy)]
enum Cut {
    /// A silent network partition: its packets are dropped (timeouts, not refusals).
    Silent,
    /// Its connection attempts are refused (a firewall REJECT answers for the controller's
    /// address) while the controller keeps running.
    Refused,
}

impl Cut {
    /// The tests' namespace tag (each test its own).
    fn tag(self) -> &'static str {
        match self {
            Cut::Silent => "p",
            Cut::Refused => "r",
        }
    }

    /// "host-1 partitioned", "host-1 refused", in messages.
    fn word(self) -> &'static str {
        match self {
            Cut::Silent => "partitioned",
            Cut::Refused => "refused",
        }
    }

    /// Cuts agent `i` of `nc` off (`off`), or undoes that.
    fn apply(self, nc: &NetCluster, i: usize, off: bool) {
        match self {
            Cut::Silent => nc.set_link(i, !off),
            Cut::Refused => nc.set_refused(i, off),
        }
    }
}

/// What [`cut_off_host_1`] leaves for each test's own checks.
struct CutOff {
    nc: NetCluster,
    /// The size of w, which took all but 2 MiB of the pool (host-1's old segments among it).
    w_size: u64,
    /// host-1's qemu-io output for its read of v's trimmed 0..2M and its 4 KiB write of 0x99 at
    /// 2M, both while cut off.
    text: String,
    /// Whether host-1 acknowledged that write.
    wrote_99: bool,
}

/// The scenario of the two tests below, on a small pool, so that freed segments must be
/// reused. host-1 maps segments 0..4 of v and host-0, which holds v too, sees the data; host-1
/// is cut off (`cut`); host-0 discards all of v, done once host-1's lease ran out, and the
/// freed space is zeroed; with `refill_segment_2`, host-0 writes new data (0x77) into v's
/// segment 2; a vdisk w takes all but 2 MiB of the pool, so host-1's old segments now hold
/// other data (w's 0xe1). While still cut off, host-1 reads v 0..2M and writes 0x99 at 2M (its
/// output is for the test to judge); then the cut is undone and host-1 serves reads again,
/// never non-zero data from v's trimmed 0..2M.
fn cut_off_host_1(cut: Cut, refill_segment_2: bool) -> CutOff {
    let word = cut.word();
    let nc = NetCluster::start(cut.tag(), 2, "32M");
    nc.controller.cli(&["vdisk", "create", "v", "--size", "8M"]);
    nc.qio(1, "v", &["write -P 0x5a 0 4M"]);
    nc.qio(0, "v", &["read -P 0x5a 0 4M"]);

    cut.apply(&nc, 1, true);
    let cut_at = Instant::now();
    nc.qio(0, "v", &["discard 0 8M"]);
    freed_after_lease(
        &nc.controller,
        &format!("discard with host-1 {word}"),
        cut_at.elapsed(),
    );
    if refill_segment_2 {
        nc.qio(0, "v", &["read -P 0 0 8M", "write -P 0x77 2M 1M"]);
    }
    let free = nc.controller.status()["free"].as_u64().unwrap();
    assert!(free >= 3 * MIB, "free after the discard: {free}");
    let w_size = free - 2 * MIB;
    nc.controller
        .cli(&["vdisk", "create", "w", "--size", &w_size.to_string()]);
    nc.qio(0, "w", &[&format!("write -P 0xe1 0 {w_size}")]);
    eprintln!(
        "host-1 while {word}, as the controller sees it: {}\nv: {}\nw: {}",
        nc.controller.status()["agents"],
        nc.controller.json(&["vdisk", "map", "v"]),
        nc.controller.json(&["vdisk", "map", "w"])
    );

    // While cut off, host-1 may fail I/O or read zeros, but never old data or other data, and
    // a write must not land anywhere through its stale entry.
    let t = Instant::now();
    let (text, _) = nc.try_qio(1, "v", &["read -P 0 0 2M", "write -P 0x99 2M 4k"]);
    eprintln!(
        "host-1 I/O while {word} ({:?} after the cut, took {:?}):\n{text}",
        cut_at.elapsed(),
        t.elapsed()
    );
    let wrote_99 = text.contains("wrote 4096/4096");

    cut.apply(&nc, 1, false);
    let restored = Instant::now();
    poll(
        "host-1 serves reads again once it reaches the controller",
        Duration::from_secs(30),
        || {
            let (text, ok) = nc.try_qio(1, "v", &["read -P 0 0 2M"]);
            assert!(
                !text.contains("Pattern verification failed"),
                "host-1, no longer {word}, read non-zero data from a trimmed range:\n{text}"
            );
            (ok && text.contains("read 2097152/2097152")).then_some(())
        },
    );
    eprintln!(
        "host-1 serves again {:?} after the cut was undone",
        restored.elapsed()
    );
    CutOff {
        nc,
        w_size,
        text,
        wrote_99,
    }
}

/// An agent cut off by a silent network partition (timeouts, not refusals) must stop using its
/// table copies when its lease runs out, by its own clock: the controller frees and reuses its
/// segments meanwhile. After the partition heals, it resyncs and serves the current table.
#[test]
fn partitioned_agent_fences_itself_and_resyncs_after_heal() {
    if !netns_usable() || !have("qemu-io") {
        return;
    }
    let t0 = Instant::now();
    let CutOff {
        nc,
        w_size,
        text,
        wrote_99,
    } = cut_off_host_1(Cut::Silent, true);
    assert!(
        !text.contains("Pattern verification failed"),
        "partitioned host-1 read non-zero data from a trimmed range:\n{text}"
    );
    let seg2_first = if wrote_99 { "0x99" } else { "0x77" };
    let want: Vec<String> = vec![
        "read -P 0 0 2M".into(),
        format!("read -P {seg2_first} 2M 4k"),
        format!("read -P 0x77 {} {}", 2 * MIB + 4096, MIB - 4096),
        format!("read -P 0 3M 5M"),
    ];
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    nc.qio(1, "v", &want);
    nc.qio(0, "v", &want);
    // Nothing host-1 did reached w.
    nc.qio(0, "w", &[&format!("read -P 0xe1 0 {w_size}")]);
    // host-1 allocates again, and host-0 sees it.
    nc.qio(1, "v", &["write -P 0x42 0 64k"]);
    nc.qio(0, "v", &["read -P 0x42 0 64k", "read -P 0 64k 64k"]);
    nc.qio(0, "w", &[&format!("read -P 0xe1 0 {w_size}")]);

    wait_connected(
        &nc.controller,
        &["host-0", "host-1"],
        Duration::from_secs(20),
    );
    wait_tables_current(
        &nc.controller,
        &[("host-0", &["v", "w"]), ("host-1", &["v"])],
        Duration::from_secs(20),
    );
    nc.finish("partition test", t0);
}

/// The lease of [`snapshot_and_rollback_wait_out_a_partitioned_agent`]: longer than the
/// controller's `--snapshot-hold` (5 s), so that holding the reachable agent's I/O until the
/// cut-off agent's lease ends cannot succeed.
const FENCE_LEASE: Duration = Duration::from_secs(8);

/// fio on agent `i`'s host writing vdisk `vdisk` from `offset` (4 KiB at a time, 200 a second,
/// one in flight) for `secs`. Its JSON report says any error and its longest write; its
/// latency log, `{log}_lat.1.log`, when each write completed (ms since the Unix epoch).
fn paced_writer(
    nc: &NetCluster,
    i: usize,
    vdisk: &str,
    offset: &str,
    secs: u64,
    log: &std::path::Path,
) -> std::process::Child {
    let args = common::strings(&[
        "netns",
        "exec",
        &nc.agent_ns[i],
        "timeout",
        "-k",
        "5",
        &(secs + 60).to_string(),
        "fio",
        "--name=paced",
        "--ioengine=nbd",
        &format!("--uri={}", nc.agents[i].url(vdisk)),
        "--rw=write",
        "--bs=4k",
        "--iodepth=1",
        &format!("--offset={offset}"),
        "--rate_iops=200",
        "--time_based=1",
        &format!("--runtime={secs}"),
        &format!("--write_lat_log={}", log.display()),
        "--log_avg_msec=0",
        "--log_unix_epoch=1",
        "--output-format=json",
    ]);
    Command::new("ip")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio")
}

/// Milliseconds since the Unix epoch.
fn epoch_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Waits for a [`paced_writer`]: it must have written without an error. Returns its longest
/// write, and the longest time without a completed write within `[from, to)` (epoch ms,
/// counting from `from` to the first completion and from the last to `to`).
fn paced_writer_done(
    w: std::process::Child,
    what: &str,
    log: &std::path::Path,
    (from, to): (u64, u64),
) -> (Duration, Duration) {
    let out = w.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "{what}: the writer failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    let v = fio::json_after_chatter(&stdout);
    let job = &v["jobs"][0];
    assert_eq!(
        job["error"].as_u64(),
        Some(0),
        "{what}: writer error: {job}"
    );
    let ios = job["write"]["total_ios"].as_u64().unwrap_or(0);
    assert!(
        ios > 100,
        "{what}: the writer wrote only {ios} times: {job}"
    );
    let longest = Duration::from_nanos(job["write"]["lat_ns"]["max"].as_u64().unwrap());
    let file = format!("{}_lat.1.log", log.display());
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut done: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split(',').next()?.trim().parse().ok())
        .filter(|&t| t >= from && t < to)
        .collect();
    done.sort_unstable();
    let gap = std::iter::once(from)
        .chain(done.iter().copied())
        .chain(std::iter::once(to))
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap();
    eprintln!(
        "{what}: the writer wrote {ios} times, the longest write took {longest:?}; while the \
         controller waited for host-1, {} writes completed, at most {gap} ms apart",
        done.len()
    );
    (longest, Duration::from_millis(gap))
}

/// Cuts host-1 off silently, runs `op` (an admin command that holds v's I/O on every agent
/// exporting it) while fio writes through host-0, then heals the cut. `op` must succeed once
/// host-1's lease has run out (not fail after --snapshot-hold), and host-0's writes must
/// neither fail nor stall while the controller waits for host-1. `before` runs on host-0
/// after the cut, before `op`.
///
/// The writer overwrites v's 16M..32M, which must be mapped and writable (`normal`) when this
/// begins: a write that needs the controller (to allocate, or to copy a block shared with a
/// snapshot) must wait, whatever the snapshot does, until host-1 has seen the new mapping or
/// lost its lease, or host-1 could read what it replaced.
fn op_with_host_1_cut_off(nc: &NetCluster, what: &str, before: &[&str], op: &[&str]) {
    // Long enough to cover the cut, the wait for host-1's lease and the operation.
    let run_secs = FENCE_LEASE.as_secs() + 12;
    let log = nc
        .tmp
        .path()
        .join(format!("writer-{}", what.replace(' ', "-")));
    let writer = paced_writer(nc, 0, "v", "16M", run_secs, &log);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    nc.set_link(1, false);
    let cut_at = Instant::now();
    let cut_epoch = epoch_ms(std::time::SystemTime::now());
    nc.qio(0, "v", before);
    let t = Instant::now();
    let out = nc.controller.try_cli_within(op, Duration::from_secs(60));
    let took = t.elapsed();
    eprintln!(
        "{what} with host-1 partitioned took {took:?} ({:?} after the cut): {}{}",
        cut_at.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let outlasted = started.elapsed() + Duration::from_secs(2) < Duration::from_secs(run_secs);
    // While the controller waits for host-1: its lease, renewed at most one heartbeat
    // (a quarter of it) before the cut, runs at least until then.
    let waiting = (
        cut_epoch,
        cut_epoch + (FENCE_LEASE * 3 / 4).as_millis() as u64 - 500,
    );
    // The writer first, so that a failed operation shows how the writer fared too.
    let (_, gap) = paced_writer_done(writer, what, &log, waiting);
    assert!(
        out.status.success(),
        "{what} with host-1 partitioned failed after {took:?}: {}\ncontroller log tail:\n{}",
        String::from_utf8_lossy(&out.stderr),
        nc.controller.proc.log_tail(30)
    );
    let bound = FENCE_LEASE + Duration::from_secs(6);
    assert!(
        took < bound,
        "{what} took {took:?}: more than host-1's lease ({FENCE_LEASE:?}) and a margin"
    );
    assert!(outlasted, "the writer must outlast {what}");
    // Generous: writes complete every 5 ms; a hold waiting for host-1 stops them for seconds.
    let limit = Duration::from_millis(2500);
    assert!(
        gap < limit,
        "{what}: no write through the reachable agent completed for {gap:?} (limit {limit:?}) \
         while the controller waited for the cut-off agent: its I/O was held"
    );
    nc.set_link(1, true);
}

/// A snapshot (and a rollback) while one exporting agent is cut off by a silent partition (its
/// session looks open to the controller: packets are dropped, nothing resets it): the
/// controller waits out the silent agent's lease without holding the other agent's I/O, counts
/// it fenced, and proceeds. The snapshot holds what was acknowledged before it; the cut-off
/// agent, healed, resyncs and serves the current table and the snapshot.
#[test]
fn snapshot_and_rollback_wait_out_a_partitioned_agent() {
    if !netns_usable() || !have("qemu-io") || !have("fio") {
        return;
    }
    let t0 = Instant::now();
    let lease = format!("{}s", FENCE_LEASE.as_secs());
    // The default --fault-wait (30 s): a write that needs the controller right after the
    // operation (all of v is shared with s1 after the rollback) may wait for the controller
    // to finish it (a rollback zeroes what it freed) on a loaded machine; what this test
    // bounds is the stall while the controller waits for host-1, measured below.
    let nc = NetCluster::start_with_lease("f", 2, "256M", &lease, "30s");
    nc.controller
        .cli(&["vdisk", "create", "v", "--size", "64M"]);
    nc.qio(1, "v", &["write -P 0x5a 0 4M"]);
    nc.qio(0, "v", &["read -P 0x5a 0 4M", "write -P 0x11 16M 16M"]);

    op_with_host_1_cut_off(
        &nc,
        "snapshot create",
        &["write -P 0x6b 0 1M"],
        &["snapshot", "create", "v", "s1"],
    );
    // The snapshot holds what host-0 wrote before it; v takes new writes.
    nc.qio(0, "v@s1", &["read -P 0x6b 0 1M", "read -P 0x5a 1M 3M"]);
    nc.qio(0, "v", &["write -P 0x7c 0 64k", "read -P 0x6b 64k 960k"]);
    nc.qio(0, "v@s1", &["read -P 0x6b 0 64k"]);
    let v_now = [
        "read -P 0x7c 0 64k",
        "read -P 0x6b 64k 960k",
        "read -P 0x5a 1M 3M",
    ];
    poll(
        "host-1, healed, serves v's current data",
        Duration::from_secs(30),
        || {
            let (text, ok) = nc.try_qio(1, "v", &v_now);
            assert!(
                !text.contains("Pattern verification failed"),
                "host-1, healed, read stale data of v:\n{text}"
            );
            (ok && text.matches("read ").count() == 3 && !text.contains("failed")).then_some(())
        },
    );
    nc.qio(1, "v@s1", &["read -P 0x6b 0 1M", "read -P 0x5a 1M 3M"]);
    wait_connected(
        &nc.controller,
        &["host-0", "host-1"],
        Duration::from_secs(20),
    );
    wait_tables_current(
        &nc.controller,
        &[("host-0", &["v"]), ("host-1", &["v"])],
        Duration::from_secs(20),
    );

    // Rollback, the same way: v becomes s1 again (0x6b at 0), whatever host-0 wrote there.
    // The writer's range is shared with s1 now: written once more, it is v's own again.
    nc.qio(0, "v", &["write -P 0x22 16M 16M"]);
    op_with_host_1_cut_off(
        &nc,
        "rollback",
        &["write -P 0x8d 0 64k"],
        &["vdisk", "rollback", "v", "s1"],
    );
    nc.qio(0, "v", &["read -P 0x6b 0 1M", "read -P 0x5a 1M 3M"]);
    poll(
        "host-1, healed, serves v as rolled back",
        Duration::from_secs(30),
        || {
            let (text, ok) = nc.try_qio(1, "v", &["read -P 0x6b 0 1M", "read -P 0x5a 1M 3M"]);
            assert!(
                !text.contains("Pattern verification failed"),
                "host-1, healed, read v as it was before the rollback:\n{text}"
            );
            (ok && text.matches("read ").count() == 2 && !text.contains("failed")).then_some(())
        },
    );
    wait_connected(
        &nc.controller,
        &["host-0", "host-1"],
        Duration::from_secs(20),
    );
    wait_tables_current(
        &nc.controller,
        &[("host-0", &["v"]), ("host-1", &["v"])],
        Duration::from_secs(20),
    );
    nc.finish("snapshot with a partitioned agent", t0);
}

/// Like the partition above, but the cut-off agent's connection attempts are *refused* (a
/// firewall REJECT answers for the controller's address) while the controller keeps running
/// and, once the agent's lease is over, frees and reuses its segments. A refusal does not
/// prove that no controller runs, so the agent must not keep using its copies past its lease.
#[test]
fn agent_refused_by_a_live_controller_does_not_serve_freed_space() {
    if !netns_usable() || !have("qemu-io") {
        return;
    }
    let t0 = Instant::now();
    let CutOff {
        nc,
        w_size,
        text,
        wrote_99,
    } = cut_off_host_1(Cut::Refused, false);
    // Judged after the reads below, so that a failure shows what w and v hold.
    let stale_read = text.contains("Pattern verification failed");
    // What w holds now, and what v holds, through host-0.
    let (w_text, _) = nc.try_qio(0, "w", &[&format!("read -P 0xe1 0 {w_size}")]);
    let seg2 = if wrote_99 {
        vec![
            "read -P 0x99 2M 4k".to_string(),
            format!("read -P 0 {} {}", 2 * MIB + 4096, 6 * MIB - 4096),
        ]
    } else {
        vec!["read -P 0 2M 6M".to_string()]
    };
    let mut want = vec!["read -P 0 0 2M".to_string()];
    want.extend(seg2);
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    let (v_text, _) = nc.try_qio(0, "v", &want);
    eprintln!("w through host-0 afterwards:\n{w_text}\nv through host-0 afterwards:\n{v_text}");
    assert!(
        !stale_read,
        "host-1, refused by a live controller past its lease, read another vdisk's bytes \
         (w's 0xe1) through v's freed entry:\n{text}"
    );
    assert!(
        !w_text.contains("Pattern verification failed"),
        "host-1's write through a stale entry of v changed w:\n{w_text}"
    );
    assert!(
        !v_text.contains("Pattern verification failed") && !v_text.contains("failed:"),
        "v through host-0 after host-1 came back ({want:?}):\n{v_text}"
    );
    nc.finish("refused-agent test", t0);
}

/// The controller stops promptly on SIGTERM even while an agent's host has vanished from the
/// network (its connection is half-open: nothing answers, nothing resets it).
#[test]
fn controller_stops_promptly_while_an_agent_is_cut_off() {
    if !netns_usable() || !have("qemu-io") {
        return;
    }
    let mut nc = NetCluster::start("s", 2, "1G");
    nc.controller.cli(&["vdisk", "create", "v", "--size", "8M"]);
    nc.qio(1, "v", &["write -P 0x5a 0 1M"]);
    nc.qio(0, "v", &["read -P 0x5a 0 1M"]);
    nc.set_link(1, false);
    std::thread::sleep(Duration::from_secs(1));
    let took = nc.controller.proc.terminate_within(Duration::from_secs(15));
    eprintln!("controller exit after SIGTERM with host-1 cut off: {took:?}");
    assert!(
        took.is_some(),
        "the controller was still running 15 s after SIGTERM with host-1 cut off; log tail:\n{}",
        nc.controller.proc.log_tail(10)
    );
    for a in &mut nc.agents {
        a.proc.stop();
    }
    common::check_data_dir(&nc.controller.data_dir);
}

/// A process killed (by process id) when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A remote container on the controller's host (its own address, 10.231.0.2) that one agent's
/// host alone cannot reach: that agent's I/O fails and it reports the container, but the
/// controller reaches it, so it records a path down from that agent, not a failed container;
/// the other agent goes on; when the path heals, the agent's probe finds it and I/O resumes.
#[test]
fn a_path_down_from_one_agent_is_told_apart_from_a_failed_container() {
    if !netns_usable() || !have("qemu-io") {
        return;
    }
    let t0 = Instant::now();
    let nc = NetCluster::start("p", 2, "64M");
    sh(&[
        "ip",
        "-n",
        &nc.ctl_ns,
        "addr",
        "add",
        "10.231.0.2/24",
        "dev",
        "br0",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("r.img");
    let log = std::fs::File::create(tmp.path().join("serve.log")).unwrap();
    let _server = Killed(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &nc.ctl_ns,
                common::BIN,
                "container",
                "serve",
            ])
            .arg(&file)
            .args(["--size", "64M", "--listen", "10.231.0.2:10810"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let uri = "nbd://10.231.0.2:10810/disk0";
    let deadline = Instant::now() + Duration::from_secs(20);
    while !nc
        .controller
        .try_cli(&["container", "add", "r", "--uri", uri])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "container serve never came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    nc.controller
        .cli(&["vdisk", "create", "vd", "--size", "16M", "--container", "r"]);
    nc.qio(0, "vd", &["write -P 0x5a 0 64k"]);
    nc.qio(1, "vd", &["read -P 0x5a 0 64k"]);
    // host-0's connections to 10.231.0.2 now end on its own loopback: refused.
    let cut = |on: bool| {
        sh(&[
            "ip",
            "-n",
            &nc.agent_ns[0],
            "addr",
            if on { "add" } else { "del" },
            "10.231.0.2/32",
            "dev",
            "lo",
        ]);
    };
    cut(true);
    let (text, _) = nc.try_qio(0, "vd", &["read -P 0x5a 0 64k"]);
    assert!(
        text.contains("failed") || text.contains("error"),
        "host-0 cannot reach the container, its read must fail:\n{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let c = loop {
        let c = nc.controller.json(&["container", "show", "r"]);
        if c["unreachable_from"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            break c;
        }
        assert!(Instant::now() < deadline, "no path down recorded: {c}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(c["state"], "ok", "the controller reaches it: {c}");
    assert!(
        c["unreachable_from"][0]
            .as_str()
            .unwrap()
            .starts_with("host-0"),
        "{c}"
    );
    assert_eq!(c["agents"], serde_json::json!(["host-1"]), "{c}");
    // host-1 never noticed.
    nc.qio(1, "vd", &["read -P 0x5a 0 64k", "write -P 0x6b 64k 64k"]);
    cut(false);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (text, ok) = nc.try_qio(0, "vd", &["read -P 0x6b 64k 64k"]);
        if ok && !text.contains("failed") && !text.contains("error") {
            break;
        }
        assert!(Instant::now() < deadline, "host-0 never resumed:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nc.controller.json(&["container", "show", "r"])["unreachable_from"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the path stayed recorded as down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    nc.finish("path-down test", t0);
}
