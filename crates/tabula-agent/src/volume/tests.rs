//! The data path's container handling: the gate held by I/O that timed out, the timeout
//! clock, and container health learnt from the controller.

use std::path::PathBuf;

use std::sync::atomic::AtomicU32;

use tabula_api::{
    AgentPort, Command, ContainerLocation, ControlPlane, TableSnapshot, VdiskSummary,
};
use tabula_container::Container;
use tabula_core::{ContainerId, Entry, Phys};

use super::*;
use crate::agent::{Agent, AgentConfig};

const C1: ContainerId = ContainerId(1);

/// A controller that knows one container (a file) and whether it is failed, and one vdisk
/// `vd` of one segment mapped at its start, which a drain keeps moving: the first `churn`
/// write faults are answered with the segment still no-write (at a newer generation, as
/// when the next step began), later ones with it writable.
struct OneContainer {
    path: PathBuf,
    failed: parking_lot::Mutex<Option<String>>,
    churn: AtomicU32,
    faults: AtomicU32,
    /// The pool id its label must name (0: unlabelled).
    pool_id: u64,
    /// Container faults reported by the agent.
    reports: parking_lot::Mutex<Vec<String>>,
}

const VD: VdiskId = VdiskId(3);

fn segment0(state: State) -> Entry {
    Entry {
        begin: 0,
        end: 256,
        target: Some(Phys {
            container: C1,
            block: 0,
        }),
        state,
    }
}

#[async_trait::async_trait]
impl ControlPlane for OneContainer {
    async fn register_agent(
        &self,
        _name: &str,
        _port: Arc<dyn AgentPort>,
        _held: Vec<VdiskId>,
    ) -> Result<(), ControlError> {
        Ok(())
    }
    async fn open_vdisk(&self, _agent: &str, name: &str) -> Result<TableSnapshot, ControlError> {
        if name != "vd" {
            return Err(ControlError::NotFound(name.into()));
        }
        Ok(TableSnapshot {
            vdisk: VD,
            name: name.into(),
            size_bytes: 1 << 20,
            segment_blocks: 256,
            generation: Generation(1),
            read_only: false,
            entries: vec![segment0(State::NoWrite)],
        })
    }
    async fn list_vdisks(&self) -> Result<Vec<String>, ControlError> {
        Ok(Vec::new())
    }
    async fn describe_vdisk(&self, name: &str) -> Result<VdiskSummary, ControlError> {
        Err(ControlError::NotFound(name.into()))
    }
    async fn container(&self, id: ContainerId) -> Result<ContainerLocation, ControlError> {
        if id != C1 {
            return Err(ControlError::NotFound(format!("container {id}")));
        }
        Ok(ContainerLocation {
            id,
            name: "c1".into(),
            path: self.path.to_string_lossy().into(),
            size_bytes: 1 << 20,
            failed: self.failed.lock().clone(),
            pool_id: self.pool_id,
        })
    }
    async fn fault(&self, fault: Fault) -> Result<RangeUpdate, ControlError> {
        if fault.vdisk != VD || fault.op != FaultOp::Write {
            return Err(ControlError::Unavailable("not in this test".into()));
        }
        let n = self.faults.fetch_add(1, Ordering::SeqCst) + 1;
        let state = if n <= self.churn.load(Ordering::SeqCst) {
            State::NoWrite
        } else {
            State::Normal
        };
        Ok(RangeUpdate {
            vdisk: VD,
            generation: Generation(1 + u64::from(n)),
            range: (0, 256),
            entries: vec![segment0(state)],
            change: false,
            copies: Vec::new(),
        })
    }
    async fn report_container(
        &self,
        _agent: &str,
        _container: ContainerId,
        error: Option<String>,
    ) -> Result<(), ControlError> {
        self.reports.lock().extend(error);
        Ok(())
    }
}

struct Setup {
    agent: Agent,
    ctl: Arc<OneContainer>,
    _dir: tempfile::TempDir,
}

async fn setup(container_timeout: Duration) -> Setup {
    setup_with(container_timeout, Duration::from_secs(30), 0, 0).await
}

/// Like `setup`, with a controller that says the container's label names `pool_id`.
async fn setup_labelled(container_timeout: Duration, pool_id: u64) -> Setup {
    setup_with(container_timeout, Duration::from_secs(30), 0, pool_id).await
}

async fn setup_with(
    container_timeout: Duration,
    fault_wait: Duration,
    churn: u32,
    pool_id: u64,
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c1.img");
    Container::create(&path, 1 << 20).unwrap();
    let ctl = Arc::new(OneContainer {
        path,
        failed: parking_lot::Mutex::new(None),
        churn: AtomicU32::new(churn),
        faults: AtomicU32::new(0),
        pool_id,
        reports: Default::default(),
    });
    let mut cfg = AgentConfig::new("t");
    cfg.container_timeout = container_timeout;
    cfg.fault_wait = fault_wait;
    let agent = Agent::start(cfg, ctl.clone()).await.unwrap();
    Setup {
        agent,
        ctl,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_io_that_timed_out_holds_the_gate_until_it_completes() {
    let s = setup(Duration::from_millis(100)).await;
    let shared = s.agent.shared().clone();
    let c = shared.container(C1).await.unwrap();
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let (release, hung) = std::sync::mpsc::channel::<()>();
    let r = run_io(
        &shared,
        "test I/O",
        gate.clone().read_owned().await,
        c.clone(),
        usize::MAX,
        move |_| {
            let _ = hung.recv();
            Ok(())
        },
    )
    .await;
    let e = r.unwrap_err();
    assert!(
        e.message.contains("no answer within 100 ms"),
        "{}",
        e.message
    );
    assert!(c.check_up().is_err(), "a timeout marks the container down");
    // The I/O still runs: a table command that frees space must keep waiting for it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        gate.try_write().is_err(),
        "the gate was released under a running I/O"
    );
    release.send(()).unwrap();
    let released = tokio::time::timeout(Duration::from_secs(5), gate.write()).await;
    assert!(
        released.is_ok(),
        "the gate is released once the I/O completes"
    );
}

#[test]
fn time_queued_for_a_blocking_thread_is_not_the_containers() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = setup(Duration::from_millis(200)).await;
        let shared = s.agent.shared().clone();
        let c = shared.container(C1).await.unwrap();
        // The only blocking thread is busy for longer than the container timeout.
        let busy = tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(400)));
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let t = Instant::now();
        let r = run_io(
            &shared,
            "test I/O",
            gate.read_owned().await,
            c.clone(),
            usize::MAX,
            |_| {
                std::thread::sleep(Duration::from_millis(50));
                Ok(())
            },
        )
        .await;
        assert!(r.is_ok(), "{}", r.err().unwrap().message);
        assert!(t.elapsed() >= Duration::from_millis(400), "it did queue");
        c.check_up().unwrap();
        busy.await.unwrap();
    });
}

#[tokio::test]
async fn container_health_comes_with_its_location_and_is_asked_again_on_reconnect() {
    let s = setup(Duration::from_secs(5)).await;
    // Old news: failed. The controller's current word, at open, is that it answers.
    s.agent
        .apply(Command::ContainerHealth {
            container: C1,
            failed: true,
            reason: "old".into(),
        })
        .await
        .unwrap();
    let c = s.agent.shared().container(C1).await.unwrap();
    c.check_up().unwrap();

    // It failed, then recovered while this agent was away: only a reconnect tells.
    s.agent
        .apply(Command::ContainerHealth {
            container: C1,
            failed: true,
            reason: "no answer within 5000 ms".into(),
        })
        .await
        .unwrap();
    let e = c.check_up().unwrap_err();
    assert!(e.contains("no answer within 5000 ms"), "{e}");
    s.agent.session_started().await;
    c.check_up().unwrap();

    // And the other way round.
    *s.ctl.failed.lock() = Some("down since a while".into());
    s.agent.session_started().await;
    let e = c.check_up().unwrap_err();
    assert!(e.contains("down since a while"), "{e}");
}

#[tokio::test]
async fn a_container_failed_at_open_fails_at_once() {
    let s = setup(Duration::from_secs(5)).await;
    *s.ctl.failed.lock() = Some("the controller cannot reach it".into());
    let c = s.agent.shared().container(C1).await.unwrap();
    let e = c.check_up().unwrap_err();
    assert!(e.contains("the controller cannot reach it"), "{e}");
}

/// The export of `vd`.
async fn export_vd(s: &Setup) -> VolumeExport {
    let vol = s.agent.volume("vd").await.unwrap();
    VolumeExport::new(s.agent.shared().clone(), vol)
}

/// Issue 17: a write gave up after 16 fault rounds while a drain and snapshots kept changing
/// the table, each round making progress. Any number of rounds is fine within the fault
/// wait.
#[tokio::test]
async fn a_write_waits_through_any_number_of_table_changes() {
    let s = setup_with(Duration::from_secs(5), Duration::from_secs(30), 100, 0).await;
    let export = export_vd(&s).await;
    export.write(4096, vec![7u8; 4096], true).await.unwrap();
    assert_eq!(s.ctl.faults.load(Ordering::SeqCst), 101);
    assert_eq!(export.read(4096, 4096).await.unwrap(), vec![7u8; 4096]);
}

/// A table that never lets the write through fails it once the fault wait has passed, not
/// before and not much after, and the error says what it waited for.
#[tokio::test]
async fn a_write_the_table_never_allows_fails_after_the_fault_wait_saying_why() {
    let wait = Duration::from_millis(300);
    let s = setup_with(Duration::from_secs(5), wait, u32::MAX, 0).await;
    let export = export_vd(&s).await;
    let t = Instant::now();
    let e = export.write(0, vec![7u8; 4096], false).await.unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.errno, Errno::Io);
    assert!(took >= wait && took < wait * 5, "failed after {took:?}");
    assert!(
        e.message.contains("--fault-wait") && e.message.contains("data being moved"),
        "{}",
        e.message
    );
    // Later rounds pause: the agent and the controller do not spin for the whole wait.
    let faults = s.ctl.faults.load(Ordering::SeqCst);
    assert!(faults < 200, "{faults} faults in {took:?}");
}

/// An agent opens a labelled container only if its label names the pool and the container
/// (another device may be at that path on this host); otherwise it does no I/O there and
/// reports it, as a path down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_whose_label_is_not_its_own_is_refused_and_reported() {
    use tabula_container::label::{self, Label};
    let s = setup_labelled(Duration::from_secs(5), 77).await;
    let c = Container::open(&s.ctl.path, 0).unwrap();
    let mut l = Label {
        pool: 77,
        container: 2,
        name: "c2".into(),
        reserved_blocks: 256,
    };
    for (what, wrong) in [
        ("no tabula label", None),
        ("container 'c2'", Some(2)),
        ("another pool", Some(1)),
    ] {
        match wrong {
            None => label::wipe(&c).unwrap(),
            Some(2) => label::write(&c, &l).unwrap(),
            Some(_) => {
                l.pool = 78;
                l.container = 1;
                label::write(&c, &l).unwrap();
            }
        }
        let Err(e) = s.agent.shared().container(C1).await else {
            panic!("{what}: opened");
        };
        assert!(e.to_string().contains(what), "{what}: {e}");
        assert!(
            s.ctl.reports.lock().iter().any(|r| r.contains(what)) || {
                // Reported from a spawned task: give it a moment.
                tokio::time::sleep(Duration::from_millis(200)).await;
                s.ctl.reports.lock().iter().any(|r| r.contains(what))
            },
            "{what}: {:?}",
            s.ctl.reports.lock()
        );
    }
    // Its own label: opened.
    l.pool = 77;
    label::write(&c, &l).unwrap();
    s.agent.shared().container(C1).await.unwrap();
}
