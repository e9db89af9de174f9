//! Agent tests with a scripted controller: table commands that race an attach, fault
//! answers that arrive out of order, blocks, state changes, missed changes, periodic
//! replacements and leases must never leave the agent using a superseded entry.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tabula_agent::lease::Lease;
use tabula_agent::{Agent, AgentConfig};
use tabula_api::{
    AgentPort, Command, ContainerLocation, ControlError, ControlPlane, Fault, RangeUpdate,
    TableSnapshot, VdiskSummary,
};
use tabula_core::{ContainerId, Entry, Generation, Phys, State, VdiskId};
use tabula_nbd::server::{Export, ExportProvider};

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
    /// The controller's table: what every open returns.
    snap: parking_lot::Mutex<TableSnapshot>,
    /// Sent to the agent during the first open.
    race: parking_lot::Mutex<Option<Command>>,
    opens: AtomicU32,
    faults: parking_lot::Mutex<Vec<Fault>>,
}

#[async_trait::async_trait]
impl ControlPlane for Scripted {
    async fn register_agent(
        &self,
        _name: &str,
        port: Arc<dyn AgentPort>,
        _held: Vec<VdiskId>,
    ) -> Result<(), ControlError> {
        *self.port.lock() = Some(port);
        Ok(())
    }

    async fn open_vdisk(&self, _agent: &str, name: &str) -> Result<TableSnapshot, ControlError> {
        if name != "vd" {
            return Err(ControlError::NotFound(name.into()));
        }
        let port = self.port.lock().clone().expect("registered");
        let snap = self.snap.lock().clone();
        self.opens.fetch_add(1, Ordering::SeqCst);
        let race = self.race.lock().take();
        if let Some(cmd) = race {
            port.apply(cmd).await.unwrap();
        }
        Ok(snap)
    }

    async fn list_vdisks(&self) -> Result<Vec<String>, ControlError> {
        Ok(vec!["vd".into()])
    }

    async fn describe_vdisk(&self, name: &str) -> Result<VdiskSummary, ControlError> {
        if name != "vd" {
            return Err(ControlError::NotFound(name.into()));
        }
        let snap = self.snap.lock();
        Ok(VdiskSummary {
            vdisk: snap.vdisk,
            name: snap.name.clone(),
            size_bytes: snap.size_bytes,
            read_only: snap.read_only,
        })
    }

    async fn container(&self, id: ContainerId) -> Result<ContainerLocation, ControlError> {
        Err(ControlError::NotFound(format!("container {id}")))
    }

    async fn fault(&self, fault: Fault) -> Result<RangeUpdate, ControlError> {
        self.faults.lock().push(fault);
        Err(ControlError::Unavailable("scripted".into()))
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

fn scripted(snap: TableSnapshot, race: Option<Command>) -> Arc<Scripted> {
    Arc::new(Scripted {
        port: parking_lot::Mutex::new(None),
        snap: parking_lot::Mutex::new(snap),
        race: parking_lot::Mutex::new(race),
        opens: AtomicU32::new(0),
        faults: parking_lot::Mutex::new(Vec::new()),
    })
}

fn quick_config() -> AgentConfig {
    let mut cfg = AgentConfig::new("t");
    cfg.fault_wait = Duration::from_millis(300);
    cfg.gap_timeout = Duration::from_millis(50);
    cfg
}

/// The agent's export of "vd".
async fn export_of(a: &Agent) -> Arc<dyn Export> {
    let Ok(export) = a.open("vd").await else {
        panic!("attach failed")
    };
    export
}

async fn block(a: &Agent, timeout_ms: u64) {
    a.apply(Command::Block {
        vdisk: VD,
        timeout_ms,
    })
    .await
    .unwrap();
}

async fn agent(snap: TableSnapshot, race: Option<Command>) -> Agent {
    Agent::start(AgentConfig::new("t"), scripted(snap, race))
        .await
        .unwrap()
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
        change: true,
        copies: Vec::new(),
    });
    let a = agent(snapshot(1, vec![mapped(0, 512, 0)]), Some(unmap)).await;
    let export = export_of(&a).await;
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
        change: true,
        copies: Vec::new(),
    });
    vol.install_answer(&RangeUpdate {
        vdisk: VD,
        generation: Generation(2),
        range: (0, 256),
        entries: vec![mapped(0, 256, 0)],
        change: true,
        copies: Vec::new(),
    });
    assert_eq!(vol.entries(), 0, "stale mapping installed");
    // An older answer with no unmap after it is merged into gaps: it only adds.
    vol.install_answer(&RangeUpdate {
        vdisk: VD,
        generation: Generation(4),
        range: (256, 512),
        entries: vec![mapped(256, 512, 256)],
        change: true,
        copies: Vec::new(),
    });
    vol.install_answer(&RangeUpdate {
        vdisk: VD,
        generation: Generation(3),
        range: (512, 768),
        entries: vec![mapped(512, 768, 1024)],
        change: true,
        copies: Vec::new(),
    });
    assert_eq!(vol.entries(), 2);
}

#[tokio::test]
async fn a_block_holds_new_io_until_unblocked() {
    let a = agent(snapshot(1, vec![]), None).await;
    let export = export_of(&a).await;
    block(&a, 10_000).await;
    let read = tokio::spawn(async move { export.read(0, 4096).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!read.is_finished(), "a read went through a block");
    a.apply(Command::Unblock { vdisk: VD }).await.unwrap();
    let data = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("unblocked read finishes")
        .unwrap()
        .expect("read");
    assert_eq!(data, vec![0u8; 4096]);
}

#[tokio::test]
async fn a_block_never_lifted_makes_the_agent_fetch_the_table_again() {
    let ctl = scripted(snapshot(1, vec![]), None);
    let a = Agent::start(quick_config(), ctl.clone()).await.unwrap();
    let export = export_of(&a).await;
    // The controller changed the table and died before lifting the block.
    *ctl.snap.lock() = snapshot(5, vec![mapped(0, 256, 0)]);
    block(&a, 100).await;
    let status = export
        .block_status(0, 1 << 20)
        .await
        .expect("served after the block lapsed");
    assert_eq!(ctl.opens.load(Ordering::SeqCst), 2, "table fetched again");
    assert_eq!(status[0].flags, 0, "the fetched table maps segment 0");
}

#[tokio::test]
async fn set_state_restricts_writes_to_mapped_entries() {
    let ctl = scripted(snapshot(1, vec![mapped(0, 256, 0)]), None);
    let a = Agent::start(quick_config(), ctl.clone()).await.unwrap();
    let export = export_of(&a).await;
    a.apply(Command::SetState {
        vdisk: VD,
        generation: Generation(2),
        range: (0, 512),
        state: State::NoWrite,
    })
    .await
    .unwrap();
    assert!(export.write(0, vec![1u8; 4096], false).await.is_err());
    let faults = ctl.faults.lock().clone();
    assert!(!faults.is_empty(), "the write must fault");
    assert_eq!(faults[0].state, State::NoWrite);
    assert_eq!(faults[0].segments, (0, 1));
    let report = a.report().unwrap();
    assert_eq!(report.tables, vec![(VD, Generation(2))]);
}

#[tokio::test]
async fn a_missing_change_is_healed_by_fetching_the_whole_table() {
    let ctl = scripted(snapshot(1, vec![]), None);
    let a = Agent::start(quick_config(), ctl.clone()).await.unwrap();
    let vol = a.volume("vd").await.unwrap();
    *ctl.snap.lock() = snapshot(3, vec![mapped(0, 256, 0), mapped(512, 768, 1024)]);
    // Generation 3 arrives; generation 2 (which mapped 512..768) never does.
    a.apply(Command::Update(RangeUpdate {
        vdisk: VD,
        generation: Generation(3),
        range: (0, 256),
        entries: vec![mapped(0, 256, 0)],
        change: true,
        copies: Vec::new(),
    }))
    .await
    .unwrap();
    a.heal_gaps().await;
    assert_eq!(
        ctl.opens.load(Ordering::SeqCst),
        1,
        "too early to call it a gap"
    );
    tokio::time::sleep(Duration::from_millis(80)).await;
    a.heal_gaps().await;
    assert_eq!(
        ctl.opens.load(Ordering::SeqCst),
        2,
        "the gap must be healed"
    );
    assert_eq!(a.report().unwrap().gaps_healed, 1);
    assert_eq!(vol.entries(), 2);
    // Changes in order never count as gaps.
    a.apply(Command::Allocated(RangeUpdate {
        vdisk: VD,
        generation: Generation(4),
        range: (256, 512),
        entries: vec![mapped(256, 512, 256)],
        change: true,
        copies: Vec::new(),
    }))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    a.heal_gaps().await;
    assert_eq!(a.report().unwrap().gaps_healed, 1);
}

#[tokio::test]
async fn a_periodic_replacement_counts_a_diverged_copy() {
    let a = agent(snapshot(1, vec![mapped(0, 256, 0)]), None).await;
    let vol = a.volume("vd").await.unwrap();
    a.apply(Command::Replace(snapshot(1, vec![mapped(0, 256, 0)])))
        .await
        .unwrap();
    assert_eq!(a.report().unwrap().table_mismatches, 0, "same table");
    a.apply(Command::Replace(snapshot(1, vec![mapped(0, 512, 0)])))
        .await
        .unwrap();
    assert_eq!(a.report().unwrap().table_mismatches, 1, "diverged copy");
    assert_eq!(vol.entries(), 1);
    a.apply(Command::Replace(snapshot(2, vec![])))
        .await
        .unwrap();
    assert_eq!(
        a.report().unwrap().table_mismatches,
        1,
        "newer: no mismatch"
    );
    assert_eq!(vol.entries(), 0);
}

#[tokio::test]
async fn an_expired_lease_stops_io_until_a_new_session_resyncs() {
    let ctl = scripted(snapshot(1, vec![]), None);
    let lease = Arc::new(Lease::expired());
    lease.extend_to(Instant::now() + Duration::from_millis(200));
    let a = Agent::start_with_lease(quick_config(), ctl.clone(), lease.clone())
        .await
        .unwrap();
    let export = export_of(&a).await;
    export
        .read(0, 4096)
        .await
        .expect("read under a valid lease");
    tokio::time::sleep(Duration::from_millis(250)).await;
    let t = Instant::now();
    let err = export
        .read(0, 4096)
        .await
        .expect_err("read after the lease ran out");
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "it waits for a renewal first"
    );
    assert!(err.message.contains("lease"), "{}", err.message);
    // A new session: the lease is renewed and every copy is fetched again before use.
    *ctl.snap.lock() = snapshot(7, vec![mapped(0, 256, 0)]);
    lease.extend_to(Instant::now() + Duration::from_secs(30));
    a.session_started().await;
    assert_eq!(ctl.opens.load(Ordering::SeqCst), 2);
    let status = export.block_status(0, 1 << 20).await.unwrap();
    assert_eq!(status[0].flags, 0, "the resynchronised table is in use");
}

/// Issue 17: a FLUSH must never be acknowledged for a vdisk that may no longer exist. With
/// the lease run out, the controller may have deleted it meanwhile: the flush waits for a
/// session like any I/O and fails if none comes; after a new session that finds the vdisk
/// gone, it fails with ESHUTDOWN.
#[tokio::test]
async fn a_flush_is_acknowledged_only_while_the_vdisk_is_known_to_exist() {
    use tabula_nbd::server::Errno;
    let ctl = scripted(snapshot(1, vec![]), None);
    let lease = Arc::new(Lease::expired());
    lease.extend_to(Instant::now() + Duration::from_secs(30));
    let a = Agent::start_with_lease(quick_config(), ctl.clone(), lease.clone())
        .await
        .unwrap();
    let export = export_of(&a).await;
    export.flush().await.expect("flush under a valid lease");
    lease.expire();
    let t = Instant::now();
    let err = export
        .flush()
        .await
        .expect_err("flush after the lease ran out, with no new session");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "it waits for a renewal first"
    );
    assert!(err.message.contains("lease"), "{}", err.message);
    // A new session: the vdisk was deleted (a new one has its name).
    ctl.snap.lock().vdisk = VdiskId(8);
    lease.extend_to(Instant::now() + Duration::from_secs(30));
    a.session_started().await;
    let err = export.flush().await.expect_err("flush of a deleted vdisk");
    assert_eq!(err.errno, Errno::Shutdown, "{}", err.message);
}

/// NBD_OPT_INFO (a client listing exports asks it of every one) is answered from the
/// controller's description of the vdisk: no table is fetched and the agent does not become a
/// holder. Once attached, the copy answers.
#[tokio::test]
async fn info_describes_without_attaching() {
    let ctl = scripted(snapshot(1, vec![mapped(0, 256, 0)]), None);
    let a = Agent::start(quick_config(), ctl.clone()).await.unwrap();
    let info = a.info("vd").await.expect("described");
    assert_eq!((info.size, info.read_only), (4 << 20, false));
    assert!(matches!(
        a.info("nope").await,
        Err(tabula_nbd::server::OpenError::NotFound)
    ));
    assert_eq!(
        ctl.opens.load(Ordering::SeqCst),
        0,
        "INFO attached the vdisk"
    );
    let export = export_of(&a).await;
    assert_eq!(ctl.opens.load(Ordering::SeqCst), 1);
    assert_eq!(a.info("vd").await.unwrap(), export.info());
    assert_eq!(ctl.opens.load(Ordering::SeqCst), 1);
}
