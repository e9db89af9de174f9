//! Controller tests: allocation, concurrency, freeing, persistence, and the invariant check
//! after every scenario.

use std::sync::Arc;

use tabula_api::{AgentPort, Command, ControlError, ControlPlane, Fault, FaultOp};
use tabula_core::{Generation, State, VdiskId};

use super::*;

pub(super) const MIB: u64 = 1 << 20;

pub(super) struct NullAgent;

#[async_trait::async_trait]
impl AgentPort for NullAgent {
    async fn apply(&self, _command: Command) -> Result<(), String> {
        Ok(())
    }
}

pub(super) async fn setup(dir: &Path, container: u64) -> Arc<Controller> {
    let ctl = Controller::open(ControllerConfig::new(dir)).await.unwrap();
    ctl.ensure_default_container(container).await.unwrap();
    ctl.register_agent("a", Arc::new(NullAgent), Vec::new())
        .await
        .unwrap();
    ctl
}

/// An agent that never acknowledges (it is paused, or cut off).
struct SilentAgent;

#[async_trait::async_trait]
impl AgentPort for SilentAgent {
    async fn apply(&self, _command: Command) -> Result<(), String> {
        std::future::pending().await
    }
}

pub(super) fn leased(dir: &Path, lease_ms: u64, grace: bool) -> ControllerConfig {
    let mut cfg = ControllerConfig::new(dir);
    cfg.lease = Duration::from_millis(lease_ms);
    cfg.restart_grace = grace;
    cfg
}

/// A controller with leases, in-process agent "a" and a 16 MiB vdisk.
async fn leased_setup(dir: &Path, lease_ms: u64) -> (Arc<Controller>, VdiskView) {
    let ctl = Controller::open(leased(dir, lease_ms, false))
        .await
        .unwrap();
    ctl.ensure_default_container(64 * MIB).await.unwrap();
    ctl.register_agent("a", Arc::new(NullAgent), Vec::new())
        .await
        .unwrap();
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    (ctl, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_waits_until_a_silent_holder_lease_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let (ctl, v) = leased_setup(dir.path(), 300).await;
    ctl.agents
        .register(
            "b",
            Arc::new(SilentAgent),
            vec![VdiskId(v.id)],
            Some(Duration::from_millis(300)),
            "192.0.2.1:5000",
        )
        .unwrap();
    let t = std::time::Instant::now();
    ctl.fault(fault(v.id, FaultOp::Write, 0, 1)).await.unwrap();
    // b may read the segment as unallocated until it acknowledges or stops: the answer to a
    // waits for one or the other.
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let agents = ctl.status().await.agents;
    assert!(agents.iter().all(|a| a.name != "b"), "b must be evicted");
    // Once evicted, b is not waited for again.
    let t = std::time::Instant::now();
    ctl.fault(fault(v.id, FaultOp::Write, 4, 5)).await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(300));
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewing_agent_is_waited_for_and_freed_space_follows_its_ack() {
    let dir = tempfile::tempdir().unwrap();
    let (ctl, v) = leased_setup(dir.path(), 300).await;
    ctl.fault(fault(v.id, FaultOp::Write, 0, 2)).await.unwrap();
    let session = ctl
        .agents
        .register(
            "b",
            Arc::new(SilentAgent),
            vec![VdiskId(v.id)],
            Some(Duration::from_millis(300)),
            "192.0.2.1:5000",
        )
        .unwrap();
    // b keeps renewing for a second without acknowledging: the trim must not free the
    // space while b's lease is alive.
    let renewer = {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                ctl.agents.renew("b", session, Default::default());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let t = std::time::Instant::now();
    ctl.fault(fault(v.id, FaultOp::Trim, 0, 2)).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(1000),
        "freed while the holder's lease was alive: {:?}",
        t.elapsed()
    );
    renewer.await.unwrap();
    let st = ctl.status().await;
    assert_eq!(st.allocated, 0);
    assert_eq!(st.zeroing, 0);
    assert_consistent(&ctl).await;
}

/// A snapshot or rollback asked for right after a start (a restart, or a standby taking
/// over) waits out the restart grace: an agent of the previous run may still write in place
/// under its old lease without having registered, so it cannot be held, and the snapshot
/// would share blocks it is still writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_right_after_a_start_waits_out_the_restart_grace() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ctl = Controller::open(leased(dir.path(), 400, true))
            .await
            .unwrap();
        ctl.ensure_default_container(64 * MIB).await.unwrap();
        let v = ctl
            .create_vdisk("vd", 16 * MIB, None, None, None)
            .await
            .unwrap();
        ctl.fault(fault(v.id, FaultOp::Write, 0, 2)).await.unwrap();
    }
    let started = std::time::Instant::now();
    let ctl = Controller::open(leased(dir.path(), 400, true))
        .await
        .unwrap();
    ctl.create_snapshot("vd", "s").await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the snapshot was taken {:?} after the start, inside the 400 ms grace",
        started.elapsed()
    );
    ctl.rollback("vd", "s").await.unwrap();
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_freed_space_waits_out_one_lease() {
    let dir = tempfile::tempdir().unwrap();
    let v = {
        let ctl = Controller::open(leased(dir.path(), 400, true))
            .await
            .unwrap();
        ctl.ensure_default_container(64 * MIB).await.unwrap();
        ctl.register_agent("a", Arc::new(NullAgent), Vec::new())
            .await
            .unwrap();
        let v = ctl
            .create_vdisk("vd", 16 * MIB, None, None, None)
            .await
            .unwrap();
        ctl.fault(fault(v.id, FaultOp::Write, 0, 2)).await.unwrap();
        v
    };
    // Agents of the previous run may still use the table: a free right after the restart
    // stays in zeroing until the grace is over.
    let ctl = Controller::open(leased(dir.path(), 400, true))
        .await
        .unwrap();
    ctl.register_agent("a", Arc::new(NullAgent), Vec::new())
        .await
        .unwrap();
    ctl.start_background();
    ctl.fault(fault(v.id, FaultOp::Trim, 0, 2)).await.unwrap();
    let st = ctl.status().await;
    assert_eq!(st.zeroing, 2 * MIB, "freed space must wait for the grace");
    assert_eq!(st.free, 62 * MIB);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let st = ctl.status().await;
    assert_eq!(st.zeroing, 0);
    assert_eq!(st.free, 64 * MIB);
    assert_consistent(&ctl).await;
}

pub(super) fn fault(vdisk: u64, op: FaultOp, s0: u64, s1: u64) -> Fault {
    Fault {
        agent: "a".into(),
        vdisk: VdiskId(vdisk),
        op,
        segments: (s0, s1),
        state: State::Zero,
        generation: Generation(0),
        copied: Vec::new(),
    }
}

pub(super) async fn assert_consistent(ctl: &Controller) {
    let c = ctl.check().await.unwrap();
    assert!(c.ok, "invariants violated: {:#?}", c.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_fault_allocates_whole_segment_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    let u = ctl.fault(fault(v.id, FaultOp::Write, 3, 4)).await.unwrap();
    assert_eq!(u.entries.len(), 1);
    assert_eq!(u.entries[0].len() * BLOCK_SIZE, MIB);
    assert_eq!(ctl.status().await.allocated, MIB);
    assert_consistent(&ctl).await;
    drop(ctl);
    // Reopen: the allocation is still there.
    let ctl = Controller::open(ControllerConfig::new(dir.path()))
        .await
        .unwrap();
    assert_eq!(ctl.vdisk_by_name("vd").await.unwrap().allocated, MIB);
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_faults_for_one_segment_allocate_once() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let c = ctl.clone();
        tasks.push(tokio::spawn(async move {
            c.fault(fault(v.id, FaultOp::Write, 5, 6)).await.unwrap()
        }));
    }
    let mut targets = Vec::new();
    for t in tasks {
        targets.push(t.await.unwrap().entries[0].target);
    }
    assert!(targets.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(ctl.status().await.allocated, MIB);
    assert_consistent(&ctl).await;
}

/// A controller with a 256 MiB pool and a 64 MiB vdisk "vd" on it.
async fn with_vdisk(dir: &Path) -> (Arc<Controller>, VdiskView) {
    let ctl = setup(dir, 256 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 64 * MIB, None, None, None)
        .await
        .unwrap();
    (ctl, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_faults_allocate_ahead_contiguously() {
    let dir = tempfile::tempdir().unwrap();
    let (ctl, v) = with_vdisk(dir.path()).await;
    ctl.fault(fault(v.id, FaultOp::Write, 0, 1)).await.unwrap();
    let u = ctl.fault(fault(v.id, FaultOp::Write, 1, 2)).await.unwrap();
    // The stream continues: more than the faulted segment, physically after segment 0.
    let mapped: u64 = u.entries.iter().map(|e| e.len()).sum();
    assert!(mapped > MIB / BLOCK_SIZE, "{u:?}");
    let m = ctl.map_view("vd").await.unwrap();
    assert_eq!(m.entries.len(), 1, "one merged extent: {m:?}");
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_fault_after_a_mapped_segment_allocates_nothing_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let (ctl, v) = with_vdisk(dir.path()).await;
    // Scattered first writes, then a stream: 13 starts where the fault for 12 ended.
    for s in [10, 40, 20, 12, 13] {
        ctl.fault(fault(v.id, FaultOp::Write, s, s + 1))
            .await
            .unwrap();
    }
    assert!(
        ctl.status().await.allocated > 5 * MIB,
        "13 continued a stream and allocated ahead"
    );
    let before = ctl.status().await.allocated;
    // Scattered faults allocate their own segment only.
    for s in [30, 50, 5, 60, 25] {
        ctl.fault(fault(v.id, FaultOp::Write, s, s + 1))
            .await
            .unwrap();
    }
    let mid = ctl.status().await.allocated;
    assert_eq!(
        mid - before,
        5 * MIB,
        "one segment each for scattered faults"
    );
    // 41 sits right after mapped 40, but the latest faults ended elsewhere: random, so
    // nothing ahead (before `Streams`, 42..49 were allocated too).
    ctl.fault(fault(v.id, FaultOp::Write, 41, 42))
        .await
        .unwrap();
    assert_eq!(
        ctl.status().await.allocated - mid,
        MIB,
        "nothing ahead of 41"
    );
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_space_fails_then_new_container_allows_writes() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 4 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    for s in [0, 2, 4, 6] {
        ctl.fault(fault(v.id, FaultOp::Write, s, s + 1))
            .await
            .unwrap();
    }
    let err = ctl
        .fault(fault(v.id, FaultOp::Write, 8, 9))
        .await
        .unwrap_err();
    assert_eq!(err, ControlError::NoSpace);
    assert!(ctl.status().await.out_of_space);
    assert_consistent(&ctl).await;
    let extra = dir.path().join("containers/extra.img");
    ctl.add_container("extra", extra.to_str().unwrap(), Some(8 * MIB))
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 8, 9)).await.unwrap();
    assert!(!ctl.status().await.out_of_space);
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_and_delete_return_space_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    let start = ctl.status().await.free;
    let a = ctl
        .create_vdisk("a", 32 * MIB, None, None, None)
        .await
        .unwrap();
    let b = ctl
        .create_vdisk("b", 32 * MIB, Some(4 * MIB), None, None)
        .await
        .unwrap();
    for s in 0..8 {
        ctl.fault(fault(a.id, FaultOp::Write, s, s + 1))
            .await
            .unwrap();
    }
    ctl.fault(fault(b.id, FaultOp::Write, 1, 3)).await.unwrap();
    assert_consistent(&ctl).await;
    let u = ctl.fault(fault(a.id, FaultOp::Trim, 2, 5)).await.unwrap();
    assert!(u.entries.is_empty());
    assert_consistent(&ctl).await;
    ctl.fault(fault(b.id, FaultOp::WriteZeroes, 0, 8))
        .await
        .unwrap();
    assert_eq!(ctl.vdisk_by_name("b").await.unwrap().allocated, 0);
    ctl.delete_vdisk("a", false).await.unwrap();
    assert_consistent(&ctl).await;
    let s = ctl.status().await;
    assert_eq!((s.free, s.zeroing), (start, 0));
    assert!(matches!(
        ctl.vdisk_by_name("a").await,
        Err(ControlError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrink_frees_tail_and_grow_reads_zero() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 8 * MIB, None, None, None)
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 0, 8)).await.unwrap();
    ctl.resize_vdisk("vd", 3 * MIB).await.unwrap();
    assert_eq!(ctl.vdisk_by_name("vd").await.unwrap().allocated, 3 * MIB);
    assert_consistent(&ctl).await;
    ctl.resize_vdisk("vd", 10 * MIB).await.unwrap();
    assert_eq!(ctl.vdisk_by_name("vd").await.unwrap().allocated, 3 * MIB);
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_bad_requests_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    let e = ctl
        .create_vdisk("x", 1000, None, None, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("multiple of the block size"), "{e}");
    let e = ctl
        .create_vdisk("a@b", MIB, None, None, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("may contain only"), "{e}");
    let e = ctl
        .create_vdisk("x", MIB, Some(3 * 4096), None, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("power of two"), "{e}");
    ctl.create_vdisk("x", MIB, None, None, None).await.unwrap();
    let e = ctl
        .create_vdisk("x", MIB, None, None, None)
        .await
        .unwrap_err();
    assert!(matches!(e, ControlError::Exists(_)));
    let e = ctl
        .fault(fault(99, FaultOp::Write, 0, 1))
        .await
        .unwrap_err();
    assert!(matches!(e, ControlError::NotFound(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_segment_smaller_than_segment_size_is_not_leaked() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    // 2.5 segments: the last segment is half a segment.
    let v = ctl
        .create_vdisk("vd", 5 * MIB / 2, None, None, None)
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 2, 3)).await.unwrap();
    assert_eq!(ctl.vdisk_by_name("vd").await.unwrap().allocated, MIB / 2);
    assert_consistent(&ctl).await;
    ctl.fault(fault(v.id, FaultOp::Trim, 2, 3)).await.unwrap();
    assert_eq!(ctl.vdisk_by_name("vd").await.unwrap().allocated, 0);
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_told_to_retry_while_a_change_waits_for_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (ctl, v) = leased_setup(dir.path(), 1500).await;
    ctl.fault(fault(v.id, FaultOp::Write, 0, 1)).await.unwrap();
    ctl.agents
        .register(
            "b",
            Arc::new(SilentAgent),
            vec![VdiskId(v.id)],
            Some(Duration::from_millis(1500)),
            "192.0.2.1:5000",
        )
        .unwrap();
    let trim = {
        let ctl = ctl.clone();
        tokio::spawn(async move { ctl.fault(fault(v.id, FaultOp::Trim, 0, 1)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = ctl
        .fault(fault(v.id, FaultOp::Write, 8, 9))
        .await
        .unwrap_err();
    assert!(matches!(e, ControlError::Retry { .. }), "{e:?}");
    trim.await.unwrap().unwrap();
    // With b evicted, the retried fault goes through.
    ctl.fault(fault(v.id, FaultOp::Write, 8, 9)).await.unwrap();
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_waits_out_a_silent_holder_without_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (ctl, v) = leased_setup(dir.path(), 1500).await;
    ctl.fault(fault(v.id, FaultOp::Write, 0, 1)).await.unwrap();
    let w = ctl
        .create_vdisk("w", 16 * MIB, None, None, None)
        .await
        .unwrap();
    let b_heard = std::time::Instant::now();
    ctl.agents
        .register(
            "b",
            Arc::new(SilentAgent),
            vec![VdiskId(v.id)],
            Some(Duration::from_millis(1500)),
            "192.0.2.1:5000",
        )
        .unwrap();
    // b has missed two heartbeats (375 ms each): it is silent, cut off.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let trim = {
        let ctl = ctl.clone();
        tokio::spawn(async move { ctl.fault(fault(v.id, FaultOp::Trim, 0, 1)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The trim waits for b's lease, but not with the metadata locked: a first write to a
    // vdisk b does not hold is answered at once, not told to retry.
    let t = std::time::Instant::now();
    ctl.fault(fault(w.id, FaultOp::Write, 0, 1)).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    trim.await.unwrap().unwrap();
    assert!(
        b_heard.elapsed() >= Duration::from_millis(1500),
        "freed after {:?}, within b's lease",
        b_heard.elapsed()
    );
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resize_and_a_delete_wait_out_a_silent_holder_without_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (ctl, v) = leased_setup(dir.path(), 1500).await;
    ctl.fault(fault(v.id, FaultOp::Write, 0, 1)).await.unwrap();
    let w = ctl
        .create_vdisk("w", 16 * MIB, None, None, None)
        .await
        .unwrap();
    for (round, op) in ["resize", "delete"].into_iter().enumerate() {
        let name = format!("b{round}");
        let heard = std::time::Instant::now();
        ctl.agents
            .register(
                &name,
                Arc::new(SilentAgent),
                vec![VdiskId(v.id)],
                Some(Duration::from_millis(1500)),
                "192.0.2.1:5000",
            )
            .unwrap();
        // Two heartbeats (375 ms each) missed: silent.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let task = {
            let ctl = ctl.clone();
            tokio::spawn(async move {
                match op {
                    "resize" => ctl.resize_vdisk("vd", 8 * MIB).await.map(|_| ()),
                    _ => ctl.delete_vdisk("vd", false).await,
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = std::time::Instant::now();
        ctl.fault(fault(w.id, FaultOp::Write, round as u64, round as u64 + 1))
            .await
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{op}: a fault on another vdisk waited {:?}",
            t.elapsed()
        );
        task.await.unwrap().unwrap();
        assert!(
            heard.elapsed() >= Duration::from_millis(1500),
            "{op} done {:?} after the silent holder was last heard from, within its lease",
            heard.elapsed()
        );
    }
    assert_consistent(&ctl).await;
}

// ---- size limits (issue 17, finding 5) ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_refuses_what_create_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    ctl.create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    // 16383P was accepted (nbdinfo then showed a negative size).
    for (size, says) in [
        (16383u64 << 50, "from 4K to 4E"),
        ((4u64 << 60) + 4096, "from 4K to 4E"),
        (0, "from 4K to 4E"),
        ((1 << 30) + 1, "use 1048580K"),
    ] {
        let e = ctl.resize_vdisk("vd", size).await.unwrap_err();
        assert!(
            matches!(&e, ControlError::Invalid(m) if m.contains(says)),
            "resize to {size}: {e}"
        );
        let e = ctl
            .create_vdisk("other", size, None, None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ControlError::Invalid(m) if m.contains(says)),
            "create at {size}: {e}"
        );
    }
    assert_eq!(ctl.vdisk_by_name("vd").await.unwrap().size, 16 * MIB);
    // The largest accepted size is accepted by both.
    ctl.resize_vdisk("vd", 4 << 60).await.unwrap();
    ctl.create_vdisk("big", 4 << 60, None, None, None)
        .await
        .unwrap();
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_segment_sizes_are_refused_with_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    // 128G, 2^62 and 2^63 were accepted; every write then failed with ENOSPC.
    for seg in [128u64 << 30, 1 << 62, 1 << 63, 2 << 30, 2048] {
        let e = ctl
            .create_vdisk("vd", 16 * MIB, Some(seg), None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ControlError::Invalid(m) if m.contains("from 4K to 1G")),
            "segment size {seg}: {e}"
        );
    }
    let e = ctl
        .create_vdisk("vd", 16 * MIB, Some(3 * MIB), None, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("use 2M or 4M"), "{e}");
    // A segment no container can hold would fail every first write: refused, saying why.
    let e = ctl
        .create_vdisk("vd", 16 * MIB, Some(128 * MIB), None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ControlError::Invalid(m) if m.contains("64M")),
        "{e}"
    );
    let v = ctl
        .create_vdisk("vd", 16 * MIB, Some(64 * MIB), None, None)
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 0, 1)).await.unwrap();
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_and_rollback_refuse_a_size_over_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    // A vdisk an older tabula resized past the limit (its store still holds it).
    {
        let mut meta = ctl.meta.lock().await;
        let m = meta.vdisks.get_mut(&VdiskId(v.id)).unwrap();
        m.rec.size_bytes = 16383 << 50;
        m.table.resize((16383 << 50) / BLOCK_SIZE);
    }
    // Stored as an older tabula stored it: `check` reports it.
    let rec = ctl.meta.lock().await.vdisks[&VdiskId(v.id)].rec.clone();
    ctl.commit(move |t| t.put_vdisk(VdiskId(v.id), &rec))
        .await
        .unwrap();
    let c = ctl.check().await.unwrap();
    assert!(!c.ok, "{c:?}");
    assert!(
        c.problems
            .iter()
            .any(|p| p.contains("vdisk vd: vdisk size 16383P") && p.contains("resize it")),
        "{c:?}"
    );
    ctl.create_snapshot("vd", "s").await.unwrap();
    let e = ctl.clone_vdisk("vd@s", "c", None).await.unwrap_err();
    assert!(
        matches!(&e, ControlError::Invalid(m) if m.contains("16383P") && m.contains("4E")),
        "{e}"
    );
    ctl.resize_vdisk("vd", 16 * MIB).await.unwrap();
    let e = ctl.rollback("vd", "s").await.unwrap_err();
    assert!(
        matches!(&e, ControlError::Invalid(m) if m.contains("16383P")),
        "{e}"
    );
    assert_eq!(ctl.vdisk_by_name("vd").await.unwrap().size, 16 * MIB);
    // The snapshot is the last table over the limit; deleting it makes the store sound.
    ctl.delete_snapshot("vd@s").await.unwrap();
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_space_clears_when_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 4 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    for s in 0..4 {
        ctl.fault(fault(v.id, FaultOp::Write, s, s + 1))
            .await
            .unwrap();
    }
    let err = ctl
        .fault(fault(v.id, FaultOp::Write, 8, 9))
        .await
        .unwrap_err();
    assert_eq!(err, ControlError::NoSpace);
    assert!(ctl.status().await.out_of_space);
    // Freeing a segment is enough: status says what is true now, without waiting for the
    // next write to succeed.
    ctl.fault(fault(v.id, FaultOp::Trim, 1, 2)).await.unwrap();
    let st = ctl.status().await;
    assert_eq!(st.free, MIB, "{st:?}");
    assert!(!st.out_of_space, "space was freed: {st:?}");
    // Full again: said again.
    ctl.fault(fault(v.id, FaultOp::Write, 9, 10)).await.unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 10, 11))
        .await
        .unwrap_err();
    assert!(ctl.status().await.out_of_space);
    // Deleting the vdisk frees everything.
    ctl.delete_vdisk("vd", false).await.unwrap();
    assert!(!ctl.status().await.out_of_space);
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_a_container_smaller_than_a_segment() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = setup(dir.path(), 64 * MIB).await;
    let v = ctl
        .create_vdisk("vd", 16 * MIB, Some(4 * MIB), None, None)
        .await
        .unwrap();
    let small = dir.path().join("containers/small.img");
    ctl.add_container("small", small.to_str().unwrap(), Some(2 * MIB))
        .await
        .unwrap();
    // Pinned there, no first write could ever get space.
    let e = ctl.migrate_vdisk("vd", "small").await.unwrap_err();
    assert!(
        matches!(&e, ControlError::Invalid(m) if m.contains("holds 2M") && m.contains("at least 4M")),
        "{e}"
    );
    ctl.fault(fault(v.id, FaultOp::Write, 0, 1)).await.unwrap();
    assert_consistent(&ctl).await;
}

// ---- agent identity: a session that may still write is never skipped ----

/// A controller with leases of `lease_ms`, in-process agent "a", a 16 MiB vdisk with its
/// segments 0, 1 and 4 written, and `cfg` adjusted by `tune`.
async fn leased_written(
    dir: &Path,
    lease_ms: u64,
    tune: impl FnOnce(&mut ControllerConfig),
) -> (Arc<Controller>, VdiskView) {
    let mut cfg = leased(dir, lease_ms, false);
    tune(&mut cfg);
    let ctl = Controller::open(cfg).await.unwrap();
    ctl.ensure_default_container(64 * MIB).await.unwrap();
    ctl.register_agent("a", Arc::new(NullAgent), Vec::new())
        .await
        .unwrap();
    let v = ctl
        .create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 0, 2)).await.unwrap();
    ctl.fault(fault(v.id, FaultOp::Write, 4, 5)).await.unwrap();
    (ctl, v)
}

/// Agent "b" holding `v` whose stream dropped (it may still write until its lease ends),
/// then "b" registered again (a restart, or a second process with the same name). Returns
/// when the first session's lease was last renewed.
fn replaced_b(ctl: &Controller, v: &VdiskView, lease_ms: u64) -> std::time::Instant {
    let lease = Some(Duration::from_millis(lease_ms));
    let renewed = std::time::Instant::now();
    let old = ctl
        .agents
        .register(
            "b",
            Arc::new(SilentAgent),
            vec![VdiskId(v.id)],
            lease,
            "192.0.2.1:5000",
        )
        .unwrap();
    ctl.agents.disconnected("b", old);
    ctl.agents
        .register(
            "b",
            Arc::new(NullAgent),
            Vec::new(),
            lease,
            "192.0.2.2:5000",
        )
        .unwrap();
    renewed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_session_is_waited_for_until_its_lease_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let (ctl, v) = leased_written(dir.path(), 600, |_| {}).await;
    let renewed = replaced_b(&ctl, &v, 600);
    // The old session's agent may still read segment 0 until its lease ends: the trim must
    // not free it before.
    ctl.fault(fault(v.id, FaultOp::Trim, 0, 1)).await.unwrap();
    assert!(
        renewed.elapsed() >= Duration::from_millis(600),
        "freed after {:?}, while the replaced session's lease still ran",
        renewed.elapsed()
    );
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_waits_out_a_replaced_session_before_it_holds_io() {
    let dir = tempfile::tempdir().unwrap();
    // A hold shorter than the lease: the wait for the old session comes before the hold,
    // so it does not cancel the snapshot.
    let (ctl, v) = leased_written(dir.path(), 600, |c| {
        c.snapshot_hold = Duration::from_millis(200)
    })
    .await;
    let renewed = replaced_b(&ctl, &v, 600);
    ctl.create_snapshot("vd", "s").await.unwrap();
    assert!(
        renewed.elapsed() >= Duration::from_millis(600),
        "snapshot taken after {:?}, while the replaced session could still write in place",
        renewed.elapsed()
    );
    assert_consistent(&ctl).await;
}

/// What a recording agent did, and when.
#[derive(Default)]
struct Recorded {
    events: parking_lot::Mutex<Vec<(std::time::Instant, &'static str)>>,
}

impl Recorded {
    fn first(&self, what: &str) -> Option<std::time::Instant> {
        self.events.lock().iter().find(|e| e.1 == what).map(|e| e.0)
    }
}

/// An agent that records the holds it is asked for. With `cut_at_block`, it stops answering
/// anything from the first `Block` on (its network is cut at that moment).
struct Recording {
    rec: Arc<Recorded>,
    cut_at_block: bool,
}

#[async_trait::async_trait]
impl AgentPort for Recording {
    async fn apply(&self, command: Command) -> Result<(), String> {
        let what = match command {
            Command::Block { .. } => "block",
            Command::Unblock { .. } => "unblock",
            _ => "other",
        };
        let cut = self.cut_at_block && self.rec.first("block").is_some();
        self.rec
            .events
            .lock()
            .push((std::time::Instant::now(), what));
        if cut || (self.cut_at_block && what == "block") {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

/// Registers leased agent `name` holding `v`, with `port`, its stream open. Returns its
/// session.
fn leased_holder(
    ctl: &Controller,
    v: &VdiskView,
    name: &str,
    port: Arc<dyn AgentPort>,
    lease_ms: u64,
) -> u64 {
    let s = ctl
        .agents
        .register(
            name,
            port,
            vec![VdiskId(v.id)],
            Some(Duration::from_millis(lease_ms)),
            "192.0.2.1:5000",
        )
        .unwrap();
    ctl.agents.opened(name, s);
    s
}

/// Renews `name`'s lease every 50 ms until `stop` (or it is evicted).
fn keep_renewing(
    ctl: &Arc<Controller>,
    name: &'static str,
    session: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let ctl = ctl.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) && ctl.agents.renew(name, session, Default::default()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_waits_out_a_silent_holder_without_holding_the_others() {
    let dir = tempfile::tempdir().unwrap();
    // A hold much shorter than the lease: holding c's I/O until b's lease ends would cancel
    // the snapshot.
    let (ctl, v) = leased_written(dir.path(), 600, |c| {
        c.snapshot_hold = Duration::from_millis(200)
    })
    .await;
    let rec = Arc::new(Recorded::default());
    let c = leased_holder(
        &ctl,
        &v,
        "c",
        Arc::new(Recording {
            rec: rec.clone(),
            cut_at_block: false,
        }),
        600,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let renewer = keep_renewing(&ctl, "c", c, stop.clone());
    // b is cut off: its stream looks open, it neither answers nor renews.
    let b_heard = std::time::Instant::now();
    leased_holder(&ctl, &v, "b", Arc::new(SilentAgent), 600);
    ctl.create_snapshot("vd", "s").await.unwrap();
    let b_lease_end = b_heard + Duration::from_millis(600);
    let blocked = rec.first("block").expect("c was held");
    assert!(
        blocked >= b_lease_end,
        "c's I/O was held {:?} before b's lease ran out",
        b_lease_end - blocked
    );
    let agents = ctl.status().await.agents;
    assert!(agents.iter().all(|a| a.name != "b"), "b is fenced: evicted");
    stop.store(true, Ordering::Relaxed);
    renewer.await.unwrap();
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cut_off_during_the_hold_releases_the_others_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // The hold may last longer than the lease: only silence must end it early.
    let (ctl, v) = leased_written(dir.path(), 600, |c| {
        c.snapshot_hold = Duration::from_secs(5)
    })
    .await;
    let (rc, rb) = (Arc::new(Recorded::default()), Arc::new(Recorded::default()));
    let c = leased_holder(
        &ctl,
        &v,
        "c",
        Arc::new(Recording {
            rec: rc.clone(),
            cut_at_block: false,
        }),
        600,
    );
    let b = leased_holder(
        &ctl,
        &v,
        "b",
        Arc::new(Recording {
            rec: rb.clone(),
            cut_at_block: true,
        }),
        600,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let renew_c = keep_renewing(&ctl, "c", c, stop.clone());
    // b renews until it receives the Block, then falls silent.
    let renew_b = {
        let (ctl, rb) = (ctl.clone(), rb.clone());
        tokio::spawn(async move {
            while rb.first("block").is_none() && ctl.agents.renew("b", b, Default::default()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let t = std::time::Instant::now();
    ctl.create_snapshot("vd", "s").await.unwrap();
    let took = t.elapsed();
    let b_cut = rb.first("block").expect("b got the Block");
    // c's first hold ended soon after b fell silent (two heartbeats: 300 ms), not at the end
    // of b's lease or of --snapshot-hold.
    let events = rc.events.lock().clone();
    let first_block = events.iter().position(|e| e.1 == "block").unwrap();
    let released = events[first_block..]
        .iter()
        .find(|e| e.1 == "unblock")
        .expect("c released")
        .0;
    assert!(
        released - b_cut < Duration::from_millis(550),
        "c held {:?} after b fell silent",
        released - b_cut
    );
    // The snapshot was taken once b's lease had run out, within a few rounds.
    assert!(took < Duration::from_secs(3), "{took:?}");
    let agents = ctl.status().await.agents;
    assert!(agents.iter().all(|a| a.name != "b"), "b is fenced: evicted");
    stop.store(true, Ordering::Relaxed);
    renew_c.await.unwrap();
    renew_b.await.unwrap();
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_renews_but_never_answers_fails_the_snapshot_without_holding_io() {
    let dir = tempfile::tempdir().unwrap();
    let (ctl, v) = leased_written(dir.path(), 600, |c| {
        c.snapshot_hold = Duration::from_millis(300)
    })
    .await;
    let rec = Arc::new(Recorded::default());
    let c = leased_holder(
        &ctl,
        &v,
        "c",
        Arc::new(Recording {
            rec: rec.clone(),
            cut_at_block: false,
        }),
        600,
    );
    let b = leased_holder(&ctl, &v, "b", Arc::new(SilentAgent), 600);
    let stop = Arc::new(AtomicBool::new(false));
    let renew_c = keep_renewing(&ctl, "c", c, stop.clone());
    let renew_b = keep_renewing(&ctl, "b", b, stop.clone());
    let t = std::time::Instant::now();
    let e = ctl.create_snapshot("vd", "s").await.unwrap_err();
    let took = t.elapsed();
    let msg = e.to_string();
    assert!(
        matches!(e, ControlError::Unavailable(_))
            && msg.contains("'b'")
            && msg.contains("try again"),
        "{msg}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(
        rec.first("block").is_none(),
        "c's I/O was held for a stuck b"
    );
    stop.store(true, Ordering::Relaxed);
    renew_c.await.unwrap();
    renew_b.await.unwrap();
    assert!(ctl.list_snapshots(Some("vd")).await.unwrap().is_empty());
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_agent_is_waited_for_by_changes_begun_after_its_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let (ctl, v) = leased_written(dir.path(), 800, |c| {
        c.ack_timeout = Duration::from_millis(100)
    })
    .await;
    let lease = Some(Duration::from_millis(800));
    let session = ctl
        .agents
        .register(
            "b",
            Arc::new(SilentAgent),
            vec![VdiskId(v.id)],
            lease,
            "192.0.2.1:5000",
        )
        .unwrap();
    // b renews but never acknowledges, until it is evicted.
    let renewer = {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let mut last = std::time::Instant::now();
            for _ in 0..100 {
                if !ctl.agents.renew("b", session, Default::default()) {
                    break;
                }
                last = std::time::Instant::now();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            last
        })
    };
    // A first write evicts b after the ack timeout and waits for its lease...
    let first = {
        let ctl = ctl.clone();
        tokio::spawn(async move { ctl.fault(fault(v.id, FaultOp::Write, 8, 9)).await })
    };
    let renewed = renewer.await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ... and a trim begun meanwhile must wait for it too: b may still read segment 4.
    ctl.fault(fault(v.id, FaultOp::Trim, 4, 5)).await.unwrap();
    assert!(
        renewed.elapsed() >= Duration::from_millis(800),
        "freed {:?} after the evicted agent's last renewal, within its lease",
        renewed.elapsed()
    );
    first.await.unwrap().unwrap();
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_a_live_session_is_refused_naming_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let (ctl, v) = leased_written(dir.path(), 300, |_| {}).await;
    let lease = Some(Duration::from_millis(300));
    let first = ctl
        .agents
        .register(
            "b",
            Arc::new(NullAgent),
            vec![VdiskId(v.id)],
            lease,
            "192.0.2.1:5000",
        )
        .unwrap();
    ctl.agents.opened("b", first);
    let e = ctl
        .agents
        .register(
            "b",
            Arc::new(NullAgent),
            Vec::new(),
            lease,
            "192.0.2.2:6000",
        )
        .unwrap_err();
    assert!(matches!(e, ControlError::Exists(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("192.0.2.1:5000") && msg.contains("--name"),
        "the refusal names the live session's address and says what to do: {msg}"
    );
    // The first session is untouched: still current, still renewing.
    assert!(ctl.agents.renew("b", first, Default::default()));
    let view = ctl.status().await.agents;
    let b = view.iter().find(|a| a.name == "b").expect("b listed");
    assert!(b.connected);
    assert_eq!(b.address.as_deref(), Some("192.0.2.1:5000"));
    // A session whose lease ran out with its stream still open (a paused process) is not
    // live: its name is free again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = ctl
        .agents
        .register(
            "b",
            Arc::new(NullAgent),
            Vec::new(),
            lease,
            "192.0.2.2:6000",
        )
        .unwrap();
    ctl.agents.opened("b", second);
    // A session whose stream closed (a restart) frees its name at once.
    ctl.agents.disconnected("b", second);
    ctl.agents
        .register(
            "b",
            Arc::new(NullAgent),
            Vec::new(),
            lease,
            "192.0.2.3:7000",
        )
        .unwrap();
    // The in-process agent of `tabula serve` re-registers freely (no lease).
    ctl.register_agent("a", Arc::new(NullAgent), Vec::new())
        .await
        .unwrap();
    assert_consistent(&ctl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_session_cannot_open_a_table_under_its_successor() {
    let dir = tempfile::tempdir().unwrap();
    let (ctl, _v) = leased_written(dir.path(), 300, |_| {}).await;
    let lease = Some(Duration::from_millis(300));
    let old = ctl
        .agents
        .register(
            "b",
            Arc::new(NullAgent),
            Vec::new(),
            lease,
            "192.0.2.1:5000",
        )
        .unwrap();
    ctl.agents.disconnected("b", old);
    let new = ctl
        .agents
        .register(
            "b",
            Arc::new(NullAgent),
            Vec::new(),
            lease,
            "192.0.2.2:6000",
        )
        .unwrap();
    // The old session's open passed its session check before it was replaced: it must not
    // get the table, which would be recorded as held by the new session only.
    let e = ctl.open_vdisk_in("b", Some(old), "vd").await.unwrap_err();
    assert!(matches!(e, ControlError::Unavailable(_)), "{e:?}");
    let id = ctl.vdisk_by_name("vd").await.unwrap().id;
    assert!(ctl.agents.holders(VdiskId(id), None).is_empty());
    ctl.open_vdisk_in("b", Some(new), "vd").await.unwrap();
    let holders = ctl.agents.holders(VdiskId(id), None);
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].session, new);
}
