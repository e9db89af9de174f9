//! `tabula check`: verifies stored metadata against the invariants, offline.

use std::path::Path;

use tabula_api::admin::CheckView;
use tabula_core::check::{Inventory, TableInventory, check};

use crate::store::{Loaded, Store, StoreError};

pub fn inventory(loaded: &Loaded) -> Inventory {
    let mut inv = Inventory::default();
    for (id, rec) in &loaded.containers {
        inv.containers
            .insert(*id, (rec.name.clone(), rec.size_blocks));
    }
    for (id, rec, entries) in &loaded.vdisks {
        inv.vdisks.push(TableInventory {
            id: *id,
            name: rec.name.clone(),
            size: rec.size_bytes / tabula_core::BLOCK_SIZE,
            writable: !rec.read_only,
            entries: entries.clone(),
        });
    }
    inv.free = loaded.free.clone();
    inv.zeroing = loaded.zeroing.clone();
    inv.cow = loaded.cow.clone();
    inv
}

pub fn check_loaded(loaded: &Loaded) -> CheckView {
    let r = check(&inventory(loaded));
    let mut problems = r.problems;
    // Sizes an older tabula let through (a resize skipped the limits): NBD clients saw
    // them as negative.
    for (_, rec, _) in &loaded.vdisks {
        let seg = rec.segment_blocks * tabula_core::BLOCK_SIZE;
        if let Err(e) = tabula_core::check_vdisk_geometry(rec.size_bytes, seg) {
            let fix = if rec.read_only {
                format!("delete it (tabula snapshot delete {})", rec.name)
            } else {
                format!("resize it (tabula vdisk resize {} --size SIZE)", rec.name)
            };
            problems.push(format!("vdisk {}: {e}; {fix}", rec.name));
        }
    }
    CheckView {
        ok: problems.is_empty(),
        problems,
        containers: r.containers,
        vdisks: r.vdisks,
        entries: r.entries,
        // Distinct blocks: a block shared by snapshots and clones counts once.
        mapped: r.mapped_blocks * tabula_core::BLOCK_SIZE,
        shared: r.shared_blocks * tabula_core::BLOCK_SIZE,
        copying: r.cow_blocks * tabula_core::BLOCK_SIZE,
        free: r.free_blocks * tabula_core::BLOCK_SIZE,
        zeroing: r.zeroing_blocks * tabula_core::BLOCK_SIZE,
    }
}

/// Opens the store under `data_dir` (which must not be in use) and checks it.
pub fn check_data_dir(data_dir: &Path) -> Result<CheckView, StoreError> {
    let path = data_dir.join(crate::service::DB_FILE);
    if !path.exists() {
        return Err(StoreError::Corrupt(format!(
            "no metadata database at {}: is this a tabula data directory?",
            path.display()
        )));
    }
    let store = Store::open(&path)?;
    Ok(check_loaded(&store.load()?))
}
