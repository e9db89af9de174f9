//! Pool tests: placement across containers, pinning, container failure and recovery, live
//! drain and migration (with snapshots sharing the moved space), and removal.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use tabula_api::{ControlPlane, FaultOp};

use super::tests::{MIB, assert_consistent, fault, setup};
use super::*;

/// The container and physical byte offset of every mapped MiB of `name`, by virtual offset.
async fn placement(ctl: &Controller, name: &str) -> Vec<(u64, String, u64)> {
    let mut out = Vec::new();
    for e in ctl.map_view(name).await.unwrap().entries {
        let (Some(c), Some(p)) = (e.container, e.physical_offset) else {
            continue;
        };
        for i in (0..e.length).step_by(MIB as usize) {
            out.push((e.offset + i, c.clone(), p + i));
        }
    }
    out
}

/// Adds a new file container `dir/containers/NAME.img` (for a data directory, the one
/// place in it where containers may be).
async fn add_file(ctl: &Controller, dir: &Path, name: &str, size: u64) -> PathBuf {
    std::fs::create_dir_all(dir.join("containers")).unwrap();
    let path = dir.join("containers").join(format!("{name}.img"));
    ctl.add_container(name, path.to_str().unwrap(), Some(size))
        .await
        .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_space_goes_by_free_space_and_a_pinned_vdisk_stays_in_its_container() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 32 * MIB).await;
    add_file(&ctl, dir.path(), "big", 128 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    // A sequential stream: the first segment goes where most space is free, and the rest
    // follows it contiguously.
    for s in 0..4 {
        ctl.fault(fault(v.id, FaultOp::Write, s, s + 1))
            .await
            .unwrap();
    }
    let p = placement(&ctl, "vd").await;
    assert!(p.iter().all(|(_, c, _)| c == "big"), "{p:?}");
    let pinned = ctl
        .create_vdisk("pinned", 64 * MIB, None, None, Some("default"))
        .await
        .unwrap();
    for s in [0, 5, 9] {
        ctl.fault(fault(pinned.id, FaultOp::Write, s, s + 1))
            .await
            .unwrap();
    }
    let p = placement(&ctl, "pinned").await;
    assert_eq!(p.len(), 3);
    assert!(p.iter().all(|(_, c, _)| c == "default"), "{p:?}");
    // A pinned vdisk whose container is full gets ENOSPC although the pool has room.
    let e = ctl
        .fault(fault(pinned.id, FaultOp::Write, 0, 40))
        .await
        .unwrap_err();
    assert_eq!(e, ControlError::NoSpace);
    assert!(
        ctl.create_vdisk("x", MIB, None, None, Some("nope"))
            .await
            .is_err()
    );
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_space_is_reported_and_cleared_by_a_new_container() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 16 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    assert!(!ctl.status().await.low_space);
    ctl.fault(fault(v.id, FaultOp::Write, 0, 15)).await.unwrap();
    let st = ctl.status().await;
    assert!(st.low_space, "1 MiB of 16 free is under 10%");
    assert!(st.containers[0].low_space);
    add_file(&ctl, dir.path(), "more", 64 * MIB).await;
    assert!(!ctl.status().await.low_space);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_container_takes_no_new_space_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    let other = add_file(&ctl, dir.path(), "other", 32 * MIB).await;
    let id = ContainerId(ctl.container_by_name("other").await.unwrap().id);
    // An agent's report about a container the controller reaches: a path down from that
    // agent only.
    ctl.report_container("a", id, Some("connection reset".into()))
        .await
        .unwrap();
    let c = ctl.container_by_name("other").await.unwrap();
    assert_eq!(c.state, "ok");
    assert_eq!(c.unreachable_from, vec!["a: connection reset".to_string()]);
    ctl.report_container("a", id, None).await.unwrap();
    assert!(
        ctl.container_by_name("other")
            .await
            .unwrap()
            .unreachable_from
            .is_empty()
    );
    // Now the controller cannot read it either (truncated under it): failed.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&other)
        .unwrap();
    let mut label = vec![0u8; 4096];
    f.read_exact_at(&mut label, 0).unwrap();
    f.set_len(0).unwrap();
    ctl.report_container("a", id, Some("EIO".into()))
        .await
        .unwrap();
    let c = ctl.container_by_name("other").await.unwrap();
    assert_eq!(c.state, "failed", "{c:?}");
    assert!(c.error.unwrap().contains("EIO"));
    // Nothing new is allocated there while it is failed.
    let v = ctl
        .create_vdisk("vd", 8 * MIB, None, None, None)
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 0, 8)).await.unwrap();
    assert!(
        placement(&ctl, "vd")
            .await
            .iter()
            .all(|(_, c, _)| c == "default")
    );
    // It answers, but without its label (as if another device were at its path): it stays
    // failed, saying why.
    f.set_len(33 * MIB).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = ctl.container_by_name("other").await.unwrap();
        assert_eq!(c.state, "failed");
        if c.error
            .as_deref()
            .is_some_and(|e| e.contains("no tabula label"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{c:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It answers again, itself: the probe clears the state without any restart.
    f.write_all_at(&label, 0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ctl.container_by_name("other").await.unwrap().state != "ok" {
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_consistent(&ctl).await;
}

/// Waits for the move of `subject` to end, and checks it ended well.
async fn finished(ctl: &Controller, subject: &str) -> tabula_api::admin::MoveView {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = ctl
            .list_moves()
            .into_iter()
            .find(|m| m.subject == subject)
            .unwrap();
        if m.state != "running" {
            assert_eq!(m.state, "done", "{m:?}");
            return m;
        }
        assert!(Instant::now() < deadline, "move did not finish: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes a recognisable block at each mapped entry's physical place, by its virtual offset.
fn stamp(path: &Path, entries: &[(u64, String, u64)], container: &str) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for (off, c, phys) in entries {
        if c == container {
            f.write_all_at(&off.to_le_bytes().repeat(512), *phys)
                .unwrap();
        }
    }
}

fn read_stamp(dir: &Path, container: &str, phys: u64) -> u64 {
    let f = std::fs::File::open(dir.join(format!("containers/{container}.img"))).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, phys).unwrap();
    u64::from_le_bytes(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_every_table_that_maps_the_space_and_the_container_can_go() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 0, 6)).await.unwrap();
    let default = dir.path().join("containers/default.img");
    stamp(&default, &placement(&ctl, "vd").await, "default");
    ctl.create_snapshot("vd", "s1").await.unwrap();
    ctl.clone_vdisk("vd@s1", "cl", None).await.unwrap();
    add_file(&ctl, dir.path(), "b", 64 * MIB).await;
    let m = ctl.drain_container("default").await.unwrap();
    assert_eq!(m.total, 6 * MIB);
    let done = finished(&ctl, "default").await;
    assert_eq!(done.moved, 6 * MIB);
    // The vdisk, its snapshot and the clone all map the same moved data, read back from
    // its new place, and the space is still shared once (not copied three times).
    for name in ["vd", "vd@s1", "cl"] {
        let p = placement(&ctl, name).await;
        assert_eq!(p.len(), 6, "{name}: {p:?}");
        for (off, c, phys) in &p {
            assert_eq!(c, "b", "{name}");
            assert_eq!(read_stamp(dir.path(), "b", *phys), *off, "{name} at {off}");
        }
    }
    let st = ctl.status().await;
    assert_eq!(st.allocated, 6 * MIB);
    let d = ctl.container_by_name("default").await.unwrap();
    assert_eq!((d.state.as_str(), d.used), ("draining", 0));
    assert_consistent(&ctl).await;
    // Nothing new goes to a drained container.
    ctl.fault(fault(v.id, FaultOp::Write, 10, 12))
        .await
        .unwrap();
    assert!(placement(&ctl, "vd").await.iter().all(|(_, c, _)| c == "b"));
    ctl.remove_container("default").await.unwrap();
    assert_eq!(ctl.list_containers().await.len(), 1);
    assert_consistent(&ctl).await;
    // The removal is durable.
    drop(ctl);
    let ctl = Controller::open(ControllerConfig::new(dir.path()))
        .await
        .unwrap();
    assert_eq!(ctl.list_containers().await.len(), 1);
    assert_consistent(&ctl).await;
}

/// Issue 17: a drain step whose run's tables change during its copy (snapshots taken and
/// deleted) switches every table that maps the run at the end, rather than undoing the step:
/// with snapshots taken and deleted throughout every step's copy, the drain still finishes,
/// and the vdisk and every snapshot left, those taken during the drain included, map the
/// moved data (shared once), with the states they had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_switches_the_snapshots_taken_and_deleted_during_its_steps() {
    move_under_a_snapshot_loop(false).await;
}

/// The same for a migration (its steps are a drain's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_switches_the_snapshots_taken_and_deleted_during_its_steps() {
    move_under_a_snapshot_loop(true).await;
}

/// Drains `default` (or migrates `vd` out of it) into `b` while snapshots of `vd` are taken
/// and deleted throughout, every step's switch paused 100 ms.
async fn move_under_a_snapshot_loop(migrate: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ControllerConfig::new(dir.path());
    cfg.test_pauses.move_switch = Some(Duration::from_millis(100));
    let ctl = Controller::open(cfg).await.unwrap();
    ctl.ensure_default_container(64 * MIB).await.unwrap();
    ctl.register_agent("a", Arc::new(super::tests::NullAgent), Vec::new())
        .await
        .unwrap();
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 0, 6)).await.unwrap();
    let default = dir.path().join("containers/default.img");
    stamp(&default, &placement(&ctl, "vd").await, "default");
    add_file(&ctl, dir.path(), "b", 64 * MIB).await;
    let stop = Arc::new(AtomicBool::new(false));
    let snapper = {
        let (ctl, stop) = (ctl.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                ctl.create_snapshot("vd", &format!("s{n}")).await.unwrap();
                if n > 2 {
                    ctl.delete_snapshot(&format!("vd@s{}", n - 2))
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let done = if migrate {
        ctl.migrate_vdisk("vd", "b").await.unwrap();
        finished(&ctl, "vd").await
    } else {
        ctl.drain_container("default").await.unwrap();
        finished(&ctl, "default").await
    };
    stop.store(true, Ordering::Relaxed);
    let n = snapper.await.unwrap();
    assert_eq!(done.moved, 6 * MIB, "{done:?}");
    // Snapshots were taken all along (one step's copy takes over 100 ms).
    assert!(n >= 10, "only {n} snapshots");
    let meta = ctl.meta.lock().await;
    for x in meta.vdisks.values() {
        let want = if x.rec.read_only {
            State::NoWrite
        } else {
            State::New
        };
        for e in x.table.entries().filter(|e| e.target.is_some()) {
            assert_eq!(e.state, want, "{}: {e:?}", x.rec.name);
        }
    }
    drop(meta);
    for name in [
        "vd".to_string(),
        format!("vd@s{}", n - 1),
        format!("vd@s{n}"),
    ] {
        let p = placement(&ctl, &name).await;
        assert_eq!(p.len(), 6, "{name}: {p:?}");
        for (off, c, phys) in &p {
            assert_eq!(c, "b", "{name}");
            assert_eq!(read_stamp(dir.path(), "b", *phys), *off, "{name} at {off}");
        }
    }
    assert_eq!(ctl.status().await.allocated, 6 * MIB);
    assert_consistent(&ctl).await;
    ctl.remove_container("default").await.unwrap();
}

/// What a drain step switches when the tables mapping its run changed during its copy: a
/// copy-on-write (copy-out) that finished meanwhile left the vdisk the run's only owner
/// (`normal`) and moved the snapshot to the copy, and a clone taken meanwhile maps the run
/// `new`. The switch moves the vdisk and the clone, with those states, and leaves the
/// snapshot where the copy-on-write put it; writes to the run from either wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_step_switches_what_maps_its_run_after_a_copy_on_write_and_a_clone() {
    use tabula_api::admin::CowPolicy;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ControllerConfig::new(dir.path());
    cfg.test_pauses.move_switch = Some(Duration::from_millis(1000));
    let ctl = Controller::open(cfg).await.unwrap();
    ctl.ensure_default_container(64 * MIB).await.unwrap();
    ctl.register_agent("a", Arc::new(super::tests::NullAgent), Vec::new())
        .await
        .unwrap();
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, Some(CowPolicy::CopyOut), None)
        .await
        .unwrap();
    // Four segments: one step's run.
    ctl.fault(fault(v.id, FaultOp::Write, 0, 4)).await.unwrap();
    let default = dir.path().join("containers/default.img");
    let before = placement(&ctl, "vd").await;
    stamp(&default, &before, "default");
    ctl.create_snapshot("vd", "s1").await.unwrap();
    ctl.create_snapshot("vd", "s2").await.unwrap();
    let write = |op, s0, s1| Fault {
        state: State::New,
        ..fault(v.id, op, s0, s1)
    };
    // A copy-on-write of segment 0 starts before the drain; the test plays the agent's copy.
    let u = ctl.fault(write(FaultOp::Write, 0, 1)).await.unwrap();
    let c = u.copies[0].clone();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&default)
        .unwrap();
    let mut seg = vec![0u8; MIB as usize];
    f.read_exact_at(&mut seg, before[0].2).unwrap();
    f.write_all_at(&seg, c.to.block * BLOCK_SIZE).unwrap();
    add_file(&ctl, dir.path(), "b", 64 * MIB).await;
    ctl.drain_container("default").await.unwrap();
    // Inside the first step (its switch waits a second): the copy finishes, a clone is
    // taken, and writes to the run are told to wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    ctl.fault(Fault {
        copied: u.copies.clone(),
        ..write(FaultOp::Copied, 0, 1)
    })
    .await
    .unwrap();
    let cl = ctl.clone_vdisk("vd@s2", "cl", None).await.unwrap();
    for (id, s) in [(v.id, 0), (cl.id, 1)] {
        let e = ctl
            .fault(Fault {
                state: State::New,
                ..fault(id, FaultOp::Write, s, s + 1)
            })
            .await
            .unwrap_err();
        assert!(matches!(e, ControlError::Retry { .. }), "{e:?}");
    }
    let running = move_of(&ctl, "default");
    assert_eq!((running.state.as_str(), running.moved), ("running", 0));
    // The step switches at the end of its pause (undone, it would take another pause).
    let first = loop {
        let m = move_of(&ctl, "default");
        if m.moved > 0 || m.state != "running" {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(first.moved, 4 * MIB, "{first:?}");
    assert!(
        first.elapsed_ms < 1800,
        "the first step was undone: {first:?}"
    );
    finished(&ctl, "default").await;
    let state = |name: &'static str| {
        let ctl = ctl.clone();
        async move {
            let m = ctl.map_view(name).await.unwrap();
            // The state of each mapped MiB.
            m.entries
                .into_iter()
                .filter(|e| e.container.is_some())
                .flat_map(|e| std::iter::repeat_n(e.state, (e.length / MIB) as usize))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(state("vd").await, ["normal", "new", "new", "new"]);
    assert_eq!(state("cl").await, ["new"; 4]);
    for name in ["vd@s1", "vd@s2"] {
        assert_eq!(state(name).await, ["no-write"; 4], "{name}");
    }
    for name in ["vd", "vd@s1", "vd@s2", "cl"] {
        let p = placement(&ctl, name).await;
        assert_eq!(p.len(), 4, "{name}: {p:?}");
        for (off, c, phys) in &p {
            assert_eq!(c, "b", "{name}");
            assert_eq!(read_stamp(dir.path(), "b", *phys), *off, "{name} at {off}");
        }
    }
    // The snapshots and the clone share segment 0's copy; segments 1-3 are shared by all.
    assert_eq!(ctl.status().await.allocated, 5 * MIB);
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_a_vdisk_and_pins_it() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 0, 4)).await.unwrap();
    stamp(
        &dir.path().join("containers/default.img"),
        &placement(&ctl, "vd").await,
        "default",
    );
    add_file(&ctl, dir.path(), "fast", 32 * MIB).await;
    // Not a container that cannot take space; not a container that is not there.
    assert!(ctl.migrate_vdisk("vd", "nope").await.is_err());
    ctl.migrate_vdisk("vd", "fast").await.unwrap();
    finished(&ctl, "vd").await;
    let p = placement(&ctl, "vd").await;
    assert_eq!(p.len(), 4);
    for (off, c, phys) in &p {
        assert_eq!(c, "fast");
        assert_eq!(read_stamp(dir.path(), "fast", *phys), *off);
    }
    // Pinned: new space comes from "fast" although "default" has more room.
    ctl.fault(fault(v.id, FaultOp::Write, 8, 9)).await.unwrap();
    assert!(
        placement(&ctl, "vd")
            .await
            .iter()
            .all(|(_, c, _)| c == "fast")
    );
    // A container a vdisk is pinned to cannot be drained or removed.
    assert!(ctl.drain_container("fast").await.is_err());
    assert!(ctl.remove_container("fast").await.is_err());
    assert_consistent(&ctl).await;
}

/// The move of `subject`, as `list_moves` shows it now.
fn move_of(ctl: &Controller, subject: &str) -> tabula_api::admin::MoveView {
    ctl.list_moves()
        .into_iter()
        .find(|m| m.subject == subject)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_moves_nothing_during_the_restart_grace() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 0, 4)).await.unwrap();
    add_file(&ctl, dir.path(), "b", 64 * MIB).await;
    drop(ctl);
    // Agents from before the restart may still write without having registered again:
    // they would miss the no-write state, so nothing moves until the grace is over.
    let ctl = Controller::open(super::tests::leased(dir.path(), 600, true))
        .await
        .unwrap();
    let grace_ends = ctl.grace_until;
    ctl.drain_container("default").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(Instant::now() < grace_ends, "the test machine was too slow");
    assert_eq!(move_of(&ctl, "default").moved, 0);
    let done = finished(&ctl, "default").await;
    assert_eq!(done.moved, 4 * MIB);
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_moves_snapshots_of_a_vdisk_stored_without_a_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 0, 3)).await.unwrap();
    // As a store from schema 1 loads it: no lineage recorded. A snapshot taken since
    // records the vdisk's id as its lineage.
    ctl.meta
        .lock()
        .await
        .vdisks
        .get_mut(&VdiskId(v.id))
        .unwrap()
        .rec
        .lineage = 0;
    ctl.create_snapshot("vd", "s1").await.unwrap();
    stamp(
        &dir.path().join("containers/default.img"),
        &placement(&ctl, "vd").await,
        "default",
    );
    add_file(&ctl, dir.path(), "b", 64 * MIB).await;
    ctl.drain_container("default").await.unwrap();
    finished(&ctl, "default").await;
    for name in ["vd", "vd@s1"] {
        let p = placement(&ctl, name).await;
        assert_eq!(p.len(), 3, "{name}: {p:?}");
        for (off, c, phys) in &p {
            assert_eq!(c, "b", "{name}");
            assert_eq!(read_stamp(dir.path(), "b", *phys), *off, "{name} at {off}");
        }
    }
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_stops_rather_than_free_space_a_table_outside_the_lineage_maps() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 0, 1)).await.unwrap();
    let before = placement(&ctl, "vd").await;
    // A reference no table of the lineage accounts for (what a foreign mapper adds).
    {
        let mut meta = ctl.meta.lock().await;
        let t = meta.vdisks[&VdiskId(v.id)].table.entries().next().unwrap();
        meta.shared.share(t.target.unwrap(), t.len());
    }
    add_file(&ctl, dir.path(), "b", 64 * MIB).await;
    ctl.drain_container("default").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = move_of(&ctl, "default");
        if m.state != "running" {
            break m;
        }
        assert!(Instant::now() < deadline, "{m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(m.state, "failed", "{m:?}");
    assert!(m.error.unwrap().contains("tabula check"));
    // Nothing switched, and the space copied into went back to the pool.
    assert_eq!(placement(&ctl, "vd").await, before);
    let b = ctl.container_by_name("b").await.unwrap();
    assert_eq!(b.used, 0);
}

/// A first start killed between creating the default container's file and committing it
/// leaves a file the store does not know; the next start must not refuse to run (the user
/// of `tabula serve` gives no `--size` to omit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_container_file_left_by_a_first_start_is_taken_at_the_next() {
    // A file taken as it is gives up its first MiB to the label area; one created afresh
    // gets it on top of the size asked for.
    for (left, expect) in [(8 * MIB, 7 * MIB), (0, 64 * MIB)] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("containers")).unwrap();
        let f = std::fs::File::create(dir.path().join("containers/default.img")).unwrap();
        // Sized (taken as it is), or never sized (created afresh with the size asked for).
        f.set_len(left).unwrap();
        drop(f);
        let ctl = setup(dir.path(), 64 * MIB).await;
        assert_eq!(ctl.status().await.capacity, expect, "left {left} bytes");
        let v = ctl
            .create_vdisk("vd", 4 * MIB, None, None, None)
            .await
            .unwrap();
        ctl.fault(fault(v.id, FaultOp::Write, 0, 4)).await.unwrap();
        assert_consistent(&ctl).await;
    }
}

// ---- container identity (issue 17, finding 1) ----

/// The error of adding `location` as container `name`.
async fn add_fails(
    ctl: &Controller,
    name: &str,
    location: &str,
    size: Option<u64>,
) -> ControlError {
    match ctl.add_container(name, location, size).await {
        Ok(v) => panic!("{location} was accepted as container {name}: {v:?}"),
        Err(e) => e,
    }
}

/// One file reached by another spelling (`..`), a symlink or a hard link is the same
/// container: adding it again is refused, naming the container it already is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_path_to_a_container_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 8 * MIB).await;
    let data = dir.path().canonicalize().unwrap();
    let dotdot = data.join("containers/../containers/default.img");
    let link = data.join("link.img");
    std::os::unix::fs::symlink(data.join("containers/default.img"), &link).unwrap();
    let other = tempfile::tempdir().unwrap();
    let hard = other.path().join("hard.img");
    std::fs::hard_link(data.join("containers/default.img"), &hard).unwrap();
    let outside_link = other.path().join("sym.img");
    std::os::unix::fs::symlink(data.join("containers/default.img"), &outside_link).unwrap();
    for p in [&dotdot, &outside_link, &hard] {
        let e = add_fails(&ctl, "dup", p.to_str().unwrap(), None).await;
        assert!(
            matches!(&e, ControlError::Exists(m) if m.contains("'default'")),
            "{}: {e:?}",
            p.display()
        );
    }
    // A file container of its own elsewhere is fine, and is then refused by another path.
    let c2 = add_file(&ctl, other.path(), "c2", 4 * MIB).await;
    let again = other.path().join("containers/./c2.img");
    let e = add_fails(&ctl, "c2b", again.to_str().unwrap(), None).await;
    assert!(
        matches!(&e, ControlError::Exists(m) if m.contains("'c2'")),
        "{e:?}"
    );
    assert!(c2.exists());
    assert_eq!(ctl.list_containers().await.len(), 2);
    assert_consistent(&ctl).await;
}

/// The data directory holds the controller's metadata: nothing there may become a
/// container except files in its `containers/` folder (where the default container lives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_inside_the_data_dir_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 8 * MIB).await;
    let data = dir.path();
    for (p, size) in [
        (data.join("tabula.wal"), None),
        (data.join("tabula.redb"), None),
        (data.join("new.img"), Some(4 * MIB)),
        (data.join("containers/../tabula.wal"), None),
    ] {
        let e = add_fails(&ctl, "meta", p.to_str().unwrap(), size).await;
        assert!(
            matches!(&e, ControlError::Invalid(m) if m.contains("data directory")),
            "{}: {e:?}",
            p.display()
        );
    }
    assert!(!data.join("new.img").exists());
    // A hard link to the metadata log elsewhere is the log all the same.
    let other = tempfile::tempdir().unwrap();
    let hard = other.path().join("wal.img");
    std::fs::hard_link(data.join("tabula.wal"), &hard).unwrap();
    let e = add_fails(&ctl, "meta", hard.to_str().unwrap(), None).await;
    assert!(
        matches!(&e, ControlError::Invalid(m) if m.contains("metadata")),
        "{e:?}"
    );
    // A new file next to the default container is allowed.
    add_file(&ctl, data, "extra", 4 * MIB).await;
    assert_consistent(&ctl).await;
}

/// A container carries a label naming its pool and itself: a copy of it (as another host
/// sees the same device) is refused as a member of this pool, and another pool refuses it
/// naming the pool it belongs to, until it is removed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_is_refused_by_a_second_pool_until_removed_from_the_first() {
    let (da, db, shared) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = setup(da.path(), 8 * MIB).await;
    let b = setup(db.path(), 8 * MIB).await;
    let path = add_file(&a, shared.path(), "c", 4 * MIB).await;
    // Another host's view of the same device: same bytes, another inode.
    let copy = shared.path().join("copy.img");
    std::fs::copy(&path, &copy).unwrap();
    let e = add_fails(&a, "c2", copy.to_str().unwrap(), None).await;
    assert!(
        matches!(&e, ControlError::Exists(m) if m.contains("already in this pool as 'c'")),
        "{e:?}"
    );
    let e = add_fails(&b, "c", path.to_str().unwrap(), None).await;
    let pool_a = format!("{:016x}", a.pool_id());
    assert!(
        matches!(&e, ControlError::Exists(m) if m.contains(&pool_a) && m.contains("wipe")),
        "{e:?}"
    );
    assert_eq!(b.list_containers().await.len(), 1);
    // Removing it wipes the label: then the other pool may take it.
    a.remove_container("c").await.unwrap();
    b.add_container("c", path.to_str().unwrap(), None)
        .await
        .unwrap();
    assert_consistent(&a).await;
    assert_consistent(&b).await;
}

/// `check` reads every container's label: a label overwritten by another container's (a
/// device swapped under its path) or wiped is an error naming the container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_wrong_or_missing_label() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 8 * MIB).await;
    let other = tempfile::tempdir().unwrap();
    let c2 = add_file(&ctl, other.path(), "c2", 4 * MIB).await;
    let c = ctl.check().await.unwrap();
    assert!(c.ok, "{:?}", c.problems);
    assert_eq!(c.labels, 2, "{c:?}");
    let mut saved = vec![0u8; 4096];
    std::fs::File::open(&c2)
        .unwrap()
        .read_exact_at(&mut saved, 0)
        .unwrap();
    // Swap: c2 now carries the default container's label.
    let mut label = vec![0u8; 4096];
    let default = std::fs::File::open(dir.path().join("containers/default.img")).unwrap();
    default.read_exact_at(&mut label, 0).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&c2).unwrap();
    f.write_all_at(&label, 0).unwrap();
    let c = ctl.check().await.unwrap();
    assert!(!c.ok);
    assert!(
        c.problems
            .iter()
            .any(|p| p.contains("c2") && p.contains("label")),
        "{:?}",
        c.problems
    );
    // Wiped.
    f.write_all_at(&[0u8; 4096], 0).unwrap();
    let c = ctl.check().await.unwrap();
    assert!(
        c.problems
            .iter()
            .any(|p| p.contains("c2") && p.contains("label")),
        "{:?}",
        c.problems
    );
    // Its own label back: clean again.
    f.write_all_at(&saved, 0).unwrap();
    let c = ctl.check().await.unwrap();
    assert!(c.ok, "{:?}", c.problems);
}

/// A failed add leaves nothing behind (a retry is not told the file exists), and bad
/// paths are refused as bad input, not as a server error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_add_leaves_nothing_and_bad_paths_are_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 8 * MIB).await;
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(other.path().join("containers")).unwrap();
    let path = other.path().join("containers/big.img");
    for size in [
        1 << 63,
        (1 << 50) / 4096 * 4096 * 1024,
        u64::MAX / 4096 * 4096,
    ] {
        let e = add_fails(&ctl, "big", path.to_str().unwrap(), Some(size)).await;
        assert!(!matches!(e, ControlError::Storage(_)), "{size}: {e:?}");
        assert!(
            !path.exists(),
            "a failed add of {size} bytes left {}",
            path.display()
        );
    }
    add_file(&ctl, other.path(), "big", 4 * MIB).await;
    let nul = format!("{}/a\0b.img", other.path().display());
    let long = format!("{}/{}", other.path().display(), "x/".repeat(6000));
    let long_name = format!("{}/{}.img", other.path().display(), "y".repeat(300));
    let missing = format!("{}/missing.img", other.path().display());
    let folder = other.path().display().to_string();
    for p in [missing, folder] {
        let e = add_fails(&ctl, "bad", &p, None).await;
        assert!(matches!(e, ControlError::Invalid(_)), "{p}: {e:?}");
    }
    for p in [nul, long, long_name] {
        let e = add_fails(&ctl, "bad", &p, Some(4 * MIB)).await;
        assert!(
            matches!(e, ControlError::Invalid(_)),
            "{}: {e:?}",
            &p[..80.min(p.len())]
        );
    }
    assert_consistent(&ctl).await;
}
