// Resource limits seen from outside (issue 17): what one NBD client can make the server
// hold, and how many exports a client can list.

mod common;

use std::time::Duration;

use common::Server;
use common::nbd::{Client, stamp_block};

/// Resident memory of a process, in bytes (VmRSS of /proc/PID/status).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// Issue 17, finding 4: one 4 KiB write at the last offset of the largest vdisk `create`
/// allows (4096P, 2^42 segments of 1 MiB) and of a 16P vdisk of 4 KiB segments (2^42 too)
/// cost the agent 128 MiB of resident memory each, held until the vdisk was deleted: its
/// table copy had a top-level pointer for every 2^18 segments of size. Memory must follow
/// what is mapped: the write costs less than 1 MiB.
#[test]
fn one_write_at_the_end_of_the_largest_vdisk_costs_little_memory() {
    let mut srv = Server::start("1G");
    let pid = srv.child.as_ref().unwrap().id();
    for (name, size, seg) in [("huge", "4096P", "1M"), ("fine", "16P", "4K")] {
        srv.cli(&[
            "vdisk",
            "create",
            name,
            "--size",
            size,
            "--segment-size",
            seg,
        ]);
        let mut c = Client::connect(srv.nbd_port, name).unwrap();
        let last = c.size - 4096;
        // Warm up everything a first write needs (attach, fault, allocation, journal) in
        // the first and a middle segment, so the measurement sees only the far write.
        c.write(0, &stamp_block(0, 1), true).unwrap();
        c.write(1 << 30, &stamp_block(1, 1), true).unwrap();
        c.flush().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let before = rss(pid);
        c.write(last, &stamp_block(2, 1), true).unwrap();
        c.flush().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let after = rss(pid);
        let grown = after.saturating_sub(before);
        eprintln!("{name} ({size}, {seg} segments): RSS {before} -> {after} (+{grown} bytes)");
        assert!(
            grown < 1 << 20,
            "{name}: one 4 KiB write at offset {last} grew the server's RSS by {grown} bytes"
        );
        assert_eq!(c.read(last, 4096).unwrap(), stamp_block(2, 1));
        assert_eq!(c.read(0, 4096).unwrap(), stamp_block(0, 1));
        c.disconnect();
    }
    srv.stop_and_check();
}
