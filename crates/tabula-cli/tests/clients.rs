mod common;

// Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) against `tabula serve`: data
// integrity at awkward offsets, thin provisioning as clients see it, image conversion, the
// allocation map, verified fio workloads over several connections, persistence across a
// restart, and the CLI's error messages.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// `qemu_io`, plus a check that every read/write/discard command reported completion (a
/// command qemu-io could not even parse prints an error but no "failed:", and exits 0).
fn qio(url: &str, cmds: &[String]) -> String {
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = qemu_io(url, &refs);
    let want = cmds
        .iter()
        .filter(|c| c.starts_with("read") || c.starts_with("write") || c.starts_with("discard"))
        .count();
    let done = out
        .lines()
        .filter(|l| l.starts_with("read ") || l.starts_with("wrote ") || l.starts_with("discard "))
        .count();
    assert_eq!(
        done, want,
        "qemu-io {cmds:?}: not every command completed:\n{out}"
    );
    out
}

fn write_p(pat: u8, off: u64, len: u64) -> String {
    format!("write -P {pat:#x} {off} {len}")
}

fn read_p(pat: u8, off: u64, len: u64) -> String {
    format!("read -P {pat:#x} {off} {len}")
}

fn vdisk(srv: &Server, name: &str) -> Value {
    srv.json(&["vdisk", "show", name])
}

fn allocated(srv: &Server, name: &str) -> u64 {
    vdisk(srv, name)["allocated"]
        .as_u64()
        .expect("vdisk show --json has a numeric `allocated`")
}

/// `(offset, length)` of every mapped entry of `vdisk map NAME --json`.
fn mapped(srv: &Server, name: &str) -> Vec<(u64, u64)> {
    let m = srv.json(&["vdisk", "map", name]);
    m["entries"]
        .as_array()
        .expect("map entries")
        .iter()
        .filter(|e| !e["container"].is_null())
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A CLI command that must fail; returns its stderr.
fn cli_fails(srv: &Server, args: &[&str]) -> String {
    let out = srv.try_cli(args);
    assert!(
        !out.status.success(),
        "tabula {args:?} should have failed but succeeded:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr_of(&out)
}

fn urandom(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf
}

// ---------------------------------------------------------------------------------------------
// 1. qemu-io: patterns at aligned, unaligned and segment-straddling offsets; zeroing; discard.

#[test]
fn qemu_io_patterns_zeroes_and_discard() {
    if !have("qemu-io") {
        return;
    }
    let mut srv = Server::start("1G");
    let size = 64 * MIB;
    srv.cli(&["vdisk", "create", "vd1", "--size", "64M"]);
    let url = srv.url("vd1");

    // (pattern, offset, length): unaligned, tiny, straddling one and several 1M segments,
    // an aligned whole segment, and the very last byte of the disk.
    let pats: [(u8, u64, u64); 6] = [
        (0xa1, 4097, 3000),
        (0xb2, 511, 1),
        (0x5a, MIB - 1000, 5000),
        (0x33, 3 * MIB - 4096, 2 * MIB),
        (0xc4, 8 * MIB, MIB),
        (0xe7, size - 1, 1),
    ];
    // Everything in between must read as zeros, including the unwritten parts of segments
    // that the writes allocated (and anything allocated ahead of a sequential stream).
    let zeros: [(u64, u64); 6] = [
        (0, 511),
        (512, 4097 - 512),
        (4097 + 3000, MIB - 1000 - (4097 + 3000)),
        (MIB + 4000, 3 * MIB - 4096 - (MIB + 4000)),
        (5 * MIB - 4096, 8 * MIB - (5 * MIB - 4096)),
        (9 * MIB, size - 1 - 9 * MIB),
    ];
    let mut writes: Vec<String> = pats.iter().map(|&(p, o, l)| write_p(p, o, l)).collect();
    let mut reads: Vec<String> = pats.iter().map(|&(p, o, l)| read_p(p, o, l)).collect();
    reads.extend(zeros.iter().map(|&(o, l)| read_p(0, o, l)));
    // Read back on the writing connection, then on fresh connections.
    writes.extend(reads.iter().cloned());
    qio(&url, &writes);
    qio(&url, &reads);
    assert!(
        allocated(&srv, "vd1") >= 7 * MIB,
        "six segments plus the last one were written: {}",
        vdisk(&srv, "vd1")
    );

    // WRITE_ZEROES of a whole segment and of a partial, unaligned range.
    qio(
        &url,
        &[
            format!("write -z {} {}", 8 * MIB, MIB),
            format!("write -z {} {}", 3 * MIB - 4096 + 100, 5000),
        ],
    );
    let start = 3 * MIB - 4096;
    qio(
        &url,
        &[
            read_p(0, 8 * MIB, MIB),
            read_p(0x33, start, 100),
            read_p(0, start + 100, 5000),
            read_p(0x33, start + 5100, 2 * MIB - 5100),
            // Neighbours are untouched.
            read_p(0x5a, MIB - 1000, 5000),
            read_p(0, 9 * MIB, MIB),
        ],
    );

    // WRITE_ZEROES that may unmap, of a whole segment in the middle of written data: reads
    // zeros, neighbours keep their data, and it must not allocate anything.
    qio(&url, &[write_p(0x99, 16 * MIB, 3 * MIB)]);
    let before = allocated(&srv, "vd1");
    qio(&url, &[format!("write -z -u {} {}", 17 * MIB, MIB)]);
    qio(
        &url,
        &[
            read_p(0x99, 16 * MIB, MIB),
            read_p(0, 17 * MIB, MIB),
            read_p(0x99, 18 * MIB, MIB),
        ],
    );
    let after = allocated(&srv, "vd1");
    assert!(
        after <= before,
        "write -z -u allocated space: {before} -> {after}"
    );

    // Discard of whole segments gives their space back and they read as zeros.
    qio(&url, &[write_p(0x42, 32 * MIB, 4 * MIB)]);
    assert!(
        mapped(&srv, "vd1")
            .iter()
            .any(|&e| overlaps(e, (32 * MIB, 4 * MIB))),
        "written segments must be mapped"
    );
    let before = allocated(&srv, "vd1");
    qio(&url, &[format!("discard {} {}", 32 * MIB, 4 * MIB)]);
    let after = allocated(&srv, "vd1");
    assert_eq!(
        before.saturating_sub(after),
        4 * MIB,
        "discarding 4 whole written segments must free exactly 4M: {before} -> {after}"
    );
    let still: Vec<_> = mapped(&srv, "vd1")
        .into_iter()
        .filter(|&e| overlaps(e, (32 * MIB, 4 * MIB)))
        .collect();
    assert!(
        still.is_empty(),
        "discarded range is still mapped: {still:?}"
    );
    qio(
        &url,
        &[
            read_p(0, 32 * MIB, 4 * MIB),
            read_p(0x99, 16 * MIB, MIB),
            read_p(0xa1, 4097, 3000),
            read_p(0xe7, size - 1, 1),
        ],
    );
    // Rewriting discarded space works (it is allocated again, from zeroed space).
    qio(
        &url,
        &[
            write_p(0x6b, 33 * MIB + 4096, 4096),
            read_p(0, 32 * MIB, MIB + 4096),
            read_p(0x6b, 33 * MIB + 4096, 4096),
            read_p(0, 33 * MIB + 8192, MIB - 8192),
        ],
    );
    srv.stop_and_check();
}

// ---------------------------------------------------------------------------------------------
// 2. Thin provisioning as qemu-img sees it.

/// `(start, length, data)` of `qemu-img map --output=json`.
fn qemu_img_map(url: &str) -> Vec<(u64, u64, bool)> {
    let out = run("qemu-img", &["map", "--output=json", "-f", "raw", url]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v.as_array()
        .expect("qemu-img map prints an array")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn thin_provisioning_seen_by_qemu_img() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let mut srv = Server::start("1G");
    // Larger than the 1G pool: thin vdisks may over-provision.
    srv.cli(&["vdisk", "create", "big", "--size", "10G"]);
    let size = 10 * GIB;
    let url = srv.url("big");
    let v = vdisk(&srv, "big");
    assert_eq!(v["size"].as_u64(), Some(size), "{v}");
    assert_eq!(
        v["allocated"].as_u64(),
        Some(0),
        "a new vdisk owns no space: {v}"
    );
    assert_eq!(v["entries"].as_u64(), Some(0), "{v}");
    let st = srv.json(&["status"]);
    assert_eq!(st["provisioned"].as_u64(), Some(size), "{st}");
    assert_eq!(st["allocated"].as_u64(), Some(0), "{st}");
    assert_eq!(st["vdisks"].as_u64(), Some(1), "{st}");

    let map = qemu_img_map(&url);
    assert_eq!(
        map.iter().map(|e| e.1).sum::<u64>(),
        size,
        "map covers the disk: {map:?}"
    );
    assert!(
        map.iter().all(|e| !e.2),
        "an unwritten vdisk has no data: {map:?}"
    );

    let at = 5 * GIB;
    qio(&url, &[write_p(0x77, at, MIB)]);
    let a = allocated(&srv, "big");
    assert!(
        (MIB..=16 * MIB).contains(&a),
        "1M written at 5G: allocated {a} should be between 1M and 16M"
    );
    let st = srv.json(&["status"]);
    let pool = st["allocated"].as_u64().unwrap();
    assert!(
        (MIB..=16 * MIB).contains(&pool),
        "pool allocation after 1M written: {st}"
    );

    let map = qemu_img_map(&url);
    assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), size, "{map:?}");
    let data: Vec<_> = map.iter().filter(|e| e.2).collect();
    assert!(
        !data.is_empty(),
        "the written MiB must show as data: {map:?}"
    );
    for e in &data {
        assert!(
            e.0 >= at - 16 * MIB && e.0 + e.1 <= at + 16 * MIB,
            "data reported far from the write at 5G: {e:?} in {map:?}"
        );
    }
    // The written range itself is entirely data.
    let covered: u64 = data
        .iter()
        .map(|e| (e.0 + e.1).min(at + MIB).saturating_sub(e.0.max(at)))
        .sum();
    assert_eq!(covered, MIB, "[5G, 5G+1M) must be data: {map:?}");
    qio(
        &url,
        &[
            read_p(0x77, at, MIB),
            read_p(0, at - MIB, MIB),
            read_p(0, at + MIB, MIB),
        ],
    );
    srv.stop_and_check();
}

// ---------------------------------------------------------------------------------------------
// 3. qemu-img convert / compare and nbdcopy.

/// A 64 MiB sparse image with random data at awkward offsets; returns the segments (1 MiB)
/// holding data.
fn make_sparse_image(path: &Path, size: u64) -> Vec<u64> {
    let chunks: [(u64, u64); 6] = [
        (0, MIB),
        (3 * MIB + 4097, 700_000),
        (10 * MIB - 5000, 2 * MIB + 10_000),
        (20 * MIB, 4096), // written as real zeros below
        (31 * MIB, 4 * MIB),
        (size - 12_345, 12_345),
    ];
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut segs = Vec::new();
    for (off, len) in chunks {
        f.seek(SeekFrom::Start(off)).unwrap();
        if off == 20 * MIB {
            f.write_all(&vec![0u8; len as usize]).unwrap();
            continue;
        }
        f.write_all(&urandom(len as usize)).unwrap();
        for s in off / MIB..(off + len).div_ceil(MIB) {
            segs.push(s);
        }
    }
    f.sync_all().unwrap();
    segs.sort_unstable();
    segs.dedup();
    segs
}

fn assert_same_file(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} and {} differ first at byte {i}: {:#x} vs {:#x}",
            a.display(),
            b.display(),
            x[i],
            y[i]
        );
    }
}

#[test]
fn qemu_img_convert_compare_and_nbdcopy() {
    if !have("qemu-img") || !have("nbdcopy") {
        return;
    }
    let mut srv = Server::start("1G");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.img");
    let size = 64 * MIB;
    let segs = make_sparse_image(&src, size);
    let src_s = src.to_str().unwrap();

    srv.cli(&["vdisk", "create", "img", "--size", "64M"]);
    let url = srv.url("img");
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &url],
    );
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &url],
    );
    assert!(out.contains("identical"), "qemu-img compare: {out}");

    // Thin: every segment with data is allocated, the holes (most of the image) are not.
    let a = allocated(&srv, "img");
    let data = segs.len() as u64 * MIB;
    assert!(
        a >= data && a <= size / 2,
        "after converting a sparse image with {data} bytes of data segments, allocated is {a}"
    );

    // Read it back with nbdcopy (several connections, sparse-aware).
    let copy = tmp.path().join("copy.img");
    run("nbdcopy", &[&url, copy.to_str().unwrap()]);
    assert_same_file(&src, &copy);

    // And write with nbdcopy into a second vdisk, then compare that one too.
    srv.cli(&["vdisk", "create", "img2", "--size", "64M"]);
    let url2 = srv.url("img2");
    run("nbdcopy", &[src_s, &url2]);
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &url2],
    );
    assert!(out.contains("identical"), "qemu-img compare: {out}");
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &url, &url2],
    );
    assert!(
        out.contains("identical"),
        "qemu-img compare of the vdisks: {out}"
    );

    // A difference must be detected (the comparison has teeth): change one byte.
    run(
        "qemu-io",
        &["-f", "raw", "-c", &write_p(0x01, 40 * MIB + 7, 1), &url2],
    );
    let out = run_timeout(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &url2],
        Duration::from_secs(120),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare must report the changed byte: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr_of(&out)
    );
    srv.stop_and_check();
}

// ---------------------------------------------------------------------------------------------
// 4. nbdinfo: export info, allocation map, export list.

/// `(offset, length, type)` of `nbdinfo --map --json`; type bit 1 = hole, bit 2 = zero.
fn nbd_map(url: &str) -> Vec<(u64, u64, u64)> {
    let out = run("nbdinfo", &["--map", "--json", url]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v.as_array()
        .expect("nbdinfo --map --json prints an array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Checks that the map covers `[0, size)` contiguously and that every byte of `range` has
/// an extent type satisfying `want`.
fn check_map(map: &[(u64, u64, u64)], size: u64, range: (u64, u64), want: fn(u64) -> bool) {
    let mut pos = 0;
    for e in map {
        assert_eq!(e.0, pos, "extents are not contiguous: {map:?}");
        pos += e.1;
    }
    assert_eq!(pos, size, "extents do not cover the export: {map:?}");
    for e in map {
        if overlaps((e.0, e.1), range) {
            assert!(
                want(e.2),
                "extent {e:?} overlapping [{}, +{}) has the wrong type: {map:?}",
                range.0,
                range.1
            );
        }
    }
}

fn is_hole(t: u64) -> bool {
    t & 3 == 3
}

fn is_data(t: u64) -> bool {
    t & 1 == 0
}

fn export_names(srv: &Server) -> Vec<String> {
    let base = format!("nbd://127.0.0.1:{}", srv.nbd_port);
    let out = run("nbdinfo", &["--list", "--json", &base]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    // The human-readable listing names them too.
    let text = run("nbdinfo", &["--list", &base]);
    for n in &names {
        assert!(text.contains(&format!("export=\"{n}\"")), "{text}");
    }
    names
}

#[test]
fn nbdinfo_reports_size_map_and_list() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let mut srv = Server::start("1G");
    srv.cli(&["vdisk", "create", "alpha", "--size", "256M"]);
    srv.cli(&["vdisk", "create", "beta", "--size", "16M"]);
    let size = 256 * MIB;
    let url = srv.url("alpha");

    let out = run("nbdinfo", &["--json", &url]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let exports = v["exports"].as_array().expect("exports");
    assert_eq!(exports.len(), 1, "{v}");
    assert_eq!(exports[0]["export-name"].as_str(), Some("alpha"), "{v}");
    assert_eq!(exports[0]["export-size"].as_u64(), Some(size), "{v}");
    assert_eq!(exports[0]["is_read_only"].as_bool(), Some(false), "{v}");
    let out = run("nbdinfo", &["--size", &srv.url("beta")]);
    assert_eq!(out.trim(), (16 * MIB).to_string(), "nbdinfo --size of beta");

    // Unwritten: one hole covering everything.
    let map = nbd_map(&url);
    check_map(&map, size, (0, size), is_hole);
    let text = run("nbdinfo", &["--map", &url]);
    assert!(text.contains("hole"), "nbdinfo --map: {text}");

    let w1 = (64 * MIB, MIB);
    let w2 = (100 * MIB + 4096, 8192);
    qio(
        &url,
        &[write_p(0x11, w1.0, w1.1), write_p(0x22, w2.0, w2.1)],
    );
    let map = nbd_map(&url);
    check_map(&map, size, w1, is_data);
    check_map(&map, size, w2, is_data);
    check_map(&map, size, (0, 64 * MIB - 16 * MIB), is_hole);
    check_map(&map, size, (128 * MIB, 128 * MIB), is_hole);
    let text = run("nbdinfo", &["--map", &url]);
    assert!(
        text.contains("data") && text.contains("hole"),
        "nbdinfo --map: {text}"
    );

    // After a discard the range is a hole again.
    qio(&url, &[format!("discard {} {}", w1.0, w1.1)]);
    let map = nbd_map(&url);
    check_map(&map, size, w1, is_hole);
    check_map(&map, size, w2, is_data);

    assert_eq!(export_names(&srv), ["alpha", "beta"]);
    srv.cli(&["vdisk", "create", "gamma", "--size", "4M"]);
    assert_eq!(export_names(&srv), ["alpha", "beta", "gamma"]);
    srv.cli(&["vdisk", "delete", "beta"]);
    assert_eq!(export_names(&srv), ["alpha", "gamma"]);
    // A deleted (or never created) export cannot be opened.
    for name in ["beta", "nosuch"] {
        let out = run_timeout("nbdinfo", &[&srv.url(name)], Duration::from_secs(60));
        assert!(
            !out.status.success(),
            "nbdinfo opened export {name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    srv.stop_and_check();
}

// ---------------------------------------------------------------------------------------------
// 5. fio with the nbd engine and crc32c verification.

/// A verified fio job (see [`fio::args`]) that runs for at most 30 s.
fn fio_args(url: &str, name: &str, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["--runtime=30"];
    a.extend_from_slice(extra);
    fio::args(url, name, &a)
}

fn spawn_fio(args: &[String]) -> std::process::Child {
    fio::spawn(args, Duration::from_secs(120))
}

/// Runs fio to the end and checks it (see [`fio::check`]).
fn run_fio(args: &[String], write: Option<u64>, read: u64) {
    let out = spawn_fio(args).wait_with_output().unwrap();
    fio::check(out, args, write, read);
}

#[test]
fn fio_verified_random_and_sequential_writes() {
    if !have("fio") {
        return;
    }
    let mut srv = Server::start("1G");
    srv.cli(&["vdisk", "create", "fio1", "--size", "128M"]);
    let url = srv.url("fio1");
    let m64 = 64 * MIB;
    let rand = fio_args(
        &url,
        "randw",
        &["--rw=randwrite", "--bs=4k", "--size=64m", "--iodepth=16"],
    );
    run_fio(&rand, Some(m64), m64);
    let seq = fio_args(
        &url,
        "seqw",
        &[
            "--rw=write",
            "--bs=1M",
            "--size=64m",
            "--offset=64m",
            "--iodepth=4",
        ],
    );
    run_fio(&seq, Some(m64), m64);
    // Both data sets are still intact when read back on fresh connections.
    run_fio(&fio::verify_only(&rand), None, m64);
    run_fio(&fio::verify_only(&seq), None, m64);
    assert!(
        allocated(&srv, "fio1") >= 128 * MIB,
        "the whole vdisk was written: {}",
        vdisk(&srv, "fio1")
    );

    // The verification has teeth: verifying a vdisk nobody wrote fails.
    srv.cli(&["vdisk", "create", "blank", "--size", "64M"]);
    let blank = fio_args(
        &srv.url("blank"),
        "randw",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=64m",
            "--iodepth=16",
            "--verify_only",
        ],
    );
    let out = spawn_fio(&blank).wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "fio verify_only of an unwritten vdisk must fail:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    srv.stop_and_check();
}

#[test]
fn fio_concurrent_connections_on_disjoint_halves() {
    if !have("fio") {
        return;
    }
    let mut srv = Server::start("1G");
    srv.cli(&["vdisk", "create", "mc", "--size", "64M"]);
    let url = srv.url("mc");
    let m32 = 32 * MIB;
    // Two fio processes at once, one per half, each on its own connection. Both start on
    // unallocated space, so allocation faults from both connections race.
    let a = fio_args(
        &url,
        "lo",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=32m",
            "--offset=0",
            "--iodepth=16",
        ],
    );
    let b = fio_args(
        &url,
        "hi",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--size=32m",
            "--offset=32m",
            "--iodepth=16",
        ],
    );
    let pa = spawn_fio(&a);
    let pb = spawn_fio(&b);
    fio::check(pa.wait_with_output().unwrap(), &a, Some(m32), m32);
    fio::check(pb.wait_with_output().unwrap(), &b, Some(m32), m32);
    // Each half is intact, read through new connections after both finished.
    for args in [&a, &b] {
        run_fio(&fio::verify_only(args), None, m32);
    }

    // One fio process with two jobs (two connections) on the halves of another vdisk,
    // sequential 64K writes that race to allocate neighbouring segments.
    srv.cli(&["vdisk", "create", "mc2", "--size", "64M"]);
    let c = fio_args(
        &srv.url("mc2"),
        "pair",
        &[
            "--rw=write",
            "--bs=64k",
            "--size=32m",
            "--numjobs=2",
            "--offset_increment=32m",
            "--iodepth=8",
        ],
    );
    let out = spawn_fio(&c).wait_with_output().unwrap();
    let v = fio::json_after_chatter(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        v["jobs"].as_array().map(Vec::len),
        Some(2),
        "numjobs=2: {v}"
    );
    fio::check(out, &c, Some(m32), m32);
    run_fio(&fio::verify_only(&c), None, m32);
    for name in ["mc", "mc2"] {
        assert_eq!(
            allocated(&srv, name),
            64 * MIB,
            "both halves of {name} were written: {}",
            vdisk(&srv, name)
        );
    }
    srv.stop_and_check();
}

// ---------------------------------------------------------------------------------------------
// 6. Persistence across a clean restart.

#[test]
fn data_and_metadata_survive_restart() {
    if !have("qemu-io") {
        return;
    }
    let mut srv = Server::start("1G");
    srv.cli(&["vdisk", "create", "keep", "--size", "64M"]);
    srv.cli(&[
        "vdisk",
        "create",
        "small",
        "--size",
        "8M",
        "--segment-size",
        "64K",
    ]);
    let keep = srv.url("keep");
    let small = srv.url("small");
    let pats: [(u8, u64, u64); 4] = [
        (0x1d, 4097, 3000),
        (0x2e, MIB - 1000, 5000),
        (0x3f, 10 * MIB, 3 * MIB),
        (0x4a, 64 * MIB - 4096, 4096),
    ];
    let small_pats: [(u8, u64, u64); 2] = [(0x5b, 60 * KIB, 10 * KIB), (0x6c, 5 * MIB + 1, 7)];
    let w: Vec<String> = pats.iter().map(|&(p, o, l)| write_p(p, o, l)).collect();
    qio(&keep, &w);
    let w: Vec<String> = small_pats
        .iter()
        .map(|&(p, o, l)| write_p(p, o, l))
        .collect();
    qio(&small, &w);
    let show_before = [vdisk(&srv, "keep"), vdisk(&srv, "small")];
    let map_before = [
        srv.json(&["vdisk", "map", "keep"]),
        srv.json(&["vdisk", "map", "small"]),
    ];

    srv.stop();
    srv.spawn();

    let list = srv.json(&["vdisk", "list"]);
    let mut names: Vec<&str> = list
        .as_array()
        .expect("vdisk list --json is an array")
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["keep", "small"], "{list}");
    let show_after = [vdisk(&srv, "keep"), vdisk(&srv, "small")];
    for (b, a) in show_before.iter().zip(&show_after) {
        for k in ["name", "id", "size", "segment_size", "allocated", "entries"] {
            assert_eq!(b[k], a[k], "{k} changed across the restart: {b} -> {a}");
        }
    }
    let map_after = [
        srv.json(&["vdisk", "map", "keep"]),
        srv.json(&["vdisk", "map", "small"]),
    ];
    for (b, a) in map_before.iter().zip(&map_after) {
        assert_eq!(b["entries"], a["entries"], "map changed across the restart");
    }

    let r: Vec<String> = pats
        .iter()
        .map(|&(p, o, l)| read_p(p, o, l))
        .chain([read_p(0, 0, 4097), read_p(0, 20 * MIB, 8 * MIB)])
        .collect();
    qio(&keep, &r);
    let rs: Vec<String> = small_pats
        .iter()
        .map(|&(p, o, l)| read_p(p, o, l))
        .chain([read_p(0, 0, 60 * KIB), read_p(0, 70 * KIB, MIB)])
        .collect();
    qio(&small, &rs);

    // New allocations after the restart must not land on space that is already in use:
    // fill the rest of `small` and write fresh parts of `keep`, then reread everything.
    qio(
        &small,
        &[
            write_p(0x7d, 2 * MIB, 2 * MIB),
            write_p(0x7e, 6 * MIB, 2 * MIB),
        ],
    );
    qio(&keep, &[write_p(0x7f, 40 * MIB, 4 * MIB)]);
    qio(&keep, &r);
    qio(&small, &rs);
    qio(
        &small,
        &[
            read_p(0x7d, 2 * MIB, 2 * MIB),
            read_p(0x7e, 6 * MIB, 2 * MIB),
        ],
    );
    qio(&keep, &[read_p(0x7f, 40 * MIB, 4 * MIB)]);
    srv.stop_and_check();
}

// ---------------------------------------------------------------------------------------------
// 7. CLI errors explain themselves.

#[test]
fn cli_errors_are_helpful() {
    let mut srv = Server::start("1G");
    srv.cli(&["vdisk", "create", "vd1", "--size", "1G"]);

    let err = cli_fails(&srv, &["vdisk", "create", "vd1", "--size", "2G"]);
    assert!(
        err.contains("exists") && err.contains("vd1"),
        "creating an existing vdisk: {err}"
    );
    assert_eq!(
        vdisk(&srv, "vd1")["size"].as_u64(),
        Some(GIB),
        "a refused create must not change the existing vdisk"
    );

    let err = cli_fails(&srv, &["vdisk", "create", "odd", "--size", "5000"]);
    assert!(
        err.contains("block size"),
        "size not a multiple of 4K: {err}"
    );
    let err = cli_fails(&srv, &["vdisk", "create", "odd", "--size", "0"]);
    assert!(err.contains("block size"), "size 0: {err}");
    let err = cli_fails(
        &srv,
        &[
            "vdisk",
            "create",
            "odd",
            "--size",
            "1G",
            "--segment-size",
            "3000",
        ],
    );
    assert!(err.contains("segment size"), "bad segment size: {err}");
    let names: Vec<String> = srv
        .json(&["vdisk", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["vd1"], "refused creates must not create anything");

    for args in [
        &["vdisk", "show", "nosuch"][..],
        &["vdisk", "map", "nosuch"],
        &["vdisk", "delete", "nosuch"],
        &["vdisk", "resize", "nosuch", "--size", "1G"],
    ] {
        let err = cli_fails(&srv, args);
        assert!(
            err.contains("not found") && err.contains("nosuch"),
            "tabula {args:?}: {err}"
        );
    }

    // Nothing listens on port 1.
    let out = Command::new(BIN)
        .args(["--controller", "http://127.0.0.1:1", "status"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "status against a dead controller succeeded"
    );
    let err = stderr_of(&out).to_lowercase();
    assert!(
        err.contains("controller")
            && (err.contains("reach") || err.contains("connect"))
            && err.contains("127.0.0.1:1"),
        "an unreachable controller should be named as such: {err}"
    );
    srv.stop_and_check();
}

// ---------------------------------------------------------------------------------------------
// 8. Resizing as clients see it.

fn nbd_size(url: &str) -> u64 {
    run("nbdinfo", &["--size", url])
        .trim()
        .parse()
        .expect("nbdinfo --size prints a number")
}

#[test]
fn resize_is_seen_by_new_connections() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let mut srv = Server::start("1G");
    srv.cli(&["vdisk", "create", "rs", "--size", "8M"]);
    let url = srv.url("rs");
    qio(&url, &[write_p(0x05, 0, 8 * MIB)]);
    assert_eq!(nbd_size(&url), 8 * MIB);

    // A connection opened before the shrink still believes the old size. A write it sends
    // beyond the new end must either fail or be kept: never acknowledged and then lost.
    let mut stale = common::nbd::Client::connect(srv.nbd_port, "rs").expect("connect");
    assert_eq!(stale.size, 8 * MIB);
    srv.cli(&["vdisk", "resize", "rs", "--size", "4M"]);
    assert_eq!(vdisk(&srv, "rs")["size"].as_u64(), Some(4 * MIB));
    assert_eq!(allocated(&srv, "rs"), 4 * MIB, "shrinking frees the tail");
    let data = vec![0xabu8; 4096];
    if stale.write(6 * MIB, &data, true).is_ok() {
        let back = stale
            .read(6 * MIB, 4096)
            .expect("read back an acknowledged write");
        assert!(
            back == data,
            "a FUA write beyond the new end was acknowledged but reads back as {:#x}..; \
             server log:\n{}",
            back[0],
            srv.log_text()
        );
    }
    stale.disconnect();

    // New connections see the new size.
    assert_eq!(
        nbd_size(&url),
        4 * MIB,
        "a connection made after `vdisk resize --size 4M` must see 4M"
    );
    srv.cli(&["vdisk", "resize", "rs", "--size", "12M"]);
    assert_eq!(
        nbd_size(&url),
        12 * MIB,
        "a connection made after `vdisk resize --size 12M` must see 12M"
    );
    // The kept part keeps its data; the regrown part reads as zeros (the old tail is gone)
    // and is writable.
    qio(
        &url,
        &[
            read_p(0x05, 0, 4 * MIB),
            read_p(0, 4 * MIB, 8 * MIB),
            write_p(0x08, 10 * MIB + 1, MIB),
            read_p(0x08, 10 * MIB + 1, MIB),
        ],
    );
    srv.stop_and_check();
}

#[test]
fn unix_socket_export_serves_qemu_and_libnbd() {
    if !have("qemu-io") || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let mut srv = Server::start_with("1G", true);
    srv.cli(&["vdisk", "create", "ux", "--size", "8M"]);
    let url = srv.url("ux");
    assert!(url.starts_with("nbd+unix://"), "{url}");
    qemu_io(
        &url,
        &[
            "write -P 0x3c 1000 70000",
            "read -P 0x3c 1000 70000",
            "read -P 0 0 1000",
        ],
    );
    let info: serde_json::Value = serde_json::from_str(&run("nbdinfo", &["--json", &url])).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 8 << 20, "{info}");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.img");
    run("nbdcopy", &[&url, copy.to_str().unwrap()]);
    let data = std::fs::read(&copy).unwrap();
    assert_eq!(data.len(), 8 << 20);
    assert!(data[1000..71000].iter().all(|&b| b == 0x3c));
    assert!(data[..1000].iter().all(|&b| b == 0) && data[71000..].iter().all(|&b| b == 0));
    srv.stop_and_check();
}
