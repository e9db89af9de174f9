//! One exported vdisk on an agent: its volatile table copy and the data path (hot path).
//!
//! Every I/O: take the gate for reading, split the byte range through the table, and either
//! do all the pieces against the containers or, if any piece is not allowed in its state,
//! release the gate, fault to the controller, install the answer and try again.
//!
//! The gate is what makes freeing safe: a table command installs the new entries and then
//! takes the gate for writing once, which waits for every I/O that could have looked up the
//! superseded entries. An I/O that times out keeps its share of the gate until it really
//! completes (see `run_io`).
//!
//! Before an I/O looks at the table, the volume must be *usable*: the agent's lease is valid,
//! the copy was synchronised in the current session, and no `Block` holds it. Otherwise the
//! I/O waits (resynchronising the copy itself if that is what is missing).
//!
//! An I/O keeps trying through holds, faults and table changes for up to the agent's fault
//! wait, counted from when it began (see [`Attempt`]), never for a number of rounds.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tabula_api::{ControlError, CowCopy, Fault, FaultOp, RangeUpdate, TableSnapshot};
use tabula_core::{BLOCK_SIZE, ContainerId, Generation, Piece, SegmentTable, State, VdiskId};
use tabula_nbd::consts::{NBD_STATE_HOLE, NBD_STATE_ZERO};
use tabula_nbd::server::{Errno, Export, ExportInfo, IoError, StatusExtent, ZeroFlags};

use crate::agent::{OpenContainer, Shared};

/// base:allocation flags of unallocated space: a hole that reads as zeros.
const HOLE_ZERO: u32 = NBD_STATE_HOLE | NBD_STATE_ZERO;

struct TableCopy {
    generation: Generation,
    /// Generation of the last pushed command, the only kind that can remove mappings.
    unmap_generation: Generation,
    table: SegmentTable,
    /// Every change up to this generation has been received.
    contiguous: u64,
    /// Changes received beyond a missing one, and since when one has been missing.
    ahead: BTreeSet<u64>,
    gap_since: Option<Instant>,
}

impl TableCopy {
    fn new(generation: Generation, table: SegmentTable) -> TableCopy {
        TableCopy {
            generation,
            unmap_generation: generation,
            table,
            contiguous: generation.0,
            ahead: BTreeSet::new(),
            gap_since: None,
        }
    }

    /// Counts a received change, to notice one that never arrives.
    fn received(&mut self, g: Generation) {
        let g = g.0;
        if g <= self.contiguous {
            return;
        }
        self.ahead.insert(g);
        while self.ahead.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        self.gap_since = match (self.ahead.is_empty(), self.gap_since) {
            (true, _) => None,
            (false, None) => Some(Instant::now()),
            (false, since) => since,
        };
    }

    /// A whole table at `g` covers every change up to it.
    fn baseline(&mut self, g: Generation) {
        self.contiguous = self.contiguous.max(g.0);
        let c = self.contiguous;
        self.ahead.retain(|&x| x > c);
        while self.ahead.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        if self.ahead.is_empty() {
            self.gap_since = None;
        }
    }
}

/// What a periodic (or any) whole-table replacement found.
#[derive(Debug, PartialEq, Eq)]
pub enum Replaced {
    /// The copy was older and is now current.
    Updated,
    /// Same generation, same entries.
    Same,
    /// Same generation, different entries: the copy had diverged (now healed).
    Mismatch,
    /// The copy is newer than the replacement, which was dropped.
    Stale,
}

pub struct Volume {
    id: VdiskId,
    name: String,
    segment_blocks: u64,
    read_only: bool,
    table: parking_lot::RwLock<TableCopy>,
    /// Held for reading by every I/O (owned guards: a guard goes with its I/O to the
    /// blocking pool), for writing by a table command waiting for them.
    gate: Arc<tokio::sync::RwLock<()>>,
    detached: AtomicBool,
    /// The agent session this copy was last synchronised in (0: needs a resync).
    pub(crate) synced_epoch: AtomicU64,
    /// Set by `Block`: new I/O waits until `Unblock`, or until this deadline, after which
    /// the copy is resynchronised before use.
    blocked: parking_lot::Mutex<Option<Instant>>,
    /// Whether `blocked` is set: the data path reads this, not the mutex.
    block_set: AtomicBool,
    /// One resynchronisation at a time.
    pub(crate) resync_lock: tokio::sync::Mutex<()>,
    /// Copy-on-write faults of one segment go one at a time: two writes to one shared
    /// segment must not both copy into the new segment while the first already writes
    /// there. Segments share [`COW_STRIPES`] locks, so faults on other segments go on.
    cow_locks: Box<[tokio::sync::Mutex<()>]>,
}

/// Locks for copy-on-write faults, by segment modulo this.
const COW_STRIPES: u64 = 64;

impl Volume {
    pub fn from_snapshot(snap: TableSnapshot) -> Result<Volume, String> {
        let table = SegmentTable::from_entries(
            snap.size_bytes / BLOCK_SIZE,
            snap.segment_blocks,
            snap.entries,
        )
        .map_err(|e| {
            format!(
                "table of {} from the controller is malformed: {e}",
                snap.name
            )
        })?;
        Ok(Volume {
            id: snap.vdisk,
            name: snap.name,
            segment_blocks: snap.segment_blocks,
            read_only: snap.read_only,
            table: parking_lot::RwLock::new(TableCopy::new(snap.generation, table)),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            detached: AtomicBool::new(false),
            synced_epoch: AtomicU64::new(0),
            blocked: parking_lot::Mutex::new(None),
            block_set: AtomicBool::new(false),
            resync_lock: tokio::sync::Mutex::new(()),
            cow_locks: (0..COW_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        })
    }

    /// Locks copy-on-write faults of segments `[s0, s1)` (in stripe order, so two faults
    /// never wait for each other's stripes crosswise).
    async fn lock_cow(&self, (s0, s1): (u64, u64)) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut stripes: Vec<u64> = (s0..s1.min(s0 + COW_STRIPES))
            .map(|s| s % COW_STRIPES)
            .collect();
        stripes.sort_unstable();
        let mut guards = Vec::with_capacity(stripes.len());
        for i in stripes {
            guards.push(self.cow_locks[i as usize].lock().await);
        }
        guards
    }

    pub fn id(&self) -> VdiskId {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn entries(&self) -> usize {
        self.table.read().table.len()
    }

    pub fn generation(&self) -> Generation {
        self.table.read().generation
    }

    /// Checks the copy against the table's invariants (for tests and fuzzing).
    pub fn check_table(&self) -> Result<(), String> {
        self.table.read().table.validate()
    }

    /// Installs a command's entries for a range (they may remove mappings), unless this copy
    /// is already newer.
    pub fn install(&self, u: &RangeUpdate) {
        let mut t = self.table.write();
        if u.change {
            t.received(u.generation);
        }
        if u.generation < t.generation {
            return;
        }
        Self::replace_range(&mut t.table, u);
        t.generation = u.generation;
        t.unmap_generation = u.generation;
    }

    /// Sets the state of every mapped entry in `range` (a command: it may restrict I/O).
    pub fn set_state(&self, generation: Generation, range: (u64, u64), state: State) {
        let mut t = self.table.write();
        t.received(generation);
        if generation < t.generation {
            return;
        }
        let (b, e) = (range.0.min(t.table.size()), range.1.min(t.table.size()));
        if b < e {
            let _ = t.table.set_mapped_state(b, e, state);
        }
        t.generation = generation;
        t.unmap_generation = generation;
    }

    /// Whether a change has been missing for longer than `timeout`: then the copy must be
    /// replaced by the whole table.
    pub fn gap_overdue(&self, timeout: Duration) -> bool {
        self.table
            .read()
            .gap_since
            .is_some_and(|since| since.elapsed() >= timeout)
    }

    /// Holds new I/O until [`unblock`](Self::unblock) or `deadline`.
    pub fn block(&self, deadline: Instant) {
        *self.blocked.lock() = Some(deadline);
        self.block_set.store(true, Ordering::Release);
    }

    pub fn unblock(&self) {
        *self.blocked.lock() = None;
        self.block_set.store(false, Ordering::Release);
    }

    /// `Some(true)` while blocked, `Some(false)` if a block timed out (it is cleared, and the
    /// copy must be resynchronised), `None` if not blocked.
    pub(crate) fn block_state(&self) -> Option<bool> {
        if !self.block_set.load(Ordering::Acquire) {
            return None;
        }
        let mut b = self.blocked.lock();
        match *b {
            None => None,
            Some(d) if Instant::now() < d => Some(true),
            Some(_) => {
                *b = None;
                self.block_set.store(false, Ordering::Release);
                Some(false)
            }
        }
    }

    /// Installs a fault's answer. Answers can arrive out of order; an answer older than this
    /// copy is still safe to use where this copy has gaps, provided no command that could
    /// have removed mappings came after it: between the two, the controller only added
    /// mappings. Otherwise it is dropped and the I/O simply faults again.
    pub fn install_answer(&self, u: &RangeUpdate) {
        let mut t = self.table.write();
        if u.change {
            t.received(u.generation);
        }
        if u.generation >= t.generation {
            Self::replace_range(&mut t.table, u);
            t.generation = u.generation;
            return;
        }
        if u.generation < t.unmap_generation {
            return;
        }
        for x in &u.entries {
            let Some(target) = x.target else { continue };
            let gaps: Vec<Piece> = t
                .table
                .lookup(x.begin, x.end)
                .into_iter()
                .filter(|p| p.target.is_none() && p.state == State::Zero)
                .collect();
            for p in gaps {
                let _ = t.table.set(
                    p.begin,
                    p.end,
                    Some(target.offset(p.begin - x.begin)),
                    x.state,
                );
            }
        }
    }

    fn replace_range(table: &mut SegmentTable, u: &RangeUpdate) {
        let (b, e) = (u.range.0.min(table.size()), u.range.1.min(table.size()));
        if b < e {
            let _ = table.remove(b, e);
        }
        for x in &u.entries {
            if x.end <= table.size() {
                let _ = table.set(x.begin, x.end, x.target, x.state);
            }
        }
    }

    /// Replaces the whole copy, unless it is newer, and says how the two compared.
    pub fn replace(&self, snap: &TableSnapshot) -> Result<Replaced, String> {
        let table = SegmentTable::from_entries(
            snap.size_bytes / BLOCK_SIZE,
            snap.segment_blocks,
            snap.entries.iter().copied(),
        )
        .map_err(|e| format!("replacement table of {} is malformed: {e}", snap.name))?;
        let mut t = self.table.write();
        if snap.generation < t.generation {
            return Ok(Replaced::Stale);
        }
        let outcome = if snap.generation > t.generation {
            Replaced::Updated
        } else if t.table.size() == table.size() && t.table.entries().eq(table.entries()) {
            Replaced::Same
        } else {
            Replaced::Mismatch
        };
        let (contiguous, ahead, gap_since) =
            (t.contiguous, std::mem::take(&mut t.ahead), t.gap_since);
        let old = std::mem::replace(&mut *t, TableCopy::new(snap.generation, table));
        t.contiguous = contiguous;
        t.ahead = ahead;
        t.gap_since = gap_since;
        t.baseline(snap.generation);
        drop(t);
        // Freeing a large old copy takes a while; not while I/O waits for the lock.
        drop(old);
        Ok(outcome)
    }

    /// Waits until no I/O that started before now is in flight.
    pub async fn drain(&self) {
        drop(self.gate.write().await);
    }

    /// Takes the gate for one I/O.
    async fn enter(&self) -> Gate {
        self.gate.clone().read_owned().await
    }

    pub fn detach(&self) {
        self.detached.store(true, Ordering::Release);
    }

    /// The current size: it follows resizes pushed by the controller.
    pub fn size_bytes(&self) -> u64 {
        self.table.read().table.size() * BLOCK_SIZE
    }

    fn segment_bytes(&self) -> u64 {
        self.segment_blocks * BLOCK_SIZE
    }

    /// Pieces of the byte range `[off, off+len)`, with byte sub-ranges.
    fn pieces(&self, off: u64, len: u64) -> Vec<Piece> {
        let b = off / BLOCK_SIZE;
        let e = (off + len).div_ceil(BLOCK_SIZE);
        self.table.read().table.lookup(b, e)
    }
}

/// Byte sub-range of `[off, off+len)` that a piece covers.
fn clip(p: &Piece, off: u64, len: u64) -> (u64, u64) {
    let s = (p.begin * BLOCK_SIZE).max(off);
    let e = (p.end * BLOCK_SIZE).min(off + len);
    (s, e)
}

/// Physical byte offset of virtual byte `v` inside piece `p`.
fn phys_off(p: &Piece, v: u64) -> Option<(ContainerId, u64)> {
    p.target.map(|t| {
        (
            t.container,
            t.block * BLOCK_SIZE + (v - p.begin * BLOCK_SIZE),
        )
    })
}

fn ctl_err(e: ControlError) -> IoError {
    let errno = match e {
        ControlError::NoSpace => Errno::NoSpc,
        ControlError::NotFound(_) => Errno::Shutdown,
        ControlError::Invalid(_)
        | ControlError::Unavailable(_)
        | ControlError::Storage(_)
        | ControlError::Retry { .. }
        | ControlError::Exists(_)
        | ControlError::InUse(_) => Errno::Io,
    };
    IoError {
        errno,
        message: e.to_string(),
    }
}

fn io_err(context: &str, e: std::io::Error) -> IoError {
    IoError {
        errno: Errno::Io,
        message: format!("{context}: {e}"),
    }
}

/// Rounds of one I/O taken at full speed; a busy table rarely needs more than a few.
const ROUNDS_BEFORE_BACKOFF: u32 = 64;
/// The longest pause between later rounds.
const MAX_BACKOFF: Duration = Duration::from_millis(10);

/// One I/O's attempts to get what it needs from the table: it keeps trying through holds,
/// faults and table changes until the fault wait has passed since it began, then fails
/// saying what it was last waiting for. Not a count of rounds: while the controller makes
/// progress (a drain's steps set runs no-write, snapshots flip states, copy-on-write
/// switches), a table can change under an I/O any number of times, each round short.
struct Attempt {
    op: &'static str,
    off: u64,
    /// The fault wait it was given, for the message.
    wait: Duration,
    deadline: Instant,
    rounds: u32,
    /// What the last round found in the way.
    waiting_for: String,
}

impl Attempt {
    fn new(op: &'static str, off: u64, wait: Duration) -> Attempt {
        Attempt {
            op,
            off,
            wait,
            deadline: Instant::now() + wait,
            rounds: 0,
            waiting_for: String::new(),
        }
    }

    /// Starts another round, or fails once the fault wait has passed. Past
    /// [`ROUNDS_BEFORE_BACKOFF`] rounds it pauses a little first: a table that never lets
    /// the I/O through (a bug) must not become a busy loop between agent and controller.
    async fn round(&mut self, vdisk: &str) -> Result<(), IoError> {
        if self.rounds == 0 {
            self.rounds = 1;
            return Ok(());
        }
        let now = Instant::now();
        if now >= self.deadline {
            return Err(IoError {
                errno: Errno::Io,
                message: format!(
                    "vdisk {vdisk}: {} at offset {} could not complete within {:?} (--fault-wait) in {} attempts; the table kept changing under it, last because of {}",
                    self.op,
                    self.off,
                    self.wait,
                    self.rounds,
                    if self.waiting_for.is_empty() {
                        "a hold"
                    } else {
                        &self.waiting_for
                    }
                ),
            });
        }
        if self.rounds >= ROUNDS_BEFORE_BACKOFF {
            let pause = Duration::from_millis(u64::from(self.rounds - ROUNDS_BEFORE_BACKOFF + 1))
                .min(MAX_BACKOFF);
            tokio::time::sleep(pause.min(self.deadline - now)).await;
        }
        self.rounds += 1;
        Ok(())
    }

    /// Notes what is in the way: the piece that needs a fault.
    fn blocked_by(&mut self, p: &Piece) {
        let why = match p.state {
            State::NoWrite => "data being moved to another container",
            State::New => "copy-on-write of a segment shared with a snapshot",
            State::Zero if p.target.is_none() => "space to allocate",
            _ => "a fault",
        };
        self.waiting_for = format!("{why} (blocks {}..{}, state {})", p.begin, p.end, p.state);
    }

    fn held(&mut self) {
        self.waiting_for =
            "a hold or resynchronisation of the table (snapshot, rollback, session)".into();
    }
}

/// I/O up to this size runs inline on the async worker; larger I/O goes to the blocking pool.
/// A small pread/pwrite against the page cache costs less than the two thread handoffs of
/// `spawn_blocking` (measured: 4K random reads 2x faster inline), while a 1 MiB copy inline
/// would stall the worker that also drives the NBD sockets (sequential 1M 20% slower).
const INLINE_IO_MAX: usize = 64 << 10;

/// One I/O's share of the volume's gate.
type Gate = tokio::sync::OwnedRwLockReadGuard<()>;

/// An I/O error from one container.
struct OpFailed(Arc<OpenContainer>, std::io::Error);

/// Tags an error of container `c`'s I/O with the container.
fn on(c: &Arc<OpenContainer>) -> impl FnOnce(std::io::Error) -> OpFailed + '_ {
    move |e| OpFailed(c.clone(), e)
}

/// What an I/O works on: `run_io` checks the containers it touches before it moves it to
/// the thread that does the I/O.
trait IoData: Send + 'static {
    /// Every container touched (repeats allowed).
    fn containers(&self) -> impl Iterator<Item = &Arc<OpenContainer>>;
}

impl IoData for Vec<PhysOp> {
    fn containers(&self) -> impl Iterator<Item = &Arc<OpenContainer>> {
        self.iter().map(|op| &op.container)
    }
}

/// A sync of one container.
impl IoData for Arc<OpenContainer> {
    fn containers(&self) -> impl Iterator<Item = &Arc<OpenContainer>> {
        std::iter::once(self)
    }
}

impl IoData for Vec<CopyStep> {
    fn containers(&self) -> impl Iterator<Item = &Arc<OpenContainer>> {
        self.iter().flat_map(|s| [&s.from, &s.to])
    }
}

/// Runs blocking I/O `f` on `data` under `gate`, and hands the gate back with the result.
/// It fails at once if a container of `data` is known to be down. Small I/O to local files
/// runs inline; the rest runs on the blocking pool, bounded by the container timeout counted
/// from when it starts running there (a device or server that stops answering must not hang
/// the host; time queued behind other blocking work is not its fault).
///
/// The gate goes with `f`: an I/O that timed out keeps holding it until it really completes,
/// so a table command cannot free (and reuse) the space it may still write. A failure or
/// timeout is a container fault: the host gets EIO and the container is reported (see
/// `Shared::container_fault`).
async fn run_io<D: IoData, T: Send + 'static>(
    shared: &Arc<Shared>,
    what: &str,
    gate: Gate,
    data: D,
    bytes: usize,
    f: impl FnOnce(D) -> Result<T, OpFailed> + Send + 'static,
) -> Result<(T, Gate), IoError> {
    // Whom a timeout blames: which container hung is unknown when there are several, so a
    // remote one is suspected (local I/O rarely hangs). The id only: the Arc is looked up
    // if it comes to that.
    let mut suspect: Option<(ContainerId, bool)> = None;
    for c in data.containers() {
        c.check_up().map_err(|m| IoError {
            errno: Errno::Io,
            message: format!("{what}: {m}"),
        })?;
        let remote = c.file.is_remote();
        if suspect.is_none_or(|(_, r)| remote && !r) {
            suspect = Some((c.id, remote));
        }
    }
    let remote = suspect.is_some_and(|(_, r)| r);
    let result = if bytes <= INLINE_IO_MAX && !remote {
        f(data).map(|t| (t, gate))
    } else {
        let started = Arc::new(OnceLock::new());
        let start = started.clone();
        // If nobody waits for it any more, the output (and with it the gate) is dropped
        // when the closure returns.
        let mut task = tokio::task::spawn_blocking(move || {
            let _ = start.set(Instant::now());
            f(data).map(|t| (t, gate))
        });
        let limit = shared.cfg.container_timeout;
        let mut wait = limit;
        loop {
            match tokio::time::timeout(wait, &mut task).await {
                Ok(joined) => {
                    break joined.map_err(|e| IoError {
                        errno: Errno::Io,
                        message: format!("{what}: {e}"),
                    })?;
                }
                Err(_) => {
                    let ran = started.get().map_or(Duration::ZERO, Instant::elapsed);
                    if ran < limit {
                        wait = limit - ran;
                        continue;
                    }
                    let e = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {} ms", limit.as_millis()),
                    );
                    let Some(c) = suspect.and_then(|(id, _)| shared.cached_container(id)) else {
                        return Err(io_err(what, e));
                    };
                    break Err(OpFailed(c, e));
                }
            }
        }
    };
    result.map_err(|OpFailed(c, e)| {
        shared.container_fault(&c, format!("{what}: {e}"));
        IoError {
            errno: Errno::Io,
            message: format!("{what} (container {}): {e}", c.name),
        }
    })
}

/// One physical operation of an I/O.
struct PhysOp {
    container: Arc<OpenContainer>,
    /// Offset in the container.
    at: u64,
    /// Offset in the request buffer.
    buf_off: usize,
    len: usize,
}

/// One piece of a copy-on-write copy: `len` bytes from `from` at `src` to `to` at `dst`.
struct CopyStep {
    from: Arc<OpenContainer>,
    src: u64,
    to: Arc<OpenContainer>,
    dst: u64,
    len: u64,
}

/// The NBD face of a volume.
pub struct VolumeExport {
    shared: Arc<Shared>,
    vol: Arc<Volume>,
    /// Counts this export (an NBD connection) until it is dropped.
    _connection: crate::agent::Connection,
}

impl VolumeExport {
    pub(crate) fn new(shared: Arc<Shared>, vol: Arc<Volume>) -> VolumeExport {
        let _connection = crate::agent::Connection::new(&shared, vol.id());
        VolumeExport {
            shared,
            vol,
            _connection,
        }
    }

    /// The attempts of one I/O, bounded by the agent's fault wait from now.
    fn attempt(&self, op: &'static str, off: u64) -> Attempt {
        Attempt::new(op, off, self.shared.cfg.fault_wait)
    }

    fn check_attached(&self) -> Result<(), IoError> {
        if self.vol.detached.load(Ordering::Acquire) {
            return Err(IoError {
                errno: Errno::Shutdown,
                message: format!("vdisk {} was deleted", self.vol.name),
            });
        }
        Ok(())
    }

    /// After an I/O whose success promises durability (FLUSH, FUA): a vdisk deleted while it
    /// ran no longer holds what it wrote, so the host must not be told it is durable.
    fn check_still_attached(&self) -> Result<(), IoError> {
        self.check_attached().map_err(|e| IoError {
            message: format!("{}; nothing written to it is durable", e.message),
            ..e
        })
    }

    /// Whether the table copy may be used right now (checked again after the gate is taken
    /// and just before touching a container: the lease may run out meanwhile).
    #[inline]
    fn usable_now(&self) -> bool {
        self.shared.lease.valid()
            && self.vol.synced_epoch.load(Ordering::Acquire) == self.shared.epoch()
            && self.vol.block_state().is_none()
    }

    /// Waits until the volume is usable: the lease is valid, the copy is synchronised in this
    /// session (resynchronising it here if not), and no `Block` holds it. Gives up at the
    /// I/O's deadline (its fault wait).
    async fn ready(&self, deadline: Instant) -> Result<(), IoError> {
        if self.usable_now() {
            return Ok(());
        }
        loop {
            self.check_attached()?;
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.vol.block_state() == Some(false) {
                tracing::warn!(
                    vdisk = self.vol.name,
                    "a block was never lifted; resynchronising the table"
                );
                self.vol.synced_epoch.store(0, Ordering::Release);
            }
            let lease_ok = self.shared.lease.valid();
            let blocked = self.vol.block_state() == Some(true);
            if lease_ok && !blocked {
                if self.vol.synced_epoch.load(Ordering::Acquire) == self.shared.epoch() {
                    return Ok(());
                }
                match self.shared.resync(&self.vol).await {
                    Ok(()) => continue,
                    Err(e) if Instant::now() >= deadline => return Err(ctl_err(e)),
                    Err(e) => {
                        tracing::debug!(vdisk = self.vol.name, error = %e, "resync failed; retrying")
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(IoError {
                    errno: Errno::Io,
                    message: format!(
                        "vdisk {}: {} for {:?}; giving up on this I/O",
                        self.vol.name,
                        if !lease_ok {
                            "this agent's lease has run out and it could not reach the controller to renew it"
                        } else if blocked {
                            "held by the controller (blocked)"
                        } else {
                            "could not resynchronise the table with the controller"
                        },
                        self.shared.cfg.fault_wait
                    ),
                });
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), changed).await;
        }
    }

    /// The NBD server checks ranges against the size seen at connect time; the vdisk may have
    /// shrunk since, so every I/O is checked again against the current size.
    fn check_io(&self, off: u64, len: u64, write: bool) -> Result<(), IoError> {
        self.check_attached()?;
        let size = self.vol.size_bytes();
        if off.checked_add(len).is_none_or(|end| end > size) {
            return Err(IoError {
                errno: if write { Errno::NoSpc } else { Errno::Inval },
                message: format!(
                    "vdisk {}: range {off}+{len} lies beyond its current size {size} (it was resized; reconnect)",
                    self.vol.name
                ),
            });
        }
        Ok(())
    }

    /// Sends a fault and installs the answer. If the answer asks for copies (copy-on-write),
    /// makes them, reports them and installs that answer too.
    async fn fault(
        &self,
        att: &mut Attempt,
        op: FaultOp,
        state: State,
        segs: (u64, u64),
    ) -> Result<(), IoError> {
        let update = self.ask(att.deadline, op, state, segs, Vec::new()).await?;
        self.vol.install_answer(&update);
        if update.copies.is_empty() {
            return Ok(());
        }
        self.copy_segments(att, &update.copies).await?;
        let first = update
            .copies
            .iter()
            .map(|c| c.segment)
            .min()
            .expect("non-empty");
        let last = update
            .copies
            .iter()
            .map(|c| c.segment)
            .max()
            .expect("non-empty");
        let done = self
            .ask(
                att.deadline,
                FaultOp::Copied,
                State::New,
                (first, last + 1),
                update.copies,
            )
            .await?;
        self.vol.install_answer(&done);
        Ok(())
    }

    /// Copies shared segments into their new places (copy-on-write) and makes the copies
    /// durable. Like any I/O it runs under the gate with a usable table, so a command that
    /// frees the sources waits for it.
    async fn copy_segments(&self, att: &mut Attempt, copies: &[CowCopy]) -> Result<(), IoError> {
        for c in copies {
            for x in &c.from {
                if let Some(t) = x.target {
                    self.open_container(t.container).await?;
                }
            }
            self.open_container(c.to.container).await?;
        }
        loop {
            att.round(&self.vol.name).await?;
            self.ready(att.deadline).await?;
            let guard = self.vol.enter().await;
            if !self.usable_now() {
                att.held();
                continue;
            }
            let mut plan = Vec::new();
            for c in copies {
                let base = c.segment * self.vol.segment_blocks;
                let to = self.shared.cached_container(c.to.container);
                for x in &c.from {
                    if x.begin < base || x.end > base + self.vol.segment_blocks {
                        return Err(IoError {
                            errno: Errno::Io,
                            message: format!(
                                "vdisk {}: the controller asked to copy blocks {}..{} as part of segment {}; refusing",
                                self.vol.name, x.begin, x.end, c.segment
                            ),
                        });
                    }
                    let (Some(t), Some(to)) = (x.target, to.clone()) else {
                        continue;
                    };
                    let Some(from) = self.shared.cached_container(t.container) else {
                        continue;
                    };
                    plan.push(CopyStep {
                        from,
                        src: t.block * BLOCK_SIZE,
                        to,
                        dst: (c.to.block + x.begin - base) * BLOCK_SIZE,
                        len: x.len() * BLOCK_SIZE,
                    });
                }
            }
            if plan.is_empty() {
                drop(guard);
                return Ok(());
            }
            let bytes: u64 = plan.iter().map(|p| p.len).sum();
            let ((), guard) = run_io(
                &self.shared,
                "copy-on-write copy of a shared segment",
                guard,
                plan,
                usize::MAX,
                move |plan| {
                    const CHUNK: u64 = 1 << 20;
                    // Aligned, so that the durable writes go direct without a bounce.
                    let mut buf = tabula_container::AlignedBuf::new(CHUNK.min(bytes) as usize);
                    for CopyStep {
                        from,
                        src,
                        to,
                        dst,
                        len,
                    } in &plan
                    {
                        let mut done = 0;
                        while done < *len {
                            let n = CHUNK.min(len - done) as usize;
                            from.file
                                .read_at(buf.get(n), src + done)
                                .map_err(on(from))?;
                            // The controller maps the copy only once it is durable; only
                            // the copy is flushed, not every write cached in the container.
                            to.file
                                .write_fresh_durable(buf.get(n), dst + done)
                                .map_err(on(to))?;
                            done += n as u64;
                        }
                    }
                    Ok(())
                },
            )
            .await?;
            drop(guard);
            return Ok(());
        }
    }

    /// Sends a fault and returns the answer. While the controller cannot be reached, or asks
    /// to retry, the fault is repeated until the I/O's deadline.
    async fn ask(
        &self,
        deadline: Instant,
        op: FaultOp,
        state: State,
        segs: (u64, u64),
        copied: Vec<CowCopy>,
    ) -> Result<RangeUpdate, IoError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let fault = Fault {
                agent: self.shared.cfg.name.clone(),
                vdisk: self.vol.id,
                op,
                segments: segs,
                state,
                generation: self.vol.generation(),
                copied: copied.clone(),
            };
            let (wait, why) = match self.shared.control.fault(fault).await {
                Ok(update) => return Ok(update),
                Err(ControlError::Retry { after_ms, reason }) => {
                    (Duration::from_millis(after_ms), reason)
                }
                Err(ControlError::Unavailable(m)) => {
                    // At most 250 ms apart: a failover to another controller takes a couple
                    // of seconds, and a first write should follow within a beat of it (a 1 s
                    // cap made it wait up to a second more; retries are cheap).
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                    tracing::debug!(
                        vdisk = self.vol.name,
                        error = m,
                        "controller unreachable; fault waits"
                    );
                    (backoff, format!("the controller was unreachable ({m})"))
                }
                Err(e) => return Err(ctl_err(e)),
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(IoError {
                    errno: Errno::Io,
                    message: format!(
                        "vdisk {}: this I/O needs the controller (to allocate, unmap or copy) and could not get an answer within {:?} (--fault-wait): {why}",
                        self.vol.name, self.shared.cfg.fault_wait
                    ),
                });
            }
            // One last try at the deadline rather than giving up early.
            tokio::time::sleep(wait.min(deadline - now)).await;
            // The session may have changed meanwhile: the copy must be current first.
            self.ready(deadline).await?;
        }
    }

    /// Segment range covering the blocks of the pieces that need a fault.
    fn fault_segments(&self, bad: &[Piece]) -> (u64, u64) {
        let seg = self.vol.segment_blocks;
        let first = bad.first().expect("non-empty").begin / seg;
        let last = bad.last().expect("non-empty").end.div_ceil(seg);
        (first, last)
    }

    /// Physical operations for the pieces, using only containers already open. Returns the
    /// id of a container that must be opened first: opening may wait for the controller, and
    /// nothing may wait for the controller while holding the gate (the controller may be
    /// waiting for this agent to drain).
    fn resolve_ops(
        &self,
        pieces: &[Piece],
        off: u64,
        len: u64,
    ) -> Result<Vec<PhysOp>, ContainerId> {
        let mut ops = Vec::with_capacity(pieces.len());
        for p in pieces {
            let (s, e) = clip(p, off, len);
            if let Some((c, at)) = phys_off(p, s) {
                let container = self.shared.cached_container(c).ok_or(c)?;
                ops.push(PhysOp {
                    container,
                    at,
                    buf_off: (s - off) as usize,
                    len: (e - s) as usize,
                });
            }
        }
        Ok(ops)
    }

    async fn open_container(&self, id: ContainerId) -> Result<(), IoError> {
        self.shared.container(id).await.map(drop).map_err(ctl_err)
    }

    /// Ensures every block of `[off, off+len)` is writable, faulting as needed, and returns
    /// with the gate held and the physical operations resolved.
    async fn writable(
        &self,
        att: &mut Attempt,
        off: u64,
        len: u64,
    ) -> Result<(Gate, Vec<PhysOp>), IoError> {
        loop {
            att.round(&self.vol.name).await?;
            self.check_io(off, len, true)?;
            self.ready(att.deadline).await?;
            let guard = self.vol.enter().await;
            if !self.usable_now() {
                att.held();
                continue;
            }
            let pieces = self.vol.pieces(off, len);
            let bad: Vec<Piece> = pieces
                .iter()
                .filter(|p| !(p.state.writable() && p.target.is_some()))
                .copied()
                .collect();
            if bad.is_empty() {
                match self.resolve_ops(&pieces, off, len) {
                    Ok(ops) => return Ok((guard, ops)),
                    Err(id) => {
                        drop(guard);
                        self.open_container(id).await?;
                        continue;
                    }
                }
            }
            drop(guard);
            if let Some(p) = bad.iter().find(|p| p.state == State::Error) {
                return Err(IoError {
                    errno: Errno::Io,
                    message: format!(
                        "vdisk {}: blocks {}..{} are in the error state",
                        self.vol.name, p.begin, p.end
                    ),
                });
            }
            // Copy-on-write faults of a segment one at a time (see `cow_locks`); the next
            // one finds the segment writable or faults for it afresh.
            let segs = self.fault_segments(&bad);
            att.blocked_by(&bad[0]);
            let _cow = if bad.iter().any(|p| p.state == State::New) {
                Some(self.vol.lock_cow(segs).await)
            } else {
                None
            };
            self.fault(att, FaultOp::Write, bad[0].state, segs).await?;
        }
    }

    /// Makes the writes of `ops` durable (FUA), still under the I/O's gate.
    async fn sync_ops(&self, mut gate: Gate, ops: &[PhysOp]) -> Result<Gate, IoError> {
        for (i, op) in ops.iter().enumerate() {
            if ops[..i]
                .iter()
                .any(|o| Arc::ptr_eq(&o.container, &op.container))
            {
                continue;
            }
            ((), gate) = run_io(
                &self.shared,
                "sync",
                gate,
                op.container.clone(),
                usize::MAX,
                |c| c.file.sync().map_err(on(&c)),
            )
            .await?;
        }
        Ok(gate)
    }

    /// Unmaps the whole segments inside `[off, off+len)` through the controller. The last
    /// segment of a vdisk whose size is not a segment multiple counts as whole when the range
    /// reaches the end.
    async fn unmap_whole_segments(
        &self,
        att: &mut Attempt,
        op: FaultOp,
        off: u64,
        len: u64,
    ) -> Result<(), IoError> {
        let segb = self.vol.segment_bytes();
        let s0 = off.div_ceil(segb);
        let end = off + len;
        let size = self.vol.size_bytes();
        let s1 = if end >= size {
            size.div_ceil(segb)
        } else {
            end / segb
        };
        if s0 >= s1 {
            return Ok(());
        }
        let seg = self.vol.segment_blocks;
        let any_mapped = {
            let t = self.vol.table.read();
            !t.table.entries_in(s0 * seg, s1 * seg).is_empty()
        };
        if any_mapped {
            self.fault(att, op, State::Normal, (s0, s1)).await?;
        }
        Ok(())
    }
}

/// What NBD clients are told about a vdisk, whether attached or only described.
pub(crate) fn export_info(name: &str, size: u64, read_only: bool) -> ExportInfo {
    ExportInfo {
        size,
        read_only,
        description: Some(format!("tabula vdisk {name}")),
        min_block: 1,
        preferred_block: BLOCK_SIZE as u32,
        can_multi_conn: true,
        can_fast_zero: true,
    }
}

#[async_trait::async_trait]
impl Export for VolumeExport {
    fn info(&self) -> ExportInfo {
        export_info(&self.vol.name, self.vol.size_bytes(), self.vol.read_only)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        let len64 = len as u64;
        let mut att = self.attempt("read", offset);
        loop {
            att.round(&self.vol.name).await?;
            self.check_io(offset, len64, false)?;
            self.ready(att.deadline).await?;
            let guard = self.vol.enter().await;
            if !self.usable_now() {
                att.held();
                continue;
            }
            let pieces = self.vol.pieces(offset, len64);
            if let Some(bad) = pieces.iter().find(|p| !p.state.readable()) {
                let bad = *bad;
                drop(guard);
                if bad.state == State::Error {
                    return Err(IoError {
                        errno: Errno::Io,
                        message: format!(
                            "vdisk {}: blocks {}..{} are in the error state",
                            self.vol.name, bad.begin, bad.end
                        ),
                    });
                }
                att.blocked_by(&bad);
                self.fault(
                    &mut att,
                    FaultOp::Read,
                    bad.state,
                    self.fault_segments(&[bad]),
                )
                .await?;
                continue;
            }
            let ops = match self.resolve_ops(&pieces, offset, len64) {
                Ok(ops) => ops,
                Err(id) => {
                    drop(guard);
                    self.open_container(id).await?;
                    continue;
                }
            };
            if ops.is_empty() {
                // Unallocated: zeros without touching any container.
                return Ok(vec![0u8; len as usize]);
            }
            if let Some(delay) = self.shared.cfg.read_delay {
                tokio::time::sleep(delay).await;
            }
            let (buf, guard) = run_io(
                &self.shared,
                "read from container",
                guard,
                ops,
                len as usize,
                move |ops| {
                    if let [op] = ops.as_slice() {
                        if op.len == len as usize {
                            // One mapped run: read straight into an unzeroed buffer.
                            return op
                                .container
                                .file
                                .read_vec_at(op.len, op.at)
                                .map_err(on(&op.container));
                        }
                    }
                    let mut buf = vec![0u8; len as usize];
                    for op in &ops {
                        op.container
                            .file
                            .read_at(&mut buf[op.buf_off..op.buf_off + op.len], op.at)
                            .map_err(on(&op.container))?;
                    }
                    Ok(buf)
                },
            )
            .await?;
            drop(guard);
            return Ok(buf);
        }
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), IoError> {
        let mut att = self.attempt("write", offset);
        let (guard, ops) = self.writable(&mut att, offset, data.len() as u64).await?;
        let (ops, guard) = run_io(
            &self.shared,
            "write to container",
            guard,
            ops,
            data.len(),
            move |ops| {
                for op in &ops {
                    let buf = &data[op.buf_off..op.buf_off + op.len];
                    // FUA: this write alone is made durable, not everything cached.
                    if fua {
                        op.container.file.write_at_durable(buf, op.at)
                    } else {
                        op.container.dirty.store(true, Ordering::Release);
                        op.container.file.write_at(buf, op.at)
                    }
                    .map_err(on(&op.container))?;
                }
                tabula_nbd::bufpool::give(data);
                Ok(ops)
            },
        )
        .await?;
        drop((ops, guard));
        if fua {
            self.check_still_attached()?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), IoError> {
        // A deleted vdisk has nothing left to make durable: its writes are gone with it.
        self.check_attached()?;
        // Only a valid lease and a copy synchronised in this session say that it was not
        // deleted behind this agent's back (the controller deletes after a holder's
        // acknowledgement or lease): otherwise find out first, as any I/O would.
        if !(self.shared.lease.valid()
            && self.vol.synced_epoch.load(Ordering::Acquire) == self.shared.epoch())
        {
            self.ready(Instant::now() + self.shared.cfg.fault_wait)
                .await?;
        }
        self.shared.flush().await.map_err(|e| io_err("flush", e))?;
        self.check_still_attached()
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        let mut att = self.attempt("trim", offset);
        self.check_io(offset, len as u64, false)?;
        self.ready(att.deadline).await?;
        // Trim is advisory: whole segments are returned to the pool, partial ones are kept.
        // The controller's answer is durable before it returns, so FUA needs nothing more.
        self.unmap_whole_segments(&mut att, FaultOp::Trim, offset, len as u64)
            .await?;
        if fua {
            self.check_still_attached()?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        let mut att = self.attempt("write-zeroes", offset);
        self.check_io(offset, len as u64, true)?;
        self.ready(att.deadline).await?;
        let len64 = len as u64;
        if !flags.no_hole {
            self.unmap_whole_segments(&mut att, FaultOp::WriteZeroes, offset, len64)
                .await?;
        }
        // What is still mapped (partial segments, or everything with NO_HOLE) is zeroed in
        // place; with NO_HOLE, unallocated space is allocated first (it already reads zeros).
        if flags.no_hole {
            drop(self.writable(&mut att, offset, len64).await?);
        }
        let (guard, fresh) = loop {
            att.round(&self.vol.name).await?;
            self.check_io(offset, len64, true)?;
            self.ready(att.deadline).await?;
            let guard = self.vol.enter().await;
            if !self.usable_now() {
                att.held();
                continue;
            }
            let pieces = self.vol.pieces(offset, len64);
            // Zeroing in place is a write: a shared segment is copied first.
            let shared: Vec<Piece> = pieces
                .iter()
                .filter(|p| p.target.is_some() && !p.state.writable())
                .copied()
                .collect();
            if !shared.is_empty() {
                drop(guard);
                let segs = self.fault_segments(&shared);
                att.blocked_by(&shared[0]);
                let _cow = self.vol.lock_cow(segs).await;
                self.fault(&mut att, FaultOp::Write, shared[0].state, segs)
                    .await?;
                continue;
            }
            match self.resolve_ops(&pieces, offset, len64) {
                Ok(ops) => break (guard, ops),
                Err(id) => {
                    drop(guard);
                    self.open_container(id).await?;
                }
            }
        };
        let (fresh, mut guard) = run_io(
            &self.shared,
            "zero container range",
            guard,
            fresh,
            usize::MAX,
            move |fresh| {
                for op in &fresh {
                    op.container.dirty.store(true, Ordering::Release);
                    op.container
                        .file
                        .zero_range(op.at, op.len as u64)
                        .map_err(on(&op.container))?;
                }
                Ok(fresh)
            },
        )
        .await?;
        if flags.fua {
            guard = self.sync_ops(guard, &fresh).await?;
        }
        drop(guard);
        if flags.fua {
            self.check_still_attached()?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        self.check_io(offset, len as u64, false)?;
        self.ready(Instant::now() + self.shared.cfg.fault_wait)
            .await?;
        let len64 = len as u64;
        let mut out: Vec<StatusExtent> = Vec::new();
        for p in self.vol.pieces(offset, len64) {
            let (s, e) = clip(&p, offset, len64);
            let flags = if p.target.is_some() { 0 } else { HOLE_ZERO };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += (e - s) as u32,
                _ => out.push(StatusExtent {
                    length: (e - s) as u32,
                    flags,
                }),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
