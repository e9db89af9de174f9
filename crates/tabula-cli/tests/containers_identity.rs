//! A container is identified by what it is, not by how its path is spelled (issue 17,
//! finding 1): a second path to a container (`..`, a symlink), the controller's own
//! metadata files, and a container of another pool are refused; labels let `tabula check`
//! find a container whose label is not its own; a failed `container add` leaves nothing
//! behind and bad paths are bad requests (finding 5).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::remote::{Kind, NbdServer};
use common::{BIN, Server};

const MIB: u64 = 1 << 20;

/// Runs `tabula container add` against `srv`: (success, stdout + stderr).
fn add(srv: &Server, args: &[&str]) -> (bool, String) {
    let mut a = vec!["container", "add"];
    a.extend_from_slice(args);
    let out = srv.try_cli(&a);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn refused(srv: &Server, args: &[&str], says: &[&str]) {
    let (ok, text) = add(srv, args);
    assert!(!ok, "{args:?} was accepted: {text}");
    for s in says {
        assert!(text.contains(s), "{args:?}: expected {s:?} in: {text}");
    }
}

fn container_names(srv: &Server) -> Vec<String> {
    srv.json(&["container", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_second_path_to_a_container_or_the_metadata_is_refused() {
    let mut srv = Server::start("16M");
    let data = srv.data_dir.canonicalize().unwrap();
    let dotdot = data.join("containers/../containers/default.img");
    let outside = tempfile::tempdir().unwrap();
    let link = outside.path().join("link.img");
    std::os::unix::fs::symlink(data.join("containers/default.img"), &link).unwrap();
    for p in [&dotdot, &link] {
        refused(
            &srv,
            &["dup", "--path", p.to_str().unwrap()],
            &["'default'"],
        );
    }
    for f in ["tabula.wal", "tabula.redb"] {
        refused(
            &srv,
            &["meta", "--path", data.join(f).to_str().unwrap()],
            &["data directory"],
        );
    }
    assert_eq!(container_names(&srv), ["default"]);
    srv.stop_and_check();
}

#[test]
fn one_container_cannot_join_two_pools() {
    let mut a = Server::start("16M");
    let mut b = Server::start("16M");
    let shared = tempfile::tempdir().unwrap();
    let path = shared.path().join("c.img");
    let p = path.to_str().unwrap();
    let (ok, text) = add(&a, &["c", "--path", p, "--size", "8M"]);
    assert!(ok, "{text}");
    refused(&b, &["c", "--path", p], &["another tabula pool", "wipe"]);
    assert_eq!(container_names(&b), ["default"]);
    // Removed from the first pool, its label is wiped: the second may take it.
    a.cli(&["container", "remove", "c"]);
    let (ok, text) = add(&b, &["c", "--path", p]);
    assert!(ok, "{text}");
    a.stop_and_check();
    b.stop_and_check();
}

fn check(dir: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["check", "--data-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_fails_on_a_container_whose_label_is_not_its_own() {
    let mut srv = Server::start("16M");
    let other = tempfile::tempdir().unwrap();
    let c2 = other.path().join("c2.img");
    let (ok, text) = add(
        &srv,
        &["c2", "--path", c2.to_str().unwrap(), "--size", "8M"],
    );
    assert!(ok, "{text}");
    srv.stop();
    let (ok, text) = check(&srv.data_dir);
    assert!(ok, "{text}");
    // c2's device swapped for the default container's: same label in both.
    let mut label = vec![0u8; 4096];
    std::fs::File::open(srv.data_dir.join("containers/default.img"))
        .unwrap()
        .read_exact_at(&mut label, 0)
        .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&c2).unwrap();
    f.write_all_at(&label, 0).unwrap();
    let (ok, text) = check(&srv.data_dir);
    assert!(!ok, "{text}");
    assert!(text.contains("c2") && text.contains("label"), "{text}");
}

/// Sends one HTTP request with a JSON body to the admin API; returns the status code and
/// body.
fn post(srv: &Server, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", srv.api_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

#[test]
fn a_failed_add_leaves_nothing_behind_and_bad_paths_are_bad_requests() {
    let mut srv = Server::start("16M");
    let other = tempfile::tempdir().unwrap();
    let path = other.path().join("big.img");
    let p = path.to_str().unwrap();
    for size in ["1P", &(1u64 << 63).to_string()] {
        let (ok, text) = add(&srv, &["big", "--path", p, "--size", size]);
        assert!(!ok, "{size}: {text}");
        assert!(!path.exists(), "a failed add of {size} left {p}");
    }
    let (ok, text) = add(&srv, &["big", "--path", p, "--size", "8M"]);
    assert!(ok, "the retry: {text}");
    let dir = other.path().display().to_string();
    let nul =
        serde_json::json!({"name": "n", "path": format!("{dir}/a\u{0}b.img"), "size": 8 << 20});
    let long = serde_json::json!({"name": "l", "path": format!("{dir}/{}", "x".repeat(11_000)), "size": 8 << 20});
    for body in [nul, long] {
        let (code, text) = post(&srv, "/v1/containers", &body.to_string());
        assert_eq!(code, 400, "{text}");
        assert!(text.contains("path"), "{text}");
    }
    assert_eq!(container_names(&srv), ["default", "big"]);
    srv.stop_and_check();
}

/// A remote container's label goes through NBD like any write; the same export is one
/// container whether reached by the same URI (identity) or another address of its server
/// (the label).
#[test]
fn an_nbd_export_is_one_container_however_it_is_reached() {
    let tmp = tempfile::tempdir().unwrap();
    let remote = NbdServer::start(Kind::Tabula, &tmp.path().join("r.img"), 16 * MIB);
    let mut srv = Server::start("16M");
    srv.cli(&["container", "add", "r", "--uri", &remote.uri()]);
    let bytes = std::fs::read(&remote.file).unwrap();
    assert_eq!(
        &bytes[..8],
        b"TABULALB",
        "the label was written through NBD"
    );
    refused(&srv, &["r2", "--uri", &remote.uri()], &["is container 'r'"]);
    // The same server by an IPv4-mapped IPv6 address: only the label knows.
    let mapped = format!("nbd://[::ffff:127.0.0.1]:{}/disk0", remote.port);
    refused(
        &srv,
        &["r3", "--uri", &mapped],
        &["already in this pool as 'r'"],
    );
    assert_eq!(container_names(&srv), ["default", "r"]);
    let text = srv.cli(&["check"]);
    assert!(text.contains("container labels verified: 2"), "{text}");
    srv.stop_and_check();
}

/// On another host a container's path may lead to another device. An agent whose path
/// (here: a private mount namespace with another file bind-mounted over it) does not lead
/// to the container added does no I/O there: the host gets EIO, the impostor is never
/// written, and the controller records a path down from that agent only.
#[test]
fn an_agent_whose_path_leads_to_another_device_does_no_io_there() {
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI needs mount namespaces (unshare --mount, as root) for this test"
        );
        eprintln!("SKIP: no mount namespaces here (run as root)");
        return;
    }
    let mut cl = common::cluster::Cluster::start("16M", &["n1"]);
    let shared = tempfile::tempdir().unwrap();
    let real = shared.path().join("c.img");
    let impostor = shared.path().join("impostor.img");
    cl.controller.cli(&[
        "container",
        "add",
        "c",
        "--path",
        real.to_str().unwrap(),
        "--size",
        "8M",
    ]);
    std::fs::File::create(&impostor)
        .unwrap()
        .set_len(9 * MIB)
        .unwrap();
    let prefix: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &format!(
            "mount --bind '{}' '{}' && exec \"$0\" \"$@\"",
            impostor.display(),
            real.display()
        ),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut other = common::cluster::Agent::prepare(
        &cl.dir,
        "n2",
        "127.0.0.1",
        common::free_port(),
        &cl.controller.url(),
        &prefix,
    );
    other.spawn(true);
    cl.agents.push(other);
    cl.wait_connected(&["n1", "n2"], Duration::from_secs(30));
    cl.controller
        .cli(&["vdisk", "create", "vd", "--size", "4M", "--container", "c"]);
    let mut good = cl.agent("n1").client("vd");
    good.write(0, &[0x5a; 4096], true).unwrap();
    let mut bad = cl.agent("n2").client("vd");
    assert!(bad.read(0, 4096).is_err(), "read through the impostor");
    assert!(
        bad.write(0, &[0xa5; 4096], true).is_err(),
        "write to the impostor"
    );
    assert!(
        std::fs::read(&impostor).unwrap().iter().all(|&b| b == 0),
        "the impostor was written"
    );
    assert_eq!(good.read(0, 4096).unwrap(), vec![0x5a; 4096]);
    let c = cl.controller.json(&["container", "show", "c"]);
    assert_eq!(c["state"], "ok", "{c}");
    let down = c["unreachable_from"].to_string();
    assert!(down.contains("n2") && down.contains("label"), "{c}");
    good.disconnect();
    bad.disconnect();
    cl.stop_and_check();
}
