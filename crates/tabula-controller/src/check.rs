//! `tabula check`: verifies stored metadata against the invariants, offline.

use std::path::Path;

use std::time::Duration;

use tabula_api::admin::CheckView;
use tabula_container::{Container, ContainerOptions, Location};
use tabula_core::ContainerId;
use tabula_core::check::{Inventory, TableInventory, check};

use crate::label::Found;
use crate::store::{ContainerRecord, Loaded, Store, StoreError};

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
    inv.labels = loaded
        .containers
        .iter()
        .filter(|(_, rec)| rec.label_blocks > 0)
        .map(|(id, rec)| (*id, 0, rec.label_blocks))
        .collect();
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
        labels: 0,
        notes: Vec::new(),
    }
}

/// Checks what container `id`'s label block holds (`read`: `None` if it was not read, the
/// container being unlabelled or unreachable) against the pool and the container, into
/// `view`: a label that names another pool or container, or none at all, means the
/// location now leads to something else, and is an error.
pub fn verify_label(
    pool: u64,
    id: ContainerId,
    rec: &ContainerRecord,
    read: Option<Result<Found, String>>,
    view: &mut CheckView,
) {
    let name = &rec.name;
    let problem = match read {
        _ if rec.label_blocks == 0 => {
            view.notes.push(format!(
                "container {name} ({id}) has no label: it was added before labels; it works as before"
            ));
            return;
        }
        None => {
            view.notes.push(format!(
                "container {name} ({id}) is not reachable: its label was not checked"
            ));
            return;
        }
        Some(Err(e)) => {
            view.notes.push(format!(
                "container {name} ({id}): its label could not be read ({e}): not checked"
            ));
            return;
        }
        Some(Ok(found)) => match crate::label::expect(&found, pool, id.0) {
            Ok(()) => {
                view.labels += 1;
                return;
            }
            Err(e) => e,
        },
    };
    view.ok = false;
    view.problems.push(format!(
        "container {name} ({id}) at {}: wrong label: {problem}. The path may lead to another device than the one added; do not write to it until that is settled",
        rec.path
    ));
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
    let loaded = store.load()?;
    let mut view = check_loaded(&loaded);
    let opts = ContainerOptions {
        io_timeout: Duration::from_secs(5),
    };
    for (id, rec) in &loaded.containers {
        let read = (rec.label_blocks > 0)
            .then(|| {
                let loc = Location::parse(&rec.path).ok()?;
                let c = Container::open_location(&loc, 0, &opts).ok()?;
                Some(crate::label::read(&c).map_err(|e| e.to_string()))
            })
            .flatten();
        verify_label(loaded.pool_id, *id, rec, read, &mut view);
    }
    Ok(view)
}
