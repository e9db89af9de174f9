//! Persistence: the controller's authoritative metadata in a redb database.
//!
//! What is durable and why: every change (an allocation, a free, a new vdisk) is one redb
//! write transaction committed with immediate durability *before* the controller answers
//! the request that caused it, so an agent never writes through an entry that a crash could
//! forget. Freed space goes first to `zeroing` and only becomes `free` after it has been
//! zeroed and the zeroing made durable; on open, anything still in `zeroing` is zeroed again.
//!
//! Key layout (version 2; version 1 had no `cow` table and no snapshot fields in vdisk
//! records, and is upgraded in place on open):
//!
//! | table        | key                     | value                                        |
//! |--------------|-------------------------|----------------------------------------------|
//! | `meta`       | name (str)              | u64 (`schema`, `next_vdisk`, `next_container`) |
//! | `containers` | container id (u32)      | JSON [`ContainerRecord`]                     |
//! | `vdisks`     | vdisk id (u64)          | JSON [`VdiskRecord`]                         |
//! | `entries`    | (vdisk id, begin block) | (end, container, physical block, has target, state) |
//! | `free`       | (container, start)      | length in blocks                             |
//! | `zeroing`    | (container, start)      | length in blocks                             |
//! | `cow`        | (container, start)      | length in blocks                             |
//!
//! `cow` holds runs allocated for a copy-on-write that an agent is copying into: they belong
//! to no table yet. A start finds any left there abandoned and frees them (after zeroing,
//! like `zeroing`). Reference counts of shared blocks are not stored: they are derived from
//! the tables at load, so they can never disagree with them.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use tabula_api::admin::CowPolicy;
use tabula_core::{ContainerId, Entry, Phys, State, VdiskId};

/// Version 2 added snapshots and clones. A version-1 tabula must not open a version-2 store:
/// it would free blocks that snapshots still map.
pub const SCHEMA_VERSION: u64 = 2;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const CONTAINERS: TableDefinition<u32, &str> = TableDefinition::new("containers");
const VDISKS: TableDefinition<u64, &str> = TableDefinition::new("vdisks");
/// (end, container, physical block, has target, state)
type EntryValue = (u64, u32, u64, bool, u8);
const ENTRIES: TableDefinition<(u64, u64), EntryValue> = TableDefinition::new("entries");
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
    pub path: String,
    pub size_blocks: u64,
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
}

/// Everything in the store, as loaded at startup.
#[derive(Debug, Default)]
pub struct Loaded {
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
}

fn encode_entry(e: &Entry) -> EntryValue {
    match e.target {
        Some(t) => (e.end, t.container.0, t.block, true, e.state.as_u8()),
        None => (e.end, 0, 0, false, e.state.as_u8()),
    }
}

fn decode_entry(begin: u64, v: EntryValue) -> Result<Entry, StoreError> {
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

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialize")
}

fn unjson<T: for<'a> Deserialize<'a>>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
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
        let store = Store { db };
        let tx = store.db.begin_write()?;
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
                }
                Some(_) => {}
            }
            tx.open_table(CONTAINERS)?;
            tx.open_table(VDISKS)?;
            tx.open_table(ENTRIES)?;
            tx.open_table(FREE)?;
            tx.open_table(ZEROING)?;
            tx.open_table(COW)?;
        }
        tx.commit()?;
        Ok(store)
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        let tx = self.db.begin_read()?;
        let mut out = Loaded::default();
        let meta = tx.open_table(META)?;
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
        let entries = tx.open_table(ENTRIES)?;
        for row in tx.open_table(VDISKS)?.iter()? {
            let (k, v) = row?;
            let id = k.value();
            let mut list = Vec::new();
            for e in entries.range((id, 0)..=(id, u64::MAX))? {
                let (k, v) = e?;
                list.push(decode_entry(k.value().1, v.value())?);
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

    /// Runs `f` in one write transaction and commits it durably before returning.
    pub fn write<R>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let tx = self.db.begin_write()?;
        let r = {
            let mut t = Txn { tx: &tx };
            f(&mut t)?
        };
        tx.commit()?;
        Ok(r)
    }
}

/// One write transaction's operations.
pub struct Txn<'a> {
    tx: &'a WriteTransaction,
}

impl Txn<'_> {
    pub fn set_meta(&mut self, key: &str, v: u64) -> Result<(), StoreError> {
        self.tx.open_table(META)?.insert(key, v)?;
        Ok(())
    }

    pub fn put_container(
        &mut self,
        id: ContainerId,
        r: &ContainerRecord,
    ) -> Result<(), StoreError> {
        self.tx
            .open_table(CONTAINERS)?
            .insert(id.0, json(r).as_str())?;
        Ok(())
    }

    pub fn put_vdisk(&mut self, id: VdiskId, r: &VdiskRecord) -> Result<(), StoreError> {
        self.tx.open_table(VDISKS)?.insert(id.0, json(r).as_str())?;
        Ok(())
    }

    /// Removes the vdisk record and all its entries.
    pub fn delete_vdisk(&mut self, id: VdiskId) -> Result<(), StoreError> {
        self.tx.open_table(VDISKS)?.remove(id.0)?;
        self.tx
            .open_table(ENTRIES)?
            .retain_in((id.0, 0)..=(id.0, u64::MAX), |_, _| false)?;
        Ok(())
    }

    /// Replaces the stored entries of `vdisk` that start in `[lo, hi)` with `entries`.
    pub fn replace_entries(
        &mut self,
        vdisk: VdiskId,
        lo: u64,
        hi: u64,
        entries: &[Entry],
    ) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(ENTRIES)?;
        if lo < hi {
            t.retain_in((vdisk.0, lo)..(vdisk.0, hi), |_, _| false)?;
        }
        for e in entries {
            t.insert((vdisk.0, e.begin), encode_entry(e))?;
        }
        Ok(())
    }

    pub fn put_free(&mut self, c: ContainerId, start: u64, len: u64) -> Result<(), StoreError> {
        self.tx.open_table(FREE)?.insert((c.0, start), len)?;
        Ok(())
    }

    pub fn delete_free(&mut self, c: ContainerId, start: u64) -> Result<(), StoreError> {
        self.tx.open_table(FREE)?.remove((c.0, start))?;
        Ok(())
    }

    /// Replaces all free runs of container `c` with `runs`.
    pub fn replace_free(
        &mut self,
        c: ContainerId,
        runs: impl Iterator<Item = (u64, u64)>,
    ) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(FREE)?;
        t.retain_in((c.0, 0)..=(c.0, u64::MAX), |_, _| false)?;
        for (s, l) in runs {
            t.insert((c.0, s), l)?;
        }
        Ok(())
    }

    /// Records freed runs as waiting to be zeroed.
    pub fn put_zeroing_runs(&mut self, runs: &[(Phys, u64)]) -> Result<(), StoreError> {
        let mut table = self.tx.open_table(ZEROING)?;
        for &(p, l) in runs {
            table.insert((p.container.0, p.block), l)?;
        }
        Ok(())
    }

    pub fn put_cow(&mut self, at: Phys, len: u64) -> Result<(), StoreError> {
        self.tx
            .open_table(COW)?
            .insert((at.container.0, at.block), len)?;
        Ok(())
    }

    pub fn delete_cow(&mut self, at: Phys) -> Result<(), StoreError> {
        self.tx
            .open_table(COW)?
            .remove((at.container.0, at.block))?;
        Ok(())
    }

    pub fn delete_zeroing(&mut self, c: ContainerId, start: u64) -> Result<(), StoreError> {
        self.tx.open_table(ZEROING)?.remove((c.0, start))?;
        Ok(())
    }
}
