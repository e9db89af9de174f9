//! Live moves of data between containers (seed 004 c12-20): draining a container and
//! migrating a vdisk, while hosts keep reading and writing.
//!
//! A move goes one physical run (at most [`STEP_BLOCKS`]) at a time, each step planned and
//! switched under the metadata lock:
//! 1. allocate a run elsewhere (in the target container for a migration; anywhere allocatable
//!    for a drain, whose container takes no new space);
//! 2. find every table that maps any of the old run (the vdisk and every snapshot and clone
//!    of its lineage) and set those ranges `no-write` on every agent (`SetState`, which
//!    drains in-flight I/O before it is acknowledged): from here on a write to the run
//!    faults, and the fault waits for the lock, so no write can land on the old run after
//!    its copy was read, and none is lost;
//! 3. copy the data and make the copy durable;
//! 4. switch every table that maps the run *now* to the new run in one transaction, with
//!    the old run recorded as zeroing, then push the new entries to every agent (each
//!    acknowledges once no I/O uses the old run) and zero and free the old run. The copy
//!    is taken without the lock, and snapshots taken or deleted, copies-on-write and
//!    rollbacks may change which tables map the run meanwhile; none of them writes it (its
//!    writes fault and wait for the switch), so the copy stays valid for all of them. Only
//!    space of the run freed meanwhile (it may have been reused), or a writable mapping of
//!    it the step did not hold, undoes the step.
//!
//! A crash before step 4's commit leaves the tables as they were (the new run was never
//! recorded as allocated, and agents resynchronise); after it, the old run is zeroed at the
//! next start like any freed space. Reads continue throughout; writes to the run being moved
//! wait for one step (milliseconds).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tabula_api::admin::{ContainerView, MoveView};
use tabula_api::{Command, ControlError};
use tabula_core::{BLOCK_SIZE, ContainerId, Entry, MappingTable, Phys, State, VdiskId};
use tracing::{info, warn};

use super::snapshot::lineage;
use super::{Controller, Meta, write_deltas};

/// The most blocks one step moves (4 MiB): writes to them wait for one step.
const STEP_BLOCKS: u64 = 1024;

/// What a move moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MoveKind {
    /// Everything a container holds, to the rest of the pool.
    Drain(ContainerId),
    /// Everything a vdisk maps outside `to`, into `to`.
    Migrate { vdisk: VdiskId, to: ContainerId },
}

/// A move in progress (or finished), as `tabula container drain` and `vdisk migrate` follow
/// it.
pub struct MoveJob {
    kind: MoveKind,
    /// The container drained or the vdisk migrated.
    subject: String,
    target: Option<String>,
    total: AtomicU64,
    moved: AtomicU64,
    cancel: AtomicBool,
    started: Instant,
    outcome: parking_lot::Mutex<Option<Result<(), String>>>,
    finished: parking_lot::Mutex<Option<Instant>>,
    /// Where the next step starts looking: (vdisk, block).
    cursor: parking_lot::Mutex<(VdiskId, u64)>,
    /// The end of the last run allocated, so consecutive runs stay contiguous.
    hint: parking_lot::Mutex<Option<Phys>>,
}

impl MoveJob {
    fn new(kind: MoveKind, subject: String, target: Option<String>, total: u64) -> MoveJob {
        MoveJob {
            kind,
            subject,
            target,
            total: AtomicU64::new(total),
            moved: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            started: Instant::now(),
            outcome: parking_lot::Mutex::new(None),
            finished: parking_lot::Mutex::new(None),
            cursor: parking_lot::Mutex::new((VdiskId(0), 0)),
            hint: parking_lot::Mutex::new(None),
        }
    }

    fn running(&self) -> bool {
        self.outcome.lock().is_none()
    }

    pub(super) fn view(&self) -> MoveView {
        let outcome = self.outcome.lock().clone();
        let end = (*self.finished.lock()).unwrap_or_else(Instant::now);
        let elapsed = end.duration_since(self.started);
        let moved = self.moved.load(Ordering::Relaxed);
        let (state, error) = match outcome {
            None => ("running", None),
            Some(Ok(())) if self.cancel.load(Ordering::Relaxed) => ("cancelled", None),
            Some(Ok(())) => ("done", None),
            Some(Err(e)) => ("failed", Some(e)),
        };
        MoveView {
            kind: match self.kind {
                MoveKind::Drain(_) => "drain",
                MoveKind::Migrate { .. } => "migrate",
            }
            .to_string(),
            subject: self.subject.clone(),
            target: self.target.clone(),
            state: state.to_string(),
            error,
            total: self.total.load(Ordering::Relaxed).max(moved),
            moved,
            elapsed_ms: elapsed.as_millis() as u64,
            rate: if elapsed.as_secs_f64() > 0.0 {
                (moved as f64 / elapsed.as_secs_f64()) as u64
            } else {
                0
            },
        }
    }
}

/// What a step decided under the lock, for the copy and the switch.
struct StepPlan {
    from: Phys,
    to: Phys,
    n: u64,
    lineage: u64,
    mappers: Vec<Mapper>,
    src: Arc<tabula_container::Container>,
    dst: Arc<tabula_container::Container>,
    /// Journal ticket of the new run's reservation.
    reserved: u64,
    /// Whether every agent acknowledged the no-write state.
    acked: bool,
}

/// Whether two physical runs share a block.
fn overlaps(a: (Phys, u64), b: (Phys, u64)) -> bool {
    a.0.container == b.0.container && a.0.block < b.0.block + b.1 && b.0.block < a.0.block + a.1
}

/// One table's part in a step: the virtual ranges that map the old run.
#[derive(Debug, PartialEq, Eq)]
struct Mapper {
    vdisk: VdiskId,
    /// (virtual begin, virtual end, first physical block, state)
    pieces: Vec<(u64, u64, u64, State)>,
}

impl Mapper {
    fn span(&self) -> (u64, u64) {
        let lo = self.pieces.iter().map(|p| p.0).min().expect("non-empty");
        let hi = self.pieces.iter().map(|p| p.1).max().expect("non-empty");
        (lo, hi)
    }
}

/// Every piece of `table` that maps physical blocks `[at, at+n)`, clipped to them.
fn pieces_mapping(table: &MappingTable, at: Phys, n: u64) -> Vec<(u64, u64, u64, State)> {
    let mut out = Vec::new();
    for x in table.entries() {
        let Some(t) = x.target else { continue };
        if t.container != at.container {
            continue;
        }
        let (s, e) = (t.block.max(at.block), (t.block + x.len()).min(at.block + n));
        if s < e {
            let v = x.begin + (s - t.block);
            out.push((v, v + (e - s), s, x.state));
        }
    }
    out
}

impl Controller {
    /// Starts draining a container: nothing new is allocated in it, and everything it holds
    /// is moved to the rest of the pool while vdisks stay online.
    pub async fn drain_container(&self, name: &str) -> Result<MoveView, ControlError> {
        self.start_drain(name, false).await
    }

    /// Starts a drain, or goes on with one the last run did not finish (`resume`: its
    /// container may be down for now; the drain waits for it).
    pub(super) async fn start_drain(
        &self,
        name: &str,
        resume: bool,
    ) -> Result<MoveView, ControlError> {
        let key = format!("drain:{name}");
        self.finish_cancelled(&key).await;
        let mut meta = self.meta.lock().await;
        // Checked under the lock, so two requests at once start one drain.
        if let Some(j) = self.moves.lock().get(&key).filter(|j| j.running()) {
            return Ok(j.view());
        }
        let id = Self::container_id(&meta, name)?;
        let c = &meta.containers[&id];
        if !resume && c.reachable().is_none() {
            return Err(ControlError::Invalid(format!(
                "container '{name}' does not answer, so its data cannot be read to move it; wait until it answers again"
            )));
        }
        if let Some(v) = meta.vdisks.values().find(|v| v.rec.container == Some(id.0)) {
            return Err(ControlError::Invalid(format!(
                "vdisk '{}' is pinned to container '{name}': migrate it elsewhere first (tabula vdisk migrate {} --to OTHER)",
                v.rec.name, v.rec.name
            )));
        }
        let total = self.container_view(&meta, id).used;
        self.set_draining(&mut meta, id, true).await?;
        let job = Arc::new(MoveJob::new(
            MoveKind::Drain(id),
            name.to_string(),
            None,
            total,
        ));
        info!(container = name, bytes = total, "drain started");
        Ok(self.start_move(key, job))
    }

    /// Waits (a few seconds at most) for a cancelled move to finish its last step, so that
    /// starting it again starts a new one rather than finding the old one still running.
    async fn finish_cancelled(&self, key: &str) {
        for _ in 0..500 {
            let busy = self
                .moves
                .lock()
                .get(key)
                .is_some_and(|j| j.running() && j.cancel.load(Ordering::Relaxed));
            if !busy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Cancels a drain: what was moved stays moved, and the container takes new space again.
    pub async fn cancel_drain(&self, name: &str) -> Result<ContainerView, ControlError> {
        if let Some(j) = self.moves.lock().get(&format!("drain:{name}")) {
            j.cancel.store(true, Ordering::Relaxed);
        }
        let mut meta = self.meta.lock().await;
        let id = Self::container_id(&meta, name)?;
        self.set_draining(&mut meta, id, false).await?;
        info!(container = name, "drain cancelled");
        Ok(self.container_view(&meta, id))
    }

    async fn set_draining(
        &self,
        meta: &mut Meta,
        id: ContainerId,
        draining: bool,
    ) -> Result<(), ControlError> {
        let c = meta.containers.get_mut(&id).expect("looked up");
        if c.rec.draining == draining {
            return Ok(());
        }
        let mut rec = c.rec.clone();
        rec.draining = draining;
        let stored = rec.clone();
        self.commit(move |t| t.put_container(id, &stored)).await?;
        meta.containers.get_mut(&id).expect("looked up").rec = rec;
        self.check_low_space(meta);
        Ok(())
    }

    /// Starts moving everything a vdisk maps into container `to`, and pins it there so new
    /// space comes from there too.
    pub async fn migrate_vdisk(&self, name: &str, to: &str) -> Result<MoveView, ControlError> {
        let key = format!("migrate:{name}");
        let mut meta = self.meta.lock().await;
        if let Some(j) = self.moves.lock().get(&key).filter(|j| j.running()) {
            return Err(ControlError::Exists(format!(
                "vdisk '{name}' is already being migrated to {}",
                j.target.clone().unwrap_or_default()
            )));
        }
        let vid = meta.by_name(name)?;
        let cid = Self::container_id(&meta, to)?;
        let v = &meta.vdisks[&vid];
        if v.rec.read_only {
            return Err(ControlError::Invalid(format!(
                "'{name}' is a snapshot: migrate its vdisk (shared space moves with it)"
            )));
        }
        if !meta.containers[&cid].allocatable() {
            return Err(ControlError::Invalid(format!(
                "container '{to}' takes no new space (failed or draining)"
            )));
        }
        // Pinned there, every later first write allocates there.
        super::segment_fits(&meta, v.rec.segment_blocks, Some(cid), |_| {
            format!(
                "migrate '{name}' to a container of at least {}",
                tabula_core::format_size_exact(v.rec.segment_blocks * BLOCK_SIZE)
            )
        })?;
        let total: u64 = v
            .table
            .entries()
            .filter(|x| x.target.is_some_and(|t| t.container != cid))
            .map(|x| x.len() * BLOCK_SIZE)
            .sum();
        let mut rec = v.rec.clone();
        rec.container = Some(cid.0);
        let stored = rec.clone();
        self.commit(move |t| t.put_vdisk(vid, &stored)).await?;
        meta.vdisks.get_mut(&vid).expect("looked up").rec = rec;
        let job = Arc::new(MoveJob::new(
            MoveKind::Migrate {
                vdisk: vid,
                to: cid,
            },
            name.to_string(),
            Some(to.to_string()),
            total,
        ));
        *job.cursor.lock() = (vid, 0);
        info!(vdisk = name, to, bytes = total, "migration started");
        Ok(self.start_move(key, job))
    }

    /// The drain of container `name`, if one was started.
    pub(super) fn drain_view(&self, name: &str) -> Option<MoveView> {
        self.moves
            .lock()
            .get(&format!("drain:{name}"))
            .map(|j| j.view())
    }

    /// Moves in progress and finished since the start.
    pub fn list_moves(&self) -> Vec<MoveView> {
        self.moves.lock().values().map(|j| j.view()).collect()
    }

    fn start_move(&self, key: String, job: Arc<MoveJob>) -> MoveView {
        let view = job.view();
        self.moves.lock().insert(key, job.clone());
        let me = self.me.clone();
        tokio::spawn(async move {
            let outcome = loop {
                if job.cancel.load(Ordering::Relaxed) {
                    break Ok(());
                }
                let Some(ctl) = me.upgrade() else {
                    break Err("the controller stopped".to_string());
                };
                match ctl.move_step(&job).await {
                    Ok(Some(blocks)) => {
                        job.moved.fetch_add(blocks * BLOCK_SIZE, Ordering::Relaxed);
                    }
                    Ok(None) => break Ok(()),
                    Err(ControlError::Retry { after_ms, .. }) => {
                        tokio::time::sleep(Duration::from_millis(after_ms)).await;
                    }
                    Err(e) => break Err(e.to_string()),
                }
            };
            let v = job.view();
            match &outcome {
                Ok(()) => info!(
                    kind = v.kind,
                    subject = v.subject,
                    moved = v.moved,
                    ms = v.elapsed_ms,
                    "move finished"
                ),
                Err(e) => warn!(kind = v.kind, subject = v.subject, error = e, "move failed"),
            }
            *job.finished.lock() = Some(Instant::now());
            *job.outcome.lock() = Some(outcome);
        });
        view
    }

    /// Finds the next run to move: a table entry mapping what the move moves, searching
    /// from the job's cursor. Returns the table, the entry and the physical run to move.
    fn next_run(meta: &Meta, job: &MoveJob) -> Option<(VdiskId, Phys, u64)> {
        let wanted = |t: Phys| match job.kind {
            MoveKind::Drain(c) => t.container == c,
            MoveKind::Migrate { to, .. } => t.container != to,
        };
        let (cur_v, cur_b) = *job.cursor.lock();
        let candidates: Vec<VdiskId> = match job.kind {
            MoveKind::Drain(_) => {
                let mut ids: Vec<VdiskId> = meta.vdisks.range(cur_v..).map(|(&id, _)| id).collect();
                ids.extend(meta.vdisks.range(..cur_v).map(|(&id, _)| id));
                ids
            }
            MoveKind::Migrate { vdisk, .. } => vec![vdisk],
        };
        for (i, id) in candidates.iter().enumerate() {
            let Some(v) = meta.vdisks.get(id) else {
                continue;
            };
            let from = if i == 0 && *id == cur_v { cur_b } else { 0 };
            let found = v
                .table
                .entries_from(from)
                .chain(if from > 0 {
                    // Wrap around once: entries before the cursor.
                    Box::new(v.table.entries().take_while(move |x| x.begin < from))
                        as Box<dyn Iterator<Item = Entry>>
                } else {
                    Box::new(std::iter::empty())
                })
                .find(|x| x.target.is_some_and(wanted));
            if let Some(x) = found {
                *job.cursor.lock() = (*id, x.begin);
                let t = x.target.expect("found by target");
                return Some((*id, t, x.len().min(STEP_BLOCKS)));
            }
        }
        None
    }

    /// Moves one run. Returns the blocks moved, or `None` when nothing is left to move.
    async fn move_step(&self, job: &MoveJob) -> Result<Option<u64>, ControlError> {
        // Each phase of a step pushes table changes with the metadata locked and waits for
        // every holder: a silent agent is waited out first, without the lock, so that faults
        // elsewhere go on meanwhile.
        self.agents.wait_heard(None, "move step").await;
        let Some(plan) = self.plan_step(job).await? else {
            return Ok(None);
        };
        // Step 3, without the metadata lock: faults elsewhere go on; a write to the run (or
        // its trim) is told to retry until the switch.
        let copied = match self.journal.wait(plan.reserved).await {
            Err(e) => Err(e.to_string()),
            Ok(()) if !plan.acked => {
                Err("an agent did not acknowledge the no-write state".to_string())
            }
            Ok(()) => {
                let (src, dst, from, to, n) = (
                    plan.src.clone(),
                    plan.dst.clone(),
                    plan.from,
                    plan.to,
                    plan.n,
                );
                tokio::task::spawn_blocking(move || {
                    const CHUNK: u64 = 256; // blocks (1 MiB)
                    let mut done = 0;
                    while done < n {
                        let k = CHUNK.min(n - done);
                        let buf = src.read_vec_at(
                            (k * BLOCK_SIZE) as usize,
                            (from.block + done) * BLOCK_SIZE,
                        )?;
                        dst.write_at(&buf, (to.block + done) * BLOCK_SIZE)?;
                        done += k;
                    }
                    dst.sync()
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            }
        };
        if let Some(p) = self.cfg.test_pauses.move_switch {
            tokio::time::sleep(p).await;
        }
        self.agents.wait_heard(None, "move step").await;
        let mut meta = self.meta.lock().await;
        let (stale, held) = meta
            .moving
            .iter()
            .find(|m| m.run == (plan.from, plan.n))
            .map(|m| (m.stale, m.spans.clone()))
            .unwrap_or_default();
        meta.moving.retain(|m| m.run != (plan.from, plan.n));
        // The tables that map the run now. Snapshots taken or deleted, copies-on-write and
        // rollbacks change them during the copy, but none of them writes the run: writes to
        // it fault and are told to retry (`maps_moving`) until this switch, so the copy is
        // what every one of them maps, and the switch moves them all (undoing instead
        // starved a drain under a busy snapshot schedule). Only space freed meanwhile, or a
        // writable mapping the step did not hold, makes the copy stale.
        let mappers = Self::mappers(&meta, plan.lineage, plan.from, plan.n);
        let outcome = match copied {
            Err(e) => Err(ControlError::Storage(format!(
                "copying {} blocks from {}: {e}",
                plan.n,
                meta.container_name(plan.from.container)
            ))),
            Ok(()) if stale => Err(ControlError::Retry {
                after_ms: 0,
                reason: "some of the run was freed while it was copied".into(),
            }),
            Ok(()) if !Self::held_throughout(&meta, &held, &mappers) => Err(ControlError::Retry {
                after_ms: 0,
                reason: "the run became writable while it was copied".into(),
            }),
            Ok(()) => Self::only_lineage_maps(&meta, plan.from, plan.n, &mappers),
        };
        if let Err(e) = outcome {
            self.undo_step(&mut meta, &plan).await?;
            return Err(e);
        }
        let (from, to, n) = (plan.from, plan.to, plan.n);
        // Step 4: switch every table, moving the shared-block counts with the data. Each
        // piece keeps its state: `new` in a vdisk snapshotted meanwhile, `no-write` in the
        // snapshot, `normal` where a copy-out left the vdisk the only owner.
        let mut writes = Vec::new();
        for m in &mappers {
            let w = Self::edit_table(&mut meta, m.vdisk, m.span(), |t| {
                for &(b, e, p, state) in &m.pieces {
                    t.set(b, e, Some(to.offset(p - from.block)), state)?;
                }
                Ok(())
            })?;
            writes.push(w);
        }
        for m in &mappers {
            for &(b, e, p, _) in &m.pieces {
                meta.release(&[(from.offset(p - from.block), e - b)]);
                meta.share(&[(to.offset(p - from.block), e - b)]);
            }
        }
        // Each new block got one reference per mapper; the first one is not "extra".
        meta.shared.release(to, n);
        let old = vec![(from, n)];
        let stored = old.clone();
        let seq = self.queue(&mut meta, writes, move |t| {
            t.delete_cow(to)?;
            t.put_zeroing_runs(&stored)
        });
        self.journal.wait(seq).await?;
        meta.mark_zeroing(&old);
        *job.hint.lock() = Some(to.offset(n));
        // Agents learn the new run, and those that held spans no-write for the step get them
        // back as they are now (a snapshot deleted or a range copied away meanwhile maps the
        // run no more, but its agents still hold the span).
        let mut spans: BTreeMap<VdiskId, (u64, u64)> = BTreeMap::new();
        for (id, (b, e)) in mappers.iter().map(|m| (m.vdisk, m.span())).chain(held) {
            let s = spans.entry(id).or_insert((b, e));
            *s = (s.0.min(b), s.1.max(e));
        }
        let mut all = true;
        for (id, (b, e)) in spans {
            // A table deleted or shrunk meanwhile told its agents itself.
            let Some(size) = meta.vdisks.get(&id).map(|v| v.table.size()) else {
                continue;
            };
            let (b, e) = (b.min(size), e.min(size));
            if b >= e {
                continue;
            }
            let update = self.range_update(&meta, id, b, e, true);
            all &= self.push(id, None, Command::Update(update)).await;
        }
        if all {
            self.zero_and_free(&mut meta, old).await?;
        }
        Ok(Some(n))
    }

    /// Checks that the tables of the lineage hold every reference to the run: the switch
    /// moves only theirs, and frees the old run. A table outside the lineage mapping it
    /// (which `tabula check` would report) would be left pointing at freed space, so the
    /// move stops instead.
    fn only_lineage_maps(
        meta: &Meta,
        from: Phys,
        n: u64,
        mappers: &[Mapper],
    ) -> Result<(), ControlError> {
        let mut refs = vec![0u32; n as usize];
        for m in mappers {
            for &(b, e, p, _) in &m.pieces {
                let i = (p - from.block) as usize;
                for r in &mut refs[i..i + (e - b) as usize] {
                    *r += 1;
                }
            }
        }
        for (i, &r) in refs.iter().enumerate() {
            let at = from.offset(i as u64);
            if r == 0 || meta.shared.extra(at) + 1 != r {
                return Err(ControlError::Invalid(format!(
                    "block {} of container {} is referenced {} times but its vdisk's tables map it {r} times; run tabula check",
                    at.block,
                    meta.container_name(at.container),
                    meta.shared.extra(at) + 1,
                )));
            }
        }
        Ok(())
    }

    /// Whether no agent could write any of the run since the step began: every writable
    /// table's piece that maps it is either in a span the step made no-write (`held`: set on
    /// every agent, and shown in every table sent since), or in a state whose writes fault
    /// (`new` in a snapshotted vdisk or a clone, `no-write`), and a write fault on the run
    /// is told to retry until the switch. Read-only tables are never written.
    fn held_throughout(meta: &Meta, held: &[(VdiskId, (u64, u64))], mappers: &[Mapper]) -> bool {
        mappers.iter().all(|m| {
            meta.vdisks[&m.vdisk].rec.read_only
                || m.pieces.iter().all(|&(b, e, _, state)| {
                    matches!(state, State::New | State::NoWrite) || {
                        // Covered by the union of the held spans (pieces merge as states
                        // change, so one piece may span several).
                        let mut pos = b;
                        while let Some(&(_, (_, he))) = held
                            .iter()
                            .find(|&&(id, (hb, he))| id == m.vdisk && hb <= pos && pos < he)
                        {
                            pos = he;
                            if pos >= e {
                                break;
                            }
                        }
                        pos >= e
                    }
                })
        })
    }

    /// Every table of `lineage` that maps any of `[at, at+n)`, with the pieces that do.
    fn mappers(meta: &Meta, lineage: u64, at: Phys, n: u64) -> Vec<Mapper> {
        meta.vdisks
            .iter()
            .filter(|(id, v)| super::snapshot::lineage(**id, &v.rec) == lineage)
            .map(|(&id, v)| Mapper {
                vdisk: id,
                pieces: pieces_mapping(&v.table, at, n),
            })
            .filter(|m| !m.pieces.is_empty())
            .collect()
    }

    /// Steps 1 and 2, under the metadata lock: picks the run, reserves the new one (its
    /// journal ticket is returned, not waited for), makes the run no-write on every agent and
    /// registers it as moving. `None` when nothing is left to move.
    async fn plan_step(&self, job: &MoveJob) -> Result<Option<StepPlan>, ControlError> {
        // During the restart grace, agents from before the restart may still be writing
        // without having registered again: they would not get the no-write state.
        let wait = self.grace_until.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            return Err(ControlError::Retry {
                after_ms: wait.as_millis() as u64 + 1,
                reason: "waiting for the restart grace to end".into(),
            });
        }
        let mut meta = self.meta.lock().await;
        let Some((vdisk, from, want)) = Self::next_run(&meta, job) else {
            // Copies-on-write into a drained container finish first (they become mapped).
            if let MoveKind::Drain(c) = job.kind {
                if meta.cows.values().any(|p| p.to.container == c) {
                    return Err(ControlError::Retry {
                        after_ms: 100,
                        reason: "copies-on-write into the container are finishing".into(),
                    });
                }
            }
            return Ok(None);
        };
        if meta.moving.iter().any(|m| overlaps(m.run, (from, want))) {
            return Err(ControlError::Retry {
                after_ms: 20,
                reason: "another move is moving this run".into(),
            });
        }
        let Some(src) = meta
            .containers
            .get(&from.container)
            .and_then(|c| c.reachable().cloned())
        else {
            let reason = format!(
                "container {} does not answer: its data cannot be moved now",
                meta.container_name(from.container)
            );
            // A drain waits for its container to answer again (it is probed every second);
            // a migration reading from elsewhere fails and can be started again.
            return Err(match job.kind {
                MoveKind::Drain(_) => ControlError::Retry {
                    after_ms: 1000,
                    reason,
                },
                MoveKind::Migrate { .. } => ControlError::Storage(reason),
            });
        };
        let scope = match job.kind {
            MoveKind::Drain(_) => None,
            MoveKind::Migrate { to, .. } => Some(to),
        };
        let mut deltas = Vec::new();
        let hint = *job.hint.lock();
        let Some((to, n)) = meta.alloc(1, 1, want, hint, scope, &mut deltas) else {
            return Err(match job.kind {
                MoveKind::Drain(_) => ControlError::Storage(
                    "no room elsewhere in the pool for the drained data: add a container (tabula container add) or free space, then drain again".into(),
                ),
                MoveKind::Migrate { .. } => ControlError::Storage(format!(
                    "container {} is full: free space in it, then migrate again",
                    job.target.clone().unwrap_or_default()
                )),
            });
        };
        let dst = meta.containers[&to.container]
            .reachable()
            .cloned()
            .expect("allocatable containers are reachable");
        // Every table of the lineage may share the run (snapshots, clones).
        let lineage = lineage(vdisk, &meta.vdisks[&vdisk].rec);
        let mappers = Self::mappers(&meta, lineage, from, n);
        // The new run belongs to no table until the switch, and the copy makes it hold
        // data: reserve it durably (as copies-on-write do), so that a crash before the
        // switch has it zeroed at the next start rather than handed out with old data.
        let reserved = self.journal.push(Box::new(move |t| {
            write_deltas(t, &deltas)?;
            t.put_cow(to, n)
        }));
        // Step 2: from here on a write to the run faults, and the fault is told to retry
        // until the switch. Answers and tables sent meanwhile show the run no-write too.
        // Only the pieces that map the run: a gap between them may be written (or allocated)
        // meanwhile, and must not be shown no-write.
        let spans: Vec<(VdiskId, (u64, u64))> = mappers
            .iter()
            .filter(|m| !meta.vdisks[&m.vdisk].rec.read_only)
            .flat_map(|m| m.pieces.iter().map(|p| (m.vdisk, (p.0, p.1))))
            .collect();
        meta.moving.push(super::Moving {
            run: (from, n),
            spans: spans.clone(),
            stale: false,
        });
        let mut acked = true;
        for (id, span) in spans {
            let v = meta.vdisks.get_mut(&id).expect("listed");
            v.rec.generation += 1;
            let cmd = Command::SetState {
                vdisk: id,
                generation: tabula_core::Generation(v.rec.generation),
                range: span,
                state: State::NoWrite,
            };
            acked &= self.push(id, None, cmd).await;
        }
        Ok(Some(StepPlan {
            from,
            to,
            n,
            lineage,
            mappers,
            src,
            dst,
            reserved,
            acked,
        }))
    }

    /// A step that cannot switch: the agents get their tables as they were, and the new run
    /// (perhaps partly written) goes back to the pool through zeroing.
    async fn undo_step(&self, meta: &mut Meta, plan: &StepPlan) -> Result<(), ControlError> {
        let mut writes = Vec::new();
        let mut restored = Vec::new();
        for m in &plan.mappers {
            if let Ok(w) = Self::edit_table(meta, m.vdisk, m.span(), |_| Ok(())) {
                writes.push(w);
                restored.push((m.vdisk, m.span()));
            }
        }
        let to = plan.to;
        let partial = vec![(to, plan.n)];
        let stored = partial.clone();
        let seq = self.queue(meta, writes, move |t| {
            t.delete_cow(to)?;
            t.put_zeroing_runs(&stored)
        });
        self.journal.wait(seq).await?;
        meta.mark_zeroing(&partial);
        for (id, (b, e)) in restored {
            let update = self.range_update(meta, id, b, e, true);
            self.push(id, None, Command::Update(update)).await;
        }
        if let Err(z) = self.zero_and_free(meta, partial).await {
            warn!(error = %z, "zeroing the run of an undone move step");
        }
        Ok(())
    }

    /// Forgets an empty container (drained, nothing left to zero, nothing pinned to it).
    pub async fn remove_container(&self, name: &str) -> Result<(), ControlError> {
        let mut meta = self.meta.lock().await;
        let id = Self::container_id(&meta, name)?;
        let view = self.container_view(&meta, id);
        if view.used > 0 || view.zeroing > 0 {
            return Err(ControlError::Invalid(format!(
                "container '{name}' still holds {} of data{}: drain it first (tabula container drain {name})",
                tabula_core::format_size(view.used + view.zeroing),
                if view.zeroing > 0 {
                    " or freed space being zeroed"
                } else {
                    ""
                }
            )));
        }
        if let Some(v) = meta.vdisks.values().find(|v| v.rec.container == Some(id.0)) {
            return Err(ControlError::Invalid(format!(
                "vdisk '{}' is pinned to container '{name}': migrate it elsewhere first",
                v.rec.name
            )));
        }
        if meta.deferred.iter().any(|d| d.1.container == id) {
            return Err(ControlError::Retry {
                after_ms: 1000,
                reason: format!("freed space in '{name}' is waiting to be zeroed"),
            });
        }
        self.commit(move |t| t.delete_container(id)).await?;
        let gone = meta.containers.remove(&id);
        meta.pool.remove(id);
        self.moves.lock().remove(&format!("drain:{name}"));
        self.check_low_space(&meta);
        drop(meta);
        // Wipe its label so that this or another pool may add it again. A label left by a
        // failure here names a container this pool no longer has: this pool takes it back,
        // another refuses it and says how to wipe it.
        if let Some(c) = gone.filter(|c| c.rec.label_blocks > 0) {
            let wiped = match c.reachable() {
                Some(f) => {
                    super::pool::container_io(f, self.cfg.container_timeout, crate::label::wipe)
                        .await
                }
                None => Err("it is not reachable".to_string()),
            };
            if let Err(e) = wiped {
                warn!(
                    container = name,
                    error = e,
                    "container removed, but its label could not be wiped: another pool will refuse it until it is ({})",
                    crate::label::wipe_hint(&c.rec.path)
                );
            }
        }
        info!(container = name, "container removed");
        Ok(())
    }
}

/// Moves by key, for the controller.
pub(super) type Moves = parking_lot::Mutex<BTreeMap<String, Arc<MoveJob>>>;

/// A run being moved: between its no-write state and its switch, writes to it are told to
/// retry, and whatever the controller sends agents shows its virtual spans no-write.
pub(super) struct Moving {
    pub(super) run: (Phys, u64),
    /// The writable tables' virtual spans that map it.
    pub(super) spans: Vec<(VdiskId, (u64, u64))>,
    /// Some of the run was freed meanwhile (a rollback, shrink or delete): it may even have
    /// been allocated again at the same place, so the tables can look unchanged while the
    /// copy is not what they map. The step is undone.
    pub(super) stale: bool,
}

impl Meta {
    /// Space of `[at, at+n)` was freed: a move copying any of it must not switch.
    pub(super) fn freed_while_moving(&mut self, at: Phys, n: u64) {
        for m in &mut self.moving {
            if overlaps(m.run, (at, n)) {
                m.stale = true;
            }
        }
    }

    /// Whether any of these entries maps into a run being moved.
    pub(super) fn maps_moving(&self, entries: &[Entry]) -> bool {
        !self.moving.is_empty()
            && entries.iter().any(|x| {
                x.target
                    .is_some_and(|t| self.moving.iter().any(|m| overlaps(m.run, (t, x.len()))))
            })
    }

    /// `entries` of `vdisk` as agents must see them while moves copy: mapped entries inside a
    /// moving span are no-write (as the `SetState` that began the step made them).
    pub(super) fn no_write_overlay(&self, vdisk: VdiskId, entries: Vec<Entry>) -> Vec<Entry> {
        let spans: Vec<(u64, u64)> = self
            .moving
            .iter()
            .flat_map(|m| m.spans.iter())
            .filter(|(v, _)| *v == vdisk)
            .map(|(_, s)| *s)
            .collect();
        if spans.is_empty() {
            return entries;
        }
        let mut out: Vec<Entry> = Vec::with_capacity(entries.len() + 2 * spans.len());
        for x in entries {
            // Cut the entry at every span edge inside it.
            let mut cuts: Vec<u64> = spans
                .iter()
                .flat_map(|&(b, e)| [b, e])
                .filter(|&c| c > x.begin && c < x.end)
                .collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut begin = x.begin;
            for end in cuts.into_iter().chain(std::iter::once(x.end)) {
                let inside = spans.iter().any(|&(b, e)| b <= begin && end <= e);
                let piece = Entry {
                    begin,
                    end,
                    target: x.target.map(|t| t.offset(begin - x.begin)),
                    state: if inside && x.target.is_some() {
                        State::NoWrite
                    } else {
                        x.state
                    },
                };
                match out.last_mut() {
                    Some(last) if last.merges_with(&piece) => last.end = piece.end,
                    _ => out.push(piece),
                }
                begin = end;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlay_makes_exactly_the_moving_spans_no_write() {
        let c = ContainerId(1);
        let at = |block| {
            Some(Phys {
                container: c,
                block,
            })
        };
        let mut meta = Meta::default();
        meta.moving.push(Moving {
            run: (at(100).unwrap(), 10),
            spans: vec![(VdiskId(1), (5, 15))],
            stale: false,
        });
        let entries = vec![
            Entry {
                begin: 0,
                end: 10,
                target: at(95),
                state: State::Normal,
            },
            Entry {
                begin: 10,
                end: 20,
                target: at(200),
                state: State::New,
            },
            Entry {
                begin: 20,
                end: 30,
                target: None,
                state: State::Zero,
            },
        ];
        let got = meta.no_write_overlay(VdiskId(1), entries.clone());
        let want: Vec<(u64, u64, State)> = vec![
            (0, 5, State::Normal),
            (5, 15, State::NoWrite),
            (15, 20, State::New),
            (20, 30, State::Zero),
        ];
        let got_short: Vec<(u64, u64, State)> =
            got.iter().map(|x| (x.begin, x.end, x.state)).collect();
        // (5..10 and 10..15 are not contiguous physically, so they stay two entries.)
        assert_eq!(got_short.len(), 5, "{got:?}");
        assert_eq!(got[1].target, at(100));
        assert_eq!(got[2].target, at(200));
        for (b, e, st) in want {
            for x in &got {
                if x.begin >= b && x.end <= e {
                    assert_eq!(x.state, st, "{x:?}");
                }
            }
        }
        assert_eq!(meta.no_write_overlay(VdiskId(2), entries.clone()), entries);
        assert!(meta.maps_moving(&entries[..1]));
        assert!(!meta.maps_moving(&entries[1..]));
    }
}
