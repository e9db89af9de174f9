//! The metadata invariant checker behind `tabula check`: given every container, table, free
//! run, pending-zero run and copy-on-write reservation, it reports each violation of the
//! brief's invariants in words.
//!
//! It works on entry lists exactly as stored, not on tables rebuilt from them, so a store
//! that overlaps or mis-merges entries is reported rather than silently repaired.
//!
//! Invariants checked:
//! - every table is well formed (sorted, non-overlapping, inside its vdisk, merged);
//! - every mapped run lies inside its container;
//! - a physical block may be mapped by several tables (snapshots and clones share it), but
//!   by at most one entry of each, and never also be free, waiting to be zeroed or reserved
//!   for a copy-on-write: anything else owns it twice;
//! - a block shared between tables is mapped in a state that does not allow writes (`new`)
//!   by every writable table, so its first write faults and is copied: a `normal` entry
//!   there would change the other tables' data;
//! - free space, pending-zero space, copy-on-write space, label areas and mapped space
//!   together cover every container exactly, so nothing leaks; nothing else owns a label
//!   area.
//!
//! Each container's runs are sorted once and swept, keeping only the runs that cover the
//! current block (a handful: one per table sharing it), so millions of entries check in
//! O(n log n).

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
    CowTarget,
    /// A container's label area, which nothing may map or free.
    Label,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Vdisk { id, name, begin } => write!(f, "vdisk {name} ({id}) block {begin}"),
            Owner::Free => f.write_str("free space"),
            Owner::Zeroing => f.write_str("space waiting to be zeroed"),
            Owner::CowTarget => f.write_str("space reserved for a copy-on-write in progress"),
            Owner::Label => f.write_str("the container's label area"),
        }
    }
}

/// One mapping table (a vdisk or a snapshot) as stored.
#[derive(Clone, Debug)]
pub struct TableInventory {
    pub id: VdiskId,
    pub name: String,
    /// Size in blocks.
    pub size: u64,
    /// False for read-only snapshots: nothing writes through them, so they may map shared
    /// blocks in any state.
    pub writable: bool,
    /// Stored entries, in order.
    pub entries: Vec<Entry>,
}

/// Everything the checker needs, independent of how it is stored.
#[derive(Debug, Default)]
pub struct Inventory {
    /// Container names and sizes in blocks.
    pub containers: BTreeMap<ContainerId, (String, u64)>,
    pub vdisks: Vec<TableInventory>,
    /// (container, start, len) runs.
    pub free: Vec<(ContainerId, u64, u64)>,
    pub zeroing: Vec<(ContainerId, u64, u64)>,
    /// Runs reserved for a copy-on-write in progress: allocated, mapped by no table yet.
    pub cow: Vec<(ContainerId, u64, u64)>,
    /// Containers' label areas (reserved, never allocated).
    pub labels: Vec<(ContainerId, u64, u64)>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    pub containers: usize,
    pub vdisks: usize,
    pub entries: usize,
    /// Distinct physical blocks mapped by at least one table (a shared block counts once).
    pub mapped_blocks: u64,
    /// Physical blocks mapped by two tables or more.
    pub shared_blocks: u64,
    pub free_blocks: u64,
    pub zeroing_blocks: u64,
    pub cow_blocks: u64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// At most this many problems are listed; a broken store could otherwise print millions.
const MAX_PROBLEMS: usize = 1000;

/// What a run in the sweep belongs to; cheap to copy, named only when reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    /// Entry `entry` of table `table` (indices into the inventory).
    Entry {
        table: usize,
        entry: usize,
    },
    Free,
    Zeroing,
    Cow,
    Label,
}

#[derive(Clone, Copy, Debug)]
struct Span {
    start: u64,
    end: u64,
    src: Src,
}

/// A problem over a block range found by the sweep; the same problem over adjacent
/// segments is reported once. Span indices name the runs involved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conflict {
    /// Two runs own the same blocks where sharing is not allowed.
    Twice(usize, usize),
    /// Shared with the second run, but the first is in a writable table and not `new`.
    Writable(usize, usize),
}

impl Inventory {
    fn owner(&self, src: Src) -> Owner {
        match src {
            Src::Entry { table, entry } => {
                let t = &self.vdisks[table];
                Owner::Vdisk {
                    id: t.id,
                    name: t.name.clone(),
                    begin: t.entries[entry].begin,
                }
            }
            Src::Free => Owner::Free,
            Src::Zeroing => Owner::Zeroing,
            Src::Cow => Owner::CowTarget,
            Src::Label => Owner::Label,
        }
    }
}

pub fn check(inv: &Inventory) -> Report {
    let mut r = Report {
        containers: inv.containers.len(),
        vdisks: inv.vdisks.len(),
        ..Report::default()
    };
    let mut runs: BTreeMap<ContainerId, Vec<Span>> = BTreeMap::new();
    let mut add = |c: ContainerId, start: u64, len: u64, src: Src| {
        // Empty runs own nothing; malformed entries among them are reported as defects.
        if len > 0 {
            runs.entry(c).or_default().push(Span {
                start,
                end: start.saturating_add(len),
                src,
            });
        }
    };
    for (ti, t) in inv.vdisks.iter().enumerate() {
        for d in list_defects(t.size, &t.entries) {
            r.problems
                .push(format!("vdisk {} ({}): malformed table: {d}", t.name, t.id));
        }
        r.entries += t.entries.len();
        for (ei, e) in t.entries.iter().enumerate() {
            if let Some(p) = e.target {
                let src = Src::Entry {
                    table: ti,
                    entry: ei,
                };
                add(p.container, p.block, e.end.saturating_sub(e.begin), src);
            }
        }
    }
    for &(c, s, l) in &inv.free {
        r.free_blocks += l;
        add(c, s, l, Src::Free);
    }
    for &(c, s, l) in &inv.zeroing {
        r.zeroing_blocks += l;
        add(c, s, l, Src::Zeroing);
    }
    for &(c, s, l) in &inv.cow {
        r.cow_blocks += l;
        add(c, s, l, Src::Cow);
    }
    for &(c, s, l) in &inv.labels {
        add(c, s, l, Src::Label);
    }
    for (&c, list) in &mut runs {
        list.sort_unstable_by_key(|x| (x.start, x.end));
        let known = inv.containers.get(&c);
        if known.is_none() {
            r.problems.push(format!(
                "{} run(s) point into container {c}, which does not exist (first: {})",
                list.len(),
                inv.owner(list[0].src)
            ));
        }
        let sweep = Sweep {
            inv,
            c,
            cname: known.map_or("?", |x| x.0.as_str()),
            size: known.map(|x| x.1),
            list,
        };
        sweep.run(&mut r);
    }
    for (c, (cname, size)) in &inv.containers {
        if !runs.contains_key(c) && *size > 0 {
            r.problems.push(format!(
                "all {size} blocks of container {cname} ({c}) are leaked: {UNOWNED}"
            ));
        }
    }
    r.problems.truncate(MAX_PROBLEMS);
    r
}

const UNOWNED: &str = "neither mapped, free, waiting to be zeroed nor reserved for a copy-on-write";

/// One container's runs, sorted by start, walked segment by segment: between two
/// consecutive run edges the set of covering runs is constant.
struct Sweep<'a> {
    inv: &'a Inventory,
    c: ContainerId,
    cname: &'a str,
    /// `None` for an unknown container: only conflicts are reported there.
    size: Option<u64>,
    list: &'a [Span],
}

impl Sweep<'_> {
    /// Counts mapped and shared blocks and reports leaks, overruns and conflicts.
    fn run(&self, r: &mut Report) {
        let (c, cname) = (self.c, self.cname);
        if let Some(size) = self.size {
            for x in self.list.iter().filter(|x| x.end > size) {
                r.problems.push(format!(
                    "{} maps blocks {}..{} of container {cname} ({c}), which has only {size} blocks",
                    self.inv.owner(x.src),
                    x.start,
                    x.end
                ));
            }
        }
        let list = self.list;
        // Conflicts still open: (conflict, first block, end block), extended while the
        // next segment has the same one.
        let mut open: Vec<(Conflict, u64, u64)> = Vec::new();
        let mut active: Vec<usize> = Vec::new();
        let mut found: Vec<Conflict> = Vec::new();
        let mut ents: Vec<(usize, usize)> = Vec::new();
        let mut next = 0usize;
        let mut pos = 0u64;
        loop {
            // Runs are added in sorted order and `retain` keeps it, so `active` is sorted.
            while next < list.len() && list[next].start <= pos {
                active.push(next);
                next += 1;
            }
            let Some(end) = active
                .iter()
                .map(|&k| list[k].end)
                .chain(list.get(next).map(|x| x.start))
                .min()
            else {
                break;
            };
            found.clear();
            if active.is_empty() {
                self.leak(r, pos, end);
            } else {
                self.classify(r, &active, end - pos, &mut found, &mut ents);
            }
            // Report conflicts that do not continue into this segment, extend those that do.
            let mut i = 0;
            while i < open.len() {
                if open[i].2 == pos && found.contains(&open[i].0) {
                    i += 1;
                } else {
                    let (k, s, e) = open.remove(i);
                    self.report(r, k, s, e);
                }
            }
            for &k in &found {
                match open.iter_mut().find(|o| o.0 == k) {
                    Some(o) => o.2 = end,
                    None => open.push((k, pos, end)),
                }
            }
            pos = end;
            active.retain(|&k| list[k].end > pos);
        }
        for (k, s, e) in open {
            self.report(r, k, s, e);
        }
        self.leak(r, pos, u64::MAX);
    }

    /// Reports `[s, e)` (clipped to the container) as owned by nobody.
    fn leak(&self, r: &mut Report, s: u64, e: u64) {
        let Some(size) = self.size.filter(|&z| s < z) else {
            return;
        };
        let (c, cname, e) = (self.c, self.cname, e.min(size));
        r.problems.push(format!(
            "blocks {s}..{e} of container {cname} ({c}) are leaked: {UNOWNED}"
        ));
    }

    fn table(&self, k: usize) -> Option<usize> {
        match self.list[k].src {
            Src::Entry { table, .. } => Some(table),
            _ => None,
        }
    }

    /// One segment of `len` blocks covered by the runs `active`: counts it and lists its
    /// conflicts. `ents` is scratch space, kept to avoid an allocation per segment.
    fn classify(
        &self,
        r: &mut Report,
        active: &[usize],
        len: u64,
        found: &mut Vec<Conflict>,
        ents: &mut Vec<(usize, usize)>,
    ) {
        // Free, zeroing or copy-on-write space overlapping anything: owned twice.
        if let Some(&n) = active.iter().find(|&&k| self.table(k).is_none()) {
            if let Some(&o) = active.iter().find(|&&k| k != n) {
                found.push(Conflict::Twice(o.min(n), o.max(n)));
            }
        }
        // (table, run) of the entries, grouped by table: sorting keeps a block shared by
        // many snapshots O(k log k) rather than comparing every pair.
        ents.clear();
        ents.extend(active.iter().filter_map(|&k| self.table(k).map(|t| (t, k))));
        if ents.is_empty() {
            return;
        }
        r.mapped_blocks += len;
        ents.sort_unstable();
        // Two entries of one table: owned twice (one table never maps a block twice).
        for w in ents.windows(2) {
            if w[0].0 == w[1].0 {
                found.push(Conflict::Twice(w[0].1, w[1].1));
            }
        }
        let (Some(&(t0, k0)), Some(&(tn, kn))) = (ents.first(), ents.last()) else {
            unreachable!("checked non-empty above");
        };
        if t0 == tn {
            return; // one table only: not shared
        }
        r.shared_blocks += len;
        for &(t, k) in ents.iter() {
            let Src::Entry { entry, .. } = self.list[k].src else {
                unreachable!("only entries are listed");
            };
            let table = &self.inv.vdisks[t];
            if table.writable && table.entries[entry].state.writable() {
                // Name an entry of another table it shares with.
                found.push(Conflict::Writable(k, if t == t0 { kn } else { k0 }));
            }
        }
    }

    fn report(&self, r: &mut Report, k: Conflict, s: u64, e: u64) {
        if r.problems.len() >= MAX_PROBLEMS {
            return; // truncated anyway: no need to format millions
        }
        let (c, cname, inv) = (self.c, self.cname, self.inv);
        let owner = |k: usize| inv.owner(self.list[k].src);
        let msg = match k {
            Conflict::Twice(a, b) => format!(
                "blocks {s}..{e} of container {cname} ({c}) are owned twice: by {} and by {}",
                owner(a),
                owner(b)
            ),
            Conflict::Writable(w, o) => {
                let (Src::Entry { table, entry }, Src::Entry { table: ot, .. }) =
                    (self.list[w].src, self.list[o].src)
                else {
                    unreachable!("writable conflicts are between entries");
                };
                let (t, other) = (&inv.vdisks[table], &inv.vdisks[ot]);
                format!(
                    "blocks {s}..{e} of container {cname} ({c}) are shared by {} and {} but writable ({}) in vdisk {}: a write would change the data of vdisk {}",
                    owner(w),
                    owner(o),
                    t.entries[entry].state,
                    t.name,
                    other.name
                )
            }
        };
        r.problems.push(msg);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::table::Phys;
    use crate::table::State;

    fn entry(begin: u64, end: u64, block: u64, state: State) -> Entry {
        Entry {
            begin,
            end,
            target: Some(Phys {
                container: ContainerId(1),
                block,
            }),
            state,
        }
    }

    fn mapped(begin: u64, end: u64, block: u64) -> Entry {
        entry(begin, end, block, State::Normal)
    }

    fn table(id: u64, name: &str, writable: bool, entries: Vec<Entry>) -> TableInventory {
        TableInventory {
            id: VdiskId(id),
            name: name.into(),
            size: 100,
            writable,
            entries,
        }
    }

    fn inv() -> Inventory {
        Inventory {
            containers: [(ContainerId(1), ("c".to_string(), 50))].into(),
            vdisks: vec![table(1, "vd", true, vec![mapped(0, 10, 0)])],
            free: vec![(ContainerId(1), 10, 30)],
            zeroing: vec![(ContainerId(1), 40, 10)],
            cow: vec![],
            labels: vec![],
        }
    }

    /// A vdisk `vd` whose blocks 0..10 are shared with its snapshot `vd@s`, in `state`.
    fn shared(state: State) -> Inventory {
        let mut i = inv();
        i.vdisks[0].entries = vec![entry(0, 10, 0, state)];
        i.vdisks.push(table(
            2,
            "vd@s",
            false,
            vec![entry(0, 10, 0, State::NoWrite)],
        ));
        i
    }

    fn has(r: &Report, what: &str) -> bool {
        r.problems.iter().any(|p| p.contains(what))
    }

    #[test]
    fn rejects_overlapping_and_unmerged_stored_entries() {
        let mut i = inv();
        // Overlapping entries, both mapping blocks 5..10 of the container.
        i.vdisks[0].entries = vec![mapped(0, 10, 0), mapped(5, 15, 5)];
        i.free[0] = (ContainerId(1), 15, 25);
        let r = check(&i);
        assert!(has(&r, "overlap"), "{:?}", r.problems);
        assert!(
            has(&r, "blocks 5..10 of container c (c1) are owned twice"),
            "{:?}",
            r.problems
        );
        let mut i = inv();
        i.vdisks[0].entries = vec![mapped(0, 5, 0), mapped(5, 10, 5)];
        let r = check(&i);
        assert!(has(&r, "should have merged"), "{:?}", r.problems);
    }

    #[test]
    fn accepts_consistent_inventory() {
        let r = check(&inv());
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(
            (
                r.mapped_blocks,
                r.shared_blocks,
                r.free_blocks,
                r.zeroing_blocks,
                r.cow_blocks
            ),
            (10, 0, 30, 10, 0)
        );
    }

    #[test]
    fn rejects_double_ownership() {
        let mut i = inv();
        i.free[0] = (ContainerId(1), 5, 35);
        let r = check(&i);
        assert!(
            has(&r, "blocks 5..10 of container c (c1) are owned twice"),
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
            has(&r, "blocks 40..45 of container c (c1) are leaked"),
            "{:?}",
            r.problems
        );
        assert!(has(&r, "has only 50"), "{:?}", r.problems);
        let mut i = inv();
        i.free.clear();
        let r = check(&i);
        assert!(
            has(&r, "blocks 10..40 of container c (c1) are leaked"),
            "{:?}",
            r.problems
        );
        i.containers.insert(ContainerId(2), ("d".into(), 8));
        assert!(has(
            &check(&i),
            "all 8 blocks of container d (c2) are leaked"
        ));
    }

    #[test]
    fn rejects_unknown_container() {
        let mut i = inv();
        i.free.push((ContainerId(9), 0, 1));
        assert!(has(&check(&i), "container c9, which does not exist"));
    }

    #[test]
    fn snapshot_may_share_new_blocks_with_its_vdisk() {
        let mut i = shared(State::New);
        // A clone of the snapshot shares them too, also `new`.
        i.vdisks
            .push(table(3, "cl", true, vec![entry(0, 10, 0, State::New)]));
        let r = check(&i);
        assert!(r.ok(), "{:?}", r.problems);
        // Counted once as mapped, and as shared.
        assert_eq!((r.mapped_blocks, r.shared_blocks, r.entries), (10, 10, 3));
    }

    #[test]
    fn rejects_shared_blocks_writable_in_a_vdisk() {
        let mut i = shared(State::New);
        // Only 3..6 normal: a write there would change the snapshot.
        i.vdisks[0].entries = vec![
            entry(0, 3, 0, State::New),
            entry(3, 6, 3, State::Normal),
            entry(6, 10, 6, State::New),
        ];
        let r = check(&i);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        let p = &r.problems[0];
        assert!(p.starts_with("blocks 3..6 of container c (c1) are shared by vdisk vd (v1) block 3 and vdisk vd@s (v2) block 0 but writable (normal) in vdisk vd"), "{p}");
        assert!(p.contains("change the data of vdisk vd@s"), "{p}");
        // A read-only snapshot may map its blocks in any state; it is the writer that counts.
        let mut i = shared(State::New);
        i.vdisks[1].entries[0].state = State::Normal;
        assert!(check(&i).ok());
    }

    #[test]
    fn rejects_one_table_mapping_a_block_twice() {
        let mut i = inv();
        // Two entries of one vdisk at different virtual places, one physical run.
        i.vdisks[0].entries = vec![entry(0, 10, 0, State::New), entry(20, 30, 0, State::New)];
        let r = check(&i);
        assert!(
            has(
                &r,
                "blocks 0..10 of container c (c1) are owned twice: by vdisk vd (v1) block 0 and by vdisk vd (v1) block 20"
            ),
            "{:?}",
            r.problems
        );
        assert_eq!(r.shared_blocks, 0);
        assert_eq!(r.mapped_blocks, 10);
    }

    #[test]
    fn cow_reservations_count_as_owned() {
        let mut i = inv();
        // A copy-on-write reserved 10..15 out of what was free.
        i.free[0] = (ContainerId(1), 15, 25);
        i.cow.push((ContainerId(1), 10, 5));
        let r = check(&i);
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(r.cow_blocks, 5);
        // Reserving mapped blocks is owning them twice.
        i.cow[0] = (ContainerId(1), 8, 7);
        i.free[0] = (ContainerId(1), 15, 25);
        let r = check(&i);
        assert!(
            has(
                &r,
                "blocks 8..10 of container c (c1) are owned twice: by vdisk vd (v1) block 0 and by space reserved for a copy-on-write in progress"
            ),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn a_label_area_is_owned_and_nothing_else_may_own_it() {
        let mut i = inv();
        // Container 1 with a label area at 50..52 (grown to 52 blocks).
        i.containers.insert(ContainerId(1), ("c".to_string(), 52));
        i.labels.push((ContainerId(1), 50, 2));
        let r = check(&i);
        assert!(r.ok(), "{:?}", r.problems);
        i.free.push((ContainerId(1), 51, 1));
        let r = check(&i);
        assert!(
            has(
                &r,
                "blocks 51..52 of container c (c1) are owned twice: by the container's label area and by free space"
            ),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn many_shared_entries_sweep_fast_and_count_once() {
        // 2 tables of 100,000 single-block entries over one container, shared pairwise: the
        // sweep must not degrade with the number of entries.
        let n = 100_000u64;
        let entries =
            |state| -> Vec<Entry> { (0..n).map(|k| entry(2 * k, 2 * k + 1, k, state)).collect() };
        let mut vd = table(1, "vd", true, entries(State::New));
        vd.size = 2 * n;
        let mut snap = table(2, "vd@s", false, entries(State::NoWrite));
        snap.size = 2 * n;
        let i = Inventory {
            containers: [(ContainerId(1), ("c".to_string(), n))].into(),
            vdisks: vec![vd, snap],
            ..Inventory::default()
        };
        let r = check(&i);
        assert!(r.ok(), "{:?}", &r.problems[..r.problems.len().min(3)]);
        assert_eq!(
            (r.mapped_blocks, r.shared_blocks, r.entries),
            (n, n, 2 * n as usize)
        );
    }

    /// Blocks named by problems containing `what` (all of the form "blocks a..b ...").
    fn blocks_of(r: &Report, what: &str) -> Vec<u64> {
        let mut v: Vec<u64> = r
            .problems
            .iter()
            .filter(|p| p.contains(what))
            .flat_map(|p| {
                if let Some(n) = p.strip_prefix("all ") {
                    return 0..n.split(' ').next().unwrap().parse::<u64>().unwrap();
                }
                let range = p["blocks ".len()..].split(' ').next().unwrap();
                let (a, b) = range.split_once("..").unwrap();
                a.parse::<u64>().unwrap()..b.parse::<u64>().unwrap()
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    proptest! {
        /// Against a per-block model of who owns each block of one container: the counts,
        /// and exactly which blocks are reported owned twice, writable while shared, or
        /// leaked.
        #[test]
        fn check_matches_per_block_model(
            entries in proptest::collection::vec(
                (0usize..3, 0u64..40, 1u64..8,
                 proptest::sample::select(vec![State::New, State::Normal, State::NoWrite])),
                0..16,
            ),
            other in proptest::collection::vec((0u8..3, 0u64..40, 1u64..8), 0..6),
        ) {
            const SIZE: u64 = 48;
            // Table 2 is a read-only snapshot; entries sit at distinct virtual places.
            let mut tables: Vec<TableInventory> = (0..3)
                .map(|t| TableInventory {
                    size: 200,
                    ..table(t as u64 + 1, &format!("t{t}"), t != 2, vec![])
                })
                .collect();
            for (t, b, l, state) in &entries {
                let v = tables[*t].entries.len() as u64 * 10;
                tables[*t].entries.push(entry(v, v + l, *b, *state));
            }
            let mut i = Inventory {
                containers: [(ContainerId(1), ("c".to_string(), SIZE))].into(),
                vdisks: tables,
                ..Inventory::default()
            };
            for &(kind, b, l) in &other {
                let run = (ContainerId(1), b, l);
                match kind {
                    0 => i.free.push(run),
                    1 => i.zeroing.push(run),
                    _ => i.cow.push(run),
                }
            }
            // The model: per block, the (table, state) of every entry and the number of
            // free/zeroing/cow runs.
            let mut ents = vec![Vec::new(); 64];
            let mut space = [0u32; 64];
            for (t, b, l, state) in &entries {
                for x in *b..b + l {
                    ents[x as usize].push((*t, *state));
                }
            }
            for &(_, b, l) in &other {
                for x in b..b + l {
                    space[x as usize] += 1;
                }
            }
            let (mut twice, mut writable, mut leaked) = (vec![], vec![], vec![]);
            let (mut mapped, mut shared) = (0, 0);
            for x in 0..64u64 {
                let e = &ents[x as usize];
                let s = space[x as usize] as usize;
                let mut ts: Vec<usize> = e.iter().map(|p| p.0).collect();
                ts.sort_unstable();
                let n = ts.len();
                ts.dedup();
                if n + s >= 2 && (s > 0 || ts.len() < n) {
                    twice.push(x);
                }
                if n > 0 {
                    mapped += 1;
                }
                if ts.len() >= 2 {
                    shared += 1;
                    if e.iter().any(|&(t, st)| t != 2 && st.writable()) {
                        writable.push(x);
                    }
                }
                if n + s == 0 && x < SIZE {
                    leaked.push(x);
                }
            }
            let r = check(&i);
            prop_assert_eq!((r.mapped_blocks, r.shared_blocks), (mapped, shared));
            prop_assert_eq!(blocks_of(&r, "owned twice"), twice);
            prop_assert_eq!(blocks_of(&r, "but writable"), writable);
            prop_assert_eq!(blocks_of(&r, "leaked"), leaked);
            prop_assert_eq!(r.ok(), r.problems.is_empty());
        }
    }
}
