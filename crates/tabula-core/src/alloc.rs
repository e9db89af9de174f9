//! Free space: per-container free maps of block runs, and the pool that picks a container.
//!
//! Allocation prefers the block right after a hint (the physical end of the vdisk's
//! previous segment) so sequential streams stay physically sequential, then the first run
//! that fits. Frees coalesce with neighbours; freeing space that is already free is refused,
//! which is how a double free shows up instead of silently corrupting the map.

use std::collections::BTreeMap;

use crate::ids::ContainerId;
use crate::table::Phys;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("blocks {start}..{end} of {container} are already free (double free)")]
    DoubleFree {
        container: ContainerId,
        start: u64,
        end: u64,
    },
    #[error("blocks {start}..{end} lie outside {container} ({size} blocks)")]
    OutOfContainer {
        container: ContainerId,
        start: u64,
        end: u64,
        size: u64,
    },
    #[error("container {0} is not in the pool")]
    UnknownContainer(ContainerId),
}

/// The free runs of one container, `start -> len` in blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FreeMap {
    size: u64,
    runs: BTreeMap<u64, u64>,
    free: u64,
}

impl FreeMap {
    /// A container of `size` blocks with nothing free yet (the caller frees what is free).
    pub fn empty(size: u64) -> FreeMap {
        FreeMap {
            size,
            runs: BTreeMap::new(),
            free: 0,
        }
    }

    /// A container of `size` blocks, all free.
    pub fn all_free(size: u64) -> FreeMap {
        let mut m = FreeMap::empty(size);
        if size > 0 {
            m.runs.insert(0, size);
            m.free = size;
        }
        m
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn free_blocks(&self) -> u64 {
        self.free
    }

    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&s, &l)| (s, l))
    }

    /// The runs that touch the closed interval `[a, b]`: the only runs an allocation or free
    /// of `[a, b)` can change, so persisting a change means replacing just these.
    pub fn touching(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if let Some((&s, &l)) = self.runs.range(..a).next_back() {
            if s + l >= a {
                out.push((s, l));
            }
        }
        out.extend(self.runs.range(a..=b).map(|(&s, &l)| (s, l)));
        out
    }

    /// Takes between `min` and `max` blocks (in multiples of `unit`) as one run, preferring to
    /// start at `hint`. Returns the start and the length taken.
    pub fn alloc(
        &mut self,
        unit: u64,
        min: u64,
        max: u64,
        hint: Option<u64>,
    ) -> Option<(u64, u64)> {
        debug_assert!(unit > 0 && min > 0 && min <= max && min % unit == 0 && max % unit == 0);
        if let Some(h) = hint {
            if let Some((&s, &l)) = self.runs.range(..=h).next_back() {
                if s + l >= h + min {
                    let take = (s + l - h).min(max) / unit * unit;
                    self.take(s, l, h, take);
                    return Some((h, take));
                }
            }
        }
        let (&s, &l) = self.runs.iter().find(|&(_, &l)| l >= min)?;
        let take = l.min(max) / unit * unit;
        self.take(s, l, s, take);
        Some((s, take))
    }

    /// Removes `[at, at+take)` from the run `[s, s+l)` that contains it.
    fn take(&mut self, s: u64, l: u64, at: u64, take: u64) {
        self.runs.remove(&s);
        if at > s {
            self.runs.insert(s, at - s);
        }
        let end = at + take;
        if end < s + l {
            self.runs.insert(end, s + l - end);
        }
        self.free -= take;
    }

    /// Marks `[start, start+len)` as used, when rebuilding from tables. Fails unless all free.
    pub fn reserve(&mut self, start: u64, len: u64) -> bool {
        match self.runs.range(..=start).next_back() {
            Some((&s, &l)) if s + l >= start + len => {
                self.take(s, l, start, len);
                true
            }
            _ => false,
        }
    }

    /// Returns `[start, start+len)` to the free map, coalescing with neighbours.
    pub fn free_run(
        &mut self,
        container: ContainerId,
        start: u64,
        len: u64,
    ) -> Result<(), AllocError> {
        let end = start + len;
        if end > self.size || len == 0 {
            return Err(AllocError::OutOfContainer {
                container,
                start,
                end,
                size: self.size,
            });
        }
        let prev = self.runs.range(..end).next_back().map(|(&s, &l)| (s, l));
        if let Some((s, l)) = prev {
            if s + l > start {
                return Err(AllocError::DoubleFree {
                    container,
                    start,
                    end,
                });
            }
        }
        let mut new_start = start;
        let mut new_end = end;
        if let Some((s, l)) = prev {
            if s + l == start {
                self.runs.remove(&s);
                new_start = s;
            }
        }
        if let Some(l) = self.runs.remove(&end) {
            new_end = end + l;
        }
        self.runs.insert(new_start, new_end - new_start);
        self.free += len;
        Ok(())
    }
}

/// Every container's free map, and the policy that picks where a new segment goes.
#[derive(Clone, Debug, Default)]
pub struct Pool {
    containers: BTreeMap<ContainerId, FreeMap>,
}

impl Pool {
    pub fn new() -> Pool {
        Pool::default()
    }

    pub fn insert(&mut self, id: ContainerId, map: FreeMap) {
        self.containers.insert(id, map);
    }

    pub fn get(&self, id: ContainerId) -> Option<&FreeMap> {
        self.containers.get(&id)
    }

    pub fn get_mut(&mut self, id: ContainerId) -> Option<&mut FreeMap> {
        self.containers.get_mut(&id)
    }

    pub fn free_blocks(&self) -> u64 {
        self.containers.values().map(FreeMap::free_blocks).sum()
    }

    /// Allocates one run of `min..=max` blocks in multiples of `unit`, from a container
    /// `allowed` accepts: right after `hint` if that space is free (so a sequential stream
    /// stays physically sequential), else in the container with the most free space (so new
    /// streams spread over the pool by free space).
    pub fn alloc(
        &mut self,
        unit: u64,
        min: u64,
        max: u64,
        hint: Option<Phys>,
        allowed: impl Fn(ContainerId) -> bool,
    ) -> Option<(Phys, u64)> {
        if let Some(h) = hint.filter(|h| allowed(h.container)) {
            if let Some(m) = self.containers.get_mut(&h.container) {
                if let Some((b, n)) = m.alloc(unit, min, max, Some(h.block)) {
                    if b == h.block {
                        return Some((h, n));
                    }
                    // Not at the hint: put it back and use the general policy.
                    m.free_run(h.container, b, n).expect("just allocated");
                }
            }
        }
        let mut order: Vec<(ContainerId, u64)> = self
            .containers
            .iter()
            .map(|(&id, m)| (id, m.free_blocks()))
            .filter(|&(id, f)| f >= min && allowed(id))
            .collect();
        order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (id, _) in order {
            let m = self.containers.get_mut(&id).expect("listed");
            if let Some((b, n)) = m.alloc(unit, min, max, None) {
                return Some((
                    Phys {
                        container: id,
                        block: b,
                    },
                    n,
                ));
            }
        }
        None
    }

    /// Free blocks in the containers `allowed` accepts.
    pub fn free_blocks_in(&self, allowed: impl Fn(ContainerId) -> bool) -> u64 {
        self.containers
            .iter()
            .filter(|(id, _)| allowed(**id))
            .map(|(_, m)| m.free_blocks())
            .sum()
    }

    pub fn remove(&mut self, id: ContainerId) -> Option<FreeMap> {
        self.containers.remove(&id)
    }

    pub fn free(&mut self, at: Phys, len: u64) -> Result<(), AllocError> {
        self.containers
            .get_mut(&at.container)
            .ok_or(AllocError::UnknownContainer(at.container))?
            .free_run(at.container, at.block, len)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const C: ContainerId = ContainerId(1);

    #[test]
    fn alloc_prefers_hint_then_first_fit() {
        let mut m = FreeMap::all_free(100);
        assert_eq!(m.alloc(10, 10, 10, None), Some((0, 10)));
        assert_eq!(m.alloc(10, 10, 30, Some(50)), Some((50, 30)));
        assert_eq!(m.alloc(10, 10, 10, Some(55)), Some((10, 10)));
        assert_eq!(m.free_blocks(), 50);
    }

    #[test]
    fn rejects_double_free() {
        let mut m = FreeMap::all_free(100);
        let (s, n) = m.alloc(10, 10, 10, None).unwrap();
        m.free_run(C, s, n).unwrap();
        assert!(matches!(
            m.free_run(C, s, n),
            Err(AllocError::DoubleFree { .. })
        ));
        assert!(matches!(
            m.free_run(C, 95, 10),
            Err(AllocError::OutOfContainer { .. })
        ));
        assert_eq!(m, FreeMap::all_free(100));
    }

    #[test]
    fn pool_spreads_by_free_space_and_reports_full() {
        let mut p = Pool::new();
        p.insert(ContainerId(1), FreeMap::all_free(20));
        p.insert(ContainerId(2), FreeMap::all_free(40));
        let any = |_| true;
        let (a, _) = p.alloc(10, 10, 10, None, any).unwrap();
        assert_eq!(a.container, ContainerId(2));
        for _ in 0..5 {
            p.alloc(10, 10, 10, None, any).unwrap();
        }
        assert_eq!(p.alloc(10, 10, 10, None, any), None);
        assert_eq!(p.free_blocks(), 0);
    }

    #[test]
    fn pool_keeps_streams_contiguous_and_honours_the_filter() {
        let mut p = Pool::new();
        p.insert(ContainerId(1), FreeMap::all_free(100));
        p.insert(ContainerId(2), FreeMap::all_free(60));
        let any = |_| true;
        // A stream continues after its hint even though container 1 has more room left.
        let (a, n) = p.alloc(10, 10, 10, None, any).unwrap();
        assert_eq!((a.container, n), (ContainerId(1), 10));
        let only2 = |c| c == ContainerId(2);
        let (b, _) = p.alloc(10, 10, 10, Some(a.offset(10)), only2).unwrap();
        assert_eq!(
            b.container,
            ContainerId(2),
            "a hint outside the filter is ignored"
        );
        let (c, _) = p.alloc(10, 10, 10, Some(b.offset(10)), any).unwrap();
        assert_eq!(
            c,
            b.offset(10),
            "the stream stays contiguous in container 2"
        );
        let none = |_| false;
        assert_eq!(p.alloc(10, 10, 10, None, none), None);
        assert_eq!(p.free_blocks_in(only2), 40);
    }

    proptest! {
        /// Against a per-block model: allocations never overlap, never exceed the size, and
        /// frees restore exactly what was taken.
        #[test]
        fn freemap_matches_model(ops in proptest::collection::vec((any::<bool>(), 1u64..4, 0u64..64, any::<prop::sample::Index>()), 1..80)) {
            let mut m = FreeMap::all_free(64);
            let mut used = [false; 64];
            let mut held: Vec<(u64, u64)> = Vec::new();
            for (is_alloc, units, hint, idx) in ops {
                if is_alloc || held.is_empty() {
                    if let Some((s, n)) = m.alloc(1, units, units * 2, Some(hint)) {
                        prop_assert!(n >= units && n <= units * 2);
                        for i in s..s + n {
                            prop_assert!(!used[i as usize]);
                            used[i as usize] = true;
                        }
                        held.push((s, n));
                    } else {
                        // Fails only when no free run of `units` exists.
                        let mut best = 0;
                        let mut run = 0;
                        for u in used { run = if u { 0 } else { run + 1 }; best = best.max(run); }
                        prop_assert!(best < units);
                    }
                } else {
                    let (s, n) = held.swap_remove(idx.index(held.len()));
                    m.free_run(C, s, n).unwrap();
                    for i in s..s + n { used[i as usize] = false; }
                }
                prop_assert_eq!(m.free_blocks(), used.iter().filter(|u| !**u).count() as u64);
                let mut prev_end = None;
                for (s, l) in m.runs() {
                    prop_assert!(l > 0);
                    if let Some(pe) = prev_end { prop_assert!(s > pe, "runs must be coalesced"); }
                    for i in s..s + l { prop_assert!(!used[i as usize]); }
                    prev_end = Some(s + l);
                }
            }
        }
    }
}
