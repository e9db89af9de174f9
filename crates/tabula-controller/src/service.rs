//! The controller's logic: vdisks, containers, allocation on fault, freeing, and commands to
//! agents. It knows nothing of transports: the admin API and agents call these methods.
//!
//! All metadata changes happen under one async mutex, in this order:
//! 1. compute the change in memory (tables, pool), remembering how to undo it;
//! 2. commit it to the store (durable); on failure undo the memory change;
//! 3. for frees: command every agent that holds the vdisk and wait for its acknowledgement
//!    (it has stopped using the old entries), then zero the space, then mark it free.
//!
//! A segment is therefore never handed to a second owner while an agent might still write
//! through the first owner's entry, and never handed out before it reads as zeros. An agent
//! that does not acknowledge is waited out by its lease (see [`crate::agents`]); after a
//! restart, freeing waits one lease period (the grace), because agents of the previous run
//! may still hold tables the new run does not know about.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tabula_api::admin::CowPolicy;
use tabula_api::admin::{CheckView, ContainerView, MapEntryView, MapView, StatusView, VdiskView};
use tabula_api::{
    AgentPort, Command, ContainerLocation, ControlError, ControlPlane, Fault, FaultOp, RangeUpdate,
    TableSnapshot, VdiskSummary,
};
use tabula_core::table::TableError;
use tabula_core::{
    BLOCK_SIZE, ContainerId, Entry, FreeMap, Generation, LimitError, MappingTable, Phys, Pool,
    SharedBlocks, State, VdiskId, check_vdisk_geometry, check_vdisk_size, format_size,
    format_size_exact,
};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::agents::{Agents, Delivery, lease_margin};
use crate::journal::Journal;
use crate::store::{Store, StoreError, Txn, VdiskRecord};
use moves::Moving;
use pool::ContainerMeta;

pub const DB_FILE: &str = "tabula.redb";
pub use tabula_core::DEFAULT_SEGMENT_SIZE;
const MAX_NAME: usize = 128;
/// How far each table's generation moves at a start: beyond every generation a previous run
/// may have shown agents without storing it (a snapshot or rollback shows its next one before
/// the commit; each running move step shows one for its no-write state). Far more than
/// can be in flight at once, and still 2^44 restarts from overflowing.
const GENERATION_SKIP_AT_START: u64 = 1 << 20;
/// Above this many runs, sharing and releasing rebuild the reference counts in one pass.
const BULK_RUNS: usize = 1024;
/// How long a fault waits for the metadata lock before it is told to retry.
const FAULT_LOCK_WAIT: Duration = Duration::from_secs(1);

/// How long a delete waits for the clients of what it deletes to disconnect before it is
/// refused (agents report a closed connection at once; this covers the trip).
pub(crate) const CLIENTS_GONE_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub data_dir: PathBuf,
    /// Extra segments allocated after a fault that continues a sequential stream.
    pub readahead_segments: u64,
    /// How long to wait for an agent to acknowledge a command; one that renews its lease
    /// but does not answer is evicted after this.
    pub ack_timeout: Duration,
    /// Lease of networked agents. It is also the grace after a start during which no freed
    /// space is reused, when `restart_grace` is set.
    pub lease: Duration,
    /// Whether agents of a previous run may still be serving (networked mode): then frees
    /// wait out one lease after the start.
    pub restart_grace: bool,
    /// How often every agent's copy of every table is replaced wholesale (`None`: never).
    pub refresh_interval: Option<Duration>,
    /// The longest a snapshot or rollback may hold a vdisk's I/O while agents drain; past
    /// it the operation is cancelled and I/O resumes.
    pub snapshot_hold: Duration,
    /// The longest a container probe or open may take before the container counts as not
    /// answering.
    pub container_timeout: Duration,
    /// Below this percentage of free allocatable space the pool is low on space: a warning
    /// in the log, `low_space` in status and metrics.
    pub low_space_percent: u64,
    /// Test hooks: pauses at the points crash tests kill the controller in.
    pub test_pauses: TestPauses,
    /// With high availability: until when this controller's leadership is certain. Past
    /// that it answers agents nothing (no fault, no lease grant), so a deposed leader that
    /// has not noticed yet misleads no one.
    pub leadership: Option<Arc<crate::ha::Leadership>>,
    /// The leadership epoch this controller serves under: 0 without HA, else the etcd
    /// revision at which it was elected; every answer and command to agents carries it.
    pub epoch: u64,
}

/// Pauses for crash tests (set from `TABULA_TEST_*` environment variables by the binary).
#[derive(Clone, Debug, Default)]
pub struct TestPauses {
    /// After a snapshot's hold, before its commit.
    pub snapshot_commit: Option<Duration>,
    /// After an agent reported a copy-on-write copy, before the tables are switched.
    pub cow_switch: Option<Duration>,
    /// After a copy-on-write switch is queued, while it waits for its commit with the
    /// metadata unlocked.
    pub cow_commit: Option<Duration>,
    /// After a move step copied its run, before the tables are switched.
    pub move_switch: Option<Duration>,
    /// After a fault's change is committed, before the agent is answered (a commit whose
    /// answer a killed leader never sends).
    pub fault_answer: Option<Duration>,
}

impl ControllerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> ControllerConfig {
        ControllerConfig {
            data_dir: data_dir.into(),
            readahead_segments: 8,
            ack_timeout: Duration::from_secs(30),
            lease: Duration::from_secs(10),
            restart_grace: false,
            refresh_interval: None,
            snapshot_hold: Duration::from_secs(5),
            container_timeout: Duration::from_secs(5),
            low_space_percent: 10,
            test_pauses: TestPauses::default(),
            leadership: None,
            epoch: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Container(#[from] tabula_container::ContainerError),
    #[error("cannot create data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

struct VdiskMeta {
    rec: VdiskRecord,
    table: MappingTable,
    /// Journal ticket of the last change to this vdisk: nothing about it may be told to an
    /// agent before that ticket is durable.
    last_seq: u64,
    streams: Streams,
}

/// Where the latest allocating faults of a vdisk ended, in segments. A fault that starts
/// at one of these ends continues a sequential stream, and only such a fault allocates
/// ahead: a random write that merely lands after a mapped segment would otherwise
/// allocate up to `readahead_segments` more than it writes on a thin vdisk. Four ends
/// follow four sequential writers at once.
#[derive(Default)]
struct Streams {
    ends: [u64; 4],
    next: usize,
}

impl Streams {
    fn continues(&self, segment: u64) -> bool {
        segment > 0 && self.ends.contains(&segment)
    }

    fn record(&mut self, end: u64) {
        self.ends[self.next] = end;
        self.next = (self.next + 1) % self.ends.len();
    }
}

/// One change to a free map, replayed into the store in order.
struct FreeDelta {
    container: ContainerId,
    old: Vec<(u64, u64)>,
    new: Vec<(u64, u64)>,
}

#[derive(Default)]
struct Meta {
    next_vdisk: u64,
    next_container: u32,
    containers: BTreeMap<ContainerId, ContainerMeta>,
    names: HashMap<String, VdiskId>,
    vdisks: BTreeMap<VdiskId, VdiskMeta>,
    pool: Pool,
    zeroing: BTreeMap<(ContainerId, u64), u64>,
    /// Runs waiting in `zeroing` that may not be zeroed before the given time: the restart
    /// grace, or the lease of an agent that was copying into them when it went away.
    deferred: Vec<(Instant, Phys, u64)>,
    /// Extra references of blocks shared by several tables (derived from the tables at
    /// load, kept up to date by every change).
    shared: SharedBlocks,
    /// Copy-on-write in progress, by (vdisk, segment).
    cows: BTreeMap<(VdiskId, u64), PendingCow>,
    /// Runs a drain or migration is copying.
    moving: Vec<Moving>,
    /// Vdisks whose last allocation was refused for want of space (until one succeeds):
    /// what `out_of_space` in status is derived from, with the free space of the moment.
    refused: BTreeSet<VdiskId>,
}

/// A segment being copied by an agent before its first write after a snapshot or clone.
#[derive(Clone, Debug)]
struct PendingCow {
    /// The segment's entries when the copy was asked for: the switch happens only if they
    /// are still the same.
    from: Vec<Entry>,
    to: Phys,
    len: u64,
    agent: String,
    /// The agent's session then (`None` if it had none: an unknown agent).
    session: Option<u64>,
}

impl Meta {
    /// Allocates from an allocatable container (within `scope`, if set: a pinned vdisk, a
    /// migration's target).
    fn alloc(
        &mut self,
        unit: u64,
        min: u64,
        max: u64,
        hint: Option<Phys>,
        scope: Option<ContainerId>,
        deltas: &mut Vec<FreeDelta>,
    ) -> Option<(Phys, u64)> {
        let containers = &self.containers;
        let allowed = |id| {
            scope.is_none_or(|s| s == id) && containers.get(&id).is_some_and(|c| c.allocatable())
        };
        let (at, n) = self.pool.alloc(unit, min, max, hint, allowed)?;
        let m = self.pool.get(at.container).expect("allocated from it");
        let new = m.touching(at.block, at.block + n);
        // Free runs are always coalesced, so the run the allocation came from is exactly the
        // allocated range joined with whatever free neighbours it left behind.
        let start = new
            .iter()
            .find(|&&(s, l)| s + l == at.block)
            .map_or(at.block, |&(s, _)| s);
        let end = new
            .iter()
            .find(|&&(s, _)| s == at.block + n)
            .map_or(at.block + n, |&(s, l)| s + l);
        deltas.push(FreeDelta {
            container: at.container,
            old: vec![(start, end - start)],
            new,
        });
        Some((at, n))
    }

    fn free(&mut self, at: Phys, n: u64, deltas: &mut Vec<FreeDelta>) -> Result<(), ControlError> {
        let m = self
            .pool
            .get_mut(at.container)
            .ok_or_else(|| ControlError::Storage(format!("container {} vanished", at.container)))?;
        let old = m.touching(at.block, at.block + n);
        self.freed_while_moving(at, n);
        let m = self.pool.get_mut(at.container).expect("looked up");
        m.free_run(at.container, at.block, n)
            .map_err(|e| ControlError::Storage(e.to_string()))?;
        deltas.push(FreeDelta {
            container: at.container,
            old,
            new: m.touching(at.block, at.block + n),
        });
        Ok(())
    }

    /// Freed runs, committed as waiting to be zeroed.
    fn mark_zeroing(&mut self, runs: &[(Phys, u64)]) {
        for &(p, l) in runs {
            self.zeroing.insert((p.container, p.block), l);
            self.freed_while_moving(p, l);
        }
    }

    /// One table stops mapping these runs: returns the parts nobody maps any more.
    fn release(&mut self, runs: &[(Phys, u64)]) -> Vec<(Phys, u64)> {
        // A few runs (a trim) edit the map in place; a whole table (a delete) is one pass
        // over it.
        if runs.len() > BULK_RUNS {
            return self.shared.release_all(runs.iter().copied());
        }
        let mut freed = Vec::new();
        for &(p, l) in runs {
            freed.extend(self.shared.release(p, l));
        }
        freed
    }

    /// One more table maps these runs.
    fn share(&mut self, runs: &[(Phys, u64)]) {
        if runs.len() > BULK_RUNS {
            self.shared.share_all(runs.iter().copied());
        } else {
            for &(p, l) in runs {
                self.shared.share(p, l);
            }
        }
    }

    /// Blocks of these runs that other tables map too.
    fn shared_blocks(&self, runs: &[(Phys, u64)]) -> u64 {
        runs.iter().map(|&(p, l)| self.shared.shared_in(p, l)).sum()
    }

    /// The snapshots of `vdisk`, by id.
    fn snapshots_of(&self, vdisk: VdiskId) -> Vec<VdiskId> {
        self.vdisks
            .iter()
            .filter(|(_, v)| v.rec.parent == Some(vdisk.0))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Takes the copy-on-writes pending for `vdisk` (it is being deleted): their runs must be
    /// freed once no agent can still be copying into them.
    fn take_cows(&mut self, vdisk: VdiskId) -> Vec<(Phys, u64)> {
        let keys: Vec<_> = self
            .cows
            .range((vdisk, 0)..=(vdisk, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.cows.remove(&k))
            .map(|c| (c.to, c.len))
            .collect()
    }

    fn vdisk(&self, id: VdiskId) -> Result<&VdiskMeta, ControlError> {
        self.vdisks
            .get(&id)
            .ok_or_else(|| ControlError::NotFound(format!("vdisk {id}")))
    }

    fn vdisk_mut(&mut self, id: VdiskId) -> Result<&mut VdiskMeta, ControlError> {
        self.vdisks
            .get_mut(&id)
            .ok_or_else(|| ControlError::NotFound(format!("vdisk {id}")))
    }

    fn by_name(&self, name: &str) -> Result<VdiskId, ControlError> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| ControlError::NotFound(format!("vdisk '{name}'")))
    }

    /// Where new space for `vdisk` may come from: its container, if pinned.
    fn scope(&self, vdisk: VdiskId) -> Option<ContainerId> {
        self.vdisks
            .get(&vdisk)
            .and_then(|v| v.rec.container.map(ContainerId))
    }

    /// Whether allocating writes fail for lack of space now: some vdisk whose allocation was
    /// refused still finds no free segment where it may allocate. Derived from the present
    /// free space, so freeing space (a trim, a delete) clears it at once.
    fn out_of_space(&self) -> bool {
        self.refused.iter().any(|id| {
            let Some(v) = self.vdisks.get(id) else {
                return false;
            };
            let scope = v.rec.container.map(ContainerId);
            let seg = v.rec.segment_blocks;
            !self.containers.iter().any(|(&c, m)| {
                scope.is_none_or(|s| s == c)
                    && m.allocatable()
                    && self
                        .pool
                        .get(c)
                        .is_some_and(|f| f.runs().any(|(_, len)| len >= seg))
            })
        })
    }

    fn container_name(&self, id: ContainerId) -> String {
        self.containers
            .get(&id)
            .map(|c| c.rec.name.clone())
            .unwrap_or_else(|| id.to_string())
    }
}

fn write_deltas(t: &mut Txn<'_>, deltas: &[FreeDelta]) -> Result<(), StoreError> {
    for d in deltas {
        for &(s, _) in &d.old {
            t.delete_free(d.container, s)?;
        }
        for &(s, l) in &d.new {
            t.put_free(d.container, s, l)?;
        }
    }
    Ok(())
}

/// The stored span that must be rewritten after changing `[b, e)`: it runs from the start of
/// the entry holding block `b-1` to the end of the entry holding block `e-1` or `e`, because
/// merging can only extend entries across those edges. Call it before and after the change
/// and rewrite the union.
fn span_edges(t: &MappingTable, b: u64, e: u64) -> (u64, u64) {
    let lo = b
        .checked_sub(1)
        .and_then(|x| t.entry_at(x))
        .map_or(b, |x| x.begin.min(b));
    let hi = [e.saturating_sub(1), e]
        .into_iter()
        .filter_map(|x| t.entry_at(x))
        .map(|x| x.end)
        .fold(e, u64::max);
    (lo, hi)
}

/// The mapped runs of a table.
fn mapped_runs(t: &MappingTable) -> Vec<(Phys, u64)> {
    t.entries()
        .filter_map(|e| e.target.map(|p| (p, e.len())))
        .collect()
}

/// One table's changed span with its record, ready to be written.
struct TableWrite {
    vdisk: VdiskId,
    lo: u64,
    hi: u64,
    entries: Vec<Entry>,
    rec: VdiskRecord,
}

impl TableWrite {
    /// The whole table (a new one, or one rewritten wholesale).
    fn whole(vdisk: VdiskId, v: &VdiskMeta) -> TableWrite {
        TableWrite {
            vdisk,
            lo: 0,
            hi: u64::MAX,
            entries: v.table.entries().collect(),
            rec: v.rec.clone(),
        }
    }

    fn apply(&self, t: &mut Txn<'_>) -> Result<(), StoreError> {
        t.replace_entries(self.vdisk, self.lo, self.hi, &self.entries)?;
        t.put_vdisk(self.vdisk, &self.rec)
    }
}

/// A write or unmap of a run a drain or migration is copying waits for its switch.
fn moving_retry() -> ControlError {
    ControlError::Retry {
        after_ms: 5,
        reason: "the data is being moved to another container".into(),
    }
}

fn read_only(name: &str) -> ControlError {
    ControlError::Invalid(format!(
        "'{name}' is a read-only snapshot: clone it (tabula vdisk clone) to get a writable copy"
    ))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A size outside tabula's limits (`tabula_core::units`): the caller's mistake, a 400.
fn invalid_size(e: LimitError) -> ControlError {
    ControlError::Invalid(e.to_string())
}

/// Refuses a segment larger than every container a vdisk may allocate from (`pin`, or the
/// whole pool): each segment is allocated in one piece of one container, so every first
/// write would fail with ENOSPC. `fix` says what to do instead. An empty pool says nothing
/// yet.
fn segment_fits(
    meta: &Meta,
    seg_blocks: u64,
    pin: Option<ContainerId>,
    fix: impl FnOnce(u64) -> String,
) -> Result<(), ControlError> {
    let largest = meta
        .containers
        .iter()
        .filter(|(id, _)| pin.is_none_or(|p| p == **id))
        .map(|(_, c)| (c.rec.usable_blocks(), c.rec.name.as_str()))
        .max();
    match largest {
        Some((blocks, name)) if blocks < seg_blocks => {
            // The largest segment that fits: a power of two, at least one block.
            let fits = (1u64 << blocks.max(1).ilog2()) * BLOCK_SIZE;
            Err(ControlError::Invalid(format!(
                "segment size {} is larger than {} (the largest, {name}, holds {}): no first write could get space; {}",
                format_size_exact(seg_blocks * BLOCK_SIZE),
                if pin.is_some() {
                    "the container"
                } else {
                    "every container in the pool"
                },
                format_size_exact(blocks * BLOCK_SIZE),
                fix(fits.min(tabula_core::MAX_SEGMENT_SIZE)),
            )))
        }
        _ => Ok(()),
    }
}

fn storage(e: impl std::fmt::Display) -> ControlError {
    ControlError::Storage(e.to_string())
}

/// A storage error with its causes, for errors that cross to clients as text.
fn storage_chain(e: &dyn std::error::Error) -> ControlError {
    ControlError::Storage(tabula_api::error_chain(e))
}

/// Names of vdisks and containers: letters, digits, `.`, `_`, `-`; `@` is reserved for
/// snapshots in export names.
pub fn validate_name(kind: &str, name: &str) -> Result<(), ControlError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(ControlError::Invalid(format!(
            "{kind} name must be 1 to {MAX_NAME} characters"
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        || name.starts_with(['.', '-'])
    {
        return Err(ControlError::Invalid(format!(
            "{kind} name '{name}' may contain only letters, digits, '.', '_' and '-', and must not start with '.' or '-'"
        )));
    }
    Ok(())
}

pub struct Controller {
    cfg: ControllerConfig,
    store: Arc<Store>,
    journal: Journal,
    meta: Mutex<Meta>,
    pub(crate) agents: Agents,
    /// Whether allocatable free space is under the low-space threshold.
    low_space: AtomicBool,
    enospc_faults: AtomicU64,
    /// Itself, for background tasks it starts (probes, moves).
    me: std::sync::Weak<Controller>,
    /// Drains and migrations, running or finished.
    moves: moves::Moves,
    /// Until when freed space may not be zeroed and reused (restart grace).
    grace_until: Instant,
    /// The pool's random id, in every container's label.
    pool_id: u64,
}

impl Controller {
    /// Opens the controller's store under the data directory, finishing any interrupted
    /// zeroing of freed space.
    pub async fn open(cfg: ControllerConfig) -> Result<Arc<Controller>, ControllerError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| ControllerError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
        let store = Arc::new(Store::open(&cfg.data_dir.join(DB_FILE))?);
        Self::open_with_store(cfg, store).await
    }

    /// Opens the controller over a store already open: a standby taking over the lead
    /// (`crate::ha`), whose store has followed every committed record.
    pub async fn open_with_store(
        cfg: ControllerConfig,
        store: Arc<Store>,
    ) -> Result<Arc<Controller>, ControllerError> {
        let started = Instant::now();
        let mut loaded = store.load()?;
        debug!(
            ms = started.elapsed().as_millis() as u64,
            vdisks = loaded.vdisks.len(),
            "metadata loaded"
        );
        let pool_id = loaded.pool_id;
        let mut meta = Meta {
            next_vdisk: loaded.next_vdisk,
            next_container: loaded.next_container,
            ..Meta::default()
        };
        let mut failed = Vec::new();
        for (id, rec) in loaded.containers {
            // A container that does not answer now (a remote one whose server is down)
            // starts failed and is probed until it does; the rest of the pool works.
            let file = match pool::open_location(
                &rec.path,
                rec.size_blocks * BLOCK_SIZE,
                cfg.container_timeout,
            )
            .await
            {
                Ok(f) => Some(Arc::new(f)),
                Err(e) => {
                    failed.push((id, format!("cannot open {}: {e}", rec.path)));
                    None
                }
            };
            // A labelled container must be the one added: another device at its path, or
            // another disk behind its server, starts failed (and is probed until it is).
            if let (Some(f), true) = (&file, rec.label_blocks > 0)
                && let Err(why) = pool::check_label(f, cfg.container_timeout, pool_id, id).await
            {
                failed.push((id, why));
            }
            meta.pool.insert(id, FreeMap::empty(rec.size_blocks));
            meta.containers.insert(id, ContainerMeta::new(rec, file));
        }
        for (c, s, l) in loaded.free {
            meta.pool
                .free(
                    Phys {
                        container: c,
                        block: s,
                    },
                    l,
                )
                .map_err(|e| StoreError::Corrupt(format!("free list: {e}")))?;
        }
        // A snapshot or rollback shows agents its next generation before committing it (so
        // the I/O hold does not include the commit). After a crash there, agents may hold a
        // generation the store never got; they would keep that copy as the newer one. So
        // every start moves each table past anything a previous run could have shown, and
        // stores that before answering anyone.
        let mut bumped = Vec::new();
        for (id, rec, _) in &mut loaded.vdisks {
            rec.generation += GENERATION_SKIP_AT_START;
            bumped.push((*id, rec.clone()));
        }
        debug!(
            ms = started.elapsed().as_millis() as u64,
            "containers opened"
        );
        if !bumped.is_empty() {
            store.write(move |t| {
                for (id, rec) in &bumped {
                    t.put_vdisk(*id, rec)?;
                }
                Ok(())
            })?;
        }
        for (id, rec, entries) in loaded.vdisks {
            let table = MappingTable::from_entries(rec.size_bytes / BLOCK_SIZE, entries)
                .map_err(|e| StoreError::Corrupt(format!("vdisk {}: {e}", rec.name)))?;
            meta.names.insert(rec.name.clone(), id);
            meta.vdisks.insert(
                id,
                VdiskMeta {
                    rec,
                    table,
                    last_seq: 0,
                    streams: Streams::default(),
                },
            );
        }
        for (c, s, l) in loaded.zeroing {
            meta.zeroing.insert((c, s), l);
        }
        meta.shared =
            SharedBlocks::from_mappings(meta.vdisks.values().flat_map(|v| mapped_runs(&v.table)));
        // Copies an agent was making when the controller stopped: nothing maps them, so
        // they are freed like any freed space (zeroed first, after the restart grace).
        let abandoned: Vec<(Phys, u64)> = loaded
            .cow
            .iter()
            .map(|&(c, s, l)| {
                (
                    Phys {
                        container: c,
                        block: s,
                    },
                    l,
                )
            })
            .collect();
        if !abandoned.is_empty() {
            let stored = abandoned.clone();
            store.write(move |t| {
                for &(p, _) in &stored {
                    t.delete_cow(p)?;
                }
                t.put_zeroing_runs(&stored)
            })?;
            meta.mark_zeroing(&abandoned);
        }
        let ctl = Controller {
            cfg,
            journal: Journal::start(store.clone()),
            store,
            meta: Mutex::new(meta),
            agents: Agents::default(),
            low_space: AtomicBool::new(false),
            enospc_faults: AtomicU64::new(0),
            me: std::sync::Weak::new(),
            moves: Default::default(),
            grace_until: Instant::now(),
            pool_id,
        };
        let mut ctl = ctl;
        {
            let mut meta = ctl.meta.lock().await;
            for (id, reason) in failed {
                warn!(
                    container = meta.containers[&id].rec.name,
                    reason, "container does not answer; it is probed until it does"
                );
                meta.containers.get_mut(&id).expect("loaded").health = pool::Health::Failed {
                    since: Instant::now(),
                    reason,
                };
            }
        }
        if ctl.cfg.restart_grace {
            ctl.grace_until += ctl.cfg.lease + lease_margin(ctl.cfg.lease);
        }
        {
            let mut meta = ctl.meta.lock().await;
            let pending: Vec<(Phys, u64)> = meta
                .zeroing
                .iter()
                .map(|(&(c, s), &l)| {
                    (
                        Phys {
                            container: c,
                            block: s,
                        },
                        l,
                    )
                })
                .collect();
            if !pending.is_empty() {
                info!(
                    runs = pending.len(),
                    "zeroing space freed before the last stop (after the restart grace, if any)"
                );
                ctl.zero_and_free(&mut meta, pending)
                    .await
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            }
        }
        let ctl = Arc::new_cyclic(|me| Controller {
            me: me.clone(),
            ..ctl
        });
        let failed: Vec<ContainerId> = {
            let meta = ctl.meta.lock().await;
            ctl.check_low_space(&meta);
            meta.containers
                .iter()
                .filter(|(_, c)| c.reachable().is_none())
                .map(|(&id, _)| id)
                .collect()
        };
        for id in failed {
            ctl.spawn_recovery(id);
        }
        // A drain the last run did not finish goes on (a cancelled one is no longer marked).
        let draining: Vec<String> = {
            let meta = ctl.meta.lock().await;
            meta.containers
                .values()
                .filter(|c| c.rec.draining)
                .map(|c| c.rec.name.clone())
                .collect()
        };
        for name in draining {
            match ctl.start_drain(&name, true).await {
                Ok(_) => info!(container = name, "resuming the drain"),
                Err(e) => warn!(container = name, error = %e, "cannot resume the drain"),
            }
        }
        Ok(ctl)
    }

    /// Starts the controller's background work: freeing what waited for the restart grace,
    /// replacing agents' tables periodically, forgetting agents whose lease ran out.
    pub fn start_background(self: &Arc<Self>) {
        let ctl = Arc::downgrade(self);
        let grace_until = self.grace_until;
        let refresh = self.cfg.refresh_interval;
        tokio::spawn(async move {
            tokio::time::sleep_until(grace_until.into()).await;
            let Some(c) = ctl.upgrade() else { return };
            c.zero_deferred().await;
            drop(c);
            let tick = refresh
                .unwrap_or(Duration::from_secs(10))
                .min(Duration::from_secs(10));
            let mut last_refresh = Instant::now();
            loop {
                tokio::time::sleep(tick).await;
                let Some(c) = ctl.upgrade() else { return };
                c.agents.sweep();
                c.reap_abandoned_cows().await;
                c.zero_deferred().await;
                if let Some(every) = refresh {
                    if last_refresh.elapsed() >= every {
                        last_refresh = Instant::now();
                        c.refresh_tables().await;
                    }
                }
            }
        });
    }

    /// Zeroes and frees the deferred runs whose time has come.
    async fn zero_deferred(&self) {
        let mut meta = self.meta.lock().await;
        let now = Instant::now();
        if !meta.deferred.iter().any(|d| d.0 <= now) {
            return;
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut meta.deferred)
            .into_iter()
            .partition(|d| d.0 <= now);
        meta.deferred = later;
        let runs: Vec<(Phys, u64)> = due.into_iter().map(|(_, p, l)| (p, l)).collect();
        info!(runs = runs.len(), "zeroing freed space whose wait is over");
        if let Err(e) = self.zero_and_free(&mut meta, runs).await {
            warn!(error = %e, "zeroing deferred freed space failed");
        }
    }

    /// Sends every agent a fresh copy of every table it holds (seed 003 c21). Agents compare
    /// it with their copy and report mismatches; nothing here waits on a slow agent.
    pub async fn refresh_tables(&self) {
        for id in self.agents.held_vdisks() {
            // One snapshot per table, whatever the number of holders.
            let (snap, seq) = {
                let meta = self.meta.lock().await;
                let Some(v) = meta.vdisks.get(&id) else {
                    continue;
                };
                (Self::snapshot_of(&meta, id), v.last_seq)
            };
            // Only what is durable goes out, and only from a controller sure it leads: a
            // commit can fail (fenced, etcd without quorum), and an agent must never be
            // given a mapping that was not committed.
            if self.journal.wait(seq).await.is_err() || !self.leading() {
                return;
            }
            // An ended session cannot take it (and resyncs if it registers again).
            for holder in self
                .agents
                .holders(id, None)
                .into_iter()
                .filter(|h| h.ended_until.is_none())
            {
                let cmd = Command::Replace(snap.clone());
                tokio::spawn(async move {
                    if let Err(e) = holder.port.apply(cmd).await {
                        warn!(
                            agent = holder.name,
                            error = e,
                            "periodic table replacement refused"
                        );
                    }
                });
            }
        }
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    /// The leadership epoch this controller serves under (see [`ControllerConfig::epoch`]).
    pub fn epoch(&self) -> u64 {
        self.cfg.epoch
    }

    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }

    // ---- vdisks ----

    pub async fn create_vdisk(
        &self,
        name: &str,
        size: u64,
        segment_size: Option<u64>,
        cow: Option<CowPolicy>,
        container: Option<&str>,
    ) -> Result<VdiskView, ControlError> {
        validate_name("vdisk", name)?;
        let seg = segment_size.unwrap_or(DEFAULT_SEGMENT_SIZE);
        check_vdisk_geometry(size, seg).map_err(invalid_size)?;
        let mut meta = self.meta.lock().await;
        if meta.names.contains_key(name) {
            return Err(ControlError::Exists(format!(
                "vdisk '{name}' already exists: pick another name or delete it first"
            )));
        }
        let pin = container
            .map(|c| Self::container_id(&meta, c))
            .transpose()?;
        segment_fits(&meta, seg / BLOCK_SIZE, pin, |fits| {
            format!(
                "use a segment size of at most {} or add a larger container",
                format_size_exact(fits)
            )
        })?;
        let id = VdiskId(meta.next_vdisk);
        let rec = VdiskRecord {
            name: name.to_string(),
            size_bytes: size,
            segment_blocks: seg / BLOCK_SIZE,
            generation: 1,
            created: now_secs(),
            read_only: false,
            parent: None,
            origin: None,
            lineage: id.0,
            cow: cow.unwrap_or_default(),
            container: pin.map(|c| c.0),
        };
        let stored = rec.clone();
        self.commit(move |t| {
            t.set_meta("next_vdisk", id.0 + 1)?;
            t.put_vdisk(id, &stored)
        })
        .await?;
        meta.next_vdisk += 1;
        meta.names.insert(name.to_string(), id);
        meta.vdisks.insert(
            id,
            VdiskMeta {
                rec,
                last_seq: 0,
                table: MappingTable::new(size / BLOCK_SIZE),
                streams: Streams::default(),
            },
        );
        info!(vdisk = name, size = %format_size(size), "vdisk created");
        Ok(Self::vdisk_view(&meta, id))
    }

    fn vdisk_view(meta: &Meta, id: VdiskId) -> VdiskView {
        let v = &meta.vdisks[&id];
        VdiskView {
            name: v.rec.name.clone(),
            id: id.0,
            size: v.rec.size_bytes,
            segment_size: v.rec.segment_blocks * BLOCK_SIZE,
            allocated: v.table.mapped_blocks() * BLOCK_SIZE,
            entries: v.table.len(),
            generation: v.rec.generation,
            created: v.rec.created,
            cow: v.rec.cow,
            origin: v.rec.origin.clone(),
            snapshots: meta
                .snapshots_of(id)
                .iter()
                .filter_map(|s| {
                    meta.vdisks[s]
                        .rec
                        .name
                        .split_once('@')
                        .map(|x| x.1.to_string())
                })
                .collect(),
            shared: meta.shared_blocks(&mapped_runs(&v.table)) * BLOCK_SIZE,
        }
    }

    pub async fn list_vdisk_views(&self) -> Vec<VdiskView> {
        let meta = self.meta.lock().await;
        let mut ids: Vec<(&String, &VdiskId)> = meta.names.iter().collect();
        ids.sort();
        ids.into_iter()
            .filter(|(_, id)| !meta.vdisks[id].rec.read_only)
            .map(|(_, &id)| Self::vdisk_view(&meta, id))
            .collect()
    }

    pub async fn vdisk_by_name(&self, name: &str) -> Result<VdiskView, ControlError> {
        let meta = self.meta.lock().await;
        let id = meta.by_name(name)?;
        Ok(Self::vdisk_view(&meta, id))
    }

    pub async fn map_view(&self, name: &str) -> Result<MapView, ControlError> {
        let meta = self.meta.lock().await;
        let id = meta.by_name(name)?;
        let v = &meta.vdisks[&id];
        let entries: Vec<MapEntryView> = v
            .table
            .entries()
            .map(|e| MapView::entry_view(&e, e.target.map(|t| meta.container_name(t.container))))
            .collect();
        Ok(MapView {
            name: name.to_string(),
            size: v.rec.size_bytes,
            generation: v.rec.generation,
            entries,
        })
    }

    /// Deletes a vdisk (with its snapshots if `with_snapshots`), or a snapshot by its
    /// `VDISK@SNAP` name. Space no other table maps is zeroed and freed.
    pub async fn delete_vdisk(&self, name: &str, with_snapshots: bool) -> Result<(), ControlError> {
        self.delete_vdisk_checked(name, with_snapshots, false).await
    }

    /// Deletes a vdisk even while NBD clients are connected to it (or, with
    /// `with_snapshots`, to its snapshots): their I/O fails from then on.
    pub async fn force_delete_vdisk(
        &self,
        name: &str,
        with_snapshots: bool,
    ) -> Result<(), ControlError> {
        self.delete_vdisk_checked(name, with_snapshots, true).await
    }

    /// Without `force`, a vdisk that clients are connected to (as `rbd rm` refuses an image
    /// with watchers) is refused: deleting it fails every I/O they send.
    async fn delete_vdisk_checked(
        &self,
        name: &str,
        with_snapshots: bool,
        force: bool,
    ) -> Result<(), ControlError> {
        // Detaching waits for every holder with the metadata locked: wait out a silent one
        // first, without the lock.
        let ids = {
            let meta = self.meta.lock().await;
            let id = meta.by_name(name)?;
            let mut ids = meta.snapshots_of(id);
            ids.push(id);
            ids
        };
        self.agents.wait_heard(Some(&ids), "delete").await;
        let deadline = tokio::time::Instant::now() + CLIENTS_GONE_WAIT;
        loop {
            let mut meta = self.meta.lock().await;
            let id = meta.by_name(name)?;
            let snaps = meta.snapshots_of(id);
            if !snaps.is_empty() && !with_snapshots {
                let names: Vec<&str> = snaps
                    .iter()
                    .map(|s| meta.vdisks[s].rec.name.as_str())
                    .collect();
                return Err(ControlError::Invalid(format!(
                    "vdisk '{name}' has {} snapshot(s) ({}): delete them first (tabula snapshot delete {}) or pass --with-snapshots",
                    names.len(),
                    names.join(", "),
                    names[0]
                )));
            }
            let mut ids = snaps;
            ids.push(id);
            match self.refuse_connected(&meta, &format!("vdisk '{name}'"), &ids, force) {
                Err(_) if tokio::time::Instant::now() < deadline => {}
                r => {
                    r?;
                    self.delete_tables(&mut meta, &ids).await?;
                    info!(vdisk = name, "deleted");
                    return Ok(());
                }
            }
            drop(meta);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Refuses (unless `force`) to delete tables that NBD clients are connected to, saying
    /// which agents serve them and how to delete anyway. Callers ask again for up to
    /// [`CLIENTS_GONE_WAIT`] before refusing: a client that just disconnected reaches the
    /// controller with its agent's next report.
    fn refuse_connected(
        &self,
        meta: &Meta,
        what: &str,
        ids: &[VdiskId],
        force: bool,
    ) -> Result<(), ControlError> {
        let conns = self.agents.connections(ids);
        if conns.is_empty() {
            return Ok(());
        }
        let total: u32 = conns.iter().map(|c| c.2).sum();
        let list = conns
            .iter()
            .map(|(agent, v, n)| {
                let export = meta.vdisks.get(v).map_or("?", |m| m.rec.name.as_str());
                let s = if *n == 1 { "" } else { "s" };
                format!("agent {agent}: {n} connection{s} to {export}")
            })
            .collect::<Vec<_>>()
            .join("; ");
        if force {
            warn!(
                what,
                clients = total,
                connections = list,
                "deleting with clients connected (--force): their I/O fails from now on"
            );
            return Ok(());
        }
        let s = if total == 1 { "" } else { "s" };
        Err(ControlError::InUse(format!(
            "{what} has {total} connected client{s} ({list}): disconnect them first, or pass --force to delete it anyway (their I/O then fails)"
        )))
    }

    /// Deletes tables in one transaction, then detaches agents and frees what nobody else
    /// maps.
    async fn delete_tables(&self, meta: &mut Meta, ids: &[VdiskId]) -> Result<(), ControlError> {
        let removed: Vec<(VdiskId, VdiskMeta)> = ids
            .iter()
            .filter_map(|id| meta.vdisks.remove(id).map(|v| (*id, v)))
            .collect();
        let mut runs = Vec::new();
        let mut cows = Vec::new();
        for (id, v) in &removed {
            meta.names.remove(&v.rec.name);
            meta.refused.remove(id);
            runs.extend(meta.release(&mapped_runs(&v.table)));
            cows.extend(meta.take_cows(*id));
        }
        runs.extend(cows.iter().copied());
        let stored = runs.clone();
        let ids_stored: Vec<VdiskId> = removed.iter().map(|(id, _)| *id).collect();
        let result = self
            .commit(move |t| {
                for &id in &ids_stored {
                    t.delete_vdisk(id)?;
                }
                for &(p, _) in &cows {
                    t.delete_cow(p)?;
                }
                t.put_zeroing_runs(&stored)
            })
            .await;
        if let Err(e) = result {
            // Nothing was stored: put everything back as it was.
            for (id, v) in removed.into_iter().rev() {
                meta.names.insert(v.rec.name.clone(), id);
                meta.vdisks.insert(id, v);
            }
            // Releasing freed some blocks outright: recount from the tables.
            meta.shared = SharedBlocks::from_mappings(
                meta.vdisks.values().flat_map(|v| mapped_runs(&v.table)),
            );
            return Err(e);
        }
        meta.mark_zeroing(&runs);
        let mut acked = true;
        for (id, _) in &removed {
            acked &= self.push(*id, None, Command::Detach { vdisk: *id }).await;
            self.agents.forget_vdisk(*id);
        }
        if acked && !runs.is_empty() {
            self.zero_and_free(meta, runs).await?;
        }
        Ok(())
    }

    pub async fn resize_vdisk(&self, name: &str, size: u64) -> Result<VdiskView, ControlError> {
        check_vdisk_size(size).map_err(invalid_size)?;
        // The new table is pushed to every holder with the metadata locked: wait out a silent
        // one first, without the lock.
        let id = self.meta.lock().await.by_name(name)?;
        self.agents.wait_heard(Some(&[id]), "resize").await;
        let mut meta = self.meta.lock().await;
        let id = meta.by_name(name)?;
        let new_blocks = size / BLOCK_SIZE;
        let v = meta.vdisks.get_mut(&id).expect("named vdisk exists");
        let old_blocks = v.table.size();
        if v.rec.read_only {
            return Err(ControlError::Invalid(format!(
                "'{name}' is a snapshot: snapshots cannot be resized (clone it first)"
            )));
        }
        let mut cut = Vec::new();
        if new_blocks < old_blocks {
            for e in v.table.entries_in(new_blocks, old_blocks) {
                if let Some(t) = e.target {
                    cut.push((t, e.len()));
                }
            }
        }
        let runs = meta.release(&cut);
        let v = meta.vdisks.get_mut(&id).expect("named vdisk exists");
        // The record is persisted with the table edit, so it carries the new size.
        v.rec.size_bytes = size;
        let stored = runs.clone();
        let seq = self.commit_table_edit(
            &mut meta,
            id,
            (new_blocks.min(old_blocks), new_blocks.max(old_blocks)),
            |t| {
                t.resize(new_blocks);
                Ok(())
            },
            move |t| t.put_zeroing_runs(&stored),
        )?;
        self.journal.wait(seq).await?;
        meta.mark_zeroing(&runs);
        let snap = Self::snapshot_of(&meta, id);
        let acked = self.push(id, None, Command::Replace(snap)).await;
        if acked && !runs.is_empty() {
            self.zero_and_free(&mut meta, runs).await?;
        }
        info!(vdisk = name, size = %format_size(size), "vdisk resized");
        Ok(Self::vdisk_view(&meta, id))
    }

    fn snapshot_of(meta: &Meta, id: VdiskId) -> TableSnapshot {
        let v = &meta.vdisks[&id];
        TableSnapshot {
            vdisk: id,
            name: v.rec.name.clone(),
            size_bytes: v.rec.size_bytes,
            segment_blocks: v.rec.segment_blocks,
            generation: Generation(v.rec.generation),
            read_only: v.rec.read_only,
            entries: meta.no_write_overlay(id, v.table.entries().collect()),
        }
    }

    // ---- status and check ----

    pub async fn status(&self) -> StatusView {
        let meta = self.meta.lock().await;
        let containers: Vec<ContainerView> = meta
            .containers
            .keys()
            .map(|&id| self.container_view(&meta, id))
            .collect();
        let capacity: u64 = containers.iter().map(|c| c.size).sum();
        let free: u64 = containers.iter().map(|c| c.free).sum();
        let zeroing: u64 = containers.iter().map(|c| c.zeroing).sum();
        let agents = self.agents.views(|id| {
            meta.vdisks
                .get(&id)
                .map(|v| (v.rec.name.clone(), v.rec.generation))
        });
        StatusView {
            capacity,
            allocated: capacity - free - zeroing,
            free,
            zeroing,
            vdisks: meta.vdisks.values().filter(|v| !v.rec.read_only).count(),
            provisioned: meta
                .vdisks
                .values()
                .filter(|v| !v.rec.read_only)
                .map(|v| v.rec.size_bytes)
                .sum(),
            containers,
            agents,
            out_of_space: meta.out_of_space(),
            low_space: self.check_low_space(&meta),
            enospc_faults: self.enospc_faults.load(Ordering::Relaxed),
            data_dir: self.cfg.data_dir.display().to_string(),
            controllers: self
                .cfg
                .leadership
                .as_ref()
                .map(|l| l.controllers())
                .unwrap_or_default(),
        }
    }

    /// Checks the stored metadata of the running controller.
    pub async fn check(&self) -> Result<CheckView, ControlError> {
        let meta = self.meta.lock().await;
        self.journal.wait(self.journal.last()).await?;
        // The store's lock may be held across a replicated commit (an etcd round trip, which
        // the runtime's workers drive): never wait for it on a worker.
        let load = || self.store.load();
        let loaded = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => load(),
            _ => tokio::task::block_in_place(load),
        }
        .map_err(storage)?;
        let mut view = crate::check::check_loaded(&loaded);
        // Every reachable container's label, through the handles already open.
        for (id, rec) in &loaded.containers {
            let read = match meta.containers.get(id).and_then(|c| c.reachable()) {
                Some(f) if rec.label_blocks > 0 => Some(
                    pool::container_io(f, self.cfg.container_timeout, crate::label::read).await,
                ),
                _ => None,
            };
            crate::check::verify_label(loaded.pool_id, *id, rec, read, &mut view);
        }
        Ok(view)
    }

    /// The pool's random id, written in every container's label.
    /// The store, for images of it sent to other controllers (`crate::ha`).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Whether a metadata commit failed, so that nothing more can be acknowledged.
    pub fn metadata_failed(&self) -> bool {
        self.journal.failed()
    }

    /// Whether this controller may answer agents: always without high availability; with
    /// it, while its leadership is certain (`crate::ha`).
    pub fn leading(&self) -> bool {
        self.cfg.leadership.as_ref().is_none_or(|l| l.valid())
    }

    pub fn pool_id(&self) -> u64 {
        self.pool_id
    }

    // ---- agents ----

    /// Attaches `agent` (in `session`, if given: a networked agent's) to vdisk `name` and
    /// returns its table.
    pub async fn open_vdisk_in(
        &self,
        agent: &str,
        session: Option<u64>,
        name: &str,
    ) -> Result<TableSnapshot, ControlError> {
        let meta = self.meta.lock().await;
        let id = meta.by_name(name)?;
        if !self.agents.attach(agent, session, id) {
            return Err(ControlError::Unavailable(format!(
                "agent '{agent}' has no current session (register again)"
            )));
        }
        let snap = Self::snapshot_of(&meta, id);
        let seq = meta.vdisks[&id].last_seq;
        drop(meta);
        self.journal.wait(seq).await?;
        Ok(snap)
    }

    /// Sends `cmd` to every agent holding `vdisk` (but `except`) at once and waits until each
    /// has acknowledged or been evicted (its lease waited out). Returns false if an agent
    /// without a lease failed to acknowledge: then superseded space must not be reused
    /// until a restart has resynchronised every agent.
    async fn push(&self, vdisk: VdiskId, except: Option<&str>, cmd: Command) -> bool {
        let holders = self.agents.holders(vdisk, except);
        let results = futures::future::join_all(
            holders
                .iter()
                .map(|h| self.agents.deliver(h, cmd.clone(), self.cfg.ack_timeout)),
        )
        .await;
        let all = !results.contains(&Delivery::Failed);
        if !all {
            warn!(%vdisk, "freed space stays reserved until every agent has resynchronised");
        }
        all
    }

    /// Queues one change and waits until it is durable.
    async fn commit(
        &self,
        op: impl FnOnce(&mut Txn<'_>) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<(), ControlError> {
        let seq = self.journal.push(Box::new(op));
        self.journal.wait(seq).await
    }

    /// Zeroes runs waiting in `zeroing`, then moves them to free space, durably. During the
    /// restart grace the runs wait (in `zeroing`, so a crash loses nothing) until it ends.
    async fn zero_and_free(
        &self,
        meta: &mut Meta,
        runs: Vec<(Phys, u64)>,
    ) -> Result<(), ControlError> {
        if Instant::now() < self.grace_until {
            let until = self.grace_until;
            meta.deferred
                .extend(runs.into_iter().map(|(p, l)| (until, p, l)));
            return Ok(());
        }
        // Space in a container that does not answer waits (still recorded as zeroing) and
        // is tried again later.
        let (runs, unreachable): (Vec<_>, Vec<_>) = runs.into_iter().partition(|(p, _)| {
            meta.containers
                .get(&p.container)
                .is_some_and(|c| c.reachable().is_some())
        });
        let retry_at = Instant::now() + pool::ZEROING_RETRY;
        meta.deferred
            .extend(unreachable.into_iter().map(|(p, l)| (retry_at, p, l)));
        // Punch every run, then make the holes durable with one sync per container (a sync
        // per run would make deleting a fragmented vdisk take minutes).
        let mut touched: Vec<ContainerId> = Vec::new();
        let punched = (|| {
            for &(p, l) in &runs {
                let c = &meta.containers[&p.container];
                let file = c.reachable().expect("partitioned").clone();
                tokio::task::block_in_place(|| {
                    file.zero_range(p.block * BLOCK_SIZE, l * BLOCK_SIZE)
                })
                .map_err(|e| storage(format!("zeroing freed space in {}: {e}", c.rec.path)))?;
                if !touched.contains(&p.container) {
                    touched.push(p.container);
                }
            }
            for &id in &touched {
                let c = &meta.containers[&id];
                let file = c.reachable().expect("partitioned").clone();
                tokio::task::block_in_place(|| file.sync())
                    .map_err(|e| storage(format!("syncing {} after zeroing: {e}", c.rec.path)))?;
            }
            Ok::<_, ControlError>(())
        })();
        if let Err(e) = punched {
            // Still recorded as zeroing: the whole batch is tried again later. The change
            // that freed the space is committed, so whoever freed it has succeeded.
            warn!(error = %e, runs = runs.len(), "zeroing freed space failed; it is tried again later");
            meta.deferred
                .extend(runs.into_iter().map(|(p, l)| (retry_at, p, l)));
            return Ok(());
        }
        let mut deltas = Vec::new();
        for &(p, l) in &runs {
            meta.free(p, l, &mut deltas)?;
        }
        let stored = runs.clone();
        let result = self
            .commit(move |t| {
                for &(p, _) in &stored {
                    t.delete_zeroing(p.container, p.block)?;
                }
                write_deltas(t, &deltas)
            })
            .await;
        // The metadata lock is held throughout, so nobody allocates from the runs before
        // they are durably free.
        if let Err(e) = result {
            // Take the runs back out of the in-memory free map: the store still has them
            // waiting to be zeroed, and handing them out now would let the next start zero
            // a new owner's data. The next start redoes the zeroing.
            for &(p, l) in &runs {
                if let Some(m) = meta.pool.get_mut(p.container) {
                    m.reserve(p.block, l);
                }
            }
            return Err(storage(format!(
                "{e}; the space stays reserved until tabula restarts"
            )));
        }
        for &(p, _) in &runs {
            meta.zeroing.remove(&(p.container, p.block));
        }
        Ok(())
    }

    /// Allocates for a write fault, or starts a copy-on-write. Returns the answer and the
    /// journal ticket to wait for before giving it to the agent.
    fn write_fault(&self, meta: &mut Meta, f: &Fault) -> Result<(RangeUpdate, u64), ControlError> {
        let readahead = self.cfg.readahead_segments;
        let v = meta.vdisk(f.vdisk)?;
        if v.rec.read_only {
            return Err(read_only(&v.rec.name));
        }
        let seg = v.rec.segment_blocks;
        let size = v.table.size();
        let nsegs = size.div_ceil(seg);
        let (s0, s1) = (f.segments.0.min(nsegs), f.segments.1.min(nsegs));
        if s0 >= s1 {
            return Err(ControlError::Invalid(format!(
                "segments {}..{} lie outside vdisk {} ({nsegs} segments)",
                f.segments.0, f.segments.1, v.rec.name
            )));
        }
        if meta.maps_moving(&v.table.entries_in(s0 * seg, (s1 * seg).min(size))) {
            return Err(moving_retry());
        }
        // What each segment needs: space, a flip of unshared `new` entries to `normal`, or a
        // copy-on-write.
        let mut need: Vec<u64> = Vec::new();
        // Unmapped pieces of segments that are partly mapped (left by a shrink and a grow):
        // only the gaps get space, the mapped part stays.
        let mut gaps: Vec<(u64, u64)> = Vec::new();
        let mut flips: Vec<u64> = Vec::new();
        let mut cows: Vec<u64> = Vec::new();
        let mut copies = Vec::new();
        for s in s0..s1 {
            if let Some(copy) = self.pending_cow(meta, f, s)? {
                copies.push(copy);
                continue;
            }
            let v = &meta.vdisks[&f.vdisk];
            let (mut unmapped, mut normal, mut new, mut shared) = (false, false, false, false);
            for p in v.table.lookup(s * seg, ((s + 1) * seg).min(size)) {
                match (p.state, p.target) {
                    (State::Zero, None) => unmapped = true,
                    (State::Normal | State::Zero, Some(_)) => normal = true,
                    (State::New, Some(t)) => {
                        new = true;
                        shared |= meta.shared.shared_in(t, p.end - p.begin) > 0;
                    }
                    (other, _) => {
                        return Err(ControlError::Invalid(format!(
                            "write to segment {s} of vdisk {} in state {other} is not supported",
                            v.rec.name
                        )));
                    }
                }
            }
            match (new, normal, shared || unmapped) {
                (false, true, _) if unmapped => gaps.extend(
                    v.table
                        .lookup(s * seg, ((s + 1) * seg).min(size))
                        .into_iter()
                        .filter(|p| p.target.is_none())
                        .map(|p| (p.begin, p.end)),
                ),
                (false, _, _) if unmapped => need.push(s),
                (false, _, _) => {}
                (true, false, true) => cows.push(s),
                (true, _, false) => flips.push(s),
                (true, true, true) => {
                    return Err(ControlError::Invalid(format!(
                        "segment {s} of vdisk {} mixes shared and writable space; run tabula check",
                        v.rec.name
                    )));
                }
            }
        }
        let lo = s0;
        let mut hi = s1;
        if need.is_empty() && flips.is_empty() && gaps.is_empty() {
            let mut deltas = Vec::new();
            let started = self.start_cows(meta, f.vdisk, &cows, &f.agent, &mut deltas)?;
            // Mapped already (perhaps by a concurrent fault whose commit is still in
            // flight), or copies to do first (whose reservation must be durable).
            let seq = if !started.is_empty() {
                self.journal.push(Box::new(started.persist(deltas)))
            } else if copies.is_empty() {
                meta.vdisks[&f.vdisk].last_seq
            } else {
                // Our own copy again: its reservation may still be on its way to disk.
                self.journal.last()
            };
            copies.extend(started.copies);
            let mut update =
                self.range_update(meta, f.vdisk, lo * seg, (hi * seg).min(size), false);
            update.copies = copies;
            return Ok((update, seq));
        }
        let v = &meta.vdisks[&f.vdisk];
        // A fault where an earlier one ended, right after a mapped segment, continues a
        // sequential stream: allocate ahead (see `Streams`).
        let mut optional = Vec::new();
        let mut prev_target = None;
        if let (Some(&first), Some(&last)) = (need.first(), need.last()) {
            prev_target = (first > 0)
                .then(|| v.table.lookup(first * seg - 1, first * seg)[0].target)
                .flatten();
            if prev_target.is_some() && v.streams.continues(first) {
                let mut s = last + 1;
                while s < nsegs && s <= last + readahead {
                    let p = v.table.lookup(s * seg, ((s + 1) * seg).min(size));
                    if p.len() == 1 && p[0].target.is_none() && p[0].state == State::Zero {
                        optional.push(s);
                        s += 1;
                    } else {
                        break;
                    }
                }
            }
        }
        let flip_entries: Vec<Entry> = flips
            .iter()
            .flat_map(|&s| v.table.entries_in(s * seg, ((s + 1) * seg).min(size)))
            .collect();
        // Allocate: required segments must all succeed; read-ahead is best effort.
        let mut deltas = Vec::new();
        let mut got: Vec<(u64, u64, Phys)> = Vec::new(); // (begin block, len, target)
        let mut place = Placement {
            seg,
            hint: prev_target.map(|t| t.offset(1)),
            scope: meta.scope(f.vdisk),
        };
        for (a, b) in contiguous_runs(&need) {
            let end = (b * seg).min(size);
            if fill(meta, &mut place, (a * seg, end), &mut deltas, &mut got)? < end {
                return Err(self.no_space(meta, f.vdisk, &got));
            }
        }
        for &(b, e) in &gaps {
            let Some((at, n)) = meta.alloc(1, e - b, e - b, None, place.scope, &mut deltas) else {
                return Err(self.no_space(meta, f.vdisk, &got));
            };
            got.push((b, n, at));
        }
        // Copies start only once the required space is had, so that a fault refused for
        // want of space leaves no reservation behind; and before read-ahead, which is
        // optional and must not take their space.
        let started = match self.start_cows(meta, f.vdisk, &cows, &f.agent, &mut deltas) {
            Ok(c) => c,
            Err(e) => {
                give_back(meta, &got)?;
                return Err(e);
            }
        };
        if let (Some(&a), Some(&b)) = (optional.first(), optional.last()) {
            let end = ((b + 1) * seg).min(size);
            let reached = fill(meta, &mut place, (a * seg, end), &mut deltas, &mut got)?;
            hi = hi.max(reached.div_ceil(seg));
        }
        meta.refused.remove(&f.vdisk);
        self.check_low_space(meta);
        if !need.is_empty() {
            if let Some(v) = meta.vdisks.get_mut(&f.vdisk) {
                v.streams.record(hi);
            }
        }
        // Install in the table and persist the span that changed.
        let (b, e) = (lo * seg, (hi * seg).min(size));
        let result = self.commit_table_edit(
            meta,
            f.vdisk,
            (b, e),
            |t| {
                for &(pos, n, at) in &got {
                    t.set(pos, pos + n, Some(at), State::Normal)?;
                }
                for x in &flip_entries {
                    t.set(x.begin, x.end, x.target, State::Normal)?;
                }
                Ok(())
            },
            started.persist(deltas),
        );
        match result {
            Ok(seq) => {
                let mut update = self.range_update(meta, f.vdisk, b, e, true);
                copies.extend(started.copies);
                update.copies = copies;
                Ok((update, seq.max(self.journal.last())))
            }
            Err(err) => {
                give_back(meta, &got)?;
                Self::undo_cows(meta, &started)?;
                Err(err)
            }
        }
    }

    /// A fault's allocation for `vdisk` failed: gives back what it took and says so.
    fn no_space(&self, meta: &mut Meta, vdisk: VdiskId, got: &[(u64, u64, Phys)]) -> ControlError {
        if let Err(e) = give_back(meta, got) {
            return e;
        }
        meta.refused.insert(vdisk);
        self.enospc_faults.fetch_add(1, Ordering::Relaxed);
        ControlError::NoSpace
    }

    /// Edits the table of `vdisk` within `range` and queues the changed span of entries, the
    /// next generation and `extra` as one journal change. Returns its ticket: the caller must
    /// wait for it before acting on the change. (If the commit fails, the journal stops
    /// acknowledging anything, so memory running ahead of the store is never exposed.)
    fn commit_table_edit(
        &self,
        meta: &mut Meta,
        vdisk: VdiskId,
        range: (u64, u64),
        edit: impl FnOnce(&mut MappingTable) -> Result<(), TableError>,
        extra: impl FnOnce(&mut Txn<'_>) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<u64, ControlError> {
        let w = Self::edit_table(meta, vdisk, range, edit)?;
        Ok(self.queue(meta, vec![w], extra))
    }

    /// Queues the writes of several tables and `extra` as one journal change (one
    /// transaction) and returns its ticket.
    fn queue(
        &self,
        meta: &mut Meta,
        writes: Vec<TableWrite>,
        extra: impl FnOnce(&mut Txn<'_>) -> Result<(), StoreError> + Send + 'static,
    ) -> u64 {
        let ids: Vec<VdiskId> = writes.iter().map(|w| w.vdisk).collect();
        let seq = self.journal.push(Box::new(move |t| {
            for w in &writes {
                w.apply(t)?;
            }
            extra(t)
        }));
        for id in ids {
            if let Some(v) = meta.vdisks.get_mut(&id) {
                v.last_seq = seq;
            }
        }
        seq
    }

    /// Edits the table of `vdisk` within `range` in memory and bumps its generation;
    /// returns the span to write.
    fn edit_table(
        meta: &mut Meta,
        vdisk: VdiskId,
        (b, e): (u64, u64),
        edit: impl FnOnce(&mut MappingTable) -> Result<(), TableError>,
    ) -> Result<TableWrite, ControlError> {
        let v = meta.vdisk_mut(vdisk)?;
        let (olo, ohi) = span_edges(&v.table, b, e);
        let undo = v.table.entries_in(olo, ohi);
        if let Err(err) = edit(&mut v.table) {
            // Edits are checked before they change anything they cannot finish, but restore
            // the span anyway so a refused edit leaves no trace.
            let _ = v.table.remove(olo, ohi);
            for x in &undo {
                let _ = v.table.set(x.begin, x.end, x.target, x.state);
            }
            return Err(storage(err));
        }
        let (nlo, nhi) = span_edges(&v.table, b, e);
        let (slo, shi) = (olo.min(nlo), ohi.max(nhi));
        let entries = v.table.entries_in(slo, shi);
        v.rec.generation += 1;
        Ok(TableWrite {
            vdisk,
            lo: slo,
            hi: shi,
            entries,
            rec: v.rec.clone(),
        })
    }

    /// The entries of `[b, e)` now; `change` says the update carries the whole of the change
    /// that made the current generation.
    fn range_update(
        &self,
        meta: &Meta,
        vdisk: VdiskId,
        b: u64,
        e: u64,
        change: bool,
    ) -> RangeUpdate {
        let v = &meta.vdisks[&vdisk];
        RangeUpdate {
            vdisk,
            generation: Generation(v.rec.generation),
            range: (b, e),
            entries: meta.no_write_overlay(vdisk, v.table.entries_in(b, e)),
            change,
            copies: Vec::new(),
        }
    }

    /// Unmaps whole segments (TRIM, or WRITE_ZEROES that may deallocate) and frees them.
    async fn unmap_fault(&self, meta: &mut Meta, f: &Fault) -> Result<RangeUpdate, ControlError> {
        let v = meta.vdisk(f.vdisk)?;
        let seg = v.rec.segment_blocks;
        let size = v.table.size();
        let b = (f.segments.0 * seg).min(size);
        let e = (f.segments.1 * seg).min(size);
        if b >= e {
            return Err(ControlError::Invalid(format!(
                "segments {}..{} lie outside vdisk {}",
                f.segments.0, f.segments.1, v.rec.name
            )));
        }
        if v.rec.read_only {
            return Err(read_only(&v.rec.name));
        }
        if meta.maps_moving(&v.table.entries_in(b, e)) {
            return Err(moving_retry());
        }
        let cut: Vec<(Phys, u64)> = v
            .table
            .entries_in(b, e)
            .into_iter()
            .filter_map(|x| x.target.map(|t| (t, x.len())))
            .collect();
        if cut.is_empty() && v.table.entries_in(b, e).is_empty() {
            return Ok(self.range_update(meta, f.vdisk, b, e, false));
        }
        // Blocks a snapshot or clone still maps stay; only the rest is freed.
        let runs = meta.release(&cut);
        let stored = runs.clone();
        let seq = self.commit_table_edit(
            meta,
            f.vdisk,
            (b, e),
            |t| t.remove(b, e),
            move |t| t.put_zeroing_runs(&stored),
        )?;
        self.journal.wait(seq).await?;
        meta.mark_zeroing(&runs);
        let update = self.range_update(meta, f.vdisk, b, e, true);
        if self
            .push(f.vdisk, None, Command::Update(update.clone()))
            .await
        {
            self.zero_and_free(meta, runs).await?;
        }
        Ok(update)
    }
}

/// Where a vdisk's new space goes: whole segments, in its pinned container if it has one,
/// each run continuing physically after the last one placed.
struct Placement {
    seg: u64,
    hint: Option<Phys>,
    scope: Option<ContainerId>,
}

/// Allocates space for virtual blocks `[pos, end)` in whole segments, as far as the pool
/// allows, as `place` says. Records what it took in `got` and returns how far it got. (The
/// last segment of a vdisk may be partial: the unused tail of its allocation goes straight
/// back.)
fn fill(
    meta: &mut Meta,
    place: &mut Placement,
    (mut pos, end): (u64, u64),
    deltas: &mut Vec<FreeDelta>,
    got: &mut Vec<(u64, u64, Phys)>,
) -> Result<u64, ControlError> {
    let seg = place.seg;
    while pos < end {
        let want = (end - pos).div_ceil(seg) * seg;
        let Some((at, n)) = meta.alloc(seg, seg, want, place.hint, place.scope, deltas) else {
            break;
        };
        let used = n.min(end - pos);
        if n > used {
            meta.free(at.offset(used), n - used, deltas)?;
        }
        got.push((pos, used, at));
        place.hint = Some(at.offset(used));
        pos += used;
    }
    Ok(pos)
}

/// Returns to the pool what a fault allocated but never persisted.
fn give_back(meta: &mut Meta, got: &[(u64, u64, Phys)]) -> Result<(), ControlError> {
    for &(_, n, at) in got {
        let mut scratch = Vec::new();
        meta.free(at, n, &mut scratch)?;
    }
    Ok(())
}

/// Groups sorted segment indexes into `[a, b)` runs.
fn contiguous_runs(segs: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &s in segs {
        match out.last_mut() {
            Some((_, b)) if *b == s => *b += 1,
            _ => out.push((s, s + 1)),
        }
    }
    out
}

#[async_trait::async_trait]
impl ControlPlane for Controller {
    async fn register_agent(
        &self,
        name: &str,
        port: Arc<dyn AgentPort>,
        held: Vec<VdiskId>,
    ) -> Result<(), ControlError> {
        // In-process: no lease, the agent lives and dies with the controller.
        self.agents
            .register(name, port, held, None, "in-process")
            .map(|_| ())
    }

    async fn open_vdisk(&self, agent: &str, name: &str) -> Result<TableSnapshot, ControlError> {
        self.open_vdisk_in(agent, None, name).await
    }

    async fn list_vdisks(&self) -> Result<Vec<String>, ControlError> {
        let meta = self.meta.lock().await;
        let mut names: Vec<String> = meta.names.keys().cloned().collect();
        names.sort();
        Ok(names)
    }

    async fn describe_vdisk(&self, name: &str) -> Result<VdiskSummary, ControlError> {
        let meta = self.meta.lock().await;
        let id = meta.by_name(name)?;
        let rec = &meta.vdisks[&id].rec;
        Ok(VdiskSummary {
            vdisk: id,
            name: rec.name.clone(),
            size_bytes: rec.size_bytes,
            read_only: rec.read_only,
        })
    }

    async fn report_container(
        &self,
        agent: &str,
        container: ContainerId,
        error: Option<String>,
    ) -> Result<(), ControlError> {
        self.container_report(agent, container, error).await
    }

    async fn container(&self, id: ContainerId) -> Result<ContainerLocation, ControlError> {
        let meta = self.meta.lock().await;
        let c = meta
            .containers
            .get(&id)
            .ok_or_else(|| ControlError::NotFound(format!("container {id}")))?;
        Ok(ContainerLocation {
            id,
            name: c.rec.name.clone(),
            path: c.rec.path.clone(),
            size_bytes: c.rec.size_blocks * BLOCK_SIZE,
            failed: match &c.health {
                pool::Health::Failed { reason, .. } => Some(reason.clone()),
                pool::Health::Ok => None,
            },
            pool_id: if c.rec.label_blocks > 0 {
                self.pool_id
            } else {
                0
            },
        })
    }

    async fn fault(&self, fault: Fault) -> Result<RangeUpdate, ControlError> {
        if matches!(fault.op, FaultOp::Trim | FaultOp::WriteZeroes) {
            // An unmap waits for every holder's acknowledgement with the metadata locked:
            // wait out a silent one first, without the lock.
            self.agents.wait_heard(Some(&[fault.vdisk]), "unmap").await;
        }
        // While a change waits for an unresponsive agent's lease, the metadata stays locked;
        // rather than hold every agent's fault hostage, ask it to retry.
        let Ok(mut meta) = tokio::time::timeout(FAULT_LOCK_WAIT, self.meta.lock()).await else {
            return Err(ControlError::Retry {
                after_ms: 100,
                reason: "the controller is waiting for an agent to acknowledge a table change"
                    .into(),
            });
        };
        match fault.op {
            FaultOp::Write => {
                let (update, seq) = self.write_fault(&mut meta, &fault)?;
                // Wait outside the lock so concurrent faults share the commit.
                drop(meta);
                self.journal.wait(seq).await?;
                if update.change {
                    // Other agents exporting the vdisk must see the new mappings before
                    // this write completes, or they would read zeros where it wrote.
                    self.push(
                        fault.vdisk,
                        Some(&fault.agent),
                        Command::Allocated(update.clone()),
                    )
                    .await;
                }
                Ok(update)
            }
            FaultOp::Trim | FaultOp::WriteZeroes => self.unmap_fault(&mut meta, &fault).await,
            FaultOp::Copied => self.cow_done(meta, &fault).await,
            FaultOp::Read => {
                let v = meta.vdisk(fault.vdisk)?;
                let seg = v.rec.segment_blocks;
                let (b, e) = (
                    (fault.segments.0 * seg).min(v.table.size()),
                    (fault.segments.1 * seg).min(v.table.size()),
                );
                let update = self.range_update(&meta, fault.vdisk, b, e, false);
                if let Some(bad) = update.entries.iter().find(|x| !x.state.readable()) {
                    return Err(ControlError::Invalid(format!(
                        "blocks {}..{} are in state {}",
                        bad.begin, bad.end, bad.state
                    )));
                }
                let seq = v.last_seq;
                drop(meta);
                self.journal.wait(seq).await?;
                Ok(update)
            }
        }
    }
}

mod cow;
mod identity;
mod moves;
mod pool;
#[cfg(test)]
mod pool_tests;
mod snapshot;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod tests;
