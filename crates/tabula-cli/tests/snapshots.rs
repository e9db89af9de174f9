//! Snapshots, clones, rollback and diff through the real binary and real NBD I/O.
//!
//! - `snapshot_model`: fsx-style random test over families of vdisks, snapshots and clones
//!   (both copy-on-write policies), every read checked against an in-memory model, with
//!   resizes, rollbacks, deletions in any order, `kill -9` restarts and `tabula check`;
//!   at the end every byte of space comes back.
//! - `delete_in_every_order`: a chain vdisk -> snapshot -> clone -> snapshot -> clone
//!   deleted in all 24 orders; the survivors keep their exact contents.
//! - `snapshot_cli_contract`: what users see (JSON views, unique space, diff ranges,
//!   refusals and their messages, rollback of size and content, read-only exports,
//!   nbdcopy of a snapshot, reads of a deleted snapshot's export fail).
//! - `snapshots_during_concurrent_io`: snapshots, deletes and copy-on-write of both policies
//!   while several connections write and read; each snapshot is one point in time between
//!   its command's start and end, and the base snapshot never changes under its readers.
//! - `cow_out_of_space`, `refused_cow_write_keeps_no_space`: copy-on-write in a full pool.
//!
//! Reproduce a random failure with
//! `TABULA_SEED=<seed printed> cargo test -p tabula --test snapshots <test>`
//! (`TABULA_STEPS` sets the model's length, 5000 by default).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nbd::{Client, NbdErr, Rng, edge_range, seed, stamp_block};
use common::{Server, have, run};

const SEG: u64 = 64 << 10;
const MIB: u64 = 1 << 20;
const EPERM: u32 = 1;

// ---------------------------------------------------------------------------------------
// The shared test client, with the server's refusals as bare errno values.

struct Nbd(Client);

/// The errno of a refused request; anything else (a broken connection, a protocol error)
/// fails the test.
fn errno(e: NbdErr) -> u32 {
    match e {
        NbdErr::Errno(n) => n,
        other => panic!("nbd: {other:?}"),
    }
}

impl Nbd {
    /// Connects to `export`; the server's refusal is returned as its message.
    fn try_connect(port: u16, export: &str) -> Result<Nbd, String> {
        Client::connect(port, export).map(Nbd).map_err(|e| match e {
            NbdErr::Protocol(m) => m,
            other => format!("{other:?}"),
        })
    }
    fn connect(port: u16, export: &str) -> Nbd {
        Nbd::try_connect(port, export).unwrap_or_else(|e| panic!("connect to {export}: {e}"))
    }
    fn size(&self) -> u64 {
        self.0.size
    }
    fn read(&mut self, off: u64, len: u64) -> Result<Vec<u8>, u32> {
        self.0.read(off, len as u32).map_err(errno)
    }
    fn write(&mut self, off: u64, data: &[u8], fua: bool) -> Result<(), u32> {
        self.0.write(off, data, fua).map_err(errno)
    }
    fn trim(&mut self, off: u64, len: u64) -> Result<(), u32> {
        self.0.trim(off, len as u32).map_err(errno)
    }
    fn write_zeroes(&mut self, off: u64, len: u64, no_hole: bool) -> Result<(), u32> {
        self.0
            .write_zeroes_flags(off, len as u32, no_hole)
            .map_err(errno)
    }
    fn flush(&mut self) -> Result<(), u32> {
        self.0.flush().map_err(errno)
    }
    fn read_all(&mut self) -> Vec<u8> {
        self.0
            .read_all()
            .unwrap_or_else(|e| panic!("read all: {e:?}"))
    }
    fn disconnect(self) {
        self.0.disconnect()
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// The whole segments `[off, off+len)` covers in a vdisk of `size` bytes; the last
/// segment counts when the range reaches the end (tabula's documented TRIM behaviour).
fn whole_segments(off: u64, len: u64, size: u64) -> (u64, u64) {
    let end = off + len;
    let b = (off.div_ceil(SEG) * SEG).min(size);
    let e = if end >= size { size } else { end / SEG * SEG };
    (b, e.max(b))
}

/// Data for a write: `byte` with a varying pattern, so misplaced bytes are caught.
fn pattern(byte: u8, len: usize) -> Vec<u8> {
    let mut data = vec![byte; len];
    for (i, d) in data.iter_mut().enumerate().step_by(511) {
        *d = (i as u8) ^ byte ^ ((i >> 9) as u8);
    }
    data
}

/// Where two buffers first differ, as a message (None when equal).
fn first_difference(got: &[u8], want: &[u8], base: u64) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} != expected {}", got.len(), want.len()));
    }
    let at = got.iter().zip(want).position(|(a, b)| a != b)?;
    Some(format!(
        "byte {} differs: read {:#x}, expected {:#x}",
        base + at as u64,
        got[at],
        want[at]
    ))
}

fn stderr_of(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

/// Runs a CLI command that must fail; returns what it printed.
fn refused(srv: &Server, args: &[&str]) -> String {
    let out = srv.try_cli(args);
    assert!(
        !out.status.success(),
        "tabula {args:?} succeeded but must fail:\n{}",
        stderr_of(&out)
    );
    stderr_of(&out)
}

/// `tabula check` on the running controller: panics with its problems unless OK.
fn check_ok(srv: &Server, ctx: &str) {
    let out = srv.try_cli(&["check", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success() && v["ok"] == true,
        "{ctx}: tabula check failed:\n{}",
        stderr_of(&out)
    );
}

/// Waits (bounded) until no freed space is still being zeroed; returns `status --json`.
fn settled_status(srv: &Server, ctx: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = srv.json(&["status"]);
        if st["zeroing"] == 0 {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{ctx}: freed space still zeroing after 30 s: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_space(srv: &Server, ctx: &str) -> u64 {
    settled_status(srv, ctx)["free"].as_u64().unwrap()
}

/// Diff ranges as (offset, length).
fn diff_ranges(v: &serde_json::Value) -> Vec<(u64, u64)> {
    let ranges: Vec<(u64, u64)> = v["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    let sum: u64 = ranges.iter().map(|r| r.1).sum();
    assert_eq!(v["changed"].as_u64(), Some(sum), "changed is the sum: {v}");
    ranges
}

// ---------------------------------------------------------------------------------------
// 1. The model test.

/// A vdisk, clone or snapshot as the model knows it.
struct Obj {
    /// Export name: `NAME` or `VDISK@SNAP`.
    name: String,
    data: Vec<u8>,
    /// For a snapshot: the vdisk it belongs to.
    snap_of: Option<String>,
    /// Made by `vdisk create` (not a clone).
    original: bool,
    /// All tables copied from one created vdisk share its lineage.
    lineage: u32,
    conn: Option<Nbd>,
}

impl Obj {
    fn writable(&self) -> bool {
        self.snap_of.is_none()
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn conn(&mut self, port: u16) -> &mut Nbd {
        let name = &self.name;
        let size = self.data.len() as u64;
        let c = self.conn.get_or_insert_with(|| Nbd::connect(port, name));
        assert_eq!(c.size(), size, "export {name} has the model's size");
        c
    }
    fn close(&mut self) {
        if let Some(c) = self.conn.take() {
            c.disconnect();
        }
    }
}

const MAX_SNAPSHOTS: usize = 6;
const MAX_CLONES: usize = 3;
const MODEL_SIZE: u64 = 8 * MIB;

struct Model {
    objs: Vec<Obj>,
    next_name: u32,
    next_lineage: u32,
}

impl Model {
    fn idx(&self, name: &str) -> usize {
        self.objs
            .iter()
            .position(|o| o.name == name)
            .unwrap_or_else(|| panic!("model has no {name}"))
    }
    fn indices(&self, f: impl Fn(&Obj) -> bool) -> Vec<usize> {
        (0..self.objs.len()).filter(|&i| f(&self.objs[i])).collect()
    }
    fn fresh(&mut self, prefix: &str) -> String {
        self.next_name += 1;
        format!("{prefix}{}", self.next_name)
    }
    /// Removes `name` (closing its connection) from the model.
    fn remove(&mut self, name: &str) {
        let i = self.idx(name);
        let mut o = self.objs.remove(i);
        o.close();
    }
}

fn create_original(srv: &Server, m: &mut Model, cow: &str) -> String {
    let name = m.fresh("v");
    srv.cli(&[
        "vdisk",
        "create",
        &name,
        "--size",
        &MODEL_SIZE.to_string(),
        "--segment-size",
        "64K",
        "--cow",
        cow,
    ]);
    m.next_lineage += 1;
    m.objs.push(Obj {
        name: name.clone(),
        data: vec![0; MODEL_SIZE as usize],
        snap_of: None,
        original: true,
        lineage: m.next_lineage,
        conn: None,
    });
    name
}

/// Every object read whole and compared with the model.
fn compare_all(srv: &Server, m: &mut Model, ctx: &str) {
    for o in &mut m.objs {
        let port = srv.nbd_port;
        let got = o.conn(port).read_all();
        if let Some(d) = first_difference(&got, &o.data, 0) {
            panic!("{ctx}: {} {d}", o.name);
        }
    }
}

#[test]
fn snapshot_model() {
    let seed = seed();
    eprintln!("snapshot model seed: {seed} (rerun with TABULA_SEED={seed})");
    let steps: usize = std::env::var("TABULA_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut srv = Server::start("256M");
    let free0 = free_space(&srv, "start");
    let mut m = Model {
        objs: Vec::new(),
        next_name: 0,
        next_lineage: 0,
    };
    create_original(&srv, &mut m, "redirect");
    create_original(&srv, &mut m, "copy-out");
    let port = srv.nbd_port;
    // writes, reads, trims, zeroes, flushes, ro-refusals, snapshots, clones, rollbacks,
    // snapshot deletes, vdisk deletes, resizes, diffs, restarts
    let mut n = [0usize; 14];
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        if step > 0 && step % 500 == 0 {
            check_ok(&srv, &ctx);
        }
        // kill -9 twice during the run, after flushing every connection.
        if step == steps / 3 || step == 2 * steps / 3 {
            for o in &mut m.objs {
                if let Some(c) = o.conn.as_mut() {
                    c.flush()
                        .unwrap_or_else(|e| panic!("{ctx}: flush {}: errno {e}", o.name));
                }
                o.conn = None;
            }
            srv.kill9();
            srv.spawn();
            compare_all(&srv, &mut m, &format!("{ctx} after kill -9"));
            n[13] += 1;
        }
        let writable = m.indices(|o| o.writable());
        let snaps = m.indices(|o| !o.writable());
        let what = rng.below(1000);
        match what {
            // Write to a vdisk or clone.
            0..=319 => {
                let i = rng.pick(&writable);
                let (off, len) = edge_range(&mut rng, SEG, m.objs[i].size());
                let data = pattern((rng.below(255) + 1) as u8, len as usize);
                let fua = rng.below(8) == 0;
                let o = &mut m.objs[i];
                o.conn(port).write(off, &data, fua).unwrap_or_else(|e| {
                    panic!("{ctx}: write {}+{len} to {}: errno {e}", off, o.name)
                });
                o.data[off as usize..(off + len) as usize].copy_from_slice(&data);
                n[0] += 1;
            }
            // Read anything, snapshots included.
            320..=599 => {
                let i = rng.below(m.objs.len() as u64) as usize;
                let o = &mut m.objs[i];
                let (off, len) = edge_range(&mut rng, SEG, o.size());
                let got = o
                    .conn(port)
                    .read(off, len)
                    .unwrap_or_else(|e| panic!("{ctx}: read {off}+{len} of {}: errno {e}", o.name));
                if let Some(d) =
                    first_difference(&got, &o.data[off as usize..(off + len) as usize], off)
                {
                    panic!("{ctx}: read {off}+{len} of {}: {d}", o.name);
                }
                n[1] += 1;
            }
            // Trim: whole segments read as zeros, partial ones keep their data.
            600..=659 => {
                let i = rng.pick(&writable);
                let o = &mut m.objs[i];
                let (off, len) = edge_range(&mut rng, SEG, o.size());
                o.conn(port)
                    .trim(off, len)
                    .unwrap_or_else(|e| panic!("{ctx}: trim {off}+{len} of {}: errno {e}", o.name));
                let (b, e) = whole_segments(off, len, o.size());
                o.data[b as usize..e as usize].fill(0);
                n[2] += 1;
            }
            // Write zeroes, with and without NO_HOLE.
            660..=719 => {
                let i = rng.pick(&writable);
                let o = &mut m.objs[i];
                let (off, len) = edge_range(&mut rng, SEG, o.size());
                let no_hole = rng.below(2) == 0;
                o.conn(port)
                    .write_zeroes(off, len, no_hole)
                    .unwrap_or_else(|e| {
                        panic!(
                            "{ctx}: write zeroes {off}+{len} (no_hole {no_hole}) of {}: errno {e}",
                            o.name
                        )
                    });
                o.data[off as usize..(off + len) as usize].fill(0);
                n[3] += 1;
            }
            720..=739 => {
                let i = rng.pick(&writable);
                let o = &mut m.objs[i];
                o.conn(port)
                    .flush()
                    .unwrap_or_else(|e| panic!("{ctx}: flush {}: errno {e}", o.name));
                n[4] += 1;
            }
            // Any change to a snapshot's export is refused.
            740..=759 if !snaps.is_empty() => {
                let i = rng.pick(&snaps);
                let o = &mut m.objs[i];
                let (off, len) = edge_range(&mut rng, SEG, o.size());
                let c = o.conn(port);
                let r = match rng.below(4) {
                    0 => c.write(off, &pattern(0x5a, len as usize), false),
                    1 => c.trim(off, len),
                    2 => c.write_zeroes(off, len, false),
                    _ => c.write_zeroes(off, len, true),
                };
                assert_eq!(
                    r,
                    Err(EPERM),
                    "{ctx}: change to snapshot {} at {off}+{len}",
                    o.name
                );
                n[5] += 1;
            }
            // Snapshot of a vdisk or clone.
            760..=799 if snaps.len() < MAX_SNAPSHOTS => {
                let i = rng.pick(&writable);
                let snap = m.fresh("s");
                let vd = m.objs[i].name.clone();
                let v = srv.json(&["snapshot", "create", &vd, &snap]);
                let full = format!("{vd}@{snap}");
                assert_eq!(v["name"], full.as_str(), "{ctx}: {v}");
                assert_eq!(v["size"], m.objs[i].size(), "{ctx}: {v}");
                let o = Obj {
                    name: full,
                    data: m.objs[i].data.clone(),
                    snap_of: Some(vd),
                    original: false,
                    lineage: m.objs[i].lineage,
                    conn: None,
                };
                m.objs.push(o);
                n[6] += 1;
            }
            // Clone of a snapshot.
            800..=829
                if !snaps.is_empty()
                    && m.indices(|o| o.writable() && !o.original).len() < MAX_CLONES =>
            {
                let i = rng.pick(&snaps);
                let name = m.fresh("c");
                let src = m.objs[i].name.clone();
                let mut args = vec!["vdisk", "clone", &src, &name];
                let cow = rng.pick(&["", "redirect", "copy-out"]);
                if !cow.is_empty() {
                    args.extend(["--cow", cow]);
                }
                srv.cli(&args);
                let o = Obj {
                    name,
                    data: m.objs[i].data.clone(),
                    snap_of: None,
                    original: false,
                    lineage: m.objs[i].lineage,
                    conn: None,
                };
                m.objs.push(o);
                n[7] += 1;
            }
            // Rollback of a vdisk to one of its own snapshots (size included).
            830..=854 => {
                let owners: Vec<usize> = snaps
                    .iter()
                    .map(|&s| m.idx(m.objs[s].snap_of.as_deref().unwrap()))
                    .collect();
                if owners.is_empty() {
                    continue;
                }
                let s = rng.below(snaps.len() as u64) as usize;
                let (si, vi) = (snaps[s], owners[s]);
                let full = m.objs[si].name.clone();
                let snap = full.split_once('@').unwrap().1.to_string();
                let vd = m.objs[vi].name.clone();
                srv.cli(&["vdisk", "rollback", &vd, &snap]);
                let v = srv.json(&["vdisk", "show", &vd]);
                assert_eq!(
                    v["size"],
                    m.objs[si].size(),
                    "{ctx}: rollback {vd} to {full}: {v}"
                );
                let data = m.objs[si].data.clone();
                let o = &mut m.objs[vi];
                if o.size() != data.len() as u64 {
                    o.close(); // the new size shows on a new connection
                }
                o.data = data;
                n[8] += 1;
            }
            // Delete a snapshot.
            855..=889 if !snaps.is_empty() => {
                let i = rng.pick(&snaps);
                let full = m.objs[i].name.clone();
                m.objs[i].close();
                // What deleting it frees is exactly the space it called unique.
                let (vd, _) = full.split_once('@').unwrap();
                let unique = unique_of(&srv, vd, &full);
                let before = free_space(&srv, &ctx);
                srv.cli(&["snapshot", "delete", &full]);
                let freed = free_space(&srv, &ctx) - before;
                assert_eq!(
                    freed, unique,
                    "{ctx}: deleting {full} freed {freed}, its unique space was {unique}"
                );
                m.remove(&full);
                n[9] += 1;
            }
            // Delete a clone (now and then an original), with its snapshots.
            890..=909 => {
                let clones = m.indices(|o| o.writable() && !o.original);
                let i = if !clones.is_empty() && rng.below(5) != 0 {
                    rng.pick(&clones)
                } else if rng.below(3) == 0 {
                    rng.pick(&writable)
                } else {
                    continue;
                };
                let vd = m.objs[i].name.clone();
                let own: Vec<String> = m
                    .objs
                    .iter()
                    .filter(|o| o.snap_of.as_deref() == Some(vd.as_str()))
                    .map(|o| o.name.clone())
                    .collect();
                for s in &own {
                    let j = m.idx(s);
                    m.objs[j].close();
                }
                m.objs[i].close();
                if own.is_empty() {
                    // What deleting it frees is exactly its unshared space.
                    let view = srv.json(&["vdisk", "show", &vd]);
                    let unshared =
                        view["allocated"].as_u64().unwrap() - view["shared"].as_u64().unwrap();
                    let before = free_space(&srv, &ctx);
                    srv.cli(&["vdisk", "delete", &vd]);
                    let freed = free_space(&srv, &ctx) - before;
                    assert_eq!(
                        freed, unshared,
                        "{ctx}: deleting {vd} freed {freed}: {view}"
                    );
                } else {
                    let msg = refused(&srv, &["vdisk", "delete", &vd]);
                    assert!(
                        msg.contains(&own[0]) && msg.contains("--with-snapshots"),
                        "{ctx}: {msg}"
                    );
                    srv.cli(&["vdisk", "delete", &vd, "--with-snapshots"]);
                }
                for s in &own {
                    m.remove(s);
                }
                m.remove(&vd);
                if m.indices(|o| o.original).is_empty() {
                    let cow = rng.pick(&["redirect", "copy-out"]);
                    create_original(&srv, &mut m, cow);
                }
                n[10] += 1;
            }
            // Resize (shrinks and grows to sizes that are not segment multiples too).
            910..=929 => {
                let i = rng.pick(&writable);
                let new = if rng.below(2) == 0 {
                    (4 + rng.below(9)) * MIB
                } else {
                    (1024 + rng.below(2048)) * 4096
                };
                let o = &mut m.objs[i];
                o.close();
                srv.cli(&["vdisk", "resize", &o.name, "--size", &new.to_string()]);
                o.data.resize(new as usize, 0);
                n[11] += 1;
            }
            // Diff: every byte that differs between two tables of one lineage is listed.
            930..=954 => {
                let a = rng.below(m.objs.len() as u64) as usize;
                let b = rng.below(m.objs.len() as u64) as usize;
                let (oa, ob) = (&m.objs[a], &m.objs[b]);
                if oa.lineage != ob.lineage {
                    let msg = refused(&srv, &["snapshot", "diff", &oa.name, &ob.name]);
                    assert!(msg.contains("lineage"), "{ctx}: {msg}");
                    continue;
                }
                let v = srv.json(&["snapshot", "diff", &oa.name, &ob.name]);
                let ranges = diff_ranges(&v);
                let covered = |blk: u64| {
                    ranges
                        .iter()
                        .any(|&(o, l)| o <= blk * 4096 && (blk + 1) * 4096 <= o + l)
                };
                // The shorter one reads as zeros beyond its end (an incremental copy
                // grows the target first).
                let max = oa.size().max(ob.size());
                let block = |d: &[u8], blk: u64| {
                    let (b, e) = ((blk * 4096) as usize, ((blk + 1) * 4096) as usize);
                    if e <= d.len() {
                        d[b..e].to_vec()
                    } else {
                        vec![0; 4096]
                    }
                };
                for blk in 0..max / 4096 {
                    if block(&oa.data, blk) != block(&ob.data, blk) {
                        assert!(
                            covered(blk),
                            "{ctx}: diff {} {} misses block {blk} (byte {}) whose contents differ: {v}",
                            oa.name,
                            ob.name,
                            blk * 4096
                        );
                    }
                }
                assert!(
                    ranges
                        .iter()
                        .all(|&(o, l)| o % 4096 == 0 && l > 0 && o + l <= max),
                    "{ctx}: diff ranges outside [0, {max}): {v}"
                );
                if a == b {
                    assert!(
                        ranges.is_empty(),
                        "{ctx}: diff of {} with itself: {v}",
                        oa.name
                    );
                }
                n[12] += 1;
            }
            // A whole object compared.
            955..=964 => {
                let i = rng.below(m.objs.len() as u64) as usize;
                let o = &mut m.objs[i];
                let got = o.conn(port).read_all();
                if let Some(d) = first_difference(&got, &o.data, 0) {
                    panic!("{ctx}: whole {}: {d}", o.name);
                }
            }
            _ => {}
        }
    }
    let ctx = format!("seed {seed} end");
    compare_all(&srv, &mut m, &ctx);
    check_ok(&srv, &ctx);
    eprintln!(
        "writes {} reads {} trims {} zeroes {} flushes {} ro-refused {} snapshots {} clones {} \
         rollbacks {} snapshot-deletes {} vdisk-deletes {} resizes {} diffs {} restarts {}",
        n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7], n[8], n[9], n[10], n[11], n[12], n[13]
    );
    // Delete everything in a random order: every byte comes back.
    while !m.objs.is_empty() {
        let i = rng.below(m.objs.len() as u64) as usize;
        let name = m.objs[i].name.clone();
        if m.objs[i].writable() {
            let own: Vec<String> = m
                .objs
                .iter()
                .filter(|o| o.snap_of.as_deref() == Some(name.as_str()))
                .map(|o| o.name.clone())
                .collect();
            for s in own {
                m.remove(&s);
            }
            m.remove(&name);
            srv.cli(&["vdisk", "delete", &name, "--with-snapshots"]);
        } else {
            m.remove(&name);
            srv.cli(&["snapshot", "delete", &name]);
        }
    }
    let st = settled_status(&srv, &ctx);
    assert_eq!(
        st["free"].as_u64(),
        Some(free0),
        "{ctx}: free space after deleting everything: {st}"
    );
    assert_eq!(st["allocated"], 0, "{ctx}: {st}");
    check_ok(&srv, &ctx);
    srv.stop_and_check();
    assert!(
        n[0] > steps / 5 && n[1] > steps / 5,
        "too few operations ran"
    );
    assert!(
        n[6] > 0 && n[7] > 0 && n[8] > 0 && n[9] > 0,
        "too few snapshot operations ran"
    );
    eprintln!("snapshot model: {steps} steps in {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// 2. Deletion in every order.

const FAM_SIZE: u64 = MIB;

/// Writes `len` bytes of `pattern(byte)` at `off` through `c` and into `model`.
fn put(c: &mut Nbd, model: &mut [u8], off: u64, len: u64, byte: u8) {
    let data = pattern(byte, len as usize);
    c.write(off, &data, false)
        .unwrap_or_else(|e| panic!("write {off}+{len}: errno {e}"));
    model[off as usize..(off + len) as usize].copy_from_slice(&data);
}

/// Builds V -> V@s1 -> C -> C@s2 -> D with overlapping changes at every level; returns
/// every object's expected contents.
fn build_family(srv: &Server, tag: &str, cow_v: &str, cow_c: &str) -> Vec<(String, Vec<u8>)> {
    let (v, c, d) = (format!("v{tag}"), format!("c{tag}"), format!("d{tag}"));
    let (s1, s2) = (format!("{v}@s1"), format!("{c}@s2"));
    let port = srv.nbd_port;
    srv.cli(&[
        "vdisk",
        "create",
        &v,
        "--size",
        "1M",
        "--segment-size",
        "64K",
        "--cow",
        cow_v,
    ]);
    let mut mv = vec![0u8; FAM_SIZE as usize];
    let mut cv = Nbd::connect(port, &v);
    put(&mut cv, &mut mv, 0, 10 * SEG, 1);
    put(&mut cv, &mut mv, 14 * SEG + 100, 1000, 2);
    srv.cli(&["snapshot", "create", &v, "s1"]);
    let ms1 = mv.clone();
    put(&mut cv, &mut mv, 2 * SEG - 10, SEG + 20, 3); // across segments 1-3
    put(&mut cv, &mut mv, 12 * SEG, SEG, 4); // a segment the snapshot does not map
    cv.trim(8 * SEG, SEG).unwrap();
    mv[(8 * SEG) as usize..(9 * SEG) as usize].fill(0);
    cv.flush().unwrap();
    cv.disconnect();

    srv.cli(&["vdisk", "clone", &s1, &c, "--cow", cow_c]);
    let mut mc = ms1.clone();
    let mut cc = Nbd::connect(port, &c);
    put(&mut cc, &mut mc, 3 * SEG + 5, 2 * SEG, 5); // segments 3-5
    put(&mut cc, &mut mc, 13 * SEG, 2 * SEG, 6);
    cc.write_zeroes(SEG, SEG, true).unwrap(); // segment 1 zeroed in place (copied first)
    mc[SEG as usize..(2 * SEG) as usize].fill(0);
    cc.trim(9 * SEG, SEG).unwrap();
    mc[(9 * SEG) as usize..(10 * SEG) as usize].fill(0);
    srv.cli(&["snapshot", "create", &c, "s2"]);
    let ms2 = mc.clone();
    put(&mut cc, &mut mc, 4 * SEG, 100, 7);
    put(&mut cc, &mut mc, 7 * SEG, SEG, 8);
    cc.flush().unwrap();
    cc.disconnect();

    srv.cli(&["vdisk", "clone", &s2, &d]);
    let mut md = ms2.clone();
    let mut cd = Nbd::connect(port, &d);
    put(&mut cd, &mut md, 5 * SEG, 3 * SEG, 9);
    cd.trim(0, SEG).unwrap();
    md[..SEG as usize].fill(0);
    put(&mut cd, &mut md, 15 * SEG, SEG, 10);
    cd.flush().unwrap();
    cd.disconnect();
    vec![(v, mv), (s1, ms1), (c, mc), (s2, ms2), (d, md)]
}

fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for (i, &x) in items.iter().enumerate() {
        let mut rest = items.to_vec();
        rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, x);
            out.push(p);
        }
    }
    out
}

#[test]
fn delete_in_every_order() {
    let started = Instant::now();
    let srv = Server::start("64M");
    let port = srv.nbd_port;
    let free0 = free_space(&srv, "start");
    // Objects: 0 V, 1 V@s1, 2 C, 3 C@s2, 4 D. V goes last; the others in every order.
    for (k, order) in permutations(&[1, 2, 3, 4]).into_iter().enumerate() {
        let tag = k.to_string();
        let (cow_v, cow_c) = match k % 4 {
            0 => ("redirect", "redirect"),
            1 => ("redirect", "copy-out"),
            2 => ("copy-out", "redirect"),
            _ => ("copy-out", "copy-out"),
        };
        let mut live = build_family(&srv, &tag, cow_v, cow_c);
        let names: Vec<String> = live.iter().map(|x| x.0.clone()).collect();
        let order: Vec<usize> = order.into_iter().chain([0]).collect();
        let ctx = |i: usize| {
            format!(
                "order {k} ({}; cow {cow_v}/{cow_c}) after deleting {}",
                order
                    .iter()
                    .map(|&j| names[j].as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                names[i]
            )
        };
        for &i in &order {
            let name = &names[i];
            let Some(pos) = live.iter().position(|x| &x.0 == name) else {
                continue; // went with its vdisk (--with-snapshots)
            };
            if name.contains('@') {
                srv.cli(&["snapshot", "delete", name]);
                live.remove(pos);
            } else {
                let own = format!("{name}@");
                let has = live.iter().any(|x| x.0.starts_with(&own));
                if has {
                    let msg = refused(&srv, &["vdisk", "delete", name]);
                    assert!(msg.contains("--with-snapshots"), "{msg}");
                    srv.cli(&["vdisk", "delete", name, "--with-snapshots"]);
                    live.retain(|x| !x.0.starts_with(&own));
                } else {
                    srv.cli(&["vdisk", "delete", name]);
                }
                live.retain(|x| &x.0 != name);
            }
            for (n, want) in &live {
                let mut c = Nbd::connect(port, n);
                let got = c.read_all();
                c.disconnect();
                if let Some(d) = first_difference(&got, want, 0) {
                    panic!("{}: {n}: {d}", ctx(i));
                }
            }
            check_ok(&srv, &ctx(i));
        }
        assert!(live.is_empty());
        let free = free_space(&srv, &ctx(0));
        assert_eq!(
            free, free0,
            "order {k}: free space after deleting the family"
        );
    }
    let st = srv.json(&["status"]);
    assert_eq!(st["allocated"], 0, "{st}");
    eprintln!(
        "delete_in_every_order: 24 orders in {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// 3. The user-visible contract.

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The segments a diff lists; every range must be whole segments (or end at `size`).
fn diff_segments(v: &serde_json::Value, size: u64) -> BTreeSet<u64> {
    let mut segs = BTreeSet::new();
    for (o, l) in diff_ranges(v) {
        assert!(
            o % SEG == 0 && ((o + l) % SEG == 0 || o + l == size) && l > 0,
            "diff range {o}+{l} is not whole segments: {v}"
        );
        segs.extend(o / SEG..(o + l).div_ceil(SEG));
    }
    segs
}

fn unique_of(srv: &Server, vdisk: &str, full: &str) -> u64 {
    let list = srv.json(&["snapshot", "list", vdisk]);
    let s = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == full)
        .unwrap_or_else(|| panic!("{full} not listed: {list}"));
    s["unique"].as_u64().unwrap()
}

#[test]
fn snapshot_cli_contract() {
    let started = Instant::now();
    let t0 = now_secs();
    let srv = Server::start("64M");
    let port = srv.nbd_port;
    let free0 = free_space(&srv, "start");
    let size = 4 * MIB;
    srv.cli(&[
        "vdisk",
        "create",
        "vd",
        "--size",
        "4M",
        "--segment-size",
        "64K",
    ]);
    let mut mv = vec![0u8; size as usize];
    let mut c = Nbd::connect(port, "vd");
    put(&mut c, &mut mv, 0, 9 * SEG, 1);
    put(&mut c, &mut mv, 20 * SEG + 300, 5000, 2);
    c.flush().unwrap();

    // Create: the JSON view, hold_ms included.
    let s = srv.json(&["snapshot", "create", "vd", "s1"]);
    assert_eq!(s["name"], "vd@s1", "{s}");
    assert_eq!(s["vdisk"], "vd", "{s}");
    assert_eq!(s["snapshot"], "s1", "{s}");
    assert_eq!(s["size"], size, "{s}");
    assert!(s["id"].is_u64(), "{s}");
    assert!(s["hold_ms"].as_f64().is_some_and(|h| h >= 0.0), "{s}");
    let created = s["created"].as_u64().unwrap();
    assert!(created >= t0 && created <= now_secs(), "{s}");
    let vd = srv.json(&["vdisk", "show", "vd"]);
    assert_eq!(
        s["allocated"], vd["allocated"],
        "the snapshot maps what the vdisk maps: {s} {vd}"
    );
    assert_eq!(s["unique"], 0, "everything is shared right after: {s}");
    assert!(
        vd["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "s1"),
        "{vd}"
    );
    let ms1 = mv.clone();

    // List: name, created, size, unique (one vdisk, and all).
    let list = srv.json(&["snapshot", "list", "vd"]);
    let l = &list.as_array().unwrap()[..];
    assert_eq!(l.len(), 1, "{list}");
    assert_eq!(l[0]["name"], "vd@s1");
    assert_eq!(l[0]["created"], created);
    assert_eq!(l[0]["size"], size);
    assert_eq!(l[0]["unique"], 0);
    assert!(
        l[0].get("hold_ms").is_none(),
        "hold_ms is for create only: {list}"
    );
    let all = srv.json(&["snapshot", "list"]);
    assert!(
        all.as_array().unwrap().iter().any(|s| s["name"] == "vd@s1"),
        "{all}"
    );

    // Refusals and their messages.
    let msg = refused(&srv, &["snapshot", "create", "vd", "s1"]);
    assert!(msg.contains("already exists"), "{msg}");
    let msg = refused(&srv, &["snapshot", "create", "vd@s1", "x"]);
    assert!(msg.contains("clone it first"), "{msg}");
    let msg = refused(&srv, &["vdisk", "clone", "vd", "k"]);
    assert!(
        msg.contains("clone a snapshot") && msg.contains("tabula snapshot create vd"),
        "cloning a vdisk must hint at snapshotting it: {msg}"
    );
    let msg = refused(&srv, &["vdisk", "delete", "vd"]);
    assert!(
        msg.contains("vd@s1") && msg.contains("--with-snapshots"),
        "deleting a vdisk with snapshots must name them: {msg}"
    );
    let msg = refused(&srv, &["snapshot", "delete", "vd"]);
    assert!(msg.contains("VDISK@SNAP"), "{msg}");
    srv.cli(&[
        "vdisk",
        "create",
        "other",
        "--size",
        "4M",
        "--segment-size",
        "64K",
    ]);
    srv.cli(&["snapshot", "create", "other", "o1"]);
    for (a, b) in [("vd", "other"), ("vd@s1", "other@o1"), ("other", "vd@s1")] {
        let msg = refused(&srv, &["snapshot", "diff", a, b]);
        assert!(msg.contains("lineage"), "diff {a} {b}: {msg}");
    }
    let msg = refused(&srv, &["vdisk", "rollback", "other", "s1"]);
    assert!(
        msg.contains("other@s1"),
        "rollback to another vdisk's snapshot: {msg}"
    );

    // The snapshot's export is read-only and reads the snapshot.
    let mut cs = Nbd::connect(port, "vd@s1");
    assert_eq!(cs.write(0, &[1; 4096], false), Err(EPERM));
    assert_eq!(cs.write(SEG, &[1; 512], true), Err(EPERM));
    assert_eq!(cs.trim(0, SEG), Err(EPERM));
    assert_eq!(cs.write_zeroes(0, SEG, false), Err(EPERM));
    assert_eq!(cs.write_zeroes(0, 512, true), Err(EPERM));
    cs.flush().unwrap();
    assert!(first_difference(&cs.read_all(), &ms1, 0).is_none());

    // Unique space grows as the vdisk overwrites shared segments.
    put(&mut c, &mut mv, 2 * SEG + 10, 100, 3);
    assert_eq!(
        unique_of(&srv, "vd", "vd@s1"),
        SEG,
        "one segment overwritten"
    );
    put(&mut c, &mut mv, 5 * SEG + SEG / 2, 2 * SEG, 4); // segments 5, 6, 7
    c.trim(20 * SEG, SEG).unwrap(); // mapped in the snapshot only now
    mv[(20 * SEG) as usize..(21 * SEG) as usize].fill(0);
    put(&mut c, &mut mv, 40 * SEG + 4096, 4096, 5); // newly allocated, after a hole
    put(&mut c, &mut mv, size - 512, 512, 6); // the last segment
    assert_eq!(
        unique_of(&srv, "vd", "vd@s1"),
        5 * SEG,
        "segments 2, 5, 6, 7 overwritten and 20 trimmed"
    );
    assert!(
        first_difference(&cs.read_all(), &ms1, 0).is_none(),
        "the snapshot keeps its data"
    );

    // Diff lists exactly the segments changed since the snapshot, both ways.
    let want: BTreeSet<u64> = [2, 5, 6, 7, 20, 40, size / SEG - 1].into();
    for (a, b) in [("vd@s1", "vd"), ("vd", "vd@s1")] {
        let d = srv.json(&["snapshot", "diff", a, b]);
        assert_eq!(d["from"], a);
        assert_eq!(d["to"], b);
        assert_eq!(diff_segments(&d, size), want, "diff {a} {b}: {d}");
    }
    // ...so copying those ranges from the vdisk onto the snapshot's data gives the vdisk.
    let d = srv.json(&["snapshot", "diff", "vd@s1", "vd"]);
    let mut rebuilt = ms1.clone();
    for (o, l) in diff_ranges(&d) {
        let got = c.read(o, l).unwrap();
        rebuilt[o as usize..(o + l) as usize].copy_from_slice(&got);
    }
    assert!(
        first_difference(&rebuilt, &mv, 0).is_none(),
        "incremental copy"
    );
    let d = srv.json(&["snapshot", "diff", "vd@s1", "vd@s1"]);
    assert!(diff_ranges(&d).is_empty(), "{d}");

    // A clone reads the snapshot, writes independently; diff reaches it (same lineage).
    srv.cli(&["vdisk", "clone", "vd@s1", "k"]);
    let k = srv.json(&["vdisk", "show", "k"]);
    assert_eq!(k["origin"], "vd@s1", "{k}");
    assert_eq!(
        k["cow"], "redirect",
        "a clone takes its vdisk's policy: {k}"
    );
    assert_eq!(k["size"], size, "{k}");
    // ...or the one given; a copy-out vdisk's clones are copy-out.
    srv.cli(&["vdisk", "clone", "vd@s1", "k2", "--cow", "copy-out"]);
    assert_eq!(srv.json(&["vdisk", "show", "k2"])["cow"], "copy-out");
    srv.cli(&["vdisk", "delete", "k2"]);
    srv.cli(&["vdisk", "create", "co", "--size", "1M", "--cow", "copy-out"]);
    srv.cli(&["snapshot", "create", "co", "x"]);
    srv.cli(&["vdisk", "clone", "co@x", "k3"]);
    assert_eq!(srv.json(&["vdisk", "show", "k3"])["cow"], "copy-out");
    srv.cli(&["vdisk", "delete", "k3"]);
    srv.cli(&["vdisk", "delete", "co", "--with-snapshots"]);
    let mut ck = Nbd::connect(port, "k");
    let mut mk = ms1.clone();
    assert!(first_difference(&ck.read_all(), &mk, 0).is_none());
    put(&mut ck, &mut mk, 8 * SEG, 10, 7);
    let d = srv.json(&["snapshot", "diff", "vd@s1", "k"]);
    assert_eq!(diff_segments(&d, size), [8].into(), "{d}");
    assert!(first_difference(&cs.read_all(), &ms1, 0).is_none());
    assert!(first_difference(&c.read_all(), &mv, 0).is_none());

    // Rollback restores content and size.
    srv.cli(&["snapshot", "create", "vd", "s2"]);
    let list = srv.json(&["snapshot", "list", "vd"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vd@s1", "vd@s2"], "listed oldest first");
    let ms2 = mv.clone();
    c.disconnect();
    srv.cli(&["vdisk", "resize", "vd", "--size", "6M"]);
    let mut c = Nbd::connect(port, "vd");
    assert_eq!(c.size(), 6 * MIB);
    mv.resize((6 * MIB) as usize, 0);
    put(&mut c, &mut mv, 5 * MIB, SEG, 8);
    put(&mut c, &mut mv, 0, 3 * SEG, 9);
    c.write_zeroes(4 * SEG, SEG, false).unwrap();
    c.flush().unwrap();
    c.disconnect();
    srv.cli(&["vdisk", "rollback", "vd", "s2"]);
    let v = srv.json(&["vdisk", "show", "vd"]);
    assert_eq!(v["size"], size, "rollback restores the size: {v}");
    let mut c = Nbd::connect(port, "vd");
    assert_eq!(c.size(), size);
    assert!(
        first_difference(&c.read_all(), &ms2, 0).is_none(),
        "rollback restores content"
    );
    let d = srv.json(&["snapshot", "diff", "vd@s2", "vd"]);
    assert!(
        diff_ranges(&d).is_empty(),
        "nothing changed since the rollback: {d}"
    );
    // ...and the vdisk is writable afterwards, the snapshots untouched.
    let mut mv = ms2.clone();
    put(&mut c, &mut mv, 3 * SEG, 10, 10);
    assert!(first_difference(&c.read_all(), &mv, 0).is_none());
    // Rollback to the older snapshot.
    c.disconnect();
    srv.cli(&["vdisk", "rollback", "vd", "s1"]);
    let mut c = Nbd::connect(port, "vd");
    assert!(
        first_difference(&c.read_all(), &ms1, 0).is_none(),
        "rollback to s1"
    );
    c.disconnect();
    let mut cs2 = Nbd::connect(port, "vd@s2");
    assert!(first_difference(&cs2.read_all(), &ms2, 0).is_none());
    cs2.disconnect();
    assert!(first_difference(&cs.read_all(), &ms1, 0).is_none());
    cs.disconnect();
    check_ok(&srv, "contract");

    // A copy of the snapshot's export equals the snapshot.
    if have("nbdcopy") {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("s1.img");
        run("nbdcopy", &[&srv.url("vd@s1"), file.to_str().unwrap()]);
        let got = std::fs::read(&file).unwrap();
        assert!(
            first_difference(&got, &ms1, 0).is_none(),
            "nbdcopy of vd@s1"
        );
    }

    // Everything deleted: all space comes back.
    ck.disconnect();
    srv.cli(&["vdisk", "delete", "k"]);
    // A client still connected to a deleted snapshot reads nothing of what reuses its
    // space: its reads fail.
    let mut stale = Nbd::connect(port, "vd@s2");
    assert!(first_difference(&stale.read_all(), &ms2, 0).is_none());
    // Deleting a snapshot a client is connected to takes --force.
    let msg = refused(&srv, &["snapshot", "delete", "vd@s2"]);
    assert!(
        msg.contains("1 connection to vd@s2") && msg.contains("--force"),
        "{msg}"
    );
    srv.cli(&["snapshot", "delete", "vd@s2", "--force"]);
    let mut co = Nbd::connect(port, "other");
    for i in 0..(4 * MIB / SEG) {
        co.write(i * SEG, &pattern(0xee, SEG as usize), false)
            .unwrap();
    }
    co.disconnect();
    for off in (0..size).step_by(SEG as usize) {
        let r = stale.read(off, SEG);
        assert!(r.is_err(), "a read of deleted vd@s2 at {off} succeeded");
    }
    stale.disconnect();
    srv.cli(&["vdisk", "delete", "vd", "--with-snapshots"]);
    let list = srv.json(&["snapshot", "list"]);
    assert!(
        list.as_array().unwrap().iter().all(|s| s["vdisk"] != "vd"),
        "{list}"
    );
    srv.cli(&["vdisk", "delete", "other", "--with-snapshots"]);
    assert_eq!(free_space(&srv, "end"), free0);
    check_ok(&srv, "contract end");
    eprintln!("snapshot_cli_contract in {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// 4. Snapshots, clones and copy-on-write under concurrent I/O.

const BLK: u64 = 4096;

/// The version a stamped block names (bytes 8..16), after checking the block is exactly
/// `stamp_block(block, version)` (or all zeros: `None`).
fn version_of(data: &[u8], block: u64, what: &str) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return None;
    }
    let v = u64::from_le_bytes(data[8..16].try_into().unwrap());
    assert!(
        data == stamp_block(block, v).as_slice(),
        "{what}: block {block} is neither zeros nor a stamp of it (names block {}, version {v})",
        u64::from_le_bytes(data[0..8].try_into().unwrap())
    );
    Some(v)
}

/// A writer thread's export and share of it: blocks `first + i * stride` for
/// `lane = (stride, first)`, versions `base + n`.
struct Writer {
    port: u16,
    export: String,
    initial: Vec<Option<u64>>,
    lane: (u64, u64),
    base: u64,
    seed: u64,
}

/// One acknowledged-or-not write of a writer thread.
#[derive(Clone, Copy)]
struct Rec {
    block: u64,
    version: u64,
    issued: Instant,
    acked: Option<Instant>,
}

/// Writes stamps of increasing versions to random blocks of `export` until `stop`,
/// recording each write before it is sent and when it is acknowledged; reads its own
/// writes back now and then. Versions are `base + n`.
fn writer(w: Writer, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Rec>>>) -> Vec<Option<u64>> {
    let Writer {
        port,
        export,
        initial,
        lane,
        base,
        seed,
    } = w;
    let mut rng = Rng::new(seed);
    let mut c = Nbd::connect(port, &export);
    let (stride, first) = lane;
    let mine = (initial.len() as u64 - first).div_ceil(stride);
    let mut now = initial;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let block = first + rng.below(mine) * stride;
        n += 1;
        let version = base + n;
        let i = {
            let mut l = log.lock().unwrap();
            l.push(Rec {
                block,
                version,
                issued: Instant::now(),
                acked: None,
            });
            l.len() - 1
        };
        c.write(block * BLK, &stamp_block(block, version), false)
            .unwrap_or_else(|e| panic!("{export}: write block {block}: errno {e}"));
        log.lock().unwrap()[i].acked = Some(Instant::now());
        now[block as usize] = Some(version);
        if rng.below(8) == 0 {
            let b = first + rng.below(mine) * stride;
            let got = version_of(&c.read(b * BLK, BLK).unwrap(), b, &export);
            assert_eq!(got, now[b as usize], "{export}: block {b} reads back");
        }
    }
    c.flush().unwrap();
    c.disconnect();
    now
}

/// Checks that snapshot contents `snap` (per block version) taken between `began` and
/// `returned` holds every write acknowledged before `began` and none issued after
/// `returned`.
fn check_point_in_time(
    what: &str,
    snap: &[Option<u64>],
    initial: &[Option<u64>],
    log: &[Rec],
    began: Instant,
    returned: Instant,
) {
    for (b, &got) in snap.iter().enumerate() {
        let writes: Vec<&Rec> = log.iter().filter(|r| r.block == b as u64).collect();
        let floor = writes
            .iter()
            .filter(|r| r.acked.is_some_and(|a| a < began))
            .map(|r| Some(r.version))
            .max()
            .unwrap_or(initial[b]);
        let allowed: Vec<Option<u64>> = std::iter::once(initial[b])
            .chain(
                writes
                    .iter()
                    .filter(|r| r.issued < returned)
                    .map(|r| Some(r.version)),
            )
            .filter(|&v| v >= floor)
            .collect();
        assert!(
            allowed.contains(&got),
            "{what}: block {b} holds version {got:?}; allowed (acknowledged before the \
             snapshot began, issued before it returned): {allowed:?}"
        );
    }
}

#[test]
fn snapshots_during_concurrent_io() {
    let started = Instant::now();
    let seed = seed();
    eprintln!("concurrent snapshot seed: {seed} (rerun with TABULA_SEED={seed})");
    // Every container read is delayed, so reads that looked up a table entry are in flight
    // while copy-on-write moves tables and snapshots hold I/O.
    let srv = Server::start_env("64M", &[("TABULA_TEST_READ_DELAY_MS", "1")]);
    let port = srv.nbd_port;
    let free0 = free_space(&srv, "start");
    let size = 2 * MIB;
    let blocks = size / BLK;
    for (k, (cow_v, cow_c)) in [
        ("copy-out", "copy-out"),
        ("redirect", "copy-out"),
        ("copy-out", "redirect"),
    ]
    .into_iter()
    .enumerate()
    {
        let ctx = format!("seed {seed} round {k} (cow {cow_v}/{cow_c})");
        let (v, c) = (format!("cv{k}"), format!("cc{k}"));
        srv.cli(&[
            "vdisk",
            "create",
            &v,
            "--size",
            "2M",
            "--segment-size",
            "64K",
            "--cow",
            cow_v,
        ]);
        // Base contents: every block stamped with version 1 .. blocks.
        let mut base = Nbd::connect(port, &v);
        let mut initial = Vec::new();
        for b in 0..blocks {
            base.write(b * BLK, &stamp_block(b, 1 + b), false).unwrap();
            initial.push(Some(1 + b));
        }
        base.flush().unwrap();
        base.disconnect();
        srv.cli(&["snapshot", "create", &v, "base"]);
        let base_name = format!("{v}@base");
        srv.cli(&["vdisk", "clone", &base_name, &c, "--cow", cow_c]);

        let stop = Arc::new(AtomicBool::new(false));
        let vlog = Arc::new(Mutex::new(Vec::new()));
        let clog = Arc::new(Mutex::new(Vec::new()));
        // Two writers on the vdisk (even and odd blocks: the same segments, copied on
        // their first write by whichever comes first), one on the clone.
        let spawn_writer = |name: &str, log: &Arc<Mutex<Vec<Rec>>>, lane, k: u64| {
            let w = Writer {
                port,
                export: name.to_string(),
                initial: initial.clone(),
                lane,
                base: k << 32,
                seed: seed ^ k,
            };
            let (stop, log) = (stop.clone(), log.clone());
            std::thread::spawn(move || writer(w, stop, log))
        };
        let writers = [
            spawn_writer(&v, &vlog, (2, 0), 1),
            spawn_writer(&v, &vlog, (2, 1), 2),
            spawn_writer(&c, &clog, (1, 0), 3),
        ];
        // Readers of the frozen base snapshot, through everyone's copy-on-write.
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let (stop, name, initial) = (stop.clone(), base_name.clone(), initial.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng::new(seed ^ (7 + r));
                    let mut c = Nbd::connect(port, &name);
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let b = rng.below(blocks);
                        let len = (1 + rng.below(20)).min(blocks - b);
                        let got = c.read(b * BLK, len * BLK).unwrap();
                        for i in 0..len {
                            let blk = &got[(i * BLK) as usize..((i + 1) * BLK) as usize];
                            assert_eq!(
                                version_of(blk, b + i, &name),
                                initial[(b + i) as usize],
                                "{name} changed"
                            );
                        }
                        n += 1;
                    }
                    c.disconnect();
                    n
                })
            })
            .collect();
        // Snapshots of both while they are written; every other one deleted soon after.
        let mut snaps: Vec<(String, Instant, Instant, bool)> = Vec::new();
        while vlog.lock().unwrap().len() < 20 || clog.lock().unwrap().len() < 20 {
            std::thread::sleep(Duration::from_millis(5));
        }
        for i in 0..12 {
            let target = if i % 3 == 2 { &c } else { &v };
            let name = format!("t{i}");
            let began = Instant::now();
            let s = srv.json(&["snapshot", "create", target, &name]);
            let returned = Instant::now();
            assert!(s["hold_ms"].as_f64().is_some(), "{s}");
            snaps.push((format!("{target}@{name}"), began, returned, target == &v));
            std::thread::sleep(Duration::from_millis(80));
            if i % 2 == 1 {
                let (name, ..) = snaps.remove(snaps.len() - 2);
                srv.cli(&["snapshot", "delete", &name]);
            }
        }
        stop.store(true, Ordering::Relaxed);
        let [w0, w1, w2] = writers.map(|w| w.join().unwrap());
        let now_v: Vec<Option<u64>> = (0..blocks as usize)
            .map(|b| if b % 2 == 0 { w0[b] } else { w1[b] })
            .collect();
        let now_c = w2;
        let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        let (vlog, clog) = (vlog.lock().unwrap().clone(), clog.lock().unwrap().clone());
        eprintln!(
            "{ctx}: {} writes to {v}, {} to {c}, {reads} reads of {base_name}",
            vlog.len(),
            clog.len()
        );
        assert!(
            vlog.len() > 100 && clog.len() > 100 && reads > 20,
            "{ctx}: too little I/O"
        );
        // The vdisk and the clone hold what their writers last wrote.
        for (name, now) in [(&v, &now_v), (&c, &now_c)] {
            let mut conn = Nbd::connect(port, name);
            let all = conn.read_all();
            conn.disconnect();
            for b in 0..blocks {
                let blk = &all[(b * BLK) as usize..((b + 1) * BLK) as usize];
                assert_eq!(
                    version_of(blk, b, name),
                    now[b as usize],
                    "{ctx}: {name} block {b}"
                );
            }
        }
        // Each snapshot is the state at one point between its command's start and end.
        for (name, began, returned, of_v) in &snaps {
            let mut conn = Nbd::connect(port, name);
            let all = conn.read_all();
            conn.disconnect();
            let got: Vec<Option<u64>> = (0..blocks)
                .map(|b| version_of(&all[(b * BLK) as usize..((b + 1) * BLK) as usize], b, name))
                .collect();
            let log = if *of_v { &vlog } else { &clog };
            check_point_in_time(
                &format!("{ctx}: {name}"),
                &got,
                &initial,
                log,
                *began,
                *returned,
            );
        }
        check_ok(&srv, &ctx);
        srv.cli(&["vdisk", "delete", &v, "--with-snapshots"]);
        srv.cli(&["vdisk", "delete", &c, "--with-snapshots"]);
        assert_eq!(
            free_space(&srv, &ctx),
            free0,
            "{ctx}: free space after deleting"
        );
    }
    check_ok(&srv, "end");
    eprintln!("snapshots_during_concurrent_io in {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// 5. Copy-on-write without space.

const ENOSPC: u32 = 28;

#[test]
fn cow_out_of_space() {
    let started = Instant::now();
    // 16 segments of 64K in all.
    let srv = Server::start("1M");
    let port = srv.nbd_port;
    let free0 = free_space(&srv, "start");
    assert_eq!(free0, 16 * SEG);
    for (k, (cow, then_trim)) in [
        ("redirect", false),
        ("redirect", true),
        ("copy-out", false),
        ("copy-out", true),
    ]
    .into_iter()
    .enumerate()
    {
        let ctx = format!("round {k} (cow {cow}, trim after the failure: {then_trim})");
        let v = format!("nv{k}");
        srv.cli(&[
            "vdisk",
            "create",
            &v,
            "--size",
            "768K",
            "--segment-size",
            "64K",
            "--cow",
            cow,
        ]);
        let mut mv = vec![0u8; 12 * SEG as usize];
        let mut c = Nbd::connect(port, &v);
        put(&mut c, &mut mv, 0, 10 * SEG, 1); // segments 0-9: 10 of 16
        srv.cli(&["snapshot", "create", &v, "s"]);
        let full = format!("{v}@s");
        let ms = mv.clone();
        for s in 0..5 {
            put(&mut c, &mut mv, s * SEG + 100, 100, 2 + s as u8); // 5 copies: 1 segment left
        }
        assert_eq!(free_space(&srv, &ctx), SEG, "{ctx}");
        // A write needing a copy of segment 9 and new space for segment 10: only one fits.
        let data = pattern(0x77, 8192);
        assert_eq!(c.write(10 * SEG - 4096, &data, false), Err(ENOSPC), "{ctx}");
        // The refused write kept nothing: its one segment is still free.
        assert_eq!(
            free_space(&srv, &ctx),
            SEG,
            "{ctx}: after the refused write"
        );
        assert!(
            first_difference(&c.read_all(), &mv, 0).is_none(),
            "{ctx}: a failed write changed the vdisk"
        );
        let mut cs = Nbd::connect(port, &full);
        assert!(
            first_difference(&cs.read_all(), &ms, 0).is_none(),
            "{ctx}: the snapshot changed"
        );
        check_ok(&srv, &ctx);
        if then_trim {
            // The segment the copy was for changes before it is written.
            c.trim(9 * SEG, SEG).unwrap();
            mv[(9 * SEG) as usize..(10 * SEG) as usize].fill(0);
            put(&mut c, &mut mv, 9 * SEG + 5, 10, 9);
        } else {
            put(&mut c, &mut mv, 9 * SEG + 5, 10, 9);
        }
        assert!(first_difference(&c.read_all(), &mv, 0).is_none(), "{ctx}");
        assert!(first_difference(&cs.read_all(), &ms, 0).is_none(), "{ctx}");
        check_ok(&srv, &ctx);
        // Deleting the snapshot gives its space back: the writes go through, no copy needed.
        cs.disconnect();
        srv.cli(&["snapshot", "delete", &full]);
        put(&mut c, &mut mv, 10 * SEG - 4096, 8192, 10);
        put(&mut c, &mut mv, 6 * SEG, 3 * SEG, 11);
        put(&mut c, &mut mv, 11 * SEG, SEG, 12);
        assert!(first_difference(&c.read_all(), &mv, 0).is_none(), "{ctx}");
        check_ok(&srv, &ctx);
        c.disconnect();
        srv.cli(&["vdisk", "delete", &v]);
        assert_eq!(
            free_space(&srv, &ctx),
            free0,
            "{ctx}: free space after deleting"
        );
    }
    eprintln!("cow_out_of_space in {:?}", started.elapsed());
}

/// A write refused with ENOSPC must not keep space: here it needs a copy of a shared
/// segment and a new segment while only one is free. The copy's reservation must be given
/// back with the refusal, so another vdisk can still have that last segment.
#[test]
fn refused_cow_write_keeps_no_space() {
    let srv = Server::start("1M"); // 16 segments of 64K
    let port = srv.nbd_port;
    srv.cli(&[
        "vdisk",
        "create",
        "a",
        "--size",
        "768K",
        "--segment-size",
        "64K",
    ]);
    srv.cli(&[
        "vdisk",
        "create",
        "b",
        "--size",
        "768K",
        "--segment-size",
        "64K",
    ]);
    let mut ma = vec![0u8; 12 * SEG as usize];
    let mut c = Nbd::connect(port, "a");
    put(&mut c, &mut ma, 0, 10 * SEG, 1); // segments 0-9
    srv.cli(&["snapshot", "create", "a", "s"]);
    for s in 0..5 {
        put(&mut c, &mut ma, s * SEG, 100, 2); // 5 copies: one segment left
    }
    assert_eq!(free_space(&srv, "before"), SEG);
    // Segment 9 is shared (a copy), segment 10 unallocated: two segments, one free.
    let data = pattern(0x77, 8192);
    assert_eq!(c.write(10 * SEG - 4096, &data, false), Err(ENOSPC));
    assert!(first_difference(&c.read_all(), &ma, 0).is_none());
    let st = settled_status(&srv, "after the refused write");
    let check = srv.json(&["check"]);
    // The last segment is still free for anyone.
    let mut cb = Nbd::connect(port, "b");
    let b = cb.write(0, &[9; 4096], false);
    assert!(
        st["free"] == SEG && check["copying"] == 0 && b.is_ok(),
        "a write refused with ENOSPC kept a copy-on-write reservation: status free {} \
         (expected {SEG}), check copying {}, a write to another vdisk: {b:?}",
        st["free"],
        check["copying"]
    );
}
