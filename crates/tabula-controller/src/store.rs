//! Persistence: the controller's authoritative metadata in a redb database.
//!
//! What is durable and why: every change (an allocation, a free, a new vdisk) is durable
//! *before* the controller answers the request that caused it, so an agent never writes
//! through an entry that a crash could forget. The journal's batches become durable as
//! records of the redo log ([`crate::wal`], the file next to the database with the
//! extension `wal`) and reach the database later, by checkpoints: durable redb
//! transactions that apply the oldest logged records, a few thousand changes at a time
//! while the journal is busy and everything when it is idle, at a clean stop and at open
//! (after replaying the log). Direct writes ([`Store::write`]) are full checkpoints. The
//! database alone is therefore only the truth after [`Store::open`]; nothing else reads
//! the file. Freed space goes first to `zeroing` and only becomes `free` after it has been
//! zeroed and the zeroing made durable; on open, anything still in `zeroing` is zeroed again.
//!
//! Key layout (versions 3 to 5; version 2 stored one row per entry in `entries`, version 1 also
//! had no `cow` table and no snapshot fields in vdisk records; both are upgraded in place
//! on open):
//!
//! | table        | key                     | value                                        |
//! |--------------|-------------------------|----------------------------------------------|
//! | `meta`       | name (str)              | u64 (`schema`, `next_vdisk`, `next_container`, `pool_id`, `journal_seq`) |
//! | `containers` | container id (u32)      | JSON [`ContainerRecord`]                     |
//! | `vdisks`     | vdisk id (u64)          | JSON [`VdiskRecord`]                         |
//! | `chunks`     | (vdisk id, first begin) | up to [`CHUNK_ENTRIES`] consecutive entries, packed |
//! | `free`       | (container, start)      | length in blocks                             |
//! | `zeroing`    | (container, start)      | length in blocks                             |
//! | `cow`        | (container, start)      | length in blocks                             |
//!
//! A table is stored in chunks of consecutive entries, keyed by the first one's begin, so
//! that copying or deleting a million-entry table (a snapshot, a clone, a delete) writes
//! thousands of rows, not millions, while a fault still rewrites one small chunk.
//!
//! `cow` holds runs allocated for a copy-on-write that an agent is copying into: they belong
//! to no table yet. A start finds any left there abandoned and frees them (after zeroing,
//! like `zeroing`). Reference counts of shared blocks are not stored: they are derived from
//! the tables at load, so they can never disagree with them.

use std::path::{Path, PathBuf};

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tabula_api::admin::CowPolicy;
use tabula_core::{ContainerId, Entry, Phys, State, VdiskId};
use tracing::{debug, info};

use crate::wal::{self, Wal};

/// Version 2 added snapshots and clones (a version-1 tabula must not open a version-2 store:
/// it would free blocks that snapshots still map); version 3 stores entries in chunks;
/// version 4 keeps what it acknowledged last in the redo log until a checkpoint (a
/// version-3 tabula would open the database without replaying the log, and lose it);
/// version 5 gives the pool a random id (`meta.pool_id`) and new containers a label area
/// that no free run covers (`ContainerRecord::label_blocks`): a version-4 tabula would
/// report that area as leaked and remove containers without wiping their labels. A
/// version-4 store is upgraded by giving it a pool id; its containers stay unlabelled.
pub const SCHEMA_VERSION: u64 = 5;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const CONTAINERS: TableDefinition<u32, &str> = TableDefinition::new("containers");
const VDISKS: TableDefinition<u64, &str> = TableDefinition::new("vdisks");
/// Version 2's one row per entry: (end, container, physical block, has target, state).
type EntryValue = (u64, u32, u64, bool, u8);
const ENTRIES_V2: TableDefinition<(u64, u64), EntryValue> = TableDefinition::new("entries");
const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("chunks");
/// Entries per stored chunk: a fault rewrites about this many (4 KiB), a million-entry
/// table is some 8,000 rows.
pub const CHUNK_ENTRIES: usize = 128;
/// begin, end, container, physical block (u64, u64, u32, u64, little-endian), then a flags
/// byte (bit 0: has a target) and the state.
const ENTRY_BYTES: usize = 30;
const FREE: TableDefinition<(u32, u64), u64> = TableDefinition::new("free");
const ZEROING: TableDefinition<(u32, u64), u64> = TableDefinition::new("zeroing");
const COW: TableDefinition<(u32, u64), u64> = TableDefinition::new("cow");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata database {path} is in use by another tabula process; stop it first")]
    InUse { path: String },
    /// Carries redb's error in its message rather than as a source, so it is printed once.
    #[error("metadata database: {0}")]
    Db(redb::Error),
    #[error("metadata record is corrupt: {0}")]
    Corrupt(String),
    #[error("metadata log: {0}")]
    Log(String),
    #[error(
        "metadata schema version {found} is newer than this tabula understands ({SCHEMA_VERSION}); upgrade tabula"
    )]
    TooNew { found: u64 },
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Db(e)
    }
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub name: String,
    /// A file or block device path, or an NBD URI (`tabula_container::Location`).
    pub path: String,
    pub size_blocks: u64,
    /// Set while it is being drained: nothing new is allocated in it.
    #[serde(default)]
    pub draining: bool,
    /// Blocks at its start reserved for its label (`crate::label`), never allocated; 0 for
    /// a container added before labels, which has none.
    #[serde(default)]
    pub label_blocks: u64,
}

impl ContainerRecord {
    /// Blocks that can hold data: all but the label area.
    pub fn usable_blocks(&self) -> u64 {
        self.size_blocks.saturating_sub(self.label_blocks)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiskRecord {
    /// For a snapshot, `VDISK@SNAP` (its export name).
    pub name: String,
    pub size_bytes: u64,
    pub segment_blocks: u64,
    pub generation: u64,
    pub created: u64,
    /// Set for snapshots: no I/O may change them.
    #[serde(default)]
    pub read_only: bool,
    /// For a snapshot, the vdisk it belongs to.
    #[serde(default)]
    pub parent: Option<u64>,
    /// For a clone, the snapshot it was cloned from (by name, for display only: a clone
    /// depends on nothing).
    #[serde(default)]
    pub origin: Option<String>,
    /// The first vdisk of the family it was copied from (itself for an original): only
    /// tables of one lineage can be compared by `snapshot diff`.
    #[serde(default)]
    pub lineage: u64,
    #[serde(default)]
    pub cow: CowPolicy,
    /// The container all its space comes from (`vdisk create --container`), if pinned.
    #[serde(default)]
    pub container: Option<u32>,
}

/// Everything in the store, as loaded at startup.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The pool's random id, written into every container's label.
    pub pool_id: u64,
    pub next_vdisk: u64,
    pub next_container: u32,
    pub containers: Vec<(ContainerId, ContainerRecord)>,
    pub vdisks: Vec<(VdiskId, VdiskRecord, Vec<Entry>)>,
    pub free: Vec<(ContainerId, u64, u64)>,
    pub zeroing: Vec<(ContainerId, u64, u64)>,
    pub cow: Vec<(ContainerId, u64, u64)>,
}

pub struct Store {
    db: Database,
    /// The redo log and the changes logged since the last checkpoint; its lock also
    /// orders every write transaction with the log.
    wal: Mutex<Logged>,
    /// With high availability: where every record goes before it is applied here.
    replicator: Mutex<Option<Arc<dyn Replicator>>>,
    /// Copies of the log's last sequence number and of `pending_changes`, readable without
    /// the lock, which a leader holds across a replicated commit (an etcd round trip): async
    /// code must never wait for it.
    last_seq: std::sync::atomic::AtomicU64,
    pending: std::sync::atomic::AtomicUsize,
}

/// The replicated log of a control plane with several controllers (`crate::ha`): a record
/// is applied to this store only after [`Replicator::replicate`] has made it durable there
/// under this controller's leadership, so no controller ever holds a change the others
/// cannot get.
pub trait Replicator: Send + Sync {
    /// Makes record `seq` (`payload` is what the redo log holds for it) durable in the
    /// replicated log, or fails: then nothing of it may be applied or acknowledged.
    fn replicate(&self, seq: u64, payload: &[u8]) -> Result<(), StoreError>;
}

/// Everything in a store as changes that rebuild it from nothing, at record `seq`: what a
/// controller with a wiped or too old data dir installs ([`Store::install_image`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct Image {
    pub seq: u64,
    pub changes: Vec<Change>,
}

/// The log, and what it holds that the database does not have yet.
struct Logged {
    wal: Wal,
    /// Logged records the database does not include yet, oldest first, with their
    /// sequence numbers: applied by checkpoints, in order.
    pending: VecDeque<(u64, Vec<Change>)>,
    /// Changes in `pending`.
    pending_changes: usize,
}

impl Logged {
    /// Whether every record in the half appends do not go to is in the database.
    fn other_half_free(&self) -> bool {
        match self.pending.front() {
            None => true,
            Some(&(seq, _)) => self.wal.current_first() != 0 && seq >= self.wal.current_first(),
        }
    }
}

fn decode_entry_v2(begin: u64, v: EntryValue) -> Result<Entry, StoreError> {
    let (end, c, b, has, s) = v;
    let state = State::from_u8(s).ok_or_else(|| StoreError::Corrupt(format!("state {s}")))?;
    Ok(Entry {
        begin,
        end,
        target: has.then_some(Phys {
            container: ContainerId(c),
            block: b,
        }),
        state,
    })
}

fn encode_chunk(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_BYTES);
    for e in entries {
        let t = e.target.unwrap_or(Phys {
            container: ContainerId(0),
            block: 0,
        });
        out.extend_from_slice(&e.begin.to_le_bytes());
        out.extend_from_slice(&e.end.to_le_bytes());
        out.extend_from_slice(&t.container.0.to_le_bytes());
        out.extend_from_slice(&t.block.to_le_bytes());
        out.push(u8::from(e.target.is_some()));
        out.push(e.state.as_u8());
    }
    out
}

/// Decodes a chunk stored under (vdisk, `first`), appending its entries to `out`.
fn decode_chunk(first: u64, bytes: &[u8], out: &mut Vec<Entry>) -> Result<(), StoreError> {
    if bytes.is_empty() || bytes.len() % ENTRY_BYTES != 0 {
        return Err(StoreError::Corrupt(format!(
            "table chunk at block {first} has {} bytes, not a positive multiple of {ENTRY_BYTES}",
            bytes.len()
        )));
    }
    let start = out.len();
    for r in bytes.chunks_exact(ENTRY_BYTES) {
        let u64_at = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().expect("8 bytes"));
        let container = u32::from_le_bytes(r[16..20].try_into().expect("4 bytes"));
        let state = State::from_u8(r[29])
            .ok_or_else(|| StoreError::Corrupt(format!("state {} in a table chunk", r[29])))?;
        out.push(Entry {
            begin: u64_at(0),
            end: u64_at(8),
            target: (r[28] & 1 == 1).then_some(Phys {
                container: ContainerId(container),
                block: u64_at(20),
            }),
            state,
        });
    }
    if out[start].begin != first {
        return Err(StoreError::Corrupt(format!(
            "table chunk stored at block {first} begins at block {}",
            out[start].begin
        )));
    }
    Ok(())
}

/// Stores sorted entries of vdisk `id` as chunks of at most [`CHUNK_ENTRIES`], of even
/// sizes, each keyed by its first entry's begin.
fn put_chunks(
    t: &mut redb::Table<'_, (u64, u64), &[u8]>,
    id: u64,
    entries: &[Entry],
) -> Result<(), StoreError> {
    let n = entries.len().div_ceil(CHUNK_ENTRIES).max(1);
    let size = entries.len().div_ceil(n).max(1);
    for c in entries.chunks(size) {
        t.insert((id, c[0].begin), encode_chunk(c).as_slice())?;
    }
    Ok(())
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialize")
}

fn unjson<T: for<'a> Deserialize<'a>>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The metadata redo log of the store at `db`: next to it, same name, `.wal`.
pub fn wal_path(db: &Path) -> PathBuf {
    db.with_extension("wal")
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
                path: path.display().to_string(),
            },
            e => StoreError::Db(e.into()),
        })?;
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let found = meta.get("schema")?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema", SCHEMA_VERSION)?;
                }
                Some(v) if v > SCHEMA_VERSION => return Err(StoreError::TooNew { found: v }),
                Some(v) if v < SCHEMA_VERSION => {
                    meta.insert("schema", SCHEMA_VERSION)?;
                    if v < 3 {
                        upgrade_entries_to_chunks(&tx)?;
                    }
                }
                Some(_) => {}
            }
            // Stores made before version 5 get their id here, once.
            if meta.get(POOL_ID)?.is_none() {
                let id = crate::label::random_pool_id()
                    .map_err(|e| StoreError::Corrupt(format!("cannot make a pool id: {e}")))?;
                meta.insert(POOL_ID, id)?;
            }
            tx.open_table(CONTAINERS)?;
            tx.open_table(VDISKS)?;
            tx.open_table(CHUNKS)?;
            tx.open_table(FREE)?;
            tx.open_table(ZEROING)?;
            tx.open_table(COW)?;
        }
        let after = tx
            .open_table(META)?
            .get(JOURNAL_SEQ)?
            .map_or(0, |v| v.value());
        let wal_path = wal_path(path);
        let (mut wal, replay) = Wal::open(&wal_path, after)
            .map_err(|e| StoreError::Log(format!("open {}: {e}", wal_path.display())))?;
        // Records after the last checkpoint: apply them in order and checkpoint.
        let last = after + replay.len() as u64;
        for payload in &replay {
            decode_changes(payload)?
                .iter()
                .try_for_each(|c| apply(&tx, c))?;
        }
        tx.open_table(META)?.insert(JOURNAL_SEQ, last)?;
        tx.commit()?;
        if !replay.is_empty() {
            info!(records = replay.len(), "replayed the metadata log");
        }
        wal.restart(last);
        Ok(Store {
            db,
            wal: Mutex::new(Logged {
                wal,
                pending: VecDeque::new(),
                pending_changes: 0,
            }),
            replicator: Mutex::new(None),
            last_seq: last.into(),
            pending: 0.into(),
        })
    }

    /// Publishes what the lock protects for lock-free readers; called before it is released.
    fn publish(&self, logged: &Logged) {
        use std::sync::atomic::Ordering;
        self.last_seq.store(logged.wal.last(), Ordering::Release);
        self.pending
            .store(logged.pending_changes, Ordering::Release);
    }

    /// From now on every record goes to `r` before it is applied here (the leader of a
    /// control plane with several controllers).
    pub fn set_replicator(&self, r: Arc<dyn Replicator>) {
        *self.replicator.lock().expect("store replicator lock") = Some(r);
    }

    fn replicator(&self) -> Option<Arc<dyn Replicator>> {
        self.replicator
            .lock()
            .expect("store replicator lock")
            .clone()
    }

    /// The sequence number of the last record this store holds (in the database or the log).
    /// Never waits, not even for a commit in flight (it gives the record before).
    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A local, unreplicated value in `meta` (the cluster a store belongs to).
    pub fn local_meta(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(META)?.get(key)?.map(|v| v.value()))
    }

    /// Sets a local value in `meta`, durably, outside the log: only for what is this
    /// controller's own (which cluster its store belongs to, the pool id it takes from it).
    pub fn set_local_meta(&self, key: &str, v: u64) -> Result<(), StoreError> {
        let _logged = self.wal.lock().expect("store log lock");
        let tx = self.db.begin_write()?;
        tx.open_table(META)?.insert(key, v)?;
        tx.commit()?;
        Ok(())
    }

    /// Whether the store holds no vdisk, container or record: a new data dir.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        let logged = self.wal.lock().expect("store log lock");
        if logged.wal.last() > 0 {
            return Ok(false);
        }
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(CONTAINERS)?.len()? == 0 && tx.open_table(VDISKS)?.len()? == 0)
    }

    /// Applies record `seq` that another controller committed to the replicated log: the
    /// same path the leader's own records take after replication ([`Store::write_logged`]).
    /// Records must come in order, without gaps.
    pub fn apply_record(&self, seq: u64, payload: &[u8]) -> Result<(), StoreError> {
        let changes = decode_changes(payload)?;
        let mut logged = self.wal.lock().expect("store log lock");
        let want = logged.wal.last() + 1;
        if seq != want {
            return Err(StoreError::Log(format!(
                "record {seq} arrived where record {want} was expected"
            )));
        }
        let r = self.apply_locked(&mut logged, changes, payload);
        self.publish(&logged);
        r
    }

    /// Everything in the store as an [`Image`], after a full checkpoint.
    pub fn image(&self) -> Result<Image, StoreError> {
        let mut logged = self.wal.lock().expect("store log lock");
        let seq = logged.wal.last();
        let r = Self::checkpoint_locked(&self.db, &mut logged, seq, Vec::new());
        self.publish(&logged);
        r?;
        // A read transaction is a consistent snapshot: commits go on while it is read.
        let tx = self.db.begin_read()?;
        drop(logged);
        let meta = tx.open_table(META)?;
        let mut changes = Vec::new();
        for key in ["next_vdisk", "next_container", POOL_ID] {
            if let Some(v) = meta.get(key)? {
                changes.push(Change::SetMeta(key.to_string(), v.value()));
            }
        }
        let mut free: std::collections::BTreeMap<u32, Vec<(u64, u64)>> = Default::default();
        for row in tx.open_table(FREE)?.iter()? {
            let (k, v) = row?;
            let (c, s) = k.value();
            free.entry(c).or_default().push((s, v.value()));
        }
        for row in tx.open_table(CONTAINERS)?.iter()? {
            let (k, v) = row?;
            changes.push(Change::PutContainer(k.value(), unjson(v.value())?));
        }
        for (c, runs) in free {
            changes.push(Change::ReplaceFree(c, runs));
        }
        let chunks = tx.open_table(CHUNKS)?;
        for row in tx.open_table(VDISKS)?.iter()? {
            let (k, v) = row?;
            let id = k.value();
            let mut entries = Vec::new();
            for c in chunks.range((id, 0)..=(id, u64::MAX))? {
                let (k, v) = c?;
                decode_chunk(k.value().1, v.value(), &mut entries)?;
            }
            changes.push(Change::PutVdisk(id, unjson(v.value())?));
            changes.push(Change::ReplaceEntries {
                vdisk: id,
                lo: 0,
                hi: u64::MAX,
                entries,
            });
        }
        let zeroing = runs_of(&tx.open_table(ZEROING)?)?;
        if !zeroing.is_empty() {
            changes.push(Change::PutZeroing(zeroing));
        }
        for (at, len) in runs_of(&tx.open_table(COW)?)? {
            changes.push(Change::PutCow(at, len));
        }
        Ok(Image { seq, changes })
    }

    /// Replaces everything in the store with `image` (local values in `meta`, such as the
    /// cluster id, stay): the next record expected is the one after the image's.
    pub fn install_image(&self, image: &Image) -> Result<(), StoreError> {
        let mut logged = self.wal.lock().expect("store log lock");
        let tx = self.db.begin_write()?;
        tx.open_table(CONTAINERS)?.retain(|_, _| false)?;
        tx.open_table(VDISKS)?.retain(|_, _| false)?;
        tx.open_table(CHUNKS)?.retain(|_, _| false)?;
        tx.open_table(FREE)?.retain(|_, _| false)?;
        tx.open_table(ZEROING)?.retain(|_, _| false)?;
        tx.open_table(COW)?.retain(|_, _| false)?;
        for c in &image.changes {
            apply(&tx, c)?;
        }
        tx.open_table(META)?.insert(JOURNAL_SEQ, image.seq)?;
        tx.commit()?;
        logged.wal.restart(image.seq);
        logged.pending.clear();
        logged.pending_changes = 0;
        self.publish(&logged);
        info!(
            seq = image.seq,
            changes = image.changes.len(),
            "installed a metadata image"
        );
        Ok(())
    }

    /// Everything in the store, logged changes included (they are checkpointed first).
    pub fn load(&self) -> Result<Loaded, StoreError> {
        if !self.wal.lock().expect("store log lock").pending.is_empty() {
            self.checkpoint()?;
        }
        let tx = self.db.begin_read()?;
        let mut out = Loaded::default();
        let meta = tx.open_table(META)?;
        out.pool_id = meta.get(POOL_ID)?.map_or(0, |v| v.value());
        out.next_vdisk = meta.get("next_vdisk")?.map(|v| v.value()).unwrap_or(1);
        out.next_container = meta
            .get("next_container")?
            .map(|v| v.value() as u32)
            .unwrap_or(1);
        for row in tx.open_table(CONTAINERS)?.iter()? {
            let (k, v) = row?;
            out.containers
                .push((ContainerId(k.value()), unjson(v.value())?));
        }
        let chunks = tx.open_table(CHUNKS)?;
        for row in tx.open_table(VDISKS)?.iter()? {
            let (k, v) = row?;
            let id = k.value();
            let mut list = Vec::new();
            for c in chunks.range((id, 0)..=(id, u64::MAX))? {
                let (k, v) = c?;
                decode_chunk(k.value().1, v.value(), &mut list)?;
            }
            out.vdisks.push((VdiskId(id), unjson(v.value())?, list));
        }
        for row in tx.open_table(FREE)?.iter()? {
            let (k, v) = row?;
            let (c, s) = k.value();
            out.free.push((ContainerId(c), s, v.value()));
        }
        for row in tx.open_table(ZEROING)?.iter()? {
            let (k, v) = row?;
            let (c, s) = k.value();
            out.zeroing.push((ContainerId(c), s, v.value()));
        }
        for row in tx.open_table(COW)?.iter()? {
            let (k, v) = row?;
            let (c, s) = k.value();
            out.cow.push((ContainerId(c), s, v.value()));
        }
        Ok(out)
    }

    /// Runs `f` in one write transaction and commits it durably before returning, with
    /// everything logged before (a full checkpoint: the log starts again).
    pub fn write<R>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        if self.replicator().is_some() {
            // Replicated first, like every record, then checkpointed.
            let mut changes = Vec::new();
            let r = f(&mut Txn(Target::Log(&mut changes)))?;
            self.commit_changes(changes)?;
            self.checkpoint()?;
            return Ok(r);
        }
        let mut logged = self.wal.lock().expect("store log lock");
        let last = logged.wal.last();
        let r = Self::checkpoint_locked_with(&self.db, &mut logged, last, f);
        self.publish(&logged);
        r
    }

    /// Applies everything logged and then `changes` to the database in one durable
    /// transaction, without a new record (the log starts again).
    /// `changes` are record `seq`'s (the last one's, without changes).
    fn checkpoint_locked(
        db: &Database,
        logged: &mut Logged,
        seq: u64,
        changes: Vec<Change>,
    ) -> Result<(), StoreError> {
        Self::checkpoint_locked_with(db, logged, seq, |t| {
            changes.into_iter().try_for_each(|c| t.apply(c))
        })
    }

    /// One durable transaction with everything logged, then what `f` does; the database
    /// then includes every record up to `last`, and the log starts again after it.
    fn checkpoint_locked_with<R>(
        db: &Database,
        logged: &mut Logged,
        last: u64,
        f: impl FnOnce(&mut Txn<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let started = std::time::Instant::now();
        let tx = db.begin_write()?;
        // Kept until committed: a failure leaves them to the next attempt, in order.
        logged
            .pending
            .iter()
            .flat_map(|(_, changes)| changes)
            .try_for_each(|c| apply(&tx, c))?;
        let r = f(&mut Txn(Target::Db(&tx)))?;
        tx.open_table(META)?.insert(JOURNAL_SEQ, last)?;
        tx.commit()?;
        logged.wal.restart(last);
        if !logged.pending.is_empty() {
            debug!(
                changes = logged.pending_changes,
                ms = started.elapsed().as_millis() as u64,
                "metadata checkpoint (all)"
            );
            logged.pending.clear();
            logged.pending_changes = 0;
        }
        Ok(r)
    }

    /// Makes the changes `f` makes durable through the log: they are appended as one
    /// record and synced before this returns, and reach the database at a checkpoint
    /// ([`Store::checkpoint_step`]; a write transaction per batch would cost about as much
    /// as the log saves). A batch too big for the log is committed to the database
    /// directly.
    pub fn write_logged(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut changes = Vec::new();
        f(&mut Txn(Target::Log(&mut changes)))?;
        self.commit_changes(changes)
    }

    /// Makes `changes` durable as the next record: replicated first (with high
    /// availability), then appended to the log.
    fn commit_changes(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let payload = serde_json::to_vec(&changes).expect("log records serialize");
        let replicator = self.replicator();
        let mut logged = self.wal.lock().expect("store log lock");
        if let Some(r) = replicator {
            r.replicate(logged.wal.last() + 1, &payload)?;
        }
        let r = self.apply_locked(&mut logged, changes, &payload);
        self.publish(&logged);
        r
    }

    /// Applies record `wal.last() + 1`: appended to the log, or if it is too big for the
    /// log, committed to the database directly (with everything logged before it).
    fn apply_locked(
        &self,
        logged: &mut Logged,
        changes: Vec<Change>,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        if !Wal::fits_at_all(payload.len()) {
            // The database then holds record `seq`; the log goes on after it.
            let seq = logged.wal.last() + 1;
            return Self::checkpoint_locked(&self.db, logged, seq, changes);
        }
        let full = !logged.wal.fits(payload.len());
        if full || (logged.wal.used() >= wal::SWITCH_AT && logged.other_half_free()) {
            if !logged.other_half_free() {
                // Checkpoints fell behind a full half: catch up now (appends wait).
                let upto = logged.wal.current_first() - 1;
                Self::apply_front(&self.db, logged, usize::MAX, upto)?;
            }
            logged.wal.switch();
        }
        let seq = logged
            .wal
            .append(payload)
            .map_err(|e| StoreError::Log(format!("append: {e}")))?;
        logged.pending_changes += changes.len();
        logged.pending.push_back((seq, changes));
        Ok(())
    }

    /// Changes logged and not yet in the database.
    pub fn pending_changes(&self) -> usize {
        self.pending.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Applies the oldest logged records, about `max_changes` changes of them (at least
    /// one record), to the database in one durable transaction. A piece at a time, so the
    /// journal never stalls long behind a checkpoint.
    pub fn checkpoint_step(&self, max_changes: usize) -> Result<(), StoreError> {
        let mut logged = self.wal.lock().expect("store log lock");
        let r = Self::apply_front(&self.db, &mut logged, max_changes, u64::MAX);
        self.publish(&logged);
        r
    }

    /// Applies records from the front of `pending`, up to `max_changes` changes (at least
    /// one record) and sequence number `upto`, and commits durably.
    fn apply_front(
        db: &Database,
        logged: &mut Logged,
        max_changes: usize,
        upto: u64,
    ) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let tx = db.begin_write()?;
        let (mut records, mut applied, mut last) = (0, 0, None);
        for (seq, changes) in &logged.pending {
            if *seq > upto || (records > 0 && applied + changes.len() > max_changes) {
                break;
            }
            records += 1;
            applied += changes.len();
            last = Some(*seq);
        }
        let picked = logged.pending.iter().take(records);
        picked
            .flat_map(|(_, changes)| changes)
            .try_for_each(|c| apply(&tx, c))?;
        let Some(last) = last else {
            return Ok(());
        };
        tx.open_table(META)?.insert(JOURNAL_SEQ, last)?;
        tx.commit()?;
        logged.pending.drain(..records);
        logged.pending_changes -= applied;
        debug!(
            changes = applied,
            ms = started.elapsed().as_millis() as u64,
            "metadata checkpoint"
        );
        Ok(())
    }

    /// Applies every logged change to the database, commits durably and starts the log
    /// again.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let mut logged = self.wal.lock().expect("store log lock");
        let last = logged.wal.last();
        let r = Self::checkpoint_locked(&self.db, &mut logged, last, Vec::new());
        self.publish(&logged);
        r
    }
}

/// `meta` key: the pool's random id.
pub const POOL_ID: &str = "pool_id";

/// The runs of a `zeroing` or `cow` table.
fn runs_of(t: &impl ReadableTable<(u32, u64), u64>) -> Result<Vec<(Phys, u64)>, StoreError> {
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        let (c, s) = k.value();
        out.push((
            Phys {
                container: ContainerId(c),
                block: s,
            },
            v.value(),
        ));
    }
    Ok(out)
}

/// `meta` key: the last log record a durable commit includes.
const JOURNAL_SEQ: &str = "journal_seq";

/// The changes in one log record's payload.
pub fn decode_changes(payload: &[u8]) -> Result<Vec<Change>, StoreError> {
    serde_json::from_slice(payload)
        .map_err(|e| StoreError::Corrupt(format!("metadata log record: {e}")))
}

/// One change, as logged: each is a call of the [`Txn`] method of the same name, and
/// replaying them in order from the last checkpoint repeats exactly what was done.
#[derive(Debug, Serialize, Deserialize)]
pub enum Change {
    SetMeta(String, u64),
    PutContainer(u32, ContainerRecord),
    DeleteContainer(u32),
    PutVdisk(u64, VdiskRecord),
    DeleteVdisk(u64),
    ReplaceEntries {
        vdisk: u64,
        lo: u64,
        hi: u64,
        entries: Vec<Entry>,
    },
    PutFree(u32, u64, u64),
    DeleteFree(u32, u64),
    ReplaceFree(u32, Vec<(u64, u64)>),
    PutZeroing(Vec<(Phys, u64)>),
    PutCow(Phys, u64),
    DeleteCow(Phys),
    DeleteZeroing(u32, u64),
}

/// One write transaction's operations: made in a database transaction, or recorded as
/// [`Change`]s for the log (and applied at a checkpoint). Every method goes through
/// [`Txn::apply`], so nothing can change the database without being logged.
pub struct Txn<'a>(Target<'a>);

enum Target<'a> {
    Db(&'a WriteTransaction),
    Log(&'a mut Vec<Change>),
}

impl Txn<'_> {
    pub fn set_meta(&mut self, key: &str, v: u64) -> Result<(), StoreError> {
        self.apply(Change::SetMeta(key.to_owned(), v))
    }

    pub fn put_container(
        &mut self,
        id: ContainerId,
        r: &ContainerRecord,
    ) -> Result<(), StoreError> {
        self.apply(Change::PutContainer(id.0, r.clone()))
    }

    /// Forgets an empty container: its record and its free runs.
    pub fn delete_container(&mut self, id: ContainerId) -> Result<(), StoreError> {
        self.apply(Change::DeleteContainer(id.0))
    }

    pub fn put_vdisk(&mut self, id: VdiskId, r: &VdiskRecord) -> Result<(), StoreError> {
        self.apply(Change::PutVdisk(id.0, r.clone()))
    }

    /// Removes the vdisk record and all its entries.
    pub fn delete_vdisk(&mut self, id: VdiskId) -> Result<(), StoreError> {
        self.apply(Change::DeleteVdisk(id.0))
    }

    /// Replaces the stored entries of `vdisk` that start in `[lo, hi)` with `entries`
    /// (sorted, each starting in `[lo, hi)`). Only two chunks are read: the one before `lo`
    /// (the new entries join it, and it may reach into the range) and the last one inside
    /// (it may reach past `hi`); those between are dropped unread.
    pub fn replace_entries(
        &mut self,
        vdisk: VdiskId,
        lo: u64,
        hi: u64,
        entries: &[Entry],
    ) -> Result<(), StoreError> {
        self.apply(Change::ReplaceEntries {
            vdisk: vdisk.0,
            lo,
            hi,
            entries: entries.to_vec(),
        })
    }

    pub fn put_free(&mut self, c: ContainerId, start: u64, len: u64) -> Result<(), StoreError> {
        self.apply(Change::PutFree(c.0, start, len))
    }

    pub fn delete_free(&mut self, c: ContainerId, start: u64) -> Result<(), StoreError> {
        self.apply(Change::DeleteFree(c.0, start))
    }

    /// Replaces all free runs of container `c` with `runs`.
    pub fn replace_free(
        &mut self,
        c: ContainerId,
        runs: impl Iterator<Item = (u64, u64)>,
    ) -> Result<(), StoreError> {
        self.apply(Change::ReplaceFree(c.0, runs.collect()))
    }

    /// Records freed runs as waiting to be zeroed.
    pub fn put_zeroing_runs(&mut self, runs: &[(Phys, u64)]) -> Result<(), StoreError> {
        self.apply(Change::PutZeroing(runs.to_vec()))
    }

    pub fn put_cow(&mut self, at: Phys, len: u64) -> Result<(), StoreError> {
        self.apply(Change::PutCow(at, len))
    }

    pub fn delete_cow(&mut self, at: Phys) -> Result<(), StoreError> {
        self.apply(Change::DeleteCow(at))
    }

    pub fn delete_zeroing(&mut self, c: ContainerId, start: u64) -> Result<(), StoreError> {
        self.apply(Change::DeleteZeroing(c.0, start))
    }

    /// Makes change `r` in the transaction, or records it.
    fn apply(&mut self, r: Change) -> Result<(), StoreError> {
        match &mut self.0 {
            Target::Db(tx) => apply(tx, &r),
            Target::Log(log) => {
                log.push(r);
                Ok(())
            }
        }
    }
}

/// Makes change `r` in `tx`.
fn apply(tx: &WriteTransaction, r: &Change) -> Result<(), StoreError> {
    match r {
        Change::SetMeta(key, v) => {
            tx.open_table(META)?.insert(key.as_str(), *v)?;
        }
        Change::PutContainer(id, rec) => {
            tx.open_table(CONTAINERS)?.insert(*id, json(rec).as_str())?;
        }
        Change::DeleteContainer(id) => {
            tx.open_table(CONTAINERS)?.remove(*id)?;
            tx.open_table(FREE)?
                .retain_in((*id, 0)..=(*id, u64::MAX), |_, _| false)?;
        }
        Change::PutVdisk(id, rec) => {
            tx.open_table(VDISKS)?.insert(*id, json(rec).as_str())?;
        }
        Change::DeleteVdisk(id) => {
            tx.open_table(VDISKS)?.remove(*id)?;
            tx.open_table(CHUNKS)?
                .retain_in((*id, 0)..=(*id, u64::MAX), |_, _| false)?;
        }
        Change::ReplaceEntries {
            vdisk,
            lo,
            hi,
            entries,
        } => replace_entries(tx, *vdisk, *lo, *hi, entries)?,
        Change::PutFree(c, start, len) => {
            tx.open_table(FREE)?.insert((*c, *start), *len)?;
        }
        Change::DeleteFree(c, start) => {
            tx.open_table(FREE)?.remove((*c, *start))?;
        }
        Change::ReplaceFree(c, runs) => {
            let mut t = tx.open_table(FREE)?;
            t.retain_in((*c, 0)..=(*c, u64::MAX), |_, _| false)?;
            for &(s, l) in runs {
                t.insert((*c, s), l)?;
            }
        }
        Change::PutZeroing(runs) => {
            let mut t = tx.open_table(ZEROING)?;
            for &(p, l) in runs {
                t.insert((p.container.0, p.block), l)?;
            }
        }
        Change::PutCow(at, len) => {
            tx.open_table(COW)?
                .insert((at.container.0, at.block), *len)?;
        }
        Change::DeleteCow(at) => {
            tx.open_table(COW)?.remove((at.container.0, at.block))?;
        }
        Change::DeleteZeroing(c, start) => {
            tx.open_table(ZEROING)?.remove((*c, *start))?;
        }
    }
    Ok(())
}

/// [`Txn::replace_entries`].
fn replace_entries(
    tx: &WriteTransaction,
    id: u64,
    lo: u64,
    hi: u64,
    entries: &[Entry],
) -> Result<(), StoreError> {
    let mut t = tx.open_table(CHUNKS)?;
    let mut old: Vec<Entry> = Vec::new();
    if lo < hi {
        let mut before_key = None;
        if let Some((k, v)) = t.range((id, 0)..(id, lo))?.next_back().transpose()? {
            before_key = Some(k.value().1);
            decode_chunk(k.value().1, v.value(), &mut old)?;
        }
        if let Some((k, v)) = t.range((id, lo)..(id, hi))?.next_back().transpose()? {
            decode_chunk(k.value().1, v.value(), &mut old)?;
        }
        if let Some(k) = before_key {
            t.remove((id, k))?;
        }
        t.retain_in((id, lo)..(id, hi), |_, _| false)?;
    }
    // The kept entries lie before `lo` or after `hi`; the new ones between.
    let split = old.partition_point(|e| e.begin < lo);
    let after = old.partition_point(|e| e.begin < hi);
    let list: Vec<Entry> = old[..split]
        .iter()
        .chain(entries)
        .chain(&old[after..])
        .copied()
        .collect();
    put_chunks(&mut t, id, &list)
}

/// Moves version 2's one-row-per-entry `entries` into `chunks`, in the caller's transaction
/// (so an interrupted upgrade leaves version 2 as it was).
fn upgrade_entries_to_chunks(tx: &WriteTransaction) -> Result<(), StoreError> {
    let mut per_vdisk: Vec<(u64, Vec<Entry>)> = Vec::new();
    {
        let old = tx.open_table(ENTRIES_V2)?;
        for row in old.iter()? {
            let (k, v) = row?;
            let (id, begin) = k.value();
            let e = decode_entry_v2(begin, v.value())?;
            match per_vdisk.last_mut() {
                Some((last, list)) if *last == id => list.push(e),
                _ => per_vdisk.push((id, vec![e])),
            }
        }
    }
    let mut chunks = tx.open_table(CHUNKS)?;
    for (id, list) in &per_vdisk {
        put_chunks(&mut chunks, *id, list)?;
    }
    tx.delete_table(ENTRIES_V2)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use proptest::prelude::*;

    fn entry(begin: u64, len: u64, block: Option<u64>, state: State) -> Entry {
        Entry {
            begin,
            end: begin + len,
            target: block.map(|b| Phys {
                container: ContainerId(1),
                block: b,
            }),
            state,
        }
    }

    fn record(name: &str) -> VdiskRecord {
        VdiskRecord {
            name: name.into(),
            size_bytes: 1 << 30,
            segment_blocks: 16,
            generation: 1,
            created: 0,
            read_only: false,
            parent: None,
            origin: None,
            lineage: 0,
            cow: CowPolicy::default(),
            container: None,
        }
    }

    fn stored(store: &Store) -> Vec<(VdiskId, Vec<Entry>)> {
        let mut v: Vec<_> = store
            .load()
            .unwrap()
            .vdisks
            .into_iter()
            .map(|(id, _, e)| (id, e))
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }

    /// Opens a copy of the store in `dir` as a crash (kill -9) would leave its files now:
    /// what is written is there, what is only in the process's memory is not.
    fn crashed(dir: &Path) -> Store {
        let copy = dir.join("crash");
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir(&copy).unwrap();
        for f in ["t.redb", "t.wal"] {
            std::fs::copy(dir.join(f), copy.join(f)).unwrap();
        }
        Store::open(&copy.join("t.redb")).unwrap()
    }

    fn chunk_sizes(store: &Store) -> Vec<usize> {
        let tx = store.db.begin_read().unwrap();
        let t = tx.open_table(CHUNKS).unwrap();
        t.iter()
            .unwrap()
            .map(|r| r.unwrap().1.value().len() / ENTRY_BYTES)
            .collect()
    }

    /// One edit: replace what starts in `[lo, lo+span)` of vdisk `which` with entries
    /// starting at the offsets in `starts` (relative, deduplicated), or the whole table.
    #[derive(Debug, Clone)]
    enum Op {
        Range {
            which: u64,
            lo: u64,
            span: u64,
            starts: Vec<u64>,
        },
        Whole {
            which: u64,
            n: u64,
        },
        Delete {
            which: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (1..3u64, 0..2000u64, 1..600u64, proptest::collection::vec(0..600u64, 0..300))
                .prop_map(|(which, lo, span, starts)| Op::Range { which, lo, span, starts }),
            1 => (1..3u64, 0..1000u64).prop_map(|(which, n)| Op::Whole { which, n }),
            1 => (1..3u64).prop_map(|which| Op::Delete { which }),
        ]
    }

    /// Collects what a leader replicates, as the etcd log would hold it.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<(u64, Vec<u8>)>>);

    impl Replicator for Recorded {
        fn replicate(&self, seq: u64, payload: &[u8]) -> Result<(), StoreError> {
            self.0.lock().unwrap().push((seq, payload.to_vec()));
            Ok(())
        }
    }

    /// Everything a store holds, comparable.
    fn everything(store: &Store) -> String {
        let mut l = store.load().unwrap();
        l.pool_id = 0;
        format!("{l:?}")
    }

    /// A leader's records, applied by a follower through `apply_record` (the path a
    /// standby takes) and by a third store from an image plus the records after it, give
    /// the same store; a record out of order is refused; a refused replication applies
    /// nothing.
    #[test]
    fn records_applied_elsewhere_give_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let leader = Store::open(&dir.path().join("l.redb")).unwrap();
        let log = Arc::new(Recorded::default());
        leader.set_replicator(log.clone());
        let follower = Store::open(&dir.path().join("f.redb")).unwrap();
        let late = Store::open(&dir.path().join("late.redb")).unwrap();
        let big: Vec<Entry> = (0..60_000)
            .map(|k| entry(k * 4, 4, Some(k), State::New))
            .collect();
        let mut applied = 0;
        let mut image = None;
        for round in 0..6u64 {
            let v = VdiskId(round % 2 + 1);
            leader
                .write_logged(|t| {
                    t.put_vdisk(v, &record("v"))?;
                    t.put_free(ContainerId(1), round * 100, 10)?;
                    t.replace_entries(
                        v,
                        round * 10,
                        round * 10 + 5,
                        &[entry(round * 10, 2, Some(round), State::Normal)],
                    )
                })
                .unwrap();
            match round {
                // A record too big for the local log goes to the database directly, and
                // still has its number.
                1 => leader
                    .write_logged(|t| t.replace_entries(VdiskId(3), 0, u64::MAX, &big))
                    .unwrap(),
                2 => leader.write(|t| t.delete_free(ContainerId(1), 0)).unwrap(),
                3 => image = Some(leader.image().unwrap()),
                _ => {}
            }
            for (seq, payload) in log.0.lock().unwrap()[applied..].iter() {
                follower.apply_record(*seq, payload).unwrap();
            }
            applied = log.0.lock().unwrap().len();
            assert_eq!(follower.last_seq(), leader.last_seq());
        }
        let records = log.0.lock().unwrap().clone();
        assert_eq!(
            records.iter().map(|r| r.0).collect::<Vec<_>>(),
            (1..=records.len() as u64).collect::<Vec<_>>(),
            "records are numbered without gaps"
        );
        let image = image.unwrap();
        late.install_image(&image).unwrap();
        let after = records.iter().filter(|r| r.0 > image.seq);
        let (first, _) = after.clone().next().unwrap();
        assert!(
            late.apply_record(first + 1, &records[0].1).is_err(),
            "a gap is refused"
        );
        for (seq, payload) in after {
            late.apply_record(*seq, payload).unwrap();
        }
        assert_eq!(everything(&follower), everything(&leader));
        assert_eq!(everything(&late), everything(&leader));

        // A replication that fails leaves the store as it was.
        struct Refuse;
        impl Replicator for Refuse {
            fn replicate(&self, _: u64, _: &[u8]) -> Result<(), StoreError> {
                Err(StoreError::Log("not the leader".into()))
            }
        }
        let before = (everything(&leader), leader.last_seq());
        leader.set_replicator(Arc::new(Refuse));
        assert!(leader.write_logged(|t| t.delete_vdisk(VdiskId(1))).is_err());
        assert!(leader.write(|t| t.delete_vdisk(VdiskId(1))).is_err());
        assert_eq!((everything(&leader), leader.last_seq()), before);
    }

    /// `last_seq` answers at once while a record is out being replicated: the leader's
    /// async tasks (its member key, `/v1/ha`, truncation) read it on runtime worker threads,
    /// and the etcd call the committer waits for needs those threads. Blocking them on the
    /// log lock the committer holds across that call hung leaders under load.
    #[test]
    fn last_seq_does_not_wait_for_a_replication_in_flight() {
        use std::sync::mpsc;
        use std::time::Duration;
        struct Held {
            entered: Mutex<mpsc::Sender<()>>,
            release: Mutex<mpsc::Receiver<()>>,
        }
        impl Replicator for Held {
            fn replicate(&self, _: u64, _: &[u8]) -> Result<(), StoreError> {
                self.entered.lock().unwrap().send(()).unwrap();
                self.release.lock().unwrap().recv().unwrap();
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
        store
            .write_logged(|t| t.put_vdisk(VdiskId(1), &record("v")))
            .unwrap();
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        store.set_replicator(Arc::new(Held {
            entered: Mutex::new(entered_tx),
            release: Mutex::new(release_rx),
        }));
        let committer = {
            let store = store.clone();
            std::thread::spawn(move || {
                store.write_logged(|t| t.put_vdisk(VdiskId(2), &record("w")))
            })
        };
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = {
            let store = store.clone();
            std::thread::spawn(move || tx.send(store.last_seq()).unwrap())
        };
        let seen = rx.recv_timeout(Duration::from_secs(2));
        release.send(()).unwrap();
        committer.join().unwrap().unwrap();
        reader.join().unwrap();
        assert_eq!(
            seen,
            Ok(1),
            "last_seq blocked behind the replication in flight"
        );
        assert_eq!(store.last_seq(), 2, "the record counts once committed");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Chunked storage against a plain model: after every transaction the store loads
        /// exactly the model's entries, and no chunk exceeds its bound. Transactions are
        /// committed durably, through the log, or through the log followed by a full
        /// checkpoint or by one step of one; the files as a crash after transaction
        /// `crash_at` leaves them open to the same.
        #[test]
        fn chunks_store_what_a_model_holds(
            ops in proptest::collection::vec((op(), 0..4u8), 1..40),
            crash_at in 0..40usize,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("t.redb")).unwrap();
            let mut model: BTreeMap<u64, BTreeMap<u64, Entry>> = BTreeMap::new();
            let crash_at = crash_at % ops.len();
            for (i, (op, mode)) in ops.into_iter().enumerate() {
                let commit = |f: &dyn Fn(&mut Txn<'_>) -> Result<(), StoreError>| {
                    if mode == 0 {
                        store.write(f).unwrap();
                    } else {
                        store.write_logged(f).unwrap();
                    }
                    match mode {
                        2 => store.checkpoint().unwrap(),
                        3 => store.checkpoint_step(1).unwrap(),
                        _ => {}
                    }
                };
                match op {
                    Op::Range { which, lo, span, starts } => {
                        let hi = lo + span;
                        let mut starts: Vec<u64> =
                            starts.into_iter().filter(|s| *s < span).map(|s| lo + s).collect();
                        starts.sort();
                        starts.dedup();
                        let new: Vec<Entry> = starts
                            .iter()
                            .map(|&b| entry(b, 1, (b % 3 != 0).then_some(b * 7 + i as u64), State::Normal))
                            .collect();
                        commit(&|t| {
                            t.put_vdisk(VdiskId(which), &record("v"))?;
                            t.replace_entries(VdiskId(which), lo, hi, &new)
                        });
                        let m = model.entry(which).or_default();
                        m.retain(|b, _| *b < lo || *b >= hi);
                        m.extend(new.into_iter().map(|e| (e.begin, e)));
                    }
                    Op::Whole { which, n } => {
                        let new: Vec<Entry> =
                            (0..n).map(|k| entry(k * 4, 4, Some(k), State::New)).collect();
                        commit(&|t| {
                            t.put_vdisk(VdiskId(which), &record("v"))?;
                            t.replace_entries(VdiskId(which), 0, u64::MAX, &new)
                        });
                        model.insert(which, new.into_iter().map(|e| (e.begin, e)).collect());
                    }
                    Op::Delete { which } => {
                        commit(&|t| t.delete_vdisk(VdiskId(which)));
                        model.remove(&which);
                    }
                }
                let want: Vec<(VdiskId, Vec<Entry>)> = model
                    .iter()
                    .map(|(id, m)| (VdiskId(*id), m.values().copied().collect()))
                    .collect();
                // The crash copy first: loading the live store checkpoints what is logged.
                if i == crash_at {
                    prop_assert_eq!(&stored(&crashed(dir.path())), &want);
                }
                prop_assert_eq!(stored(&store), want);
                prop_assert!(chunk_sizes(&store).iter().all(|&n| n > 0 && n <= CHUNK_ENTRIES));
            }
        }
    }

    /// Enough logged records to fill both halves of the log several times: with steps of
    /// checkpoint now and then, and with none (a full half forces one). A crash at any
    /// round opens to the last table written.
    #[test]
    fn the_log_moves_between_halves_and_replays_across_them() {
        for steps in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("t.redb")).unwrap();
            let mut want = Vec::new();
            // Some 40 KiB per record: 2,000 records cross about 80 MiB of log.
            for round in 0..2000u64 {
                let new: Vec<Entry> = (0..400)
                    .map(|k| entry(k * 2, 1, Some(round * 1000 + k), State::Normal))
                    .collect();
                store
                    .write_logged(|t| {
                        t.put_vdisk(VdiskId(1), &record("v"))?;
                        t.replace_entries(VdiskId(1), 0, u64::MAX, &new)
                    })
                    .unwrap();
                want = vec![(VdiskId(1), new)];
                if steps && round % 7 == 0 {
                    store.checkpoint_step(1000).unwrap();
                }
                if round % 400 == 199 {
                    assert_eq!(stored(&crashed(dir.path())), want, "round {round}");
                }
            }
            assert_eq!(stored(&crashed(dir.path())), want);
            assert_eq!(stored(&store), want);
        }
    }

    /// A version-2 store (one row per entry) opens as the current version with the same
    /// tables.
    #[test]
    fn upgrades_version_2_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let tables: Vec<Vec<Entry>> = vec![
            (0..1000)
                .map(|k| entry(k * 16, 16, Some(k * 16), State::Normal))
                .collect(),
            vec![
                entry(0, 8, None, State::Zero),
                entry(8, 8, Some(5), State::NoWrite),
            ],
        ];
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                tx.open_table(META).unwrap().insert("schema", 2).unwrap();
                let mut vd = tx.open_table(VDISKS).unwrap();
                let mut en = tx.open_table(ENTRIES_V2).unwrap();
                for (i, list) in tables.iter().enumerate() {
                    let id = i as u64 + 1;
                    vd.insert(id, json(&record(&format!("v{id}"))).as_str())
                        .unwrap();
                    for e in list {
                        let (c, b, has) = match e.target {
                            Some(t) => (t.container.0, t.block, true),
                            None => (0, 0, false),
                        };
                        en.insert((id, e.begin), (e.end, c, b, has, e.state.as_u8()))
                            .unwrap();
                    }
                }
            }
            tx.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let want: Vec<(VdiskId, Vec<Entry>)> = tables
            .into_iter()
            .enumerate()
            .map(|(i, l)| (VdiskId(i as u64 + 1), l))
            .collect();
        assert_eq!(stored(&store), want);
        let tx = store.db.begin_read().unwrap();
        assert_eq!(
            tx.open_table(META)
                .unwrap()
                .get("schema")
                .unwrap()
                .unwrap()
                .value(),
            SCHEMA_VERSION
        );
        assert!(tx.open_table(ENTRIES_V2).is_err(), "the old table is gone");
    }

    /// A version-4 store (no pool id, containers without label areas) opens as the current
    /// version: it gets a pool id once, kept across opens, and its containers stay
    /// unlabelled.
    #[test]
    fn upgrades_version_4_with_a_pool_id_and_unlabelled_containers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                tx.open_table(META).unwrap().insert("schema", 4).unwrap();
                // As version 4 wrote it: no `label_blocks`.
                tx.open_table(CONTAINERS)
                    .unwrap()
                    .insert(
                        1,
                        r#"{"name":"default","path":"/x/default.img","size_blocks":64,"draining":false}"#,
                    )
                    .unwrap();
            }
            tx.commit().unwrap();
        }
        let first = Store::open(&path).unwrap().load().unwrap();
        assert_ne!(first.pool_id, 0);
        assert_eq!(first.containers[0].1.label_blocks, 0);
        assert_eq!(first.containers[0].1.usable_blocks(), 64);
        let again = Store::open(&path).unwrap();
        assert_eq!(again.load().unwrap().pool_id, first.pool_id);
        let tx = again.db.begin_read().unwrap();
        let schema = tx.open_table(META).unwrap().get("schema").unwrap().unwrap();
        assert_eq!(schema.value(), SCHEMA_VERSION);
    }
}
