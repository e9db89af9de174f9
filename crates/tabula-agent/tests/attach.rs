//! Agent tests with a scripted controller: table commands that race an attach, and fault
//! answers that arrive out of order, must never leave the agent using a superseded entry.

use std::sync::Arc;

use tabula_agent::{Agent, AgentConfig};
use tabula_api::{
    AgentPort, Command, ContainerLocation, ControlError, ControlPlane, Fault, RangeUpdate,
    TableSnapshot,
};
use tabula_core::{ContainerId, Entry, Generation, Phys, State, VdiskId};
use tabula_nbd::server::ExportProvider;

const VD: VdiskId = VdiskId(7);
const HOLE_ZERO: u32 = 3;

fn mapped(begin: u64, end: u64, block: u64) -> Entry {
    Entry {
        begin,
        end,
        target: Some(Phys {
            container: ContainerId(1),
            block,
        }),
        state: State::Normal,
    }
}

fn snapshot(generation: u64, entries: Vec<Entry>) -> TableSnapshot {
    TableSnapshot {
        vdisk: VD,
        name: "vd".into(),
        size_bytes: 4 << 20,
        segment_blocks: 256,
        generation: Generation(generation),
        read_only: false,
        entries,
    }
}

/// A controller that, while answering `open_vdisk`, first sends the agent `race` (as a
/// concurrent trim or delete would), then returns the snapshot taken before it.
struct Scripted {
    port: parking_lot::Mutex<Option<Arc<dyn AgentPort>>>,
    snap: TableSnapshot,
    race: Option<Command>,
}

#[async_trait::async_trait]
impl ControlPlane for Scripted {
    async fn register_agent(
        &self,
        _name: &str,
        port: Arc<dyn AgentPort>,
    ) -> Result<(), ControlError> {
        *self.port.lock() = Some(port);
        Ok(())
    }

    async fn open_vdisk(&self, _agent: &str, name: &str) -> Result<TableSnapshot, ControlError> {
        if name != "vd" {
            return Err(ControlError::NotFound(name.into()));
        }
        let port = self.port.lock().clone().expect("registered");
        if let Some(cmd) = &self.race {
            port.apply(cmd.clone()).await.unwrap();
        }
        Ok(self.snap.clone())
    }

    async fn list_vdisks(&self) -> Result<Vec<String>, ControlError> {
        Ok(vec!["vd".into()])
    }

    async fn container(&self, id: ContainerId) -> Result<ContainerLocation, ControlError> {
        Err(ControlError::NotFound(format!("container {id}")))
    }

    async fn fault(&self, _fault: Fault) -> Result<RangeUpdate, ControlError> {
        Err(ControlError::Unavailable("scripted".into()))
    }
}

async fn agent(snap: TableSnapshot, race: Option<Command>) -> Agent {
    let ctl = Arc::new(Scripted {
        port: parking_lot::Mutex::new(None),
        snap,
        race,
    });
    Agent::start(AgentConfig::new("t"), ctl).await.unwrap()
}

#[tokio::test]
async fn an_unmap_that_races_the_attach_is_applied() {
    // The controller trimmed segment 0 (generation 2) after taking the snapshot (generation 1)
    // but before the agent installed it.
    let unmap = Command::Update(RangeUpdate {
        vdisk: VD,
        generation: Generation(2),
        range: (0, 256),
        entries: vec![],
    });
    let a = agent(snapshot(1, vec![mapped(0, 512, 0)]), Some(unmap)).await;
    let Ok(export) = a.open("vd").await else {
        panic!("attach failed")
    };
    let status = export.block_status(0, 2 << 20).await.unwrap();
    assert_eq!(
        status[0].flags, HOLE_ZERO,
        "segment 0 must be unmapped: {status:?}"
    );
    assert_eq!(status[0].length, 1 << 20);
    assert_eq!(status[1].flags, 0, "segment 1 stays mapped: {status:?}");
}

#[tokio::test]
async fn a_delete_that_races_the_attach_refuses_it() {
    let a = agent(
        snapshot(1, vec![mapped(0, 256, 0)]),
        Some(Command::Detach { vdisk: VD }),
    )
    .await;
    assert!(
        a.open("vd").await.is_err(),
        "a deleted vdisk must not be exported"
    );
}

#[tokio::test]
async fn a_stale_answer_never_resurrects_an_unmapped_entry() {
    let a = agent(snapshot(1, vec![]), None).await;
    let vol = a.volume("vd").await.unwrap();
    // Generation 3 unmapped segment 0 (pushed); an answer from generation 2 that mapped it
    // arrives late: it must be dropped.
    vol.install(&RangeUpdate {
        vdisk: VD,
        generation: Generation(3),
        range: (0, 256),
        entries: vec![],
    });
    vol.install_answer(&RangeUpdate {
        vdisk: VD,
        generation: Generation(2),
        range: (0, 256),
        entries: vec![mapped(0, 256, 0)],
    });
    assert_eq!(vol.entries(), 0, "stale mapping installed");
    // An older answer with no unmap after it is merged into gaps: it only adds.
    vol.install_answer(&RangeUpdate {
        vdisk: VD,
        generation: Generation(4),
        range: (256, 512),
        entries: vec![mapped(256, 512, 256)],
    });
    vol.install_answer(&RangeUpdate {
        vdisk: VD,
        generation: Generation(3),
        range: (512, 768),
        entries: vec![mapped(512, 768, 1024)],
    });
    assert_eq!(vol.entries(), 2);
}
