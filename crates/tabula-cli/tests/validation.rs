//! Input validation against the real binary (issue 17, finding 5 and "smaller surprises"):
//!
//! - `sizes_over_the_limits_are_refused_with_4xx`: create, resize and segment sizes beyond
//!   the limits are refused with 400 and the limits in the message, by the admin API and by
//!   the CLI; NBD clients never see a negative size; every rounding hint is accepted.
//! - `out_of_space_clears_when_space_is_freed`: status says OUT OF SPACE while allocating
//!   writes fail, and stops saying it once a trim frees space.
//! - `relative_container_path_is_the_callers`: `container add --path rel.img` means
//!   rel.img in the caller's directory, not in the controller's.
//! - `partial_trim_keeps_bytes_and_write_zeroes_zeroes_them`: the documented TRIM and
//!   WRITE_ZEROES semantics for partial segments.

mod common;

use std::process::Command;
use std::time::Duration;

use common::nbd::{Client, NbdErr, stamp_block};
use common::{BIN, Server, have, run};

const MIB: u64 = 1 << 20;
const ENOSPC: u32 = 28;

/// POSTs `body` to the admin API; returns the HTTP status and the body.
fn post(srv: &Server, path: &str, body: &str) -> (u16, String) {
    let out = common::run_timeout(
        "curl",
        &[
            "-sS",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
            "-w",
            "\n%{http_code}",
            &format!("{}{path}", srv.api()),
        ],
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').expect("curl printed the status");
    (
        code.trim().parse().expect("an HTTP status"),
        body.to_string(),
    )
}

/// The size an NBD client sees, as nbdinfo prints it (signed, like libnbd).
fn nbd_size(srv: &Server, vdisk: &str) -> String {
    run("nbdinfo", &["--size", &srv.url(vdisk)])
        .trim()
        .to_string()
}

fn cli_fails(srv: &Server, args: &[&str]) -> String {
    let out = srv.try_cli(args);
    assert!(
        !out.status.success(),
        "tabula {args:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn sizes_over_the_limits_are_refused_with_4xx() {
    if !have("curl") || !have("nbdinfo") {
        return;
    }
    let mut srv = Server::start("1G");
    srv.cli(&["vdisk", "create", "vd", "--size", "16M"]);

    // resize skipped the cap create enforces: 16383P was accepted and nbdinfo then printed
    // a negative size.
    let err = cli_fails(&srv, &["vdisk", "resize", "vd", "--size", "16383P"]);
    assert!(
        err.contains("vdisk size 16383P is out of range") && err.contains("from 4K to 4E"),
        "{err}"
    );
    for size in [16383u64 << 50, u64::MAX, 0, (4 << 60) + 4096] {
        let (code, body) = post(
            &srv,
            "/v1/vdisks/vd/resize",
            &format!(r#"{{"size":{size}}}"#),
        );
        assert_eq!(code, 400, "resize to {size}: {body}");
        assert!(body.contains("from 4K to 4E"), "{body}");
    }
    // A number beyond 64 bits is the client's mistake too.
    let (code, body) = post(
        &srv,
        "/v1/vdisks/vd/resize",
        r#"{"size":18446744073709551616}"#,
    );
    assert!((400..500).contains(&code), "{code}: {body}");
    assert_eq!(nbd_size(&srv, "vd"), (16 * MIB).to_string());

    // Segment sizes of 128G, 2^62 and 2^63 were accepted; every write then failed ENOSPC.
    for seg in [128u64 << 30, 1 << 62, 1 << 63] {
        let (code, body) = post(
            &srv,
            "/v1/vdisks",
            &format!(r#"{{"name":"s","size":16777216,"segment_size":{seg}}}"#),
        );
        assert_eq!(code, 400, "segment size {seg}: {body}");
        assert!(body.contains("a power of two from 4K to 1G"), "{body}");
    }
    let err = cli_fails(
        &srv,
        &[
            "vdisk",
            "create",
            "s",
            "--size",
            "16M",
            "--segment-size",
            "128G",
        ],
    );
    assert!(err.contains("segment size 128G is out of range"), "{err}");
    // A segment larger than the pool's only container (1G) cannot happen (1G is the
    // largest segment), so a 2G one is refused by the limit, and 1G is accepted.
    srv.cli(&[
        "vdisk",
        "create",
        "s",
        "--size",
        "4G",
        "--segment-size",
        "1G",
    ]);

    // The rounding hint names a size that is then accepted (it suggested `1.0G`, refused).
    let err = cli_fails(&srv, &["vdisk", "create", "odd", "--size", "1073741825"]);
    let hint = err
        .split("use ")
        .nth(1)
        .and_then(|h| h.split_whitespace().next())
        .unwrap_or_else(|| panic!("no hint in: {err}"));
    assert_eq!(hint, "1048580K", "{err}");
    srv.cli(&["vdisk", "create", "odd", "--size", hint]);

    // E is a unit like the others, and the largest vdisk is served with its true size.
    srv.cli(&["vdisk", "create", "e", "--size", "1EiB"]);
    assert_eq!(nbd_size(&srv, "e"), (1u64 << 60).to_string());
    srv.cli(&["vdisk", "resize", "vd", "--size", "4E"]);
    assert_eq!(nbd_size(&srv, "vd"), (4u64 << 60).to_string());
    let names: Vec<String> = srv
        .json(&["vdisk", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["e", "odd", "s", "vd"]);
    srv.stop_and_check();
}

#[test]
fn out_of_space_clears_when_space_is_freed() {
    let mut srv = Server::start("4M");
    srv.cli(&["vdisk", "create", "vd", "--size", "16M"]);
    let mut c = Client::connect(srv.nbd_port, "vd").unwrap();
    for i in 0..4u64 {
        c.write(i * 4 * MIB, &stamp_block(i, 1), false).unwrap();
    }
    match c.write(5 * MIB, &stamp_block(9, 1), false) {
        Err(NbdErr::Errno(e)) => assert_eq!(e, ENOSPC),
        other => panic!("expected ENOSPC, got {other:?}"),
    }
    let st = srv.json(&["status"]);
    assert_eq!(st["out_of_space"], true, "{st}");
    assert!(srv.cli(&["status"]).contains("OUT OF SPACE"));
    // Free one segment: status says so without waiting for the next write.
    c.trim(4 * MIB, MIB as u32).unwrap();
    let st = common::poll("the trim freed nothing", Duration::from_secs(10), || {
        let st = srv.json(&["status"]);
        (st["free"].as_u64() == Some(MIB)).then_some(st)
    });
    assert_eq!(st["out_of_space"], false, "{st}");
    assert!(!srv.cli(&["status"]).contains("OUT OF SPACE"));
    c.write(5 * MIB, &stamp_block(9, 1), false).unwrap();
    c.disconnect();
    srv.stop_and_check();
}

#[test]
fn relative_container_path_is_the_callers() {
    let mut srv = Server::start("64M");
    let caller = tempfile::tempdir().unwrap();
    let name = format!("rel-{}.img", std::process::id());
    // The server runs in the test's directory; a file landing there is the bug.
    let server_side = std::env::current_dir().unwrap().join(&name);
    let out = Command::new(BIN)
        .current_dir(caller.path())
        .args(["--controller", &srv.api()])
        .args(["container", "add", "rel", "--path", &name, "--size", "8M"])
        .output()
        .unwrap();
    let leaked = server_side.exists();
    let _ = std::fs::remove_file(&server_side);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !leaked,
        "the container file was created in the controller's directory"
    );
    let want = caller.path().join(&name);
    assert!(want.exists(), "no container file at {}", want.display());
    let c = srv.json(&["container", "show", "rel"]);
    assert_eq!(c["path"].as_str(), want.to_str(), "{c}");
    srv.cli(&[
        "vdisk",
        "create",
        "vd",
        "--size",
        "8M",
        "--container",
        "rel",
    ]);
    let mut nbd = Client::connect(srv.nbd_port, "vd").unwrap();
    nbd.write(0, &stamp_block(1, 1), true).unwrap();
    assert_eq!(nbd.read(0, 4096).unwrap(), stamp_block(1, 1));
    nbd.disconnect();
    srv.stop_and_check();
}

/// TRIM is advisory and never writes: whole segments are unmapped (they read as zeros and
/// their space returns to the pool), the partial segments at its ends keep their bytes.
/// WRITE_ZEROES zeroes partial segments in place.
#[test]
fn partial_trim_keeps_bytes_and_write_zeroes_zeroes_them() {
    let mut srv = Server::start("64M");
    srv.cli(&["vdisk", "create", "vd", "--size", "8M"]);
    let mut c = Client::connect(srv.nbd_port, "vd").unwrap();
    let data = vec![0xabu8; 3 * MIB as usize];
    c.write(0, &data, true).unwrap();
    let allocated = |srv: &Server| {
        srv.json(&["vdisk", "show", "vd"])["allocated"]
            .as_u64()
            .unwrap()
    };
    let before = allocated(&srv);
    // [512K, 2M + 512K): the second segment whole, halves of the first and third.
    c.trim(MIB / 2, 2 * MIB as u32).unwrap();
    assert_eq!(
        before - allocated(&srv),
        MIB,
        "exactly one whole segment is freed"
    );
    let got = c.read(0, 3 * MIB as u32).unwrap();
    let (m, h) = (MIB as usize, MIB as usize / 2);
    assert!(got[..m].iter().all(|&b| b == 0xab), "partial head kept");
    assert!(
        got[m..2 * m].iter().all(|&b| b == 0),
        "whole segment reads zeros"
    );
    assert!(got[2 * m..].iter().all(|&b| b == 0xab), "partial tail kept");
    // The same range zeroed: the partial pieces read zeros, nothing past them changes.
    c.write_zeroes(MIB / 2, 2 * MIB as u32).unwrap();
    let got = c.read(0, 3 * MIB as u32).unwrap();
    assert!(got[..h].iter().all(|&b| b == 0xab));
    assert!(got[h..2 * m + h].iter().all(|&b| b == 0));
    assert!(got[2 * m + h..].iter().all(|&b| b == 0xab));
    c.disconnect();
    srv.stop_and_check();
}
