//! Snapshots, clones, rollback and diffs by table copy (seed 004).
//!
//! A snapshot is a read-only table holding a copy of a vdisk's entries; a clone is a
//! writable one copied from a snapshot. Copying a table copies no data: both tables map the
//! same blocks, which are counted in `Meta::shared`, and every writable entry that maps a
//! shared block is `new`, so its first write faults and is copied (see `cow.rs`).
//!
//! Taking a snapshot holds the vdisk's I/O on every agent that exports it (`Block`: new
//! I/O waits, in-flight I/O drains), marks the vdisk's mapped entries `new` in the
//! controller and on every agent (`SetState`), and releases the I/O (`Unblock`). The copy
//! and its durable commit happen after the release, still under the metadata lock: any
//! write to the vdisk now faults, and a fault's answer waits for a later journal ticket, so
//! nothing can depend on a snapshot that a crash would lose. The hold is bounded by
//! `snapshot_hold`; past it the snapshot is cancelled and I/O resumes.
//!
//! An agent cut off from the controller cannot be held, only waited out: before any
//! `Block`, every exporting agent must answer a probe that changes nothing; one that does
//! not is waited for with the metadata unlocked and nobody's I/O held, until it answers or
//! its lease runs out (then it does no I/O and is counted fenced). One that falls silent
//! during the hold has the others released at once, and the hold is tried again
//! (`lock_and_hold`).

use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};

use tabula_api::admin::{CowPolicy, DiffRange, DiffView, SnapshotView, VdiskView};
use tabula_api::{Command, ControlError};
use tabula_core::{
    BLOCK_SIZE, Entry, Generation, MappingTable, State, VdiskId, check_vdisk_geometry,
    check_vdisk_size,
};
use tokio::sync::MutexGuard;
use tracing::{error, info, warn};

use super::{
    Controller, Meta, TableWrite, VdiskMeta, mapped_runs, now_secs, read_only, storage,
    validate_name,
};
use crate::agents::{Delivery, Holder, Standing};
use crate::store::VdiskRecord;

/// The entries of `t` with every mapped entry in `state` (unmapped ones as they are).
fn with_state(t: &MappingTable, state: State) -> Result<MappingTable, ControlError> {
    let entries: Vec<Entry> = t
        .entries()
        .map(|e| match e.target {
            Some(_) => Entry { state, ..e },
            None => e,
        })
        .collect();
    MappingTable::from_entries(t.size(), entries).map_err(storage)
}

/// Tables with more entries than this are rebuilt on a blocking thread while the agents
/// rebuild theirs. The unit tests take that path with every table; the
/// integration tests, with their small tables, the other.
const PARALLEL_FLIP_ENTRIES: usize = if cfg!(test) { 0 } else { 4096 };

/// The lineage a table belongs to (stores from schema 1 recorded none: a table is then its
/// own lineage's root).
pub(super) fn lineage(id: VdiskId, rec: &VdiskRecord) -> u64 {
    if rec.lineage == 0 { id.0 } else { rec.lineage }
}

impl Meta {
    /// Adds a table copied from another (a snapshot or a clone) under the next vdisk id:
    /// its blocks gain a reference. Returns the write that stores it.
    fn add_copy(&mut self, id: VdiskId, rec: VdiskRecord, table: MappingTable) -> TableWrite {
        self.share(&mapped_runs(&table));
        self.next_vdisk += 1;
        self.names.insert(rec.name.clone(), id);
        self.vdisks.insert(
            id,
            VdiskMeta {
                rec,
                table,
                last_seq: 0,
                streams: Default::default(),
            },
        );
        TableWrite::whole(id, &self.vdisks[&id])
    }
}

/// How long a hold waits, with the metadata locked, for every agent exporting the vdisk to
/// answer a probe (an agent that hears the controller answers within milliseconds). Faults
/// wait for the lock meanwhile, so this is short: an agent that has not answered by then is
/// waited for with the lock released.
const PROBE_WAIT: Duration = Duration::from_millis(500);

/// How many times a hold is tried: each try after the first follows a wait for an agent
/// that stopped answering.
const HOLD_TRIES: usize = 4;

/// Why a hold did not take.
enum HoldError {
    /// This holder went silent while the others' I/O was held: their hold was released, and
    /// the silent one is to be waited out before another try.
    Silent(Holder),
    Failed(ControlError),
}

impl Controller {
    /// Locks the metadata and holds the I/O of a vdisk on every agent that exports it (see
    /// [`Self::hold`]). `find` picks the vdisk and checks the request against the metadata,
    /// again after every wait. Every holder is first asked to answer a probe that changes
    /// nothing; one that does not answer (cut off by the network, say: the controller does
    /// not hear it) is waited for with the lock released and nobody's I/O held, until it
    /// answers or its lease runs out: then it does no I/O and is counted fenced. Returns the
    /// locked metadata with the I/O held, the vdisk, what `find` returned, and when the
    /// hold began.
    async fn lock_and_hold<T>(
        &self,
        what: &str,
        find: impl Fn(&Meta) -> Result<(VdiskId, T), ControlError>,
    ) -> Result<(MutexGuard<'_, Meta>, VdiskId, T, Instant), ControlError> {
        let cap = self.cfg.snapshot_hold;
        let stuck = |e: String| {
            warn!(reason = e, "{what} cancelled");
            ControlError::Unavailable(format!(
                "{what} cancelled, no I/O was held: {e} (the controller's --snapshot-hold); \
                 try again"
            ))
        };
        // Right after a start (a restart, or a takeover by another controller), agents of the
        // previous run may still write in place under their old lease without having
        // registered here: they cannot be held, so nothing may be shared with a snapshot or
        // rolled back under them until that lease has run out (the restart grace).
        let now = Instant::now();
        if now < self.grace_until {
            info!(
                wait_ms = (self.grace_until - now).as_millis() as u64,
                "{what}: waiting for the restart grace: agents of the previous run may still \
                 write in place until their lease runs out"
            );
            tokio::time::sleep_until(self.grace_until.into()).await;
        }
        let mut waited: Vec<String> = Vec::new();
        for _ in 0..HOLD_TRIES {
            let meta = self.meta.lock().await;
            let (id, found) = find(&meta)?;
            let probe = Command::Unblock { vdisk: id };
            let mut probed = self
                .agents
                .probe(self.agents.holders(id, None), probe.clone());
            let late = probed
                .wait(&self.agents, Some(Instant::now() + PROBE_WAIT), cap, what)
                .await
                .map_err(stuck)?;
            if late.is_empty() {
                let began = Instant::now();
                match self.hold(id, what).await {
                    Ok(()) => return Ok((meta, id, found, began)),
                    Err(HoldError::Failed(e)) => return Err(e),
                    Err(HoldError::Silent(h)) => {
                        drop(meta);
                        let d = self.agents.describe(&h);
                        info!(
                            vdisk = %id,
                            agent = d,
                            "{what}: an agent stopped answering while the others' I/O was held: \
                             released them; waiting, without holding anyone's I/O, until it \
                             answers again or its lease runs out"
                        );
                        waited.push(d);
                        probed = self.agents.probe(vec![h], probe);
                    }
                }
            } else {
                drop(meta);
                info!(
                    vdisk = %id,
                    agents = late.join(", "),
                    "{what}: waiting, without holding anyone's I/O, until agents that do not \
                     answer the controller answer again or their lease runs out (then they do \
                     no I/O and are counted fenced)"
                );
                waited.extend(late);
            }
            probed
                .wait(&self.agents, None, cap, what)
                .await
                .map_err(stuck)?;
        }
        let why = format!(
            "agents stopped answering the controller each time it tried to hold the vdisk's \
             I/O ({HOLD_TRIES} tries; waited for {})",
            waited.join("; ")
        );
        warn!(reason = why, "{what} cancelled");
        Err(ControlError::Unavailable(format!(
            "{what} cancelled, I/O resumed: {why}; check the network between the controller and \
             those agents' hosts, then try again"
        )))
    }

    /// Holds the I/O of `vdisk` on every agent that exports it until each has drained what
    /// was in flight. On timeout or failure the hold is released and the caller told why. A
    /// holder that goes silent meanwhile ([`Standing::Silent`]) is not waited for with the
    /// others' I/O held: their hold is released at once, for the caller to wait it out.
    async fn hold(&self, vdisk: VdiskId, what: &str) -> Result<(), HoldError> {
        let holders = self.agents.holders(vdisk, None);
        if holders.is_empty() {
            return Ok(());
        }
        let hold = self.cfg.snapshot_hold;
        let block = Command::Block {
            vdisk,
            timeout_ms: hold.as_millis() as u64,
        };
        let mut pending: FuturesUnordered<_> = holders
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let block = block.clone();
                async move { (i, self.agents.deliver(h, block, self.cfg.ack_timeout).await) }
            })
            .collect();
        let mut answered = vec![false; holders.len()];
        let give_up = Instant::now() + hold;
        let why = loop {
            // Silence is checked this often.
            let wake = (Instant::now() + Duration::from_millis(50)).min(give_up);
            tokio::select! {
                r = pending.next() => match r {
                    None => return Ok(()),
                    Some((_, Delivery::Failed)) => break "an agent refused to hold I/O".to_string(),
                    // Acknowledged, or its lease ran out (fenced).
                    Some((i, _)) => answered[i] = true,
                },
                _ = tokio::time::sleep_until(wake.into()) => {
                    if Instant::now() >= give_up {
                        break format!(
                            "agents exporting it did not finish their in-flight I/O within {hold:?} (the controller's --snapshot-hold)"
                        );
                    }
                    let silent = (0..holders.len()).find(|&i| {
                        !answered[i]
                            && matches!(
                                self.agents.standing_of(&holders[i]),
                                Standing::Silent { .. }
                            )
                    });
                    if let Some(i) = silent {
                        drop(pending);
                        self.release_hold_now(vdisk).await;
                        return Err(HoldError::Silent(holders[i].clone()));
                    }
                }
            }
        };
        self.release_hold(vdisk);
        warn!(%vdisk, reason = why, "{what} cancelled");
        Err(HoldError::Failed(ControlError::Unavailable(format!(
            "{what} cancelled, I/O resumed: {why}; try again"
        ))))
    }

    /// Releases a hold: every release is on its way to its agent when this returns (so it
    /// arrives before anything sent later, a later try's hold included), and those of the
    /// agents the controller hears are acknowledged (within a bound).
    async fn release_hold_now(&self, vdisk: VdiskId) {
        let mut heard = Vec::new();
        for h in self
            .agents
            .holders(vdisk, None)
            .into_iter()
            .filter(|h| h.ended_until.is_none())
        {
            let port = h.port.clone();
            let mut unblock = Box::pin(async move { port.apply(Command::Unblock { vdisk }).await });
            // The first poll sends it.
            if (&mut unblock).now_or_never().is_some() {
                continue;
            }
            if self.agents.standing_of(&h) == Standing::Heard {
                heard.push(unblock);
            } else {
                tokio::spawn(unblock);
            }
        }
        let _ = tokio::time::timeout(PROBE_WAIT, futures::future::join_all(heard)).await;
    }

    /// Releases a hold without waiting for acknowledgements (but each release is sent
    /// before this returns, so that it cannot reach its agent after a later hold).
    fn release_hold(&self, vdisk: VdiskId) {
        for h in self
            .agents
            .holders(vdisk, None)
            .into_iter()
            .filter(|h| h.ended_until.is_none())
        {
            let mut unblock =
                Box::pin(async move { h.port.apply(Command::Unblock { vdisk }).await });
            if (&mut unblock).now_or_never().is_none() {
                tokio::spawn(unblock);
            }
        }
    }

    /// Takes snapshot `snap` of vdisk `name` (seed 004 c1-7).
    pub async fn create_snapshot(
        &self,
        name: &str,
        snap: &str,
    ) -> Result<SnapshotView, ControlError> {
        validate_name("snapshot", snap)?;
        let full = format!("{name}@{snap}");
        let (mut meta, id, (), started) = self
            .lock_and_hold(&format!("snapshot {full}"), |meta| {
                let id = meta.by_name(name)?;
                if meta.vdisks[&id].rec.read_only {
                    return Err(ControlError::Invalid(format!(
                        "'{name}' is a snapshot: clone it first to snapshot the clone"
                    )));
                }
                if meta.names.contains_key(&full) {
                    return Err(ControlError::Exists(format!(
                        "snapshot '{full}' already exists: pick another name or delete it first"
                    )));
                }
                Ok((id, ()))
            })
            .await?;
        let v = meta.vdisks.get_mut(&id).expect("named vdisk exists");
        let size = v.table.size();
        let before = std::mem::replace(&mut v.table, MappingTable::new(0));
        v.rec.generation += 1;
        let generation = Generation(v.rec.generation);
        // The agents and the controller each rebuild the table with every entry `new`
        // (O(entries)): side by side, so the hold lasts one rebuild, not two. The metadata
        // lock is held throughout, so nothing sees the placeholder table meanwhile.
        // (A small table is rebuilt in place: handing it to a thread would cost more.)
        let big = before.len() > PARALLEL_FLIP_ENTRIES;
        let flip = async move {
            if big {
                tokio::task::spawn_blocking(move || {
                    let t = with_state(&before, State::New);
                    (before, t)
                })
                .await
                .ok()
            } else {
                let t = with_state(&before, State::New);
                Some((before, t))
            }
        };
        let set_state = self.push(
            id,
            None,
            Command::SetState {
                vdisk: id,
                generation,
                range: (0, size),
                state: State::New,
            },
        );
        let (acked, flipped) = tokio::join!(set_state, flip);
        let Some((before, flipped)) = flipped else {
            // The rebuild panicked and took the only in-memory copy of the table with it.
            // Serving on would write an empty table; the store is intact, so stop here and
            // let the restart load it.
            error!(
                vdisk = name,
                "rebuilding the table for a snapshot failed; stopping"
            );
            std::process::abort();
        };
        let failed = match (acked, flipped) {
            (true, Ok(t)) => {
                meta.vdisks.get_mut(&id).expect("named vdisk exists").table = t;
                None
            }
            (false, _) => Some(ControlError::Unavailable(format!(
                "snapshot {full} cancelled, I/O resumed: an agent did not apply the change; try again"
            ))),
            (true, Err(e)) => Some(e),
        };
        if let Some(e) = failed {
            // Agents may hold the `new` table (or, not having applied it, write in place):
            // put the table back, tell every agent, give up.
            let v = meta.vdisks.get_mut(&id).expect("named vdisk exists");
            v.table = before;
            v.rec.generation += 1;
            let table = Self::snapshot_of(&meta, id);
            self.push(id, None, Command::Replace(table)).await;
            self.release_hold(id);
            return Err(e);
        }
        self.push(id, None, Command::Unblock { vdisk: id }).await;
        let hold = started.elapsed();
        if let Some(p) = self.cfg.test_pauses.snapshot_commit {
            tokio::time::sleep(p).await;
        }
        // The copy: a read-only table mapping the same blocks.
        let table = with_state(&before, State::NoWrite)?;
        drop(before);
        let v = &meta.vdisks[&id];
        let sid = VdiskId(meta.next_vdisk);
        let rec = VdiskRecord {
            name: full.clone(),
            size_bytes: v.rec.size_bytes,
            segment_blocks: v.rec.segment_blocks,
            generation: 1,
            created: now_secs(),
            read_only: true,
            parent: Some(id.0),
            origin: None,
            lineage: lineage(id, &v.rec),
            cow: CowPolicy::default(),
            container: v.rec.container,
        };
        let copy = meta.add_copy(sid, rec, table);
        let writes = vec![TableWrite::whole(id, &meta.vdisks[&id]), copy];
        let next = sid.0 + 1;
        let seq = self.queue(&mut meta, writes, move |t| t.set_meta("next_vdisk", next));
        let copied = started.elapsed();
        self.journal.wait(seq).await?;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        info!(
            snapshot = full,
            hold_ms = ms(hold),
            copy_ms = ms(copied - hold),
            commit_ms = ms(started.elapsed() - copied),
            "snapshot taken"
        );
        // Just taken: its vdisk maps every one of its blocks, so nothing is unique to it (no
        // need to count a million runs).
        let mut view = Self::snapshot_view(&meta, sid, true);
        view.hold_ms = Some(hold.as_secs_f64() * 1e3);
        Ok(view)
    }

    /// `fresh`: taken just now, under the same lock, so it shares everything it maps.
    pub(super) fn snapshot_view(meta: &Meta, id: VdiskId, fresh: bool) -> SnapshotView {
        let v = &meta.vdisks[&id];
        let (vdisk, snapshot) = v
            .rec
            .name
            .split_once('@')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap_or_default();
        let runs = mapped_runs(&v.table);
        let allocated: u64 = runs.iter().map(|r| r.1).sum();
        let shared = if fresh {
            allocated
        } else {
            meta.shared_blocks(&runs)
        };
        SnapshotView {
            name: v.rec.name.clone(),
            vdisk,
            snapshot,
            id: id.0,
            created: v.rec.created,
            size: v.rec.size_bytes,
            allocated: allocated * BLOCK_SIZE,
            unique: (allocated - shared) * BLOCK_SIZE,
            hold_ms: None,
        }
    }

    /// Snapshots of one vdisk (by name), or of all.
    pub async fn list_snapshots(
        &self,
        vdisk: Option<&str>,
    ) -> Result<Vec<SnapshotView>, ControlError> {
        let meta = self.meta.lock().await;
        let parent = vdisk.map(|n| meta.by_name(n)).transpose()?;
        let mut out: Vec<SnapshotView> = meta
            .vdisks
            .iter()
            .filter(|(_, v)| v.rec.read_only && parent.is_none_or(|p| v.rec.parent == Some(p.0)))
            .map(|(&id, _)| Self::snapshot_view(&meta, id, false))
            .collect();
        out.sort_by(|a, b| (&a.vdisk, a.created, a.id).cmp(&(&b.vdisk, b.created, b.id)));
        Ok(out)
    }

    /// Deletes snapshot `VDISK@SNAP`; the space only it maps is freed.
    pub async fn delete_snapshot(&self, full: &str) -> Result<(), ControlError> {
        self.delete_snapshot_checked(full, false).await
    }

    /// Deletes a snapshot even while NBD clients are connected to its export: their I/O
    /// fails from then on.
    pub async fn force_delete_snapshot(&self, full: &str) -> Result<(), ControlError> {
        self.delete_snapshot_checked(full, true).await
    }

    async fn delete_snapshot_checked(&self, full: &str, force: bool) -> Result<(), ControlError> {
        // Detaching waits for every holder with the metadata locked: wait out a silent one
        // first, without the lock.
        let id = self.meta.lock().await.by_name(full)?;
        self.agents.wait_heard(Some(&[id]), "snapshot delete").await;
        let deadline = tokio::time::Instant::now() + super::CLIENTS_GONE_WAIT;
        let mut meta = loop {
            let meta = self.meta.lock().await;
            let id = meta.by_name(full)?;
            if !meta.vdisks[&id].rec.read_only {
                return Err(ControlError::Invalid(format!(
                    "'{full}' is a vdisk, not a snapshot: use tabula vdisk delete"
                )));
            }
            match self.refuse_connected(&meta, &format!("snapshot '{full}'"), &[id], force) {
                Err(_) if tokio::time::Instant::now() < deadline => {}
                r => {
                    r?;
                    break meta;
                }
            }
            drop(meta);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        let id = meta.by_name(full)?;
        self.delete_tables(&mut meta, &[id]).await?;
        info!(snapshot = full, "snapshot deleted");
        Ok(())
    }

    /// Creates vdisk `name`, a writable copy of snapshot `source` sharing all its blocks.
    /// It depends on nothing: the snapshot can be deleted while the clone lives.
    pub async fn clone_vdisk(
        &self,
        source: &str,
        name: &str,
        cow: Option<CowPolicy>,
    ) -> Result<VdiskView, ControlError> {
        validate_name("vdisk", name)?;
        let mut meta = self.meta.lock().await;
        let sid = meta.by_name(source)?;
        let s = &meta.vdisks[&sid];
        if !s.rec.read_only {
            return Err(ControlError::Invalid(format!(
                "'{source}' is a vdisk: clone a snapshot of it (tabula snapshot create {source} SNAP, then clone {source}@SNAP)"
            )));
        }
        if meta.names.contains_key(name) {
            return Err(ControlError::Exists(format!(
                "vdisk '{name}' already exists: pick another name or delete it first"
            )));
        }
        // A vdisk an older tabula let grow past the limits must not spread.
        check_vdisk_geometry(s.rec.size_bytes, s.rec.segment_blocks * BLOCK_SIZE).map_err(|e| {
            ControlError::Invalid(format!(
                "cannot clone '{source}': its {e} (an older tabula allowed it)"
            ))
        })?;
        let table = with_state(&s.table, State::New)?;
        let parent_cow = s
            .rec
            .parent
            .and_then(|p| meta.vdisks.get(&VdiskId(p)))
            .map(|p| p.rec.cow)
            .unwrap_or_default();
        let id = VdiskId(meta.next_vdisk);
        let rec = VdiskRecord {
            name: name.to_string(),
            size_bytes: s.rec.size_bytes,
            segment_blocks: s.rec.segment_blocks,
            generation: 1,
            created: now_secs(),
            read_only: false,
            parent: None,
            origin: Some(source.to_string()),
            lineage: lineage(sid, &s.rec),
            cow: cow.unwrap_or(parent_cow),
            container: s.rec.container,
        };
        let writes = vec![meta.add_copy(id, rec, table)];
        let next = id.0 + 1;
        let seq = self.queue(&mut meta, writes, move |t| t.set_meta("next_vdisk", next));
        self.journal.wait(seq).await?;
        info!(vdisk = name, source, "clone created");
        Ok(Self::vdisk_view(&meta, id))
    }

    /// Makes vdisk `name`'s table equal to its snapshot `snap`'s (size included). Space only
    /// the vdisk mapped is freed.
    pub async fn rollback(&self, name: &str, snap: &str) -> Result<VdiskView, ControlError> {
        let full = format!("{name}@{snap}");
        let (mut meta, id, (size_bytes, table), started) = self
            .lock_and_hold(&format!("rollback of {name}"), |meta| {
                let id = meta.by_name(name)?;
                if meta.vdisks[&id].rec.read_only {
                    return Err(read_only(name));
                }
                let sid = meta.by_name(&full)?;
                if meta.vdisks[&sid].rec.parent != Some(id.0) {
                    return Err(ControlError::Invalid(format!(
                        "'{full}' is not a snapshot of '{name}'"
                    )));
                }
                let size_bytes = meta.vdisks[&sid].rec.size_bytes;
                check_vdisk_size(size_bytes).map_err(|e| {
                    ControlError::Invalid(format!(
                        "cannot roll back to '{full}': its {e} (an older tabula allowed it)"
                    ))
                })?;
                // Built before the hold, so that the hold does not last a table rebuild.
                let table = with_state(&meta.vdisks[&sid].table, State::New)?;
                Ok((id, (size_bytes, table)))
            })
            .await?;
        meta.share(&mapped_runs(&table));
        let v = meta.vdisks.get_mut(&id).expect("named vdisk exists");
        let old = std::mem::replace(&mut v.table, table);
        v.rec.size_bytes = size_bytes;
        v.rec.generation += 1;
        let runs = meta.release(&mapped_runs(&old));
        drop(old);
        let snapshot = Self::snapshot_of(&meta, id);
        let writes = vec![TableWrite::whole(id, &meta.vdisks[&id])];
        let stored = runs.clone();
        let seq = self.queue(&mut meta, writes, move |t| t.put_zeroing_runs(&stored));
        // Every copy is now all `new`: no write lands without a fault, and a fault's answer
        // waits for this commit, so I/O may resume before it is durable.
        let acked = self.push(id, None, Command::Replace(snapshot)).await;
        self.push(id, None, Command::Unblock { vdisk: id }).await;
        let hold = started.elapsed();
        self.journal.wait(seq).await?;
        meta.mark_zeroing(&runs);
        if acked && !runs.is_empty() {
            self.zero_and_free(&mut meta, runs).await?;
        }
        info!(
            vdisk = name,
            snapshot = full,
            hold_ms = hold.as_secs_f64() * 1e3,
            "rolled back"
        );
        Ok(Self::vdisk_view(&meta, id))
    }

    /// The virtual ranges whose mapping differs between two tables of one lineage: what
    /// changed, for an incremental backup. No data is read.
    pub async fn diff(&self, from: &str, to: &str) -> Result<DiffView, ControlError> {
        let meta = self.meta.lock().await;
        let (a, b) = (meta.by_name(from)?, meta.by_name(to)?);
        let (va, vb) = (&meta.vdisks[&a], &meta.vdisks[&b]);
        if lineage(a, &va.rec) != lineage(b, &vb.rec) {
            return Err(ControlError::Invalid(format!(
                "'{from}' and '{to}' are not of one lineage (copies of one vdisk): their tables cannot be compared"
            )));
        }
        let ranges: Vec<DiffRange> = va
            .table
            .diff(&vb.table)
            .into_iter()
            .map(|(b, e)| DiffRange {
                offset: b * BLOCK_SIZE,
                length: (e - b) * BLOCK_SIZE,
            })
            .collect();
        Ok(DiffView {
            from: from.to_string(),
            to: to.to_string(),
            changed: ranges.iter().map(|r| r.length).sum(),
            ranges,
        })
    }
}
