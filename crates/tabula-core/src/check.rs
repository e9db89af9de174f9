//! The metadata invariant checker behind `tabula check`: given every container, table, free
//! run and pending-zero run, it reports each violation of the brief's invariants in words.
//!
//! It works on entry lists exactly as stored, not on tables rebuilt from them, so a store
//! that overlaps or mis-merges entries is reported rather than silently repaired.
//!
//! Invariants checked:
//! - every table is well formed (sorted, non-overlapping, inside its vdisk, merged);
//! - every mapped run lies inside its container;
//! - no physical block is owned twice (by two entries, or by an entry and free space);
//! - free space, pending-zero space and mapped space together cover every container exactly,
//!   so nothing leaks.

use std::collections::BTreeMap;

use crate::ids::{ContainerId, VdiskId};
use crate::table::{Entry, list_defects};

/// What a physical run is used for, to name it in a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    Vdisk {
        id: VdiskId,
        name: String,
        begin: u64,
    },
    Free,
    Zeroing,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Vdisk { id, name, begin } => write!(f, "vdisk {name} ({id}) block {begin}"),
            Owner::Free => f.write_str("free space"),
            Owner::Zeroing => f.write_str("space waiting to be zeroed"),
        }
    }
}

/// Everything the checker needs, independent of how it is stored.
#[derive(Debug, Default)]
pub struct Inventory {
    /// Container sizes in blocks.
    pub containers: BTreeMap<ContainerId, (String, u64)>,
    /// (id, name, size in blocks, stored entries in order).
    pub vdisks: Vec<(VdiskId, String, u64, Vec<Entry>)>,
    /// (container, start, len) runs.
    pub free: Vec<(ContainerId, u64, u64)>,
    pub zeroing: Vec<(ContainerId, u64, u64)>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    pub containers: usize,
    pub vdisks: usize,
    pub entries: usize,
    pub mapped_blocks: u64,
    pub free_blocks: u64,
    pub zeroing_blocks: u64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// At most this many problems are listed; a broken store could otherwise print millions.
const MAX_PROBLEMS: usize = 1000;

pub fn check(inv: &Inventory) -> Report {
    let mut r = Report {
        containers: inv.containers.len(),
        vdisks: inv.vdisks.len(),
        ..Report::default()
    };
    let mut runs: BTreeMap<ContainerId, Vec<(u64, u64, Owner)>> = BTreeMap::new();
    for (id, name, size, entries) in &inv.vdisks {
        for d in list_defects(*size, entries) {
            r.problems
                .push(format!("vdisk {name} ({id}): malformed table: {d}"));
        }
        for e in entries {
            r.entries += 1;
            if let Some(t) = e.target {
                r.mapped_blocks += e.len();
                runs.entry(t.container).or_default().push((
                    t.block,
                    t.block + e.len(),
                    Owner::Vdisk {
                        id: *id,
                        name: name.clone(),
                        begin: e.begin,
                    },
                ));
            }
        }
    }
    for &(c, s, l) in &inv.free {
        r.free_blocks += l;
        runs.entry(c).or_default().push((s, s + l, Owner::Free));
    }
    for &(c, s, l) in &inv.zeroing {
        r.zeroing_blocks += l;
        runs.entry(c).or_default().push((s, s + l, Owner::Zeroing));
    }
    for (c, list) in &mut runs {
        let Some((cname, size)) = inv.containers.get(c) else {
            r.problems.push(format!(
                "{} run(s) point into container {c}, which does not exist (first: {})",
                list.len(),
                list[0].2
            ));
            continue;
        };
        list.sort_by_key(|x| (x.0, x.1));
        let mut covered_to = 0u64;
        let mut last_owner: Option<&Owner> = None;
        for (s, e, owner) in list.iter() {
            if *e > *size {
                r.problems.push(format!(
                    "{owner} maps blocks {s}..{e} of container {cname} ({c}), which has only {size} blocks"
                ));
            }
            if *s < covered_to {
                r.problems.push(format!(
                    "blocks {s}..{} of container {cname} ({c}) are owned twice: by {} and by {owner}",
                    covered_to.min(*e),
                    last_owner.expect("set with covered_to")
                ));
            } else if *s > covered_to {
                r.problems.push(format!(
                    "blocks {covered_to}..{s} of container {cname} ({c}) are leaked: neither mapped, free nor waiting to be zeroed"
                ));
            }
            if *e > covered_to {
                covered_to = *e;
                last_owner = Some(owner);
            }
        }
        if covered_to < *size {
            r.problems.push(format!(
                "blocks {covered_to}..{size} of container {cname} ({c}) are leaked: neither mapped, free nor waiting to be zeroed"
            ));
        }
    }
    for (c, (cname, size)) in &inv.containers {
        if !runs.contains_key(c) && *size > 0 {
            r.problems.push(format!(
                "all {size} blocks of container {cname} ({c}) are leaked: neither mapped, free nor waiting to be zeroed"
            ));
        }
    }
    r.problems.truncate(MAX_PROBLEMS);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Phys, State};

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

    fn inv() -> Inventory {
        Inventory {
            containers: [(ContainerId(1), ("c".to_string(), 50))].into(),
            vdisks: vec![(VdiskId(1), "vd".into(), 100, vec![mapped(0, 10, 0)])],
            free: vec![(ContainerId(1), 10, 30)],
            zeroing: vec![(ContainerId(1), 40, 10)],
        }
    }

    #[test]
    fn rejects_overlapping_and_unmerged_stored_entries() {
        let mut i = inv();
        // Overlapping entries, both mapping block 5 of the container.
        i.vdisks[0].3 = vec![mapped(0, 10, 0), mapped(5, 15, 5)];
        i.free[0] = (ContainerId(1), 15, 25);
        let r = check(&i);
        assert!(
            r.problems.iter().any(|p| p.contains("overlap")),
            "{:?}",
            r.problems
        );
        assert!(
            r.problems.iter().any(|p| p.contains("owned twice")),
            "{:?}",
            r.problems
        );
        let mut i = inv();
        i.vdisks[0].3 = vec![mapped(0, 5, 0), mapped(5, 10, 5)];
        let r = check(&i);
        assert!(
            r.problems.iter().any(|p| p.contains("should have merged")),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn accepts_consistent_inventory() {
        let r = check(&inv());
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(
            (r.mapped_blocks, r.free_blocks, r.zeroing_blocks),
            (10, 30, 10)
        );
    }

    #[test]
    fn rejects_double_ownership() {
        let mut i = inv();
        i.free[0] = (ContainerId(1), 5, 35);
        let r = check(&i);
        assert!(
            r.problems.iter().any(|p| p.contains("owned twice")),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn rejects_leak_and_overflow() {
        let mut i = inv();
        i.zeroing.clear();
        i.free.push((ContainerId(1), 45, 10));
        let r = check(&i);
        assert!(
            r.problems.iter().any(|p| p.contains("leaked")),
            "{:?}",
            r.problems
        );
        assert!(
            r.problems.iter().any(|p| p.contains("has only 50")),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn rejects_unknown_container() {
        let mut i = inv();
        i.free.push((ContainerId(9), 0, 1));
        assert!(!check(&i).ok());
    }
}
