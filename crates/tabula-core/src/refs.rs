//! Sharing of physical blocks between tables (snapshots and clones, seed 004).
//!
//! A mapped block is owned by exactly one table unless it is shared; only shared blocks are
//! recorded here, as the number of *extra* references (a block mapped by three tables has
//! 2). Vdisks that were never snapshotted or cloned cost nothing, and freeing asks one
//! question per run: which of these blocks does nobody else map?
//!
//! Runs of equal counts are kept merged per container, so a snapshot of a vdisk whose
//! segments are physically contiguous is one record, not one per segment.

use std::collections::BTreeMap;

use crate::{ContainerId, Phys};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    end: u64,
    extra: u32,
}

/// Extra references to physical blocks, keyed by (container, first block).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedBlocks {
    map: BTreeMap<(ContainerId, u64), Run>,
}

/// A run of blocks `[block, block + len)` in one container with its extra reference count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedRun {
    pub at: Phys,
    pub len: u64,
    pub extra: u32,
}

impl SharedBlocks {
    pub fn new() -> SharedBlocks {
        SharedBlocks::default()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of records (merged runs).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Every shared run, in order.
    pub fn runs(&self) -> impl Iterator<Item = SharedRun> + '_ {
        self.map.iter().map(|(&(c, b), r)| SharedRun {
            at: Phys {
                container: c,
                block: b,
            },
            len: r.end - b,
            extra: r.extra,
        })
    }

    /// Rebuilds from stored runs (any order; adjacent equal runs are merged).
    pub fn from_runs(runs: impl IntoIterator<Item = SharedRun>) -> Result<SharedBlocks, String> {
        let mut s = SharedBlocks::new();
        for r in runs {
            if r.len == 0 || r.extra == 0 {
                return Err(format!("empty shared run at {:?}", r.at));
            }
            let (c, b) = (r.at.container, r.at.block);
            if s.map.range((c, b)..(c, b + r.len)).next().is_some() || s.covering(c, b).is_some() {
                return Err(format!("shared runs overlap at {c}:{b}"));
            }
            s.map.insert(
                (c, b),
                Run {
                    end: b + r.len,
                    extra: r.extra,
                },
            );
            s.merge_around(c, b);
            s.merge_around(c, b + r.len);
        }
        Ok(s)
    }

    /// Derives the extra references from every mapped run of every table (a run per entry
    /// with a target; runs of different tables overlap where they share blocks): a block
    /// covered `n` times has `n - 1` extra. One sort and one sweep, so the controller can
    /// rebuild the counts at start from millions of entries instead of storing them.
    pub fn from_mappings(runs: impl IntoIterator<Item = (Phys, u64)>) -> SharedBlocks {
        let mut events = Vec::new();
        push_runs(&mut events, runs, 1);
        SharedBlocks {
            map: sweep(events, 1),
        }
    }

    /// Each of `runs` is mapped by one more table: the same as [`share`](Self::share) for
    /// each, in one pass (a snapshot of a million-entry table shares a million runs).
    pub fn share_all(&mut self, runs: impl IntoIterator<Item = (Phys, u64)>) {
        let mut events = Vec::new();
        for (&(c, b), r) in &self.map {
            events.push((c, b, i64::from(r.extra)));
            events.push((c, r.end, -i64::from(r.extra)));
        }
        push_runs(&mut events, runs, 1);
        self.map = sweep(events, 0);
    }

    /// Each of `runs` loses one reference: the same as [`release`](Self::release) for each,
    /// in one pass. Returns the sub-runs nobody maps any more, in order.
    pub fn release_all(&mut self, runs: impl IntoIterator<Item = (Phys, u64)>) -> Vec<(Phys, u64)> {
        // (container, block, change of extra, change of releases)
        let mut events: Vec<(ContainerId, u64, i64, i64)> = Vec::new();
        for (&(c, b), r) in &self.map {
            events.push((c, b, i64::from(r.extra), 0));
            events.push((c, r.end, -i64::from(r.extra), 0));
        }
        for (at, len) in sorted_runs(runs) {
            events.push((at.container, at.block, 0, 1));
            events.push((at.container, at.block.saturating_add(len), 0, -1));
        }
        // Stable: see `sorted_runs`.
        events.sort();
        let mut kept: Vec<((ContainerId, u64), Run)> = Vec::new();
        let mut freed: Vec<(Phys, u64)> = Vec::new();
        let (mut extra, mut gone) = (0i64, 0i64);
        for (i, &(c, b, de, dg)) in events.iter().enumerate() {
            extra += de;
            gone += dg;
            let Some(&(nc, nb, _, _)) = events.get(i + 1) else {
                break;
            };
            if nc != c || nb == b {
                continue;
            }
            // References left: the mapping itself (if released at all) plus the extras.
            let left = if gone > 0 {
                extra + 1 - gone
            } else {
                extra + 1
            };
            if left <= 0 {
                match freed.last_mut() {
                    Some((p, l)) if p.container == c && p.block + *l == b => *l += nb - b,
                    _ => freed.push((
                        Phys {
                            container: c,
                            block: b,
                        },
                        nb - b,
                    )),
                }
            } else if left > 1 {
                let extra = u32::try_from(left - 1).unwrap_or(u32::MAX);
                match kept.last_mut() {
                    Some(((lc, _), last)) if *lc == c && last.end == b && last.extra == extra => {
                        last.end = nb;
                    }
                    _ => kept.push(((c, b), Run { end: nb, extra })),
                }
            }
        }
        self.map = kept.into_iter().collect();
        freed
    }

    /// How many blocks of `[at, at + len)` are shared (have extra references).
    pub fn shared_in(&self, at: Phys, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        let b = at.block;
        self.pieces(at.container, b, b.saturating_add(len))
            .into_iter()
            .map(|(s, t, _)| t - s)
            .sum()
    }

    /// The extra references of one block.
    pub fn extra(&self, at: Phys) -> u32 {
        self.covering(at.container, at.block)
            .map(|(_, r)| r.extra)
            .unwrap_or(0)
    }

    /// One more table maps `[at, at + len)` (a snapshot or clone copied an entry).
    pub fn share(&mut self, at: Phys, len: u64) {
        self.adjust(at, len, |x| Some(x + 1));
    }

    /// One table stops mapping `[at, at + len)`. Returns the sub-runs nobody maps any more
    /// (free them); elsewhere one reference fewer remains.
    pub fn release(&mut self, at: Phys, len: u64) -> Vec<(Phys, u64)> {
        let mut freed: Vec<(Phys, u64)> = Vec::new();
        let (c, b, e) = (at.container, at.block, at.block + len);
        // Walk the pieces of [b, e): shared runs lose a reference, gaps are freed.
        let mut pos = b;
        let shared: Vec<(u64, u64)> = self
            .pieces(c, b, e)
            .into_iter()
            .map(|(s, t, _)| (s, t))
            .collect();
        for (s, t) in shared {
            if pos < s {
                freed.push((
                    Phys {
                        container: c,
                        block: pos,
                    },
                    s - pos,
                ));
            }
            pos = t;
        }
        if pos < e {
            freed.push((
                Phys {
                    container: c,
                    block: pos,
                },
                e - pos,
            ));
        }
        self.adjust(at, len, |x| x.checked_sub(1).filter(|&n| n > 0));
        freed
    }

    /// The run covering block `b` of container `c`, if shared.
    fn covering(&self, c: ContainerId, b: u64) -> Option<(u64, Run)> {
        self.map
            .range(..=(c, b))
            .next_back()
            .filter(|(k, r)| k.0 == c && r.end > b)
            .map(|(&(_, s), r)| (s, *r))
    }

    /// Shared pieces inside `[b, e)`: (begin, end, extra).
    fn pieces(&self, c: ContainerId, b: u64, e: u64) -> Vec<(u64, u64, u32)> {
        let mut out = Vec::new();
        if let Some((_, r)) = self.covering(c, b) {
            out.push((b, r.end.min(e), r.extra));
        }
        for (&(_, s), r) in self.map.range((c, b + 1)..(c, e)) {
            out.push((s, r.end.min(e), r.extra));
        }
        out
    }

    /// Splits so that a run starts at `b` (if one covers it).
    fn split_at(&mut self, c: ContainerId, b: u64) {
        if let Some((s, r)) = self.covering(c, b) {
            if s < b {
                self.map.insert((c, s), Run { end: b, ..r });
                self.map.insert((c, b), r);
            }
        }
    }

    /// Applies `f` to the extra count of every block in the run (gaps count 0; `None`
    /// means 0 afterwards), keeping runs merged.
    fn adjust(&mut self, at: Phys, len: u64, f: impl Fn(u32) -> Option<u32>) {
        if len == 0 {
            return;
        }
        let (c, b, e) = (at.container, at.block, at.block + len);
        self.split_at(c, b);
        self.split_at(c, e);
        let old: Vec<(u64, Run)> = self
            .map
            .range((c, b)..(c, e))
            .map(|(&(_, s), r)| (s, *r))
            .collect();
        for (s, _) in &old {
            self.map.remove(&(c, *s));
        }
        let mut pos = b;
        let put = |s: u64, t: u64, x: u32, map: &mut BTreeMap<(ContainerId, u64), Run>| {
            if let Some(n) = f(x) {
                map.insert((c, s), Run { end: t, extra: n });
            }
        };
        for (s, r) in old {
            if pos < s {
                put(pos, s, 0, &mut self.map);
            }
            put(s, r.end, r.extra, &mut self.map);
            pos = r.end;
        }
        if pos < e {
            put(pos, e, 0, &mut self.map);
        }
        // Merge inside and at both edges.
        let starts: Vec<u64> = self
            .map
            .range((c, b)..=(c, e))
            .map(|(&(_, s), _)| s)
            .collect();
        for s in starts {
            self.merge_around(c, s);
        }
    }

    /// Merges the run starting at `b` with its predecessor if they touch with equal counts.
    fn merge_around(&mut self, c: ContainerId, b: u64) {
        let Some(cur) = self.map.get(&(c, b)).copied() else {
            return;
        };
        let prev = self
            .map
            .range(..(c, b))
            .next_back()
            .filter(|(k, r)| k.0 == c && r.end == b && r.extra == cur.extra)
            .map(|(&(_, s), _)| s);
        if let Some(s) = prev {
            self.map.remove(&(c, b));
            self.map.insert((c, s), cur);
        }
    }

    /// Checks the representation: runs non-empty, non-overlapping, merged, counts > 0.
    pub fn validate(&self) -> Result<(), String> {
        let mut prev: Option<((ContainerId, u64), Run)> = None;
        for (&k, &r) in &self.map {
            if r.end <= k.1 || r.extra == 0 {
                return Err(format!("bad shared run at {}:{}", k.0, k.1));
            }
            if let Some((pk, pr)) = prev {
                if pk.0 == k.0 && pr.end > k.1 {
                    return Err(format!("shared runs overlap at {}:{}", k.0, k.1));
                }
                if pk.0 == k.0 && pr.end == k.1 && pr.extra == r.extra {
                    return Err(format!("shared runs at {}:{} should have merged", k.0, k.1));
                }
            }
            prev = Some((k, r));
        }
        Ok(())
    }
}

/// Start (+weight) and end (-weight) events of runs.
fn push_runs(
    events: &mut Vec<(ContainerId, u64, i64)>,
    runs: impl IntoIterator<Item = (Phys, u64)>,
    weight: i64,
) {
    for (at, len) in sorted_runs(runs) {
        events.push((at.container, at.block, weight));
        events.push((at.container, at.block.saturating_add(len), -weight));
    }
}

/// The non-empty runs in physical order. A table's runs never overlap, so their events come
/// out sorted too, and the stable sort in [`sweep`] merges them with the (sorted) events of
/// the existing map in one pass instead of sorting millions of events afresh.
fn sorted_runs(runs: impl IntoIterator<Item = (Phys, u64)>) -> Vec<(Phys, u64)> {
    let mut v: Vec<(Phys, u64)> = runs.into_iter().filter(|r| r.1 > 0).collect();
    v.sort_unstable_by_key(|(p, _)| (p.container, p.block));
    v
}

/// Sums the events along each container; where the sum exceeds `base`, the blocks have
/// `sum - base` extra references. Equal neighbouring runs are merged (the canonical form).
fn sweep(mut events: Vec<(ContainerId, u64, i64)>, base: i64) -> BTreeMap<(ContainerId, u64), Run> {
    // Stable: it finds the presorted stretches (see `sorted_runs`) and merges them.
    events.sort();
    let mut out: Vec<((ContainerId, u64), Run)> = Vec::new();
    let mut count: i64 = 0;
    for (i, &(c, b, d)) in events.iter().enumerate() {
        count += d;
        let Some(&(nc, nb, _)) = events.get(i + 1) else {
            break;
        };
        // Every run that starts in a container ends there, so the count is back to 0
        // between containers, and at equal positions the segment is empty.
        if nc != c || nb == b || count <= base {
            continue;
        }
        // More than u32::MAX tables mapping one block cannot be stored anyway.
        let extra = u32::try_from(count - base).unwrap_or(u32::MAX);
        match out.last_mut() {
            Some(((lc, _), last)) if *lc == c && last.end == b && last.extra == extra => {
                last.end = nb;
            }
            _ => out.push(((c, b), Run { end: nb, extra })),
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn p(c: u32, b: u64) -> Phys {
        Phys {
            container: ContainerId(c),
            block: b,
        }
    }

    #[test]
    fn unshared_blocks_free_at_once_and_shared_ones_last() {
        let mut s = SharedBlocks::new();
        s.share(p(1, 0), 512); // a snapshot of a 512-block run
        assert_eq!(s.len(), 1);
        // The vdisk overwrites (copy-on-write) its first segment: one reference fewer, none
        // freed; the snapshot still maps it.
        assert!(s.release(p(1, 0), 256).is_empty());
        // The snapshot is deleted: blocks 0..256 are mapped by nobody now; 256..512 still by
        // the vdisk.
        assert_eq!(s.release(p(1, 0), 512), vec![(p(1, 0), 256)]);
        assert!(s.is_empty());
        assert_eq!(s.release(p(1, 256), 256), vec![(p(1, 256), 256)]);
        s.validate().unwrap();
    }

    #[test]
    fn from_mappings_counts_covering_runs() {
        // A vdisk mapping 0..512, a snapshot of it, then a second snapshot taken after the
        // vdisk moved 0..256 elsewhere (copy-on-write).
        let runs = [
            (p(1, 0), 512),
            (p(1, 0), 512),
            (p(1, 256), 256),
            (p(1, 1000), 256),
        ];
        let s = SharedBlocks::from_mappings(runs);
        assert_eq!(
            s.runs().collect::<Vec<_>>(),
            vec![
                SharedRun {
                    at: p(1, 0),
                    len: 256,
                    extra: 1
                },
                SharedRun {
                    at: p(1, 256),
                    len: 256,
                    extra: 2
                },
            ]
        );
        assert_eq!(s.shared_in(p(1, 200), 100), 100);
        assert_eq!(s.shared_in(p(1, 500), 600), 12);
        assert_eq!(s.shared_in(p(2, 0), 600), 0);
        assert_eq!(s.shared_in(p(1, 0), 0), 0);
        // Runs of one table that only touch are not shared, and touching shared runs of
        // equal count are one record.
        let s = SharedBlocks::from_mappings([
            (p(1, 0), 10),
            (p(1, 10), 10),
            (p(1, 0), 10),
            (p(1, 10), 10),
        ]);
        assert_eq!(s.len(), 1);
        assert_eq!(s.shared_in(p(1, 0), 30), 20);
        assert!(SharedBlocks::from_mappings([(p(1, 0), 10), (p(1, 10), 5)]).is_empty());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Share(u32, u64, u64),
        Release(u32, u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..2, 0u64..48, 1u64..16).prop_map(|(c, b, l)| Op::Share(c, b, l)),
            (0u32..2, 0u64..48, 1u64..16).prop_map(|(c, b, l)| Op::Release(c, b, l)),
        ]
    }

    proptest! {
        /// Against a per-block model of reference counts: a block is freed exactly when its
        /// last reference goes, and the merged representation stays valid and round-trips.
        #[test]
        fn shared_blocks_match_per_block_model(ops in proptest::collection::vec(op(), 1..80)) {
            let mut s = SharedBlocks::new();
            // Total references per block; a released block with count 1 becomes 0 (freed).
            let mut model = vec![[1u32; 64]; 2];
            for op in ops {
                match op {
                    Op::Share(c, b, l) => {
                        if (b..b + l).any(|i| model[c as usize][i as usize] == 0) {
                            continue; // only mapped blocks can be shared
                        }
                        s.share(p(c, b), l);
                        for i in b..b + l {
                            model[c as usize][i as usize] += 1;
                        }
                    }
                    Op::Release(c, b, l) => {
                        if (b..b + l).any(|i| model[c as usize][i as usize] == 0) {
                            continue; // nothing releases unmapped blocks
                        }
                        let freed = s.release(p(c, b), l);
                        let mut want = Vec::new();
                        for i in b..b + l {
                            let m = &mut model[c as usize][i as usize];
                            *m -= 1;
                            if *m == 0 {
                                want.push(i);
                            }
                        }
                        let got: Vec<u64> = freed
                            .iter()
                            .flat_map(|&(at, n)| at.block..at.block + n)
                            .collect();
                        prop_assert!(freed.iter().all(|(at, _)| at.container == ContainerId(c)));
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(s.validate(), Ok(()));
                for c in 0..2u32 {
                    for i in 0..64u64 {
                        let m = model[c as usize][i as usize];
                        prop_assert_eq!(s.extra(p(c, i)), m.saturating_sub(1));
                    }
                }
                let back = SharedBlocks::from_runs(s.runs()).unwrap();
                prop_assert_eq!(&back, &s);
                for c in 0..2u32 {
                    let shared = model[c as usize].iter().filter(|&&m| m > 1).count();
                    prop_assert_eq!(s.shared_in(p(c, 0), 64), shared as u64);
                }
            }
        }

        /// Deriving counts from all mapped runs at once agrees with the per-block model
        /// (a block covered `n` times has `n - 1` extra), with `shared_in`, and, in its
        /// merged form, with sharing run by run as snapshots and clones do.
        #[test]
        fn from_mappings_matches_model_and_incremental_sharing(
            runs in proptest::collection::vec((0u32..2, 0u64..48, 1u64..16), 0..40),
            query in (0u32..2, 0u64..64, 0u64..64),
        ) {
            let runs: Vec<(Phys, u64)> = runs.into_iter().map(|(c, b, l)| (p(c, b), l)).collect();
            let s = SharedBlocks::from_mappings(runs.iter().copied());
            prop_assert_eq!(s.validate(), Ok(()));
            let mut model = vec![[0u32; 64]; 2];
            for &(at, l) in &runs {
                for i in at.block..at.block + l {
                    model[at.container.0 as usize][i as usize] += 1;
                }
            }
            for c in 0..2u32 {
                for i in 0..64u64 {
                    prop_assert_eq!(s.extra(p(c, i)), model[c as usize][i as usize].saturating_sub(1));
                }
            }
            let (qc, qb, ql) = query;
            let want = (qb..(qb + ql).min(64))
                .filter(|&i| model[qc as usize][i as usize] > 1)
                .count();
            prop_assert_eq!(s.shared_in(p(qc, qb), ql), want as u64);

            // Incrementally: the first run over a block maps it; every later one shares it.
            let mut inc = SharedBlocks::new();
            let mut mapped = [[false; 64]; 2];
            for &(at, l) in &runs {
                let m = &mut mapped[at.container.0 as usize];
                let mut i = at.block;
                while i < at.block + l {
                    let was = m[i as usize];
                    let mut j = i;
                    while j < at.block + l && m[j as usize] == was {
                        m[j as usize] = true;
                        j += 1;
                    }
                    if was {
                        inc.share(p(at.container.0, i), j - i);
                    }
                    i = j;
                }
            }
            prop_assert_eq!(&s, &inc);
            let mut reversed = runs.clone();
            reversed.reverse();
            prop_assert_eq!(&SharedBlocks::from_mappings(reversed), &s);
        }

        /// Releasing many runs at once equals releasing them one by one.
        #[test]
        fn release_all_equals_release_one_by_one(
            before in proptest::collection::vec((0u32..2, 0u64..48, 1u64..16), 0..20),
            runs in proptest::collection::vec((0u32..2, 0u64..48, 1u64..16), 0..20),
        ) {
            let mut one = SharedBlocks::new();
            for &(c, b, l) in &before {
                one.share(p(c, b), l);
            }
            let mut all = one.clone();
            // Freed blocks, per block: releasing one by one may free a block and then see
            // it again unshared (it counts once: a second release of a freed block would be
            // a caller's bug, so compare the set of freed blocks).
            let mut want = std::collections::BTreeSet::new();
            for &(c, b, l) in &runs {
                for (at, n) in one.release(p(c, b), l) {
                    for i in at.block..at.block + n {
                        want.insert((at.container.0, i));
                    }
                }
            }
            let got: std::collections::BTreeSet<(u32, u64)> = all
                .release_all(runs.iter().map(|&(c, b, l)| (p(c, b), l)))
                .into_iter()
                .flat_map(|(at, n)| (at.block..at.block + n).map(move |i| (at.container.0, i)))
                .collect();
            prop_assert_eq!(all.validate(), Ok(()));
            prop_assert_eq!(&all, &one);
            prop_assert_eq!(got, want);
        }

        /// Sharing many runs at once equals sharing them one by one.
        #[test]
        fn share_all_equals_share_one_by_one(
            before in proptest::collection::vec((0u32..2, 0u64..48, 1u64..16), 0..20),
            runs in proptest::collection::vec((0u32..2, 0u64..48, 1u64..16), 0..20),
        ) {
            let mut one = SharedBlocks::new();
            for &(c, b, l) in &before {
                one.share(p(c, b), l);
            }
            let mut all = one.clone();
            for &(c, b, l) in &runs {
                one.share(p(c, b), l);
            }
            all.share_all(runs.iter().map(|&(c, b, l)| (p(c, b), l)));
            prop_assert_eq!(all.validate(), Ok(()));
            prop_assert_eq!(&all, &one);
        }
    }
}
