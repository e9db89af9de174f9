//! Bad input, isolation between vdisks, and running out of space, through the real binary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Server;
use common::nbd::{Client, NbdErr, stamp_block};

const ENOSPC: u32 = 28;

/// Reads until the server closes the connection; fails if it stays open too long.
fn expect_close(mut s: TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("server kept the connection open: {e}"),
        }
    }
}

#[test]
fn garbage_and_oversized_options_get_a_clean_close_while_others_work() {
    let mut srv = Server::start("256M");
    srv.cli(&["vdisk", "create", "vd", "--size", "16M"]);
    let mut good = Client::connect(srv.nbd_port, "vd").unwrap();
    good.write(0, &stamp_block(0, 1), true).unwrap();

    // Pure garbage instead of the client flags and options.
    let mut s = TcpStream::connect(("127.0.0.1", srv.nbd_port)).unwrap();
    s.write_all(&[0xff; 512]).unwrap();
    expect_close(s);

    // A well-formed start, then an option claiming 4 GiB of payload.
    let mut s = TcpStream::connect(("127.0.0.1", srv.nbd_port)).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x49484156454f5054u64.to_be_bytes());
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&opt).unwrap();
    expect_close(s);

    // Garbage after a successful handshake (bad request magic).
    let c = Client::connect(srv.nbd_port, "vd").unwrap();
    drop(c);
    let mut s = TcpStream::connect(("127.0.0.1", srv.nbd_port)).unwrap();
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x49484156454f5054u64.to_be_bytes());
    opt.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
    opt.extend_from_slice(&2u32.to_be_bytes());
    opt.extend_from_slice(b"vd");
    s.write_all(&opt).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    s.write_all(&[0xab; 28]).unwrap();
    expect_close(s);

    // The first client still works, and its data is intact.
    assert_eq!(good.read(0, 4096).unwrap(), stamp_block(0, 1));
    good.write(4096, &stamp_block(1, 1), false).unwrap();
    good.flush().unwrap();
    good.disconnect();
    srv.stop_and_check();
}

#[test]
fn data_of_a_deleted_vdisk_never_reads_back_through_a_new_one() {
    // A small pool so the new vdisk must reuse the freed segments.
    let mut srv = Server::start("8M");
    srv.cli(&["vdisk", "create", "old", "--size", "8M"]);
    let mut c = Client::connect(srv.nbd_port, "old").unwrap();
    let secret = vec![0x5eu8; 1 << 20];
    for i in 0..8u64 {
        c.write(i << 20, &secret, false).unwrap();
    }
    c.flush().unwrap();
    c.disconnect();
    assert_eq!(srv.json(&["status"])["free"], 0);
    srv.cli(&["vdisk", "delete", "old"]);
    assert_eq!(srv.json(&["status"])["free"], 8 << 20);

    srv.cli(&["vdisk", "create", "new", "--size", "8M"]);
    let mut c = Client::connect(srv.nbd_port, "new").unwrap();
    // Small writes allocate whole segments; the rest of each segment must read as zeros.
    for i in 0..8u64 {
        c.write((i << 20) + 8192, &[1u8; 512], false).unwrap();
    }
    assert_eq!(
        srv.json(&["status"])["free"],
        0,
        "the new vdisk reuses the old space"
    );
    for i in 0..8u64 {
        let data = c.read(i << 20, 1 << 20).unwrap();
        assert!(
            !data.contains(&0x5e),
            "segment {i} leaks the deleted vdisk's data"
        );
        assert!(data[..8192].iter().all(|&b| b == 0));
        assert!(data[8192 + 512..].iter().all(|&b| b == 0));
    }
    c.disconnect();
    srv.stop_and_check();
}

#[test]
fn trimmed_space_is_zeroed_before_another_vdisk_gets_it() {
    let mut srv = Server::start("4M");
    srv.cli(&["vdisk", "create", "a", "--size", "4M"]);
    srv.cli(&["vdisk", "create", "b", "--size", "4M"]);
    let mut a = Client::connect(srv.nbd_port, "a").unwrap();
    a.write(0, &vec![0x77u8; 4 << 20], false).unwrap();
    a.trim(0, 4 << 20).unwrap();
    assert_eq!(srv.json(&["vdisk", "show", "a"])["allocated"], 0);
    // Trimmed space reads as zeros through the trimming vdisk...
    assert!(a.read(0, 1 << 20).unwrap().iter().all(|&b| b == 0));
    let mut b = Client::connect(srv.nbd_port, "b").unwrap();
    b.write(100, &[9u8; 10], false).unwrap();
    // ...and through the vdisk that now owns it.
    let d = b.read(0, 1 << 20).unwrap();
    assert!(!d.contains(&0x77));
    a.disconnect();
    b.disconnect();
    srv.stop_and_check();
}

#[test]
fn full_pool_returns_enospc_while_allocated_io_continues() {
    let mut srv = Server::start("4M");
    srv.cli(&["vdisk", "create", "vd", "--size", "64M"]);
    let mut c = Client::connect(srv.nbd_port, "vd").unwrap();
    for i in 0..4u64 {
        c.write(i << 21, &stamp_block(i, 1), false).unwrap();
    }
    // No segment left: an allocating write fails with ENOSPC, at once.
    match c.write(40 << 20, &stamp_block(99, 1), false) {
        Err(NbdErr::Errno(e)) => assert_eq!(e, ENOSPC),
        other => panic!("expected ENOSPC, got {other:?}"),
    }
    let status = srv.json(&["status"]);
    assert_eq!(status["out_of_space"], true, "{status}");
    let human = srv.cli(&["status"]);
    assert!(human.contains("OUT OF SPACE"), "{human}");
    // Writes and reads to allocated space go on.
    c.write(2 << 21, &stamp_block(2, 2), true).unwrap();
    assert_eq!(c.read(2 << 21, 4096).unwrap(), stamp_block(2, 2));
    assert_eq!(c.read(0, 4096).unwrap(), stamp_block(0, 1));
    // Adding a container lets allocating writes proceed, without a restart.
    let extra = srv.data_dir.join("containers/extra.img");
    srv.cli(&[
        "container",
        "add",
        "extra",
        "--path",
        extra.to_str().unwrap(),
        "--size",
        "16M",
    ]);
    c.write(40 << 20, &stamp_block(99, 1), false).unwrap();
    assert_eq!(c.read(40 << 20, 4096).unwrap(), stamp_block(99, 1));
    assert_eq!(srv.json(&["status"])["out_of_space"], false);
    c.disconnect();
    srv.stop_and_check();
}

#[test]
fn deleting_a_connected_vdisk_fails_its_io_cleanly() {
    let mut srv = Server::start("64M");
    srv.cli(&["vdisk", "create", "vd", "--size", "8M"]);
    let mut c = Client::connect(srv.nbd_port, "vd").unwrap();
    c.write(0, &stamp_block(0, 1), false).unwrap();
    // Refused without --force while the client is connected (tests/admin_api.rs).
    srv.cli(&["vdisk", "delete", "vd", "--force"]);
    assert!(matches!(
        c.read(0, 4096),
        Err(NbdErr::Errno(_)) | Err(NbdErr::Io(_))
    ));
    assert!(Client::connect(srv.nbd_port, "vd").is_err());
    srv.stop_and_check();
}

/// The agent must never read or write through an entry the controller has superseded: here
/// one connection keeps reading vdisk `a` while its only segment is trimmed and handed to
/// vdisk `b` (the pool has exactly one segment), over and over. A read of `a` may see its
/// own bytes or zeros, never `b`'s.
#[test]
fn reads_racing_a_free_and_reuse_never_see_the_new_owners_bytes() {
    // Every read holds the gate for 40 ms, so frees regularly race reads in flight.
    let mut srv = Server::start_env("1M", &[("TABULA_TEST_READ_DELAY_MS", "40")]);
    srv.cli(&["vdisk", "create", "a", "--size", "1M"]);
    srv.cli(&["vdisk", "create", "b", "--size", "1M"]);
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let port = srv.nbd_port;
    let (stop2, reads2) = (stop.clone(), reads.clone());
    let reader = std::thread::spawn(move || {
        let mut r = Client::connect(port, "a").unwrap();
        let mut x = 0x2545f4914f6cdd1du64;
        while !stop2.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % 240) * 4096;
            let data = r.read(off, 65536).unwrap();
            assert!(
                !data.contains(&0xbb),
                "read of vdisk a at {off} returned vdisk b's bytes after {} reads",
                reads2.load(Ordering::Relaxed)
            );
            reads2.fetch_add(1, Ordering::Relaxed);
        }
        r.disconnect();
    });
    let mut a = Client::connect(srv.nbd_port, "a").unwrap();
    let mut b = Client::connect(srv.nbd_port, "b").unwrap();
    let aa = vec![0xaau8; 1 << 20];
    let bb = vec![0xbbu8; 1 << 20];
    // At least 25 rounds and 50 reads, however fast or slow the machine is (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut rounds = 0;
    while (rounds < 25 || reads.load(Ordering::Relaxed) < 50)
        && std::time::Instant::now() < deadline
        && !reader.is_finished()
    {
        b.trim(0, 1 << 20).unwrap();
        a.write(0, &aa, false).unwrap();
        a.trim(0, 1 << 20).unwrap();
        b.write(0, &bb, false).unwrap();
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert!(reads.load(Ordering::Relaxed) >= 50, "the reader barely ran");
    a.disconnect();
    b.disconnect();
    srv.stop_and_check();
}

/// Deletes `vd` although a client is connected (a plain delete refuses that; the refusal is
/// `admin_api`'s to test).
fn delete_connected(srv: &Server, vd: &str) {
    srv.cli(&["vdisk", "delete", vd, "--force"]);
}

/// Issue 17: after a connected vdisk was deleted, its reads failed but FLUSH still answered
/// success, telling the host that writes to a vdisk that no longer exists were durable.
/// FLUSH and FUA writes must fail, and the log must say which request failed and why.
#[test]
fn a_flush_or_fua_write_to_a_deleted_vdisk_fails_and_is_logged() {
    const ESHUTDOWN: u32 = 108;
    let mut srv = Server::start("64M");
    srv.cli(&["vdisk", "create", "vd", "--size", "8M"]);
    srv.cli(&["vdisk", "create", "other", "--size", "8M"]);
    let mut c = Client::connect(srv.nbd_port, "vd").unwrap();
    let mut other = Client::connect(srv.nbd_port, "other").unwrap();
    c.write(0, &stamp_block(0, 1), false).unwrap();
    c.flush().unwrap();
    // Unflushed writes in the container, to this vdisk and to another one.
    c.write(4096, &stamp_block(1, 1), false).unwrap();
    other.write(0, &stamp_block(2, 1), false).unwrap();
    delete_connected(&srv, "vd");
    assert!(
        matches!(c.flush(), Err(NbdErr::Errno(ESHUTDOWN))),
        "a FLUSH of a deleted vdisk must fail"
    );
    assert!(
        matches!(
            c.write(8192, &stamp_block(3, 1), true),
            Err(NbdErr::Errno(ESHUTDOWN))
        ),
        "a FUA write to a deleted vdisk must fail"
    );
    // The other vdisk is unaffected.
    other.flush().unwrap();
    assert_eq!(other.read(0, 4096).unwrap(), stamp_block(2, 1));
    other.disconnect();
    let log = srv.log_text();
    let warned = |op: &str| {
        log.lines().any(|l| {
            l.contains("WARN")
                && l.contains("NBD request failed")
                && l.contains("export=vd")
                && l.contains(&format!("op=\"{op}\""))
                && l.contains("was deleted")
        })
    };
    assert!(
        warned("flush") && warned("write"),
        "each failed request must be logged at WARN with its cause:\n{log}"
    );
    srv.stop_and_check();
}
