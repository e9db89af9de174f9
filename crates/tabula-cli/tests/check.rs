//! `tabula check --data-dir` on a stopped installation: clean data passes; a store with a
//! segment owned twice, or with leaked space, fails with exit status 1 and says what is wrong.

mod common;

use std::process::Command;

use common::{BIN, Server};
use tabula_controller::store::Store;
use tabula_core::ContainerId;

fn check(dir: &std::path::Path) -> (bool, String) {
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

/// A stopped data directory with one vdisk that owns its first segment.
fn prepared() -> Server {
    let mut srv = Server::start("16M");
    srv.cli(&["vdisk", "create", "vd", "--size", "8M"]);
    let mut c = common::nbd::Client::connect(srv.nbd_port, "vd").unwrap();
    c.write(0, &[7u8; 4096], true).unwrap();
    c.disconnect();
    srv.stop();
    srv
}

#[test]
fn check_passes_on_clean_data_and_refuses_a_running_server() {
    let mut srv = prepared();
    let (ok, text) = check(&srv.data_dir);
    assert!(ok, "{text}");
    assert!(text.contains("OK"), "{text}");
    srv.spawn();
    let (ok, text) = check(&srv.data_dir);
    assert!(!ok);
    assert!(text.contains("in use"), "{text}");
    // ...and the running server checks itself.
    assert!(srv.cli(&["check"]).contains("OK"));
    srv.stop();
}

#[test]
fn check_reports_a_segment_owned_twice() {
    let srv = prepared();
    let store = Store::open(&srv.data_dir.join("tabula.redb")).unwrap();
    let loaded = store.load().unwrap();
    let (_, _, entries) = &loaded.vdisks[0];
    let owned = entries[0].target.unwrap();
    // Corrupt: declare the vdisk's segment free as well.
    store
        .write(|t| t.put_free(owned.container, owned.block, 256))
        .unwrap();
    drop(store);
    let (ok, text) = check(&srv.data_dir);
    assert!(!ok, "check passed a double-owned segment:\n{text}");
    assert!(text.contains("owned twice"), "{text}");
    assert!(
        text.contains("vdisk vd"),
        "the report names the owner:\n{text}"
    );
}

#[test]
fn check_reports_leaked_space() {
    let srv = prepared();
    let store = Store::open(&srv.data_dir.join("tabula.redb")).unwrap();
    let loaded = store.load().unwrap();
    let (c, start, _) = loaded.free[0];
    assert_eq!(c, ContainerId(1));
    // Corrupt: lose the free run, so its space belongs to nobody.
    store.write(|t| t.delete_free(c, start)).unwrap();
    drop(store);
    let (ok, text) = check(&srv.data_dir);
    assert!(!ok, "check passed leaked space:\n{text}");
    assert!(text.contains("leaked"), "{text}");
}
