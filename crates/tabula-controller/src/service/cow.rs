//! Copy-on-write (seed 004 c8-11): the first write to a segment shared with a snapshot or
//! clone.
//!
//! It takes two round trips, so that no crash can leave a table mapping a segment whose
//! copy was never made:
//! 1. the write fault finds the segment `new` and shared: the controller allocates a new
//!    run, records it durably in `cow` (it belongs to no table yet) and answers with a
//!    [`CowCopy`];
//! 2. the agent copies the segment into the run, makes it durable and reports it
//!    (`FaultOp::Copied`); the controller checks that the segment still maps what was
//!    copied and switches the tables in one transaction: with `redirect` the vdisk maps
//!    the new run, with `copy-out` every other table that shared the segment does and the
//!    vdisk keeps the original, now unshared. Other agents holding a changed table are
//!    told (and acknowledge) before the answer, so none reads the old place after the
//!    write lands. Only then does the agent write.
//!
//! A run left in `cow` by a crash of the controller is freed at the next start; one whose
//! agent went away is freed once that agent's lease has run out.

use std::time::Instant;

use tabula_api::{Command, ControlError, CowCopy, Fault, RangeUpdate};
use tabula_core::{Entry, Phys, SharedBlocks, State, VdiskId};
use tracing::{debug, info};

use super::{
    Controller, CowPolicy, FreeDelta, Meta, PendingCow, Placement, TableWrite, fill, give_back,
    write_deltas,
};
use crate::agents::lease_margin;
use crate::store::{StoreError, Txn};

impl Controller {
    /// A copy-on-write already pending for segment `s`: the same copy again if it is the
    /// faulting agent's own (it may have lost the answer), `Retry` while another live agent
    /// copies. One whose agent went away is abandoned and `None` returned.
    pub(super) fn pending_cow(
        &self,
        meta: &mut Meta,
        f: &Fault,
        s: u64,
    ) -> Result<Option<CowCopy>, ControlError> {
        let key = (f.vdisk, s);
        let Some(p) = meta.cows.get(&key) else {
            return Ok(None);
        };
        if p.agent == f.agent && p.session == self.agents.session_of(&f.agent) {
            return Ok(Some(CowCopy {
                segment: s,
                from: p.from.clone(),
                to: p.to,
            }));
        }
        if p.session
            .is_some_and(|sess| self.agents.is_current(&p.agent, sess))
        {
            return Err(ControlError::Retry {
                after_ms: 5,
                reason: format!(
                    "agent '{}' is copying this segment (copy-on-write)",
                    p.agent
                ),
            });
        }
        let p = meta.cows.remove(&key).expect("present");
        self.abandon_cow(meta, p);
        Ok(None)
    }

    /// Frees the run of a copy whose agent went away, once its lease (during which it may
    /// still be writing into the run) has surely run out.
    fn abandon_cow(&self, meta: &mut Meta, p: PendingCow) {
        info!(
            agent = p.agent,
            "copy-on-write abandoned by its agent; its space is freed after the agent's lease"
        );
        let run = [(p.to, p.len)];
        self.journal.push(Box::new(move |t| {
            t.delete_cow(run[0].0)?;
            t.put_zeroing_runs(&run)
        }));
        meta.mark_zeroing(&run);
        let until = Instant::now() + self.cfg.lease + lease_margin(self.cfg.lease);
        meta.deferred.push((until, p.to, p.len));
    }

    /// Abandons every pending copy whose agent's session is over.
    pub(super) async fn reap_abandoned_cows(&self) {
        let mut meta = self.meta.lock().await;
        let dead: Vec<(VdiskId, u64)> = meta
            .cows
            .iter()
            .filter(|(_, p)| {
                !p.session
                    .is_some_and(|sess| self.agents.is_current(&p.agent, sess))
            })
            .map(|(k, _)| *k)
            .collect();
        for k in dead {
            let p = meta.cows.remove(&k).expect("listed");
            self.abandon_cow(&mut meta, p);
        }
    }

    /// Allocates a run for each segment to copy and registers the copies in memory. The
    /// free-map changes go to `deltas`, in order with the caller's own allocations; the
    /// caller journals them with [`Cows::persist`] (and waits before answering) or, if it
    /// fails before that, takes everything back with [`Controller::undo_cows`].
    pub(super) fn start_cows(
        &self,
        meta: &mut Meta,
        vdisk: VdiskId,
        segs: &[u64],
        agent: &str,
        deltas: &mut Vec<FreeDelta>,
    ) -> Result<Cows, ControlError> {
        let mut cows = Cows::default();
        if segs.is_empty() {
            return Ok(cows);
        }
        let v = &meta.vdisks[&vdisk];
        let seg = v.rec.segment_blocks;
        let size = v.table.size();
        let plans: Vec<(u64, u64, u64, Vec<Entry>)> = segs
            .iter()
            .map(|&s| {
                let (b, e) = (s * seg, ((s + 1) * seg).min(size));
                (s, b, e, v.table.entries_in(b, e))
            })
            .collect();
        let mut got: Vec<(u64, u64, Phys)> = Vec::new();
        let mut place = Placement {
            seg,
            hint: None,
            scope: meta.scope(vdisk),
        };
        for &(_, b, e, _) in &plans {
            let before = got.len();
            let reached = fill(meta, &mut place, (b, e), deltas, &mut got)?;
            if reached < e || got.len() != before + 1 {
                return Err(self.no_space(meta, vdisk, &got));
            }
        }
        let session = self.agents.session_of(agent);
        for ((s, _, _, from), &(_, len, to)) in plans.into_iter().zip(&got) {
            cows.reserved.push((vdisk, s, to, len));
            cows.copies.push(CowCopy {
                segment: s,
                from: from.clone(),
                to,
            });
            meta.cows.insert(
                (vdisk, s),
                PendingCow {
                    from,
                    to,
                    len,
                    agent: agent.to_string(),
                    session,
                },
            );
        }
        debug!(%vdisk, segments = cows.copies.len(), "copy-on-write started");
        Ok(cows)
    }

    /// Takes back copies started but never journaled: forgets them and returns their runs
    /// to the pool.
    pub(super) fn undo_cows(meta: &mut Meta, cows: &Cows) -> Result<(), ControlError> {
        let mut runs = Vec::new();
        for &(vdisk, s, to, len) in &cows.reserved {
            meta.cows.remove(&(vdisk, s));
            runs.push((0, len, to));
        }
        give_back(meta, &runs)
    }

    /// The agent has copied: switch the tables (see the module comment).
    pub(super) async fn cow_done(
        &self,
        mut guard: tokio::sync::MutexGuard<'_, Meta>,
        f: &Fault,
    ) -> Result<RangeUpdate, ControlError> {
        let meta = &mut *guard;
        if let Some(p) = self.cfg.test_pauses.cow_switch {
            tokio::time::sleep(p).await;
        }
        let vdisk = f.vdisk;
        let v = meta.vdisk(vdisk)?;
        let seg = v.rec.segment_blocks;
        let size = v.table.size();
        let policy = v.rec.cow;
        let range = |s: u64| (s * seg, ((s + 1) * seg).min(size));
        let mut switch: Vec<(u64, PendingCow)> = Vec::new();
        // Runs allocated for a copy that nobody ends up mapping.
        let mut unused: Vec<(Phys, u64)> = Vec::new();
        for c in &f.copied {
            let key = (vdisk, c.segment);
            match meta.cows.get(&key) {
                Some(p) if p.to == c.to && p.agent == f.agent => {}
                _ => continue,
            }
            let p = meta.cows.remove(&key).expect("present");
            let (b, e) = range(c.segment);
            if e > b && meta.vdisks[&vdisk].table.entries_in(b, e) == p.from {
                switch.push((c.segment, p));
            } else {
                // The segment changed meanwhile (trim, rollback, resize): the copy is stale
                // and the agent faults again.
                unused.push((p.to, p.len));
            }
        }
        let dropped: Vec<Phys> = switch
            .iter()
            .map(|(_, p)| p.to)
            .chain(unused.iter().map(|u| u.0))
            .collect();
        let mut writes: Vec<TableWrite> = Vec::new();
        // Tables whose change other agents must see: (vdisk, block range, skip the faulter).
        let mut pushes: Vec<(VdiskId, (u64, u64), bool)> = Vec::new();
        let mut freed: Vec<(Phys, u64)> = Vec::new();
        if !switch.is_empty() {
            let lo = range(switch[0].0).0;
            let hi = range(switch[switch.len() - 1].0).1;
            match policy {
                CowPolicy::Redirect => {
                    for (_, p) in &switch {
                        for x in &p.from {
                            freed.extend(meta.shared.release(x.target.expect("mapped"), x.len()));
                        }
                    }
                    let targets: Vec<((u64, u64), Phys)> =
                        switch.iter().map(|(s, p)| (range(*s), p.to)).collect();
                    writes.push(Self::edit_table(meta, vdisk, (lo, hi), |t| {
                        for &((b, e), to) in &targets {
                            t.set(b, e, Some(to), State::Normal)?;
                        }
                        Ok(())
                    })?);
                }
                CowPolicy::CopyOut => {
                    let (w, others, left) = self.copy_out(meta, vdisk, &switch, range)?;
                    writes.extend(w);
                    pushes.extend(others);
                    unused.extend(left);
                }
            }
            pushes.push((vdisk, (lo, hi), true));
        }
        let edited = !writes.is_empty();
        let to_zero: Vec<(Phys, u64)> = freed.iter().chain(&unused).copied().collect();
        let stored = to_zero.clone();
        let seq = self.queue(meta, writes, move |t| {
            for &p in &dropped {
                t.delete_cow(p)?;
            }
            t.put_zeroing_runs(&stored)
        });
        meta.mark_zeroing(&to_zero);
        // Wait outside the lock, so that the switches of concurrent copies share one commit
        // (waiting under it made every copy of a burst after a snapshot wait for its own
        // fsync in turn). What others may see meanwhile is the switched table, and anything
        // they do with it is journaled after this.
        drop(guard);
        if let Some(p) = self.cfg.test_pauses.cow_commit {
            tokio::time::sleep(p).await;
        }
        self.journal.wait(seq).await?;
        // The pushes below wait for every holder with the metadata locked: a silent one is
        // waited out first, without the lock.
        let ids: Vec<VdiskId> = pushes.iter().map(|p| p.0).collect();
        self.agents.wait_heard(Some(&ids), "copy-on-write").await;
        let mut guard = self.meta.lock().await;
        let meta = &mut *guard;
        let mut acked = true;
        for (id, (b, e), skip_faulter) in pushes {
            // A table deleted or shrunk meanwhile told its agents itself.
            let Some(size) = meta.vdisks.get(&id).map(|v| v.table.size()) else {
                continue;
            };
            let (b, e) = (b.min(size), e.min(size));
            let update = self.range_update(meta, id, b, e, true);
            let except = skip_faulter.then_some(f.agent.as_str());
            acked &= self.push(id, except, Command::Update(update)).await;
        }
        if acked && !to_zero.is_empty() {
            self.zero_and_free(meta, to_zero).await?;
        }
        let v = meta.vdisk(vdisk)?;
        let (b, e) = (
            (f.segments.0 * seg).min(v.table.size()),
            (f.segments.1 * seg).min(v.table.size()),
        );
        Ok(self.range_update(meta, vdisk, b, e, edited))
    }

    /// Copy-out: the vdisk keeps its segments (now `normal`), every other table that maps
    /// them at the same place moves to the copies. Returns the writes, the other tables to
    /// push, and the parts of the copies nobody maps.
    #[allow(clippy::type_complexity)]
    fn copy_out(
        &self,
        meta: &mut Meta,
        vdisk: VdiskId,
        switch: &[(u64, PendingCow)],
        range: impl Fn(u64) -> (u64, u64),
    ) -> Result<
        (
            Vec<TableWrite>,
            Vec<(VdiskId, (u64, u64), bool)>,
            Vec<(Phys, u64)>,
        ),
        ControlError,
    > {
        // Sharing only ever comes from copying tables, so a shared block sits at the same
        // virtual place in every table that maps it.
        let mut moves: Vec<(VdiskId, Entry)> = Vec::new(); // entries to install elsewhere
        let mut new_runs: Vec<(Phys, u64)> = Vec::new();
        for (s, p) in switch {
            let (b, _) = range(*s);
            for (&id, t) in &meta.vdisks {
                if id == vdisk {
                    continue;
                }
                for x in &p.from {
                    let old = x.target.expect("mapped");
                    if x.begin >= t.table.size() {
                        continue;
                    }
                    for q in t.table.lookup(x.begin, x.end.min(t.table.size())) {
                        if q.target == Some(old.offset(q.begin - x.begin)) {
                            let at = p.to.offset(q.begin - b);
                            moves.push((
                                id,
                                Entry {
                                    begin: q.begin,
                                    end: q.end,
                                    target: Some(at),
                                    state: q.state,
                                },
                            ));
                            new_runs.push((at, q.end - q.begin));
                        }
                    }
                }
            }
        }
        // References: each moved entry leaves the original (the vdisk keeps one) and takes
        // the copy (the first taker owns it, the others share it).
        for (id, m) in &moves {
            let old = meta.vdisks[id]
                .table
                .lookup(m.begin, m.end)
                .first()
                .and_then(|q| q.target)
                .expect("matched above");
            let gone = meta.shared.release(old, m.end - m.begin);
            debug_assert!(gone.is_empty(), "the vdisk still maps {old:?}");
        }
        for r in SharedBlocks::from_mappings(new_runs.iter().copied()).runs() {
            for _ in 0..r.extra {
                meta.shared.share(r.at, r.len);
            }
        }
        // Parts of a copy no table took.
        let mut unused = Vec::new();
        for (_, p) in switch {
            let mut taken: Vec<(u64, u64)> = new_runs
                .iter()
                .filter(|(at, _)| {
                    at.container == p.to.container
                        && at.block >= p.to.block
                        && at.block < p.to.block + p.len
                })
                .map(|(at, l)| (at.block, at.block + l))
                .collect();
            taken.sort_unstable();
            let mut pos = p.to.block;
            for (a, z) in taken {
                if a > pos {
                    unused.push((p.to.offset(pos - p.to.block), a - pos));
                }
                pos = pos.max(z);
            }
            if pos < p.to.block + p.len {
                unused.push((p.to.offset(pos - p.to.block), p.to.block + p.len - pos));
            }
        }
        let mut writes = Vec::new();
        let mut pushes = Vec::new();
        // The vdisk: its entries stay where they are, writable now.
        let flips: Vec<Entry> = switch.iter().flat_map(|(_, p)| p.from.clone()).collect();
        let (lo, hi) = (range(switch[0].0).0, range(switch[switch.len() - 1].0).1);
        writes.push(Self::edit_table(meta, vdisk, (lo, hi), |t| {
            for x in &flips {
                t.set(x.begin, x.end, x.target, State::Normal)?;
            }
            Ok(())
        })?);
        let mut ids: Vec<VdiskId> = moves.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let mine: Vec<Entry> = moves
                .iter()
                .filter(|(i, _)| *i == id)
                .map(|(_, m)| *m)
                .collect();
            let (b, e) = (
                mine.iter().map(|m| m.begin).min().expect("non-empty"),
                mine.iter().map(|m| m.end).max().expect("non-empty"),
            );
            writes.push(Self::edit_table(meta, id, (b, e), |t| {
                for m in &mine {
                    t.set(m.begin, m.end, m.target, m.state)?;
                }
                Ok(())
            })?);
            pushes.push((id, (b, e), false));
        }
        Ok((writes, pushes, unused))
    }
}

/// Copies started by a write fault, to journal with its other changes.
#[derive(Default)]
pub(super) struct Cows {
    pub copies: Vec<CowCopy>,
    /// (vdisk, segment, run, length) of each reservation.
    reserved: Vec<(VdiskId, u64, Phys, u64)>,
}

impl Cows {
    /// The fault's free-map changes `deltas` (its own allocations and these copies', in
    /// order) and the reservations in `cow` (they belong to no table until the switch), to
    /// be written in one transaction.
    pub fn persist(
        &self,
        deltas: Vec<FreeDelta>,
    ) -> impl FnOnce(&mut Txn<'_>) -> Result<(), StoreError> + Send + 'static {
        let runs: Vec<(Phys, u64)> = self.reserved.iter().map(|r| (r.2, r.3)).collect();
        move |t| {
            write_deltas(t, &deltas)?;
            for &(p, l) in &runs {
                t.put_cow(p, l)?;
            }
            Ok(())
        }
    }

    pub fn is_empty(&self) -> bool {
        self.reserved.is_empty()
    }
}
