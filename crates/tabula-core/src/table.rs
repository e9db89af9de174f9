//! The mapping table: ordered entries, each mapping a run of contiguous virtual blocks
//! `[begin, end)` to a container and a physical start block, with a state.
//!
//! ```text
//!  virtual blocks   0        256       512            1024
//!                   |--------|---------|--------------|
//!  entries          [ c1@0   ][  gap   ][ c2@4096 New  ]
//!                    Normal    (zero)
//! ```
//!
//! Blocks not covered by any entry are unallocated and read as zeros (the `Zero` state).
//! Entries that are contiguous both virtually and physically, with equal states, are merged,
//! so a table of sequentially allocated segments stays one entry.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::ContainerId;

/// The state flags of an entry (seed 002 c2-5, 17-23; 003 c24-27).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Mapped: reads and writes go to the container.
    Normal,
    /// Reads are zeros without container I/O; a write faults so the controller allocates.
    Zero,
    /// No usable mapping: any I/O faults to the controller.
    Invalid,
    /// Reads go to the container; writes fault.
    NoWrite,
    /// Shared with a snapshot or clone: reads go to the container, the first write faults so
    /// the controller can break the sharing (copy-on-write).
    New,
    /// A known failure: I/O fails fast and is reported.
    Error,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Normal,
        State::Zero,
        State::Invalid,
        State::NoWrite,
        State::New,
        State::Error,
    ];

    /// Whether reads of this state may be served by the agent without the controller.
    pub fn readable(self) -> bool {
        matches!(
            self,
            State::Normal | State::NoWrite | State::New | State::Zero
        )
    }

    /// Whether writes of this state may be served by the agent without the controller.
    pub fn writable(self) -> bool {
        matches!(self, State::Normal)
    }

    pub fn as_u8(self) -> u8 {
        match self {
            State::Normal => 0,
            State::Zero => 1,
            State::Invalid => 2,
            State::NoWrite => 3,
            State::New => 4,
            State::Error => 5,
        }
    }

    pub fn from_u8(v: u8) -> Option<State> {
        State::ALL.into_iter().find(|s| s.as_u8() == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Normal => "normal",
            State::Zero => "zero",
            State::Invalid => "invalid",
            State::NoWrite => "no-write",
            State::New => "new",
            State::Error => "error",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A physical position: container and block within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Phys {
    pub container: ContainerId,
    pub block: u64,
}

impl Phys {
    pub fn offset(self, blocks: u64) -> Phys {
        Phys {
            container: self.container,
            block: self.block + blocks,
        }
    }
}

/// One table entry, as stored and as sent to agents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub begin: u64,
    pub end: u64,
    /// Where `begin` lives; `None` for states that need no storage (invalid, error, zero).
    pub target: Option<Phys>,
    pub state: State,
}

impl Entry {
    pub fn len(&self) -> u64 {
        self.end - self.begin
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.begin
    }

    /// Whether `next` continues this entry (virtually and physically, same state), so
    /// the two must be one entry.
    pub fn merges_with(&self, next: &Entry) -> bool {
        if self.end != next.begin || self.state != next.state {
            return false;
        }
        match (self.target, next.target) {
            (None, None) => true,
            (Some(t1), Some(t2)) => t1.offset(self.len()) == t2,
            _ => false,
        }
    }

    /// The problem with this entry on its own in a table of `size` blocks, if any.
    pub fn defect(&self, size: u64) -> Option<String> {
        if self.is_empty() {
            Some(format!(
                "entry at {} is empty (end {})",
                self.begin, self.end
            ))
        } else if self.end > size {
            Some(format!(
                "entry {}..{} beyond size {size}",
                self.begin, self.end
            ))
        } else if self.target.is_none()
            && matches!(self.state, State::Normal | State::NoWrite | State::New)
        {
            Some(format!(
                "entry at {} in state {} has no target",
                self.begin, self.state
            ))
        } else if self.target.is_none() && self.state == State::Zero {
            Some(format!(
                "entry at {} is an explicit unmapped zero",
                self.begin
            ))
        } else {
            None
        }
    }
}

/// Structural problems of an entry list as stored: each entry on its own, and order,
/// overlap and merging between neighbours. Empty when the list is a well-formed table.
pub fn list_defects(size: u64, entries: &[Entry]) -> Vec<String> {
    let mut out: Vec<String> = entries.iter().filter_map(|e| e.defect(size)).collect();
    for w in entries.windows(2) {
        if w[0].end > w[1].begin {
            out.push(format!(
                "entries at {} and {} overlap or are out of order",
                w[0].begin, w[1].begin
            ));
        } else if w[0].merges_with(&w[1]) {
            out.push(format!(
                "entries at {} and {} should have merged",
                w[0].begin, w[1].begin
            ));
        }
    }
    out
}

/// The part of one lookup that falls in a single entry (or a single gap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub begin: u64,
    pub end: u64,
    /// Physical position of `begin`, already offset into the entry.
    pub target: Option<Phys>,
    pub state: State,
}

/// What a block reads as, for [`MappingTable::diff`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataKey {
    /// The data at this physical block (whatever state allows reading it).
    Mapped(Phys),
    /// Unmapped: zeros.
    Zeros,
    /// Not readable (`Invalid`, `Error`): no data to compare, so only the same state is equal.
    Unreadable(State),
}

impl Piece {
    /// The data identity of the block `off` blocks into this piece.
    fn data_key(&self, off: u64) -> DataKey {
        match self.target {
            _ if !self.state.readable() => DataKey::Unreadable(self.state),
            Some(t) => DataKey::Mapped(t.offset(off)),
            None => DataKey::Zeros,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Value {
    end: u64,
    target: Option<Phys>,
    state: State,
}

/// Errors from table edits: each is a bug in the caller, reported rather than panicking so the
/// controller can refuse a bad request from the network.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("range {begin}..{end} is empty or inverted")]
    BadRange { begin: u64, end: u64 },
    #[error("range {begin}..{end} lies beyond the table size {size} blocks")]
    OutOfRange { begin: u64, end: u64, size: u64 },
    #[error("state {0} needs a physical target")]
    NeedsTarget(State),
}

/// A vdisk's mapping table. Cloning is O(entries); agents keep one per exported vdisk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MappingTable {
    size: u64,
    map: BTreeMap<u64, Value>,
}

impl MappingTable {
    /// An empty table over `size` blocks: everything reads as zeros.
    pub fn new(size: u64) -> MappingTable {
        MappingTable {
            size,
            map: BTreeMap::new(),
        }
    }

    /// Builds a table from stored entries, validating and merging them.
    pub fn from_entries(
        size: u64,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<MappingTable, TableError> {
        let entries: Vec<Entry> = entries.into_iter().collect();
        // A table's own entries (a stored table, a snapshot from the controller) are already
        // canonical: sorted, disjoint, merged, each valid. Those are built in one pass (a
        // million entries: tens of ms instead of most of a second); anything else is
        // applied entry by entry, with the same result.
        let sorted = entries.iter().all(|e| {
            e.begin < e.end
                && e.end <= size
                && (e.target.is_some()
                    || !matches!(
                        e.state,
                        State::Normal | State::NoWrite | State::New | State::Zero
                    ))
        }) && entries.windows(2).all(|w| w[0].end <= w[1].begin);
        if sorted {
            // Sorted and disjoint: merging each entry into its predecessor where they join
            // gives the canonical form in one pass.
            let mut out: Vec<Entry> = Vec::with_capacity(entries.len());
            for e in entries {
                match out.last_mut() {
                    Some(last) if last.merges_with(&e) => last.end = e.end,
                    _ => out.push(e),
                }
            }
            return Ok(MappingTable {
                size,
                map: out
                    .into_iter()
                    .map(|e| {
                        (
                            e.begin,
                            Value {
                                end: e.end,
                                target: e.target,
                                state: e.state,
                            },
                        )
                    })
                    .collect(),
            });
        }
        let mut t = MappingTable::new(size);
        for e in entries {
            t.set(e.begin, e.end, e.target, e.state)?;
        }
        Ok(t)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Changes the size; shrinking drops every mapping beyond the new end.
    pub fn resize(&mut self, size: u64) {
        if size < self.size {
            self.cut(size, self.size);
            self.map.retain(|&b, _| b < size);
        }
        self.size = size;
    }

    /// Entries in order.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.map.iter().map(|(&begin, v)| Self::entry(begin, v))
    }

    /// Entries that begin at or after `block`, in order.
    pub fn entries_from(&self, block: u64) -> impl Iterator<Item = Entry> + '_ {
        self.map
            .range(block..)
            .map(|(&begin, v)| Self::entry(begin, v))
    }

    /// The whole (unclipped) entry holding `block`, if any.
    pub fn entry_at(&self, block: u64) -> Option<Entry> {
        let (&begin, v) = self.map.range(..=block).next_back()?;
        (v.end > block).then(|| Self::entry(begin, v))
    }

    /// Entries overlapping `[begin, end)`, clipped to it.
    pub fn entries_in(&self, begin: u64, end: u64) -> Vec<Entry> {
        self.lookup(begin, end)
            .into_iter()
            .filter(|p| p.target.is_some() || p.state != State::Zero)
            .map(|p| Entry {
                begin: p.begin,
                end: p.end,
                target: p.target,
                state: p.state,
            })
            .collect()
    }

    /// The virtual block ranges whose data may differ between `self` and `other`, merged,
    /// without reading any data: what changed between a snapshot and a later table of the
    /// same lineage, for incremental backup. Blocks are compared by data identity, not by
    /// state: a readable mapped block is its target (so a snapshot's `NoWrite` entry and its
    /// vdisk's `New` entry at the same place are equal), an unmapped block reads zeros, and a
    /// block in `Invalid` or `Error` is unreadable, equal only to the same state. Blocks
    /// beyond a table's size count as unmapped.
    pub fn diff(&self, other: &MappingTable) -> Vec<(u64, u64)> {
        let end = self.size.max(other.size);
        let pad = |t: &MappingTable| {
            let mut v = t.lookup(0, t.size);
            if t.size < end {
                v.push(Piece {
                    begin: t.size,
                    end,
                    target: None,
                    state: State::Zero,
                });
            }
            v
        };
        let (a, b) = (pad(self), pad(other));
        let (mut i, mut j, mut pos) = (0, 0, 0);
        let mut out: Vec<(u64, u64)> = Vec::new();
        while pos < end {
            let (pa, pb) = (&a[i], &b[j]);
            let next = pa.end.min(pb.end);
            let at = |p: &Piece| p.data_key(pos - p.begin);
            if at(pa) != at(pb) {
                match out.last_mut() {
                    Some((_, e)) if *e == pos => *e = next,
                    _ => out.push((pos, next)),
                }
            }
            pos = next;
            if pa.end == pos {
                i += 1;
            }
            if pb.end == pos {
                j += 1;
            }
        }
        out
    }

    /// Splits `[begin, end)` into the pieces it covers, gaps included as `Zero` pieces with no
    /// target. The pieces are contiguous and cover the whole range (clipped to the table size).
    pub fn lookup(&self, begin: u64, end: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        self.for_each_piece(begin, end, |p| out.push(p));
        out
    }

    /// Like [`lookup`](Self::lookup) without allocating: the hot path's form.
    pub fn for_each_piece(&self, begin: u64, end: u64, mut f: impl FnMut(Piece)) {
        let end = end.min(self.size);
        if begin >= end {
            return;
        }
        let mut pos = begin;
        // The entry that starts at or before `begin` may cover it.
        if let Some((&b, v)) = self.map.range(..=begin).next_back() {
            if v.end > begin {
                let e = v.end.min(end);
                f(Piece {
                    begin,
                    end: e,
                    target: v.target.map(|t| t.offset(begin - b)),
                    state: v.state,
                });
                pos = e;
            }
        }
        if pos >= end {
            return;
        }
        for (&b, v) in self.map.range(pos..end) {
            if b > pos {
                f(Piece {
                    begin: pos,
                    end: b,
                    target: None,
                    state: State::Zero,
                });
            }
            let e = v.end.min(end);
            f(Piece {
                begin: b,
                end: e,
                target: v.target,
                state: v.state,
            });
            pos = e;
        }
        if pos < end {
            f(Piece {
                begin: pos,
                end,
                target: None,
                state: State::Zero,
            });
        }
    }

    /// Maps `[begin, end)` to `target` with `state`, replacing whatever was there, and merges
    /// with neighbours. `Zero` without a target is the same as [`remove`](Self::remove).
    pub fn set(
        &mut self,
        begin: u64,
        end: u64,
        target: Option<Phys>,
        state: State,
    ) -> Result<(), TableError> {
        self.check_range(begin, end)?;
        if target.is_none() && matches!(state, State::Normal | State::NoWrite | State::New) {
            return Err(TableError::NeedsTarget(state));
        }
        self.cut(begin, end);
        if target.is_none() && state == State::Zero {
            return Ok(());
        }
        self.map.insert(begin, Value { end, target, state });
        self.merge_around(begin);
        Ok(())
    }

    /// Sets the state of every mapped block in `[begin, end)` (unmapped blocks stay so),
    /// splitting entries at the edges. Many entries (a snapshot marks a whole table `new`)
    /// are rewritten in one pass rather than edited one by one.
    pub fn set_mapped_state(
        &mut self,
        begin: u64,
        end: u64,
        state: State,
    ) -> Result<(), TableError> {
        let many = self.map.range(begin..end).nth(64).is_some();
        self.set_mapped_state_by(begin, end, state, many)
    }

    fn set_mapped_state_by(
        &mut self,
        begin: u64,
        end: u64,
        state: State,
        rebuild: bool,
    ) -> Result<(), TableError> {
        self.check_range(begin, end)?;
        if !rebuild {
            for x in self.entries_in(begin, end) {
                if x.target.is_some() {
                    self.set(x.begin, x.end, x.target, state)?;
                }
            }
            return Ok(());
        }
        let mut all = Vec::with_capacity(self.map.len() + 2);
        for e in self.entries() {
            if e.target.is_none() || e.end <= begin || e.begin >= end {
                all.push(e);
                continue;
            }
            let (b, x) = (e.begin.max(begin), e.end.min(end));
            let at = |pos: u64| e.target.map(|t| t.offset(pos - e.begin));
            if e.begin < b {
                all.push(Entry { end: b, ..e });
            }
            all.push(Entry {
                begin: b,
                end: x,
                target: at(b),
                state,
            });
            if x < e.end {
                all.push(Entry {
                    begin: x,
                    target: at(x),
                    ..e
                });
            }
        }
        *self = MappingTable::from_entries(self.size, all)?;
        Ok(())
    }

    /// Unmaps `[begin, end)`: it reads as zeros again.
    pub fn remove(&mut self, begin: u64, end: u64) -> Result<(), TableError> {
        self.check_range(begin, end)?;
        self.cut(begin, end);
        Ok(())
    }

    fn check_range(&self, begin: u64, end: u64) -> Result<(), TableError> {
        if begin >= end {
            return Err(TableError::BadRange { begin, end });
        }
        if end > self.size {
            return Err(TableError::OutOfRange {
                begin,
                end,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Removes every mapping inside `[begin, end)`, trimming entries that straddle its edges.
    fn cut(&mut self, begin: u64, end: u64) {
        // An entry starting before `begin` that reaches into the range: keep its head, and its
        // tail if it also runs past `end`.
        if let Some((&b, &v)) = self.map.range(..begin).next_back() {
            if v.end > begin {
                self.map.insert(b, Value { end: begin, ..v });
                if v.end > end {
                    self.map.insert(
                        end,
                        Value {
                            end: v.end,
                            target: v.target.map(|t| t.offset(end - b)),
                            state: v.state,
                        },
                    );
                }
            }
        }
        let inside: Vec<u64> = self.map.range(begin..end).map(|(&b, _)| b).collect();
        for b in inside {
            let v = self.map.remove(&b).expect("key just listed");
            if v.end > end {
                self.map.insert(
                    end,
                    Value {
                        end: v.end,
                        target: v.target.map(|t| t.offset(end - b)),
                        state: v.state,
                    },
                );
            }
        }
    }

    fn mergeable(b1: u64, v1: &Value, b2: u64, v2: &Value) -> bool {
        Self::entry(b1, v1).merges_with(&Self::entry(b2, v2))
    }

    fn entry(begin: u64, v: &Value) -> Entry {
        Entry {
            begin,
            end: v.end,
            target: v.target,
            state: v.state,
        }
    }

    fn merge_around(&mut self, begin: u64) {
        let mut begin = begin;
        if let Some((&pb, &pv)) = self.map.range(..begin).next_back() {
            let v = self.map[&begin];
            if Self::mergeable(pb, &pv, begin, &v) {
                self.map.remove(&begin);
                self.map.get_mut(&pb).expect("present").end = v.end;
                begin = pb;
            }
        }
        let v = self.map[&begin];
        if let Some(nv) = self.map.get(&v.end).copied() {
            if Self::mergeable(begin, &v, v.end, &nv) {
                self.map.remove(&v.end);
                self.map.get_mut(&begin).expect("present").end = nv.end;
            }
        }
    }

    /// Blocks that have a physical target.
    pub fn mapped_blocks(&self) -> u64 {
        self.map
            .values()
            .zip(self.map.keys())
            .filter(|(v, _)| v.target.is_some())
            .map(|(v, &b)| v.end - b)
            .sum()
    }

    /// Structural invariants: entries sorted, non-overlapping, inside the size, never
    /// mergeable with their successor, and states that need storage have it.
    pub fn validate(&self) -> Result<(), String> {
        let entries: Vec<Entry> = self.entries().collect();
        match list_defects(self.size, &entries).into_iter().next() {
            Some(d) => Err(d),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn phys(c: u32, b: u64) -> Option<Phys> {
        Some(Phys {
            container: ContainerId(c),
            block: b,
        })
    }

    #[test]
    fn empty_table_reads_as_one_zero_piece() {
        let t = MappingTable::new(100);
        assert_eq!(
            t.lookup(10, 20),
            vec![Piece {
                begin: 10,
                end: 20,
                target: None,
                state: State::Zero
            }]
        );
        assert!(t.lookup(100, 120).is_empty());
    }

    #[test]
    fn sequential_segments_merge_into_one_entry() {
        let mut t = MappingTable::new(1024);
        t.set(0, 256, phys(1, 0), State::Normal).unwrap();
        t.set(256, 512, phys(1, 256), State::Normal).unwrap();
        assert_eq!(t.len(), 1);
        t.set(512, 768, phys(1, 1000), State::Normal).unwrap();
        assert_eq!(t.len(), 2);
        t.validate().unwrap();
    }

    #[test]
    fn lookup_splits_across_entries_and_gaps() {
        let mut t = MappingTable::new(1000);
        t.set(100, 200, phys(1, 0), State::Normal).unwrap();
        t.set(300, 400, phys(2, 50), State::New).unwrap();
        let p = t.lookup(150, 350);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].target, phys(1, 50));
        assert_eq!((p[1].begin, p[1].end, p[1].state), (200, 300, State::Zero));
        assert_eq!(p[2].target, phys(2, 50));
    }

    #[test]
    fn rejects_bad_edits() {
        let mut t = MappingTable::new(10);
        assert!(t.set(5, 5, phys(1, 0), State::Normal).is_err());
        assert!(t.set(5, 11, phys(1, 0), State::Normal).is_err());
        assert_eq!(
            t.set(0, 1, None, State::Normal),
            Err(TableError::NeedsTarget(State::Normal))
        );
    }

    #[test]
    fn shrink_drops_tail() {
        let mut t = MappingTable::new(100);
        t.set(0, 100, phys(1, 0), State::Normal).unwrap();
        t.resize(40);
        assert_eq!(t.entries().collect::<Vec<_>>().len(), 1);
        assert_eq!(t.mapped_blocks(), 40);
        t.validate().unwrap();
    }

    #[test]
    fn diff_compares_data_not_state() {
        // A snapshot (no-write) and its vdisk (new, same targets) hold the same data.
        let mut snap = MappingTable::new(100);
        snap.set(0, 50, phys(1, 0), State::NoWrite).unwrap();
        let mut vdisk = MappingTable::new(100);
        vdisk.set(0, 50, phys(1, 0), State::New).unwrap();
        assert!(snap.diff(&vdisk).is_empty());
        // A copy-on-write moved 10..20; a write filled 60..70; 40..50 became unreadable.
        vdisk.set(10, 20, phys(1, 500), State::Normal).unwrap();
        vdisk.set(60, 70, phys(1, 600), State::Normal).unwrap();
        vdisk.set(40, 50, None, State::Error).unwrap();
        assert_eq!(snap.diff(&vdisk), vec![(10, 20), (40, 50), (60, 70)]);
        // Invalid and error differ from each other, and from unmapped zeros.
        let mut inv = MappingTable::new(100);
        inv.set(40, 50, None, State::Invalid).unwrap();
        assert_eq!(inv.diff(&vdisk), vec![(0, 50), (60, 70)]);
        assert_eq!(inv.diff(&MappingTable::new(100)), vec![(40, 50)]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Set(u64, u64, Option<(u32, u64)>, State),
        Remove(u64, u64),
        Resize(u64),
        SetMappedState(u64, u64, State, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        let state = proptest::sample::select(State::ALL.to_vec());
        prop_oneof![
            4 => (0u64..64, 1u64..16, proptest::option::of((0u32..2, 0u64..8)), state)
                .prop_map(|(b, l, t, s)| Op::Set(b, b + l, t.map(|(c, x)| (c, x * 8)), s)),
            2 => (0u64..64, 1u64..16).prop_map(|(b, l)| Op::Remove(b, b + l)),
            1 => (32u64..80).prop_map(Op::Resize),
            1 => (0u64..64, 1u64..40, proptest::sample::select(State::ALL.to_vec()), any::<bool>())
                .prop_map(|(b, l, s, r)| Op::SetMappedState(b, b + l, s, r)),
        ]
    }

    /// The naive model: one optional (target, state) per block.
    type Model = Vec<Option<(Option<Phys>, State)>>;

    fn model_piece(m: &Model, i: u64) -> (Option<Phys>, State) {
        m[i as usize].unwrap_or((None, State::Zero))
    }

    proptest! {
        /// Building from a table's own entries (the fast path) and from arbitrary entries
        /// (one by one) agree with building by edits.
        #[test]
        fn from_entries_equals_edits(ops in proptest::collection::vec(op(), 1..40)) {
            let mut t = MappingTable::new(80);
            let mut raw = Vec::new();
            for op in ops {
                if let Op::Set(b, e, target, state) = op {
                    let target = target.and_then(|(c, x)| phys(c, x));
                    if t.set(b, e, target, state).is_ok() {
                        raw.push(Entry { begin: b, end: e, target, state });
                    }
                }
            }
            let canonical: Vec<Entry> = t.entries().collect();
            // Sorted and disjoint but not merged: each entry cut in two.
            let split: Vec<Entry> = canonical
                .iter()
                .flat_map(|e| {
                    let m = e.begin + e.len() / 2;
                    if m == e.begin {
                        return vec![*e];
                    }
                    let second = Entry {
                        begin: m,
                        target: e.target.map(|p| p.offset(m - e.begin)),
                        ..*e
                    };
                    vec![Entry { end: m, ..*e }, second]
                })
                .collect();
            prop_assert_eq!(&MappingTable::from_entries(80, split).unwrap(), &t);
            prop_assert_eq!(&MappingTable::from_entries(80, canonical).unwrap(), &t);
            prop_assert_eq!(&MappingTable::from_entries(80, raw).unwrap(), &t);
        }

        /// `diff` lists exactly the blocks whose data identity differs, merged.
        #[test]
        fn diff_matches_per_block_comparison(
            ops_a in proptest::collection::vec(op(), 0..30),
            ops_b in proptest::collection::vec(op(), 0..30),
        ) {
            let build = |ops: &[Op]| {
                let mut t = MappingTable::new(64);
                for op in ops {
                    match *op {
                        Op::Set(b, e, target, state) => {
                            let _ = t.set(b, e, target.and_then(|(c, x)| phys(c, x)), state);
                        }
                        Op::Remove(b, e) => {
                            let _ = t.remove(b, e);
                        }
                        Op::Resize(n) => t.resize(n),
                        Op::SetMappedState(b, e, s, r) => {
                            let _ = t.set_mapped_state_by(b, e, s, r);
                        }
                    }
                }
                t
            };
            // Share a history, then diverge: the case diff is for.
            let a = build(&ops_a);
            let mut b = a.clone();
            for op in &ops_b {
                match *op {
                    Op::Set(s, e, target, state) => {
                        let _ = b.set(s, e, target.and_then(|(c, x)| phys(c, x)), state);
                    }
                    Op::Remove(s, e) => {
                        let _ = b.remove(s, e);
                    }
                    Op::Resize(n) => b.resize(n),
                    Op::SetMappedState(x, e, s, r) => {
                        let _ = b.set_mapped_state_by(x, e, s, r);
                    }
                }
            }
            let end = a.size().max(b.size());
            // Data identity: Ok(target) for readable blocks (None: zeros, unmapped), and
            // Err(state) for unreadable ones.
            let block = |t: &MappingTable, i: u64| -> Result<Option<Phys>, State> {
                if i >= t.size() {
                    return Ok(None);
                }
                let p = t.lookup(i, i + 1)[0];
                match p.state {
                    State::Invalid | State::Error => Err(p.state),
                    _ => Ok(p.target),
                }
            };
            let want: Vec<u64> = (0..end).filter(|&i| block(&a, i) != block(&b, i)).collect();
            let d = a.diff(&b);
            let got: Vec<u64> = d.iter().flat_map(|&(s, e)| s..e).collect();
            prop_assert_eq!(got, want);
            prop_assert!(d.windows(2).all(|w| w[0].1 < w[1].0), "merged: {:?}", d);
            prop_assert_eq!(b.diff(&a), d);
        }

        #[test]
        fn table_matches_per_block_model(ops in proptest::collection::vec(op(), 1..60)) {
            let mut t = MappingTable::new(64);
            let mut m: Model = vec![None; 64];
            for op in ops {
                match op {
                    Op::Set(b, e, target, state) => {
                        let target = target.and_then(|(c, x)| phys(c, x));
                        let r = t.set(b, e, target, state);
                        let needs = target.is_none()
                            && matches!(state, State::Normal | State::NoWrite | State::New);
                        if e > m.len() as u64 || needs {
                            prop_assert!(r.is_err());
                            continue;
                        }
                        prop_assert!(r.is_ok());
                        for i in b..e {
                            m[i as usize] = if target.is_none() && state == State::Zero {
                                None
                            } else {
                                Some((target.map(|p| p.offset(i - b)), state))
                            };
                        }
                    }
                    Op::Remove(b, e) => {
                        let r = t.remove(b, e);
                        if e > m.len() as u64 {
                            prop_assert!(r.is_err());
                            continue;
                        }
                        for i in b..e {
                            m[i as usize] = None;
                        }
                    }
                    Op::Resize(n) => {
                        t.resize(n);
                        m.resize(n as usize, None);
                    }
                    Op::SetMappedState(b, e, state, rebuild) => {
                        let r = t.set_mapped_state_by(b, e, state, rebuild);
                        if e > m.len() as u64 {
                            prop_assert!(r.is_err());
                            continue;
                        }
                        prop_assert!(r.is_ok());
                        for i in b..e {
                            if let Some((Some(p), _)) = m[i as usize] {
                                m[i as usize] = Some((Some(p), state));
                            }
                        }
                    }
                }
                prop_assert_eq!(t.validate(), Ok(()));
                // Every block agrees with the model, through a whole-table lookup and through
                // random sub-range lookups.
                let pieces = t.lookup(0, t.size());
                let mut pos = 0;
                for p in &pieces {
                    prop_assert_eq!(p.begin, pos);
                    for i in p.begin..p.end {
                        let got = (p.target.map(|x| x.offset(i - p.begin)), p.state);
                        prop_assert_eq!(got, model_piece(&m, i));
                    }
                    pos = p.end;
                }
                prop_assert_eq!(pos, m.len() as u64);
                let mapped = (0..m.len()).filter(|&i| m[i].is_some_and(|x| x.0.is_some())).count();
                prop_assert_eq!(t.mapped_blocks(), mapped as u64);
            }
        }

        #[test]
        fn lookup_of_subrange_is_contiguous(b in 0u64..64, l in 1u64..64) {
            let mut t = MappingTable::new(64);
            t.set(8, 16, phys(0, 0), State::Normal).unwrap();
            t.set(20, 40, phys(1, 100), State::New).unwrap();
            let e = (b + l).min(64);
            let pieces = t.lookup(b, e);
            let mut pos = b;
            for p in &pieces {
                prop_assert_eq!(p.begin, pos);
                prop_assert!(p.end > p.begin);
                pos = p.end;
            }
            prop_assert_eq!(pos, e.max(b));
        }
    }
}
