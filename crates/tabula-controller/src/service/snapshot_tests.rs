//! Controller tests of snapshots, clones and the two phases of copy-on-write, driven by
//! faults as an agent would send them, with the invariant check after every step.

use std::sync::Arc;

use tabula_api::admin::CowPolicy;
use tabula_api::{ControlPlane, Fault, FaultOp, RangeUpdate};
use tabula_core::{Generation, State, VdiskId};

use super::*;

use super::tests::{MIB, NullAgent, assert_consistent};

async fn setup(dir: &Path) -> Arc<Controller> {
    super::tests::setup(dir, 64 * MIB).await
}

fn fault(vdisk: u64, op: FaultOp, s0: u64, s1: u64) -> Fault {
    Fault {
        agent: "a".into(),
        vdisk: VdiskId(vdisk),
        op,
        segments: (s0, s1),
        state: State::New,
        generation: Generation(0),
        copied: Vec::new(),
    }
}

/// Reports the copies an answer asked for as done.
fn copied(vdisk: u64, u: &RangeUpdate) -> Fault {
    let first = u.copies.iter().map(|c| c.segment).min().unwrap();
    let last = u.copies.iter().map(|c| c.segment).max().unwrap();
    Fault {
        copied: u.copies.clone(),
        ..fault(vdisk, FaultOp::Copied, first, last + 1)
    }
}

/// The mapping of one block: its target and state.
async fn entry_at(ctl: &Controller, name: &str, block: u64) -> tabula_core::Piece {
    let meta = ctl.meta.lock().await;
    let id = meta.by_name(name).unwrap();
    meta.vdisks[&id].table.lookup(block, block + 1)[0]
}

/// A vdisk with segments 0..4 written, and a snapshot of it.
async fn snapshotted(ctl: &Controller, cow: CowPolicy) -> u64 {
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, Some(cow), None)
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 0, 4)).await.unwrap();
    let s = ctl.create_snapshot("vd", "s1").await.unwrap();
    assert_eq!(s.unique, 0, "everything is shared right after a snapshot");
    assert_eq!(entry_at(ctl, "vd", 0).await.state, State::New);
    assert_eq!(entry_at(ctl, "vd@s1", 0).await.state, State::NoWrite);
    assert_consistent(ctl).await;
    v.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_copies_then_switches_the_vdisk() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path()).await;
    let id = snapshotted(&ctl, CowPolicy::Redirect).await;
    let old = entry_at(&ctl, "vd", 0).await.target.unwrap();
    let u = ctl.fault(fault(id, FaultOp::Write, 1, 2)).await.unwrap();
    assert_eq!(u.copies.len(), 1, "a shared segment is copied first");
    let c = &u.copies[0];
    assert_eq!(c.segment, 1);
    assert_eq!(c.from[0].target.unwrap(), old.offset(256));
    // Phase 1 changed no table: the reservation is owned by `cow`.
    assert_eq!(
        entry_at(&ctl, "vd", 256).await.target,
        Some(old.offset(256))
    );
    assert_consistent(&ctl).await;
    // The same fault again (a lost answer) gets the same copy, not a second reservation.
    let again = ctl.fault(fault(id, FaultOp::Write, 1, 2)).await.unwrap();
    assert_eq!(again.copies, u.copies);
    let done = ctl.fault(copied(id, &u)).await.unwrap();
    assert!(done.copies.is_empty());
    let e = entry_at(&ctl, "vd", 256).await;
    assert_eq!((e.target, e.state), (Some(c.to), State::Normal));
    assert_eq!(c.from[0].begin, 256);
    assert_eq!(
        entry_at(&ctl, "vd@s1", 256).await.target,
        Some(old.offset(256)),
        "the snapshot keeps the original"
    );
    let snaps = ctl.list_snapshots(Some("vd")).await.unwrap();
    assert_eq!(
        snaps[0].unique, MIB,
        "one segment is now the snapshot's alone"
    );
    let d = ctl.diff("vd@s1", "vd").await.unwrap();
    assert_eq!(d.changed, MIB);
    assert_eq!(d.ranges[0].offset, MIB);
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_out_moves_every_sharer_and_keeps_the_vdisk_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path()).await;
    let id = snapshotted(&ctl, CowPolicy::CopyOut).await;
    ctl.create_snapshot("vd", "s2").await.unwrap();
    ctl.clone_vdisk("vd@s2", "cl", None).await.unwrap();
    let old = entry_at(&ctl, "vd", 0).await.target.unwrap();
    let u = ctl.fault(fault(id, FaultOp::Write, 0, 1)).await.unwrap();
    let to = u.copies[0].to;
    ctl.fault(copied(id, &u)).await.unwrap();
    let e = entry_at(&ctl, "vd", 0).await;
    assert_eq!((e.target, e.state), (Some(old), State::Normal));
    for (name, state) in [
        ("vd@s1", State::NoWrite),
        ("vd@s2", State::NoWrite),
        ("cl", State::New),
    ] {
        let e = entry_at(&ctl, name, 0).await;
        assert_eq!((e.target, e.state), (Some(to), state), "{name}");
    }
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_is_dropped_and_its_space_freed() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path()).await;
    let id = snapshotted(&ctl, CowPolicy::Redirect).await;
    let free = ctl.status().await.free;
    let u = ctl.fault(fault(id, FaultOp::Write, 2, 3)).await.unwrap();
    assert_eq!(ctl.status().await.free, free - MIB);
    // The segment is trimmed while the agent copies: the copy no longer matters.
    ctl.fault(fault(id, FaultOp::Trim, 2, 3)).await.unwrap();
    let done = ctl.fault(copied(id, &u)).await.unwrap();
    assert!(done.entries.is_empty(), "{done:?}");
    assert_eq!(ctl.status().await.free, free, "the reservation is freed");
    assert_consistent(&ctl).await;
}

/// The switch waits for its commit without the metadata lock (so that concurrent copies
/// share commits); a table it changed may be deleted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharer_deleted_while_a_switch_waits_for_its_commit_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ControllerConfig::new(dir.path());
    cfg.test_pauses.cow_commit = Some(Duration::from_millis(300));
    let ctl = Controller::open(cfg).await.unwrap();
    ctl.ensure_default_container(64 * MIB).await.unwrap();
    ctl.register_agent("a", Arc::new(NullAgent), Vec::new())
        .await
        .unwrap();
    let id = snapshotted(&ctl, CowPolicy::CopyOut).await;
    let free = ctl.status().await.free;
    let u = ctl.fault(fault(id, FaultOp::Write, 0, 1)).await.unwrap();
    let switch = {
        let ctl = ctl.clone();
        let f = copied(id, &u);
        tokio::spawn(async move { ctl.fault(f).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !switch.is_finished(),
        "the switch is waiting for its commit"
    );
    // Copy-out moved the snapshot to the copy; deleting the snapshot now frees the copy.
    ctl.delete_snapshot("vd@s1").await.unwrap();
    let done = switch.await.unwrap().unwrap();
    let e = entry_at(&ctl, "vd", 0).await;
    assert_eq!(e.state, State::Normal);
    assert_eq!(done.entries[0].target, e.target);
    assert_eq!(
        ctl.status().await.free,
        free,
        "the copy the snapshot moved to went with it; the vdisk still maps the rest"
    );
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unshared_new_segments_become_writable_without_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path()).await;
    let id = snapshotted(&ctl, CowPolicy::Redirect).await;
    let old = entry_at(&ctl, "vd", 0).await.target.unwrap();
    ctl.delete_snapshot("vd@s1").await.unwrap();
    let u = ctl.fault(fault(id, FaultOp::Write, 0, 1)).await.unwrap();
    assert!(u.copies.is_empty());
    let e = entry_at(&ctl, "vd", 0).await;
    assert_eq!((e.target, e.state), (Some(old), State::Normal));
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_left_by_a_crash_is_freed_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path()).await;
    let id = snapshotted(&ctl, CowPolicy::Redirect).await;
    let free = ctl.status().await.free;
    let u = ctl.fault(fault(id, FaultOp::Write, 3, 4)).await.unwrap();
    assert_eq!(u.copies.len(), 1);
    drop(ctl);
    let ctl = Controller::open(ControllerConfig::new(dir.path()))
        .await
        .unwrap();
    assert_eq!(ctl.status().await.free, free);
    assert_consistent(&ctl).await;
    // The write starts over and completes.
    ctl.register_agent("a", Arc::new(NullAgent), Vec::new())
        .await
        .unwrap();
    let u = ctl.fault(fault(id, FaultOp::Write, 3, 4)).await.unwrap();
    ctl.fault(copied(id, &u)).await.unwrap();
    assert_eq!(entry_at(&ctl, "vd", 768).await.state, State::Normal);
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_clones_survive_a_restart_with_their_sharing() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path()).await;
    let start = ctl.status().await.free;
    let id = snapshotted(&ctl, CowPolicy::Redirect).await;
    ctl.clone_vdisk("vd@s1", "cl", Some(CowPolicy::CopyOut))
        .await
        .unwrap();
    let u = ctl.fault(fault(id, FaultOp::Write, 0, 1)).await.unwrap();
    ctl.fault(copied(id, &u)).await.unwrap();
    drop(ctl);
    let ctl = setup(dir.path()).await;
    assert_consistent(&ctl).await;
    let v = ctl.vdisk_by_name("cl").await.unwrap();
    assert_eq!(
        (v.cow, v.origin.as_deref()),
        (CowPolicy::CopyOut, Some("vd@s1"))
    );
    assert_eq!(v.shared, 4 * MIB);
    // Deleting the vdisk first (with its snapshot), then the clone, frees everything.
    ctl.delete_vdisk("vd", true).await.unwrap();
    assert_consistent(&ctl).await;
    assert_eq!(ctl.vdisk_by_name("cl").await.unwrap().shared, 0);
    ctl.delete_vdisk("cl", false).await.unwrap();
    assert_consistent(&ctl).await;
    assert_eq!(ctl.status().await.free, start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_refuse_writes_and_vdisks_with_snapshots_refuse_plain_delete() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path()).await;
    snapshotted(&ctl, CowPolicy::Redirect).await;
    let sid = ctl.vdisk_by_name("vd@s1").await.unwrap().id;
    let e = ctl
        .fault(fault(sid, FaultOp::Write, 0, 1))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("read-only snapshot"), "{e}");
    let e = ctl.delete_vdisk("vd", false).await.unwrap_err();
    assert!(e.to_string().contains("--with-snapshots"), "{e}");
    let e = ctl.clone_vdisk("vd", "x", None).await.unwrap_err();
    assert!(e.to_string().contains("clone a snapshot"), "{e}");
    let e = ctl.create_snapshot("vd", "s1").await.unwrap_err();
    assert!(matches!(e, ControlError::Exists(_)), "{e}");
    let other = ctl
        .create_vdisk("other", MIB, None, None, None)
        .await
        .unwrap();
    let e = ctl.diff("vd@s1", &other.name).await.unwrap_err();
    assert!(e.to_string().contains("lineage"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_mapped_segment_keeps_its_mapped_part_when_written() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path()).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 3, 4)).await.unwrap();
    let head = entry_at(&ctl, "vd", 768).await.target;
    // Shrinking into segment 3 and growing back leaves its tail unmapped.
    ctl.resize_vdisk("vd", 3 * MIB + MIB / 2).await.unwrap();
    ctl.resize_vdisk("vd", 16 * MIB).await.unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 3, 4)).await.unwrap();
    assert_eq!(
        entry_at(&ctl, "vd", 768).await.target,
        head,
        "the mapped half stays"
    );
    let tail = entry_at(&ctl, "vd", 1023).await;
    assert!(tail.target.is_some() && tail.state == State::Normal);
    assert_consistent(&ctl).await;
    assert_eq!(ctl.vdisk_by_name("vd").await.unwrap().allocated, MIB);
}
