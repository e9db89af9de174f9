//! The data path's container handling: the gate held by I/O that timed out, the timeout
//! clock, and container health learnt from the controller.

use std::path::PathBuf;

use tabula_api::{
    AgentPort, Command, ContainerLocation, ControlPlane, TableSnapshot, VdiskSummary,
};
use tabula_container::Container;
use tabula_core::ContainerId;

use super::*;
use crate::agent::{Agent, AgentConfig};

const C1: ContainerId = ContainerId(1);

/// A controller that knows one container (a file) and whether it is failed.
struct OneContainer {
    path: PathBuf,
    failed: parking_lot::Mutex<Option<String>>,
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
        Err(ControlError::NotFound(name.into()))
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
        })
    }
    async fn fault(&self, _fault: Fault) -> Result<RangeUpdate, ControlError> {
        Err(ControlError::Unavailable("not in this test".into()))
    }
    async fn report_container(
        &self,
        _agent: &str,
        _container: ContainerId,
        _error: Option<String>,
    ) -> Result<(), ControlError> {
        Ok(())
    }
}

struct Setup {
    agent: Agent,
    ctl: Arc<OneContainer>,
    _dir: tempfile::TempDir,
}

async fn setup(container_timeout: Duration) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c1.img");
    Container::create(&path, 1 << 20).unwrap();
    let ctl = Arc::new(OneContainer {
        path,
        failed: parking_lot::Mutex::new(None),
    });
    let mut cfg = AgentConfig::new("t");
    cfg.container_timeout = container_timeout;
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
