//! A compact mapping table for agents: one 64-bit word per segment instead of a B-tree node
//! slot per entry, with the same observable behaviour as [`MappingTable`] for the operations
//! an agent uses (`from_entries`, `set`, `set_mapped_state`, `remove`, `resize`, `lookup`,
//! `for_each_piece`, `entries`, `entries_in`, `len`, `mapped_blocks`, `validate`).
//!
//! Allocations are nearly always whole, segment-aligned segments, so a segment is almost
//! always either unmapped or covered by **one** entry: one contiguous physical run in one
//! state. Such a segment is one word; anything finer ("irregular") lives in a side map.
//!
//! ```text
//!  segment word (u64), least significant bit first:
//!
//!   bits  0..3   kind: 0 = unmapped (reads zeros), 1..=6 = uniform with state kind-1
//!                (normal, zero, invalid, no-write, new, error), 7 = irregular
//!   bit   3      has target
//!   bits  4..19  container id (15 bits: ids 0..=32767)
//!   bits 19..64  physical block of the segment's first block (45 bits: 128 PiB of 4 KiB)
//! ```
//!
//! A uniform word means one entry covers the segment's whole span inside the table:
//! `[s * segment_blocks, min((s + 1) * segment_blocks, size))`, so the last, partial segment
//! of a vdisk whose size is not a segment multiple is uniform too. A segment whose content is
//! anything else — several entries, a partly mapped segment, or one entry whose container or
//! block does not fit the word — is irregular: its word says so and its entries (clipped to
//! the segment, merged within it, sorted) are in a `BTreeMap<segment, Vec<Entry>>`. Every
//! edit stores a segment in this canonical form (the simplest representation that holds its
//! content), so the representation is a function of the content.
//!
//! Words live in pages of 512 segments (4 KiB), pages in directories of 512 pages (2^18
//! segments: 256 GiB at 1 MiB segments), each allocated on first use; a missing directory or
//! page is all unmapped, and pages and directories that become all-unmapped after an unmap or
//! a shrink are freed. The first 512 directories (2^27 segments: 128 TiB at 1 MiB
//! segments) are found by index in a vector of at most 4 KiB of pointers; directories beyond
//! that, which only larger tables have, are kept in an ordered map by directory number. So
//! memory follows what is mapped, never the size or the highest offset written: one segment
//! at the end of the largest vdisk (2^42 or even 2^50 segments) costs a page, a directory and
//! a map node, about 8 KiB. A dense table costs just over 8 bytes per segment. Every segment
//! inside a run set to a state without target (a big `invalid` range, say) costs its word like
//! a mapped one.
//!
//! A lookup reads one word per segment touched (two pointer hops and an index, plus a short
//! B-tree search beyond the first 2^27 segments); a range inside one regular segment — the
//! 4 KiB I/O of the hot path — is a single word read with no search. Walks (`entries`,
//! `mapped_blocks`, unmapping a range) skip missing directories through the map, so their cost
//! follows the pages present, not the span walked. [`entries`](SegmentTable::entries) and friends merge neighbouring segments that
//! are virtually contiguous, physically contiguous and in the same state, exactly as a
//! [`MappingTable`] holds them, so the two can be compared entry by entry. `len`,
//! `mapped_blocks` and `is_empty` walk the table (O(segments)); they are for status, not for
//! the I/O path.

use std::collections::BTreeMap;
use std::fmt;

use crate::ids::ContainerId;
use crate::table::{Entry, MappingTable, Phys, Piece, State, TableError, list_defects};

/// Segments per page of words (a page is 4 KiB).
pub const PAGE_SEGMENTS: u64 = 1 << PAGE_BITS;
const PAGE_BITS: u32 = 9;
const PAGE_MASK: u64 = PAGE_SEGMENTS - 1;
const PAGE_WORDS: usize = PAGE_SEGMENTS as usize;
/// Segments covered by one directory of pages.
const DIR_SHIFT: u32 = 2 * PAGE_BITS;
/// Directories found by index in a vector; those beyond are in an ordered map. 512 pointers
/// are 4 KiB at most, whatever the table's size.
const DENSE_DIRS: u64 = 512;

type Page = [u64; PAGE_WORDS];
type Dir = [Option<Box<Page>>; PAGE_WORDS];

const KIND_MASK: u64 = 0b111;
const KIND_IRREGULAR: u64 = 7;
const HAS_TARGET: u64 = 1 << 3;
const CONTAINER_SHIFT: u32 = 4;
/// Bits of a container id in a segment word: larger ids make the segment irregular.
pub const CONTAINER_BITS: u32 = 15;
const BLOCK_SHIFT: u32 = CONTAINER_SHIFT + CONTAINER_BITS;
/// Bits of a physical block in a segment word: larger blocks make the segment irregular.
pub const BLOCK_BITS: u32 = 64 - BLOCK_SHIFT;

/// What one segment word says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Word {
    Unmapped,
    /// One entry over the whole segment; the target is that of the segment's first block.
    Uniform(Option<Phys>, State),
    Irregular,
}

fn state_code(s: State) -> u64 {
    match s {
        State::Normal => 1,
        State::Zero => 2,
        State::Invalid => 3,
        State::NoWrite => 4,
        State::New => 5,
        State::Error => 6,
    }
}

#[inline]
fn decode(w: u64) -> Word {
    let state = match w & KIND_MASK {
        0 => return Word::Unmapped,
        KIND_IRREGULAR => return Word::Irregular,
        1 => State::Normal,
        2 => State::Zero,
        3 => State::Invalid,
        4 => State::NoWrite,
        5 => State::New,
        _ => State::Error,
    };
    let target = (w & HAS_TARGET != 0).then_some(Phys {
        container: ContainerId(((w >> CONTAINER_SHIFT) & ((1 << CONTAINER_BITS) - 1)) as u32),
        block: w >> BLOCK_SHIFT,
    });
    Word::Uniform(target, state)
}

/// The word of a uniform segment, or `None` when the target does not fit one.
fn encode(target: Option<Phys>, state: State) -> Option<u64> {
    let mut w = state_code(state);
    if let Some(p) = target {
        let c = u64::from(p.container.0);
        if c >> CONTAINER_BITS != 0 || p.block >> BLOCK_BITS != 0 {
            return None;
        }
        w |= HAS_TARGET | (c << CONTAINER_SHIFT) | (p.block << BLOCK_SHIFT);
    }
    Some(w)
}

/// `e` clipped to `[begin, end)`, if anything is left.
fn clip(e: &Entry, begin: u64, end: u64) -> Option<Entry> {
    let (b, x) = (e.begin.max(begin), e.end.min(end));
    (b < x).then(|| Entry {
        begin: b,
        end: x,
        target: e.target.map(|t| t.offset(b - e.begin)),
        state: e.state,
    })
}

/// Appends `e` to `out`, merging it into the last entry where the two join.
fn push_merged(out: &mut Vec<Entry>, e: Entry) {
    match out.last_mut() {
        Some(last) if last.merges_with(&e) => last.end = e.end,
        _ => out.push(e),
    }
}

/// A vdisk's mapping table in about 8 bytes per segment; see the [module docs](self).
#[derive(Clone)]
pub struct SegmentTable {
    size: u64,
    seg: u64,
    /// Directories of pages of segment words, by `segment >> 18`.
    dirs: Dirs,
    /// Entries of the irregular segments, clipped to the segment, sorted and merged.
    irregular: BTreeMap<u64, Vec<Entry>>,
}

impl SegmentTable {
    /// An empty table over `size` blocks cut in segments of `segment_blocks` blocks (0 is
    /// taken as 1): everything reads as zeros.
    pub fn new(size: u64, segment_blocks: u64) -> SegmentTable {
        SegmentTable {
            size,
            seg: segment_blocks.max(1),
            dirs: Dirs::default(),
            irregular: BTreeMap::new(),
        }
    }

    /// Builds a table from stored entries, validating and merging them, with the result and
    /// errors of [`MappingTable::from_entries`].
    pub fn from_entries(
        size: u64,
        segment_blocks: u64,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<SegmentTable, TableError> {
        let mut t = SegmentTable::new(size, segment_blocks);
        // MappingTable builds its result in one pass when every entry is valid and they are
        // sorted and disjoint, and otherwise applies them one by one with `set`; the two give
        // the same table, and a valid entry never fails `set`. So this streams: entries are
        // written directly while that holds, and from the first that breaks it on, the rest
        // go through `set` (same table, same first error), with no copy of the list.
        // Pieces of a partly covered segment gather in `buf` until the next segment starts.
        let mut cur: Option<u64> = None;
        let mut buf: Vec<Entry> = Vec::new();
        let mut prev_end = 0;
        let mut entries = entries.into_iter();
        while let Some(e) = entries.next() {
            let direct = e.begin < e.end
                && e.end <= size
                && e.begin >= prev_end
                && (e.target.is_some()
                    || !matches!(
                        e.state,
                        State::Normal | State::NoWrite | State::New | State::Zero
                    ));
            if !direct {
                if let Some(c) = cur.take() {
                    t.store(c, &buf);
                }
                for e in std::iter::once(e).chain(entries) {
                    t.set(e.begin, e.end, e.target, e.state)?;
                }
                return Ok(t);
            }
            prev_end = e.end;
            for s in e.begin / t.seg..=(e.end - 1) / t.seg {
                let (sb, se) = t.span(s);
                let piece = clip(&e, sb, se).expect("the entry overlaps its segments");
                if cur.is_some_and(|c| c != s) {
                    t.store(cur.take().expect("checked"), &buf);
                    buf.clear();
                }
                if piece.begin == sb && piece.end == se {
                    t.write_whole(s, piece);
                } else {
                    cur = Some(s);
                    buf.push(piece);
                }
            }
        }
        if let Some(c) = cur {
            t.store(c, &buf);
        }
        Ok(t)
    }

    /// The same entries as a [`MappingTable`].
    pub fn to_mapping_table(&self) -> MappingTable {
        MappingTable::from_entries(self.size, self.entries())
            .expect("a table's own entries are canonical")
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn segment_blocks(&self) -> u64 {
        self.seg
    }

    /// Number of (merged) entries, as [`MappingTable::len`] reports it. O(segments).
    pub fn len(&self) -> usize {
        self.entries().count()
    }

    /// Whether no block is mapped or in a state other than unmapped zeros.
    pub fn is_empty(&self) -> bool {
        self.entries().next().is_none()
    }

    /// Number of segments whose content is held in the side map.
    pub fn irregular_segments(&self) -> usize {
        self.irregular.len()
    }

    /// Heap bytes held, counted from capacities: exact for the words, directories and
    /// entry vectors, estimated for the side map's B-tree nodes.
    pub fn heap_bytes(&self) -> usize {
        let dirs = self.dirs.heap_bytes();
        let mut pages = 0;
        for (_, dir) in self.dirs.iter() {
            pages += size_of::<Dir>();
            pages += dir.iter().flatten().count() * size_of::<Page>();
        }
        let side: usize = self
            .irregular
            .values()
            .map(|v| {
                // Key and value in a B-tree leaf about two-thirds full.
                (size_of::<u64>() + size_of::<Vec<Entry>>()) * 3 / 2
                    + v.capacity() * size_of::<Entry>()
            })
            .sum();
        dirs + pages + side
    }

    /// Changes the size; shrinking drops every mapping beyond the new end.
    pub fn resize(&mut self, size: u64) {
        let old = self.size;
        if size < old {
            let s = size / self.seg;
            let mut keep = Vec::new();
            if size % self.seg != 0 {
                self.seg_entries(s, &mut keep);
                keep.retain_mut(|e| {
                    e.end = e.end.min(size);
                    e.begin < e.end
                });
            }
            self.truncate_segments(s);
            self.size = size;
            self.store(s, &keep);
            self.release(s, s);
        } else if size > old {
            if old % self.seg != 0 {
                // The old last segment was partial: its entries no longer span it.
                let s = old / self.seg;
                let mut keep = Vec::new();
                self.seg_entries(s, &mut keep);
                self.size = size;
                self.store(s, &keep);
            }
            self.size = size;
        }
    }

    /// Entries in order, merged across segments exactly as a [`MappingTable`] holds them.
    pub fn entries(&self) -> Entries<'_> {
        self.entries_range(0, self.size)
    }

    /// Entries overlapping `[begin, end)`, clipped to it.
    pub fn entries_in(&self, begin: u64, end: u64) -> Vec<Entry> {
        self.entries_range(begin, end.min(self.size)).collect()
    }

    fn entries_range(&self, begin: u64, end: u64) -> Entries<'_> {
        let (s, s_end) = if begin < end {
            (begin / self.seg, (end - 1) / self.seg + 1)
        } else {
            (0, 0)
        };
        Entries {
            raw: Raw {
                t: self,
                begin,
                end,
                s,
                s_end,
                irr: [].iter(),
            },
            pending: None,
        }
    }

    /// Splits `[begin, end)` into the pieces it covers, gaps included as `Zero` pieces with no
    /// target, as [`MappingTable::lookup`] does.
    pub fn lookup(&self, begin: u64, end: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        self.for_each_piece(begin, end, |p| out.push(p));
        out
    }

    /// Like [`lookup`](Self::lookup) without allocating: the hot path's form.
    #[inline]
    pub fn for_each_piece(&self, begin: u64, end: u64, mut f: impl FnMut(Piece)) {
        let end = end.min(self.size);
        if begin >= end {
            return;
        }
        let s = begin / self.seg;
        if (end - 1) / self.seg == s {
            // Inside one segment: a regular one is a single word read.
            match decode(self.word(s)) {
                Word::Unmapped => {
                    return f(Piece {
                        begin,
                        end,
                        target: None,
                        state: State::Zero,
                    });
                }
                Word::Uniform(target, state) => {
                    return f(Piece {
                        begin,
                        end,
                        target: target.map(|t| t.offset(begin - s * self.seg)),
                        state,
                    });
                }
                Word::Irregular => {}
            }
        }
        let mut pos = begin;
        for e in self.entries_range(begin, end) {
            if e.begin > pos {
                f(Piece {
                    begin: pos,
                    end: e.begin,
                    target: None,
                    state: State::Zero,
                });
            }
            f(Piece {
                begin: e.begin,
                end: e.end,
                target: e.target,
                state: e.state,
            });
            pos = e.end;
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

    /// Maps `[begin, end)` to `target` with `state`, replacing whatever was there. `Zero`
    /// without a target is the same as [`remove`](Self::remove).
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
        if target.is_none() && state == State::Zero {
            self.unmap(begin, end);
            return Ok(());
        }
        let e = Entry {
            begin,
            end,
            target,
            state,
        };
        for s in begin / self.seg..=(end - 1) / self.seg {
            let (sb, se) = self.span(s);
            let piece = clip(&e, sb, se).expect("the range overlaps its segments");
            if piece.begin == sb && piece.end == se {
                self.write_whole(s, piece);
            } else {
                let mut list = Vec::new();
                self.seg_entries(s, &mut list);
                let mut out = Vec::with_capacity(list.len() + 2);
                let mut placed = false;
                for x in &list {
                    if x.end <= piece.begin || x.begin >= piece.end {
                        if x.begin >= piece.end && !placed {
                            out.push(piece);
                            placed = true;
                        }
                        out.push(*x);
                        continue;
                    }
                    if let Some(head) = clip(x, x.begin, piece.begin) {
                        out.push(head);
                    }
                    if !placed {
                        out.push(piece);
                        placed = true;
                    }
                    if let Some(tail) = clip(x, piece.end, x.end) {
                        out.push(tail);
                    }
                }
                if !placed {
                    out.push(piece);
                }
                self.store(s, &out);
            }
        }
        Ok(())
    }

    /// Sets the state of every mapped block in `[begin, end)` (unmapped blocks stay so, and
    /// so do entries without a target).
    pub fn set_mapped_state(
        &mut self,
        begin: u64,
        end: u64,
        state: State,
    ) -> Result<(), TableError> {
        self.check_range(begin, end)?;
        let last = (end - 1) / self.seg;
        let mut s = begin / self.seg;
        while s <= last {
            let w = match self.page_at(s) {
                Ok(page) => page[(s & PAGE_MASK) as usize],
                Err(next) => {
                    s = next;
                    continue;
                }
            };
            let (sb, se) = self.span(s);
            match decode(w) {
                Word::Unmapped | Word::Uniform(None, _) => {}
                Word::Uniform(Some(t), old) if begin <= sb && se <= end => {
                    if old != state {
                        let w = encode(Some(t), state).expect("the same target still fits");
                        *self.slot(s) = w;
                    }
                }
                Word::Uniform(Some(_), _) | Word::Irregular => {
                    let mut list = Vec::new();
                    self.seg_entries(s, &mut list);
                    let mut out = Vec::with_capacity(list.len() + 2);
                    for x in &list {
                        if x.target.is_none() || x.end <= begin || x.begin >= end {
                            push_merged(&mut out, *x);
                            continue;
                        }
                        if let Some(head) = clip(x, x.begin, begin) {
                            push_merged(&mut out, head);
                        }
                        let mid = clip(x, begin, end).expect("overlaps");
                        push_merged(&mut out, Entry { state, ..mid });
                        if let Some(tail) = clip(x, end, x.end) {
                            push_merged(&mut out, tail);
                        }
                    }
                    self.store(s, &out);
                }
            }
            s += 1;
        }
        Ok(())
    }

    /// Unmaps `[begin, end)`: it reads as zeros again.
    pub fn remove(&mut self, begin: u64, end: u64) -> Result<(), TableError> {
        self.check_range(begin, end)?;
        self.unmap(begin, end);
        Ok(())
    }

    /// Blocks that have a physical target. O(segments).
    pub fn mapped_blocks(&self) -> u64 {
        Raw {
            t: self,
            begin: 0,
            end: self.size,
            s: 0,
            s_end: self.size.div_ceil(self.seg),
            irr: [].iter(),
        }
        .filter(|e| e.target.is_some())
        .map(|e| e.len())
        .sum()
    }

    /// Structural invariants: those of [`MappingTable::validate`] on the merged entries,
    /// plus the representation's own (every word decodes to a valid uniform entry or points
    /// at side-map entries inside its segment, and each segment is in canonical form).
    pub fn validate(&self) -> Result<(), String> {
        let nsegs = self.size.div_ceil(self.seg);
        for (d, dir) in self.dirs.iter() {
            // Memory follows content: no directory or page is kept that holds nothing.
            if dir.iter().all(Option::is_none) {
                return Err(format!("directory {d} is empty but kept"));
            }
            for (p, page) in dir.iter().enumerate() {
                let Some(page) = page else { continue };
                if page.iter().all(|&w| w == 0) {
                    return Err(format!("page {p} of directory {d} is empty but kept"));
                }
                for (i, &w) in page.iter().enumerate() {
                    let s = (d << DIR_SHIFT) | ((p as u64) << PAGE_BITS) | i as u64;
                    if w == 0 {
                        continue;
                    }
                    if s >= nsegs {
                        return Err(format!("segment {s} beyond size {} has a word", self.size));
                    }
                    match decode(w) {
                        Word::Unmapped => {}
                        Word::Irregular => {
                            if w != KIND_IRREGULAR {
                                return Err(format!("irregular segment {s} has stray bits"));
                            }
                            if !self.irregular.contains_key(&s) {
                                return Err(format!("irregular segment {s} has no entries"));
                            }
                        }
                        Word::Uniform(target, state) => {
                            let (b, e) = self.span(s);
                            let entry = Entry {
                                begin: b,
                                end: e,
                                target,
                                state,
                            };
                            if let Some(d) = entry.defect(self.size) {
                                return Err(format!("segment {s}: {d}"));
                            }
                            if target.is_none() && w != state_code(state) {
                                return Err(format!("segment {s} has a stray target"));
                            }
                        }
                    }
                }
            }
        }
        for (&s, list) in &self.irregular {
            if self.word(s) != KIND_IRREGULAR {
                return Err(format!(
                    "side entries of segment {s}, which is not irregular"
                ));
            }
            let (b, e) = self.span(s);
            if let Some(x) = list.iter().find(|x| x.begin < b || x.end > e) {
                return Err(format!(
                    "entry {}..{} outside its segment {s} ({b}..{e})",
                    x.begin, x.end
                ));
            }
            if let Some(d) = list_defects(self.size, list).into_iter().next() {
                return Err(format!("segment {s}: {d}"));
            }
            match list.as_slice() {
                [] => return Err(format!("irregular segment {s} has no entries")),
                [x] if x.begin == b && x.end == e && encode(x.target, x.state).is_some() => {
                    return Err(format!("irregular segment {s} fits a word"));
                }
                _ => {}
            }
        }
        let entries: Vec<Entry> = self.entries().collect();
        match list_defects(self.size, &entries).into_iter().next() {
            Some(d) => Err(d),
            None => Ok(()),
        }
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

    /// The blocks of segment `s` inside the table.
    #[inline]
    fn span(&self, s: u64) -> (u64, u64) {
        let b = s * self.seg;
        (b, b.saturating_add(self.seg).min(self.size))
    }

    /// The word of segment `s` (unmapped where no page holds it).
    #[inline]
    fn word(&self, s: u64) -> u64 {
        match self.page_at(s) {
            Ok(page) => page[(s & PAGE_MASK) as usize],
            Err(_) => 0,
        }
    }

    /// The page holding segment `s`, or the next segment that may have one.
    #[inline]
    fn page_at(&self, s: u64) -> Result<&Page, u64> {
        let dir = self.dirs.get(s >> DIR_SHIFT).map_err(|next| {
            // The first segment of the next directory that may exist.
            next.map_or(u64::MAX, |d| d << DIR_SHIFT)
        })?;
        match &dir[((s >> PAGE_BITS) & PAGE_MASK) as usize] {
            Some(page) => Ok(page),
            None => Err((s | PAGE_MASK).saturating_add(1)),
        }
    }

    /// The word of segment `s`, allocating its directory and page.
    fn slot(&mut self, s: u64) -> &mut u64 {
        let dir = self.dirs.get_or_insert(s >> DIR_SHIFT);
        let page = dir[((s >> PAGE_BITS) & PAGE_MASK) as usize]
            .get_or_insert_with(|| Box::new([0; PAGE_WORDS]));
        &mut page[(s & PAGE_MASK) as usize]
    }

    fn set_word(&mut self, s: u64, w: u64) {
        if self.word(s) == KIND_IRREGULAR && w != KIND_IRREGULAR {
            self.irregular.remove(&s);
        }
        if w != 0 || self.page_at(s).is_ok() {
            *self.slot(s) = w;
        }
    }

    /// Makes segment `s` hold exactly `e`, which spans it.
    fn write_whole(&mut self, s: u64, e: Entry) {
        match encode(e.target, e.state) {
            Some(w) => self.set_word(s, w),
            None => {
                self.set_word(s, KIND_IRREGULAR);
                self.irregular.insert(s, vec![e]);
            }
        }
    }

    /// Appends the entries of segment `s` (clipped to it) to `out`.
    fn seg_entries(&self, s: u64, out: &mut Vec<Entry>) {
        match decode(self.word(s)) {
            Word::Unmapped => {}
            Word::Uniform(target, state) => {
                let (begin, end) = self.span(s);
                out.push(Entry {
                    begin,
                    end,
                    target,
                    state,
                });
            }
            Word::Irregular => {
                if let Some(list) = self.irregular.get(&s) {
                    out.extend_from_slice(list);
                }
            }
        }
    }

    /// Stores the content of segment `s` in canonical form: `list` is sorted, disjoint and
    /// inside the segment, possibly unmerged.
    fn store(&mut self, s: u64, list: &[Entry]) {
        let mut merged: Vec<Entry> = Vec::with_capacity(list.len());
        for e in list {
            push_merged(&mut merged, *e);
        }
        let (b, e) = self.span(s);
        let word = match merged.as_slice() {
            [] => Some(0),
            [x] if x.begin == b && x.end == e => encode(x.target, x.state),
            _ => None,
        };
        match word {
            Some(w) => self.set_word(s, w),
            None => {
                self.set_word(s, KIND_IRREGULAR);
                self.irregular.insert(s, merged);
            }
        }
    }

    /// Unmaps `[begin, end)` (a valid range) and frees pages left empty.
    fn unmap(&mut self, begin: u64, end: u64) {
        let last = (end - 1) / self.seg;
        let first = begin / self.seg;
        let mut s = first;
        while s <= last {
            if let Err(next) = self.page_at(s) {
                s = next;
                continue;
            }
            let (sb, se) = self.span(s);
            if begin <= sb && se <= end {
                self.set_word(s, 0);
            } else if self.word(s) != 0 {
                let mut list = Vec::new();
                self.seg_entries(s, &mut list);
                let mut out = Vec::with_capacity(list.len() + 1);
                for x in &list {
                    out.extend(clip(x, x.begin, begin));
                    out.extend(clip(x, end, x.end));
                }
                self.store(s, &out);
            }
            s += 1;
        }
        self.release(first, last);
    }

    /// Clears every segment from `s` on.
    fn truncate_segments(&mut self, s: u64) {
        drop(self.irregular.split_off(&s));
        let d = s >> DIR_SHIFT;
        self.dirs.truncate(d);
        if let Some(dir) = self.dirs.get_mut(d) {
            let p = ((s >> PAGE_BITS) & PAGE_MASK) as usize;
            for page in &mut dir[p + 1..] {
                *page = None;
            }
            if let Some(page) = dir[p].as_mut() {
                page[(s & PAGE_MASK) as usize..].fill(0);
            }
        }
        self.release(s, s);
    }

    /// Frees the pages of segments `first..=last` that hold no word, and their directories if
    /// left empty. Visits only the directories present in the range.
    fn release(&mut self, first: u64, last: u64) {
        let (d0, d1) = (first >> DIR_SHIFT, last >> DIR_SHIFT);
        for d in self.dirs.present(d0, d1) {
            let dir = self.dirs.get_mut(d).expect("present");
            let p0 = if d == d0 {
                (first >> PAGE_BITS) & PAGE_MASK
            } else {
                0
            };
            let p1 = if d == d1 {
                (last >> PAGE_BITS) & PAGE_MASK
            } else {
                PAGE_MASK
            };
            for page in &mut dir[p0 as usize..=p1 as usize] {
                if page.as_ref().is_some_and(|p| p.iter().all(|&w| w == 0)) {
                    *page = None;
                }
            }
            if dir.iter().all(Option::is_none) {
                self.dirs.remove(d);
            }
        }
    }
}

/// The directories of a [`SegmentTable`]: the first [`DENSE_DIRS`] by index in a vector
/// (trailing `None`s trimmed, so a small table's vector is as long as it needs), the rest in
/// an ordered map. Neither ever holds a directory that is all unmapped for long: `release`
/// drops them.
#[derive(Clone, Default)]
struct Dirs {
    dense: Vec<Option<Box<Dir>>>,
    far: BTreeMap<u64, Box<Dir>>,
}

impl Dirs {
    /// Directory `d`, or the number of the next directory at or after `d` that may exist.
    #[inline]
    fn get(&self, d: u64) -> Result<&Dir, Option<u64>> {
        if d < DENSE_DIRS {
            match self.dense.get(d as usize) {
                Some(Some(dir)) => Ok(dir),
                Some(None) => Err(Some(d + 1)),
                None => Err(self.far.keys().next().copied()),
            }
        } else {
            match self.far.get(&d) {
                Some(dir) => Ok(dir),
                None => Err(self.far.range(d..).next().map(|(&k, _)| k)),
            }
        }
    }

    #[inline]
    fn get_mut(&mut self, d: u64) -> Option<&mut Dir> {
        if d < DENSE_DIRS {
            self.dense.get_mut(d as usize)?.as_deref_mut()
        } else {
            self.far.get_mut(&d).map(|b| &mut **b)
        }
    }

    #[inline]
    fn get_or_insert(&mut self, d: u64) -> &mut Dir {
        let new = || Box::new([const { None }; PAGE_WORDS]);
        if d < DENSE_DIRS {
            let i = d as usize;
            if self.dense.len() <= i {
                self.dense.resize_with(i + 1, || None);
            }
            self.dense[i].get_or_insert_with(new)
        } else {
            self.far.entry(d).or_insert_with(new)
        }
    }

    fn remove(&mut self, d: u64) {
        if d < DENSE_DIRS {
            if let Some(slot) = self.dense.get_mut(d as usize) {
                *slot = None;
            }
            self.trim();
        } else {
            self.far.remove(&d);
            if self.far.is_empty() {
                // An emptied B-tree may keep its root node.
                self.far = BTreeMap::new();
            }
        }
    }

    /// Drops every directory after `d`.
    fn truncate(&mut self, d: u64) {
        if d < DENSE_DIRS {
            self.dense.truncate(d as usize + 1);
            self.trim();
            self.far = BTreeMap::new();
        } else {
            drop(self.far.split_off(&(d + 1)));
            if self.far.is_empty() {
                self.far = BTreeMap::new();
            }
        }
    }

    /// Drops trailing `None`s, and the vector's buffer when nothing is left.
    fn trim(&mut self) {
        while matches!(self.dense.last(), Some(None)) {
            self.dense.pop();
        }
        if self.dense.is_empty() {
            self.dense = Vec::new();
        }
    }

    /// The numbers of the directories present in `d0..=d1`, in order.
    fn present(&self, d0: u64, d1: u64) -> Vec<u64> {
        let dense = (d0..=d1.min(DENSE_DIRS - 1))
            .take_while(|&d| (d as usize) < self.dense.len())
            .filter(|&d| self.dense[d as usize].is_some());
        let far_from = d0.max(DENSE_DIRS);
        let far = (far_from <= d1)
            .then(|| self.far.range(far_from..=d1).map(|(&k, _)| k))
            .into_iter()
            .flatten();
        dense.chain(far).collect()
    }

    /// Every directory present, with its number, in order.
    fn iter(&self) -> impl Iterator<Item = (u64, &Dir)> {
        let dense = self
            .dense
            .iter()
            .enumerate()
            .filter_map(|(d, dir)| Some((d as u64, &**dir.as_ref()?)));
        dense.chain(self.far.iter().map(|(&d, dir)| (d, &**dir)))
    }

    /// Heap bytes of the vector and the map's nodes (estimated: a key and a pointer in a
    /// B-tree leaf about two-thirds full); the directories themselves are not counted.
    fn heap_bytes(&self) -> usize {
        self.dense.capacity() * size_of::<Option<Box<Dir>>>()
            + self.far.len() * (size_of::<u64>() + size_of::<Box<Dir>>()) * 3 / 2
    }
}

impl PartialEq for SegmentTable {
    /// Equal content: same size and entries, whatever the segment sizes.
    fn eq(&self, other: &SegmentTable) -> bool {
        self.size == other.size && self.entries().eq(other.entries())
    }
}

impl Eq for SegmentTable {}

impl fmt::Debug for SegmentTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentTable")
            .field("size", &self.size)
            .field("segment_blocks", &self.seg)
            .field("irregular_segments", &self.irregular.len())
            .field("heap_bytes", &self.heap_bytes())
            .finish()
    }
}

/// Per-segment entries of `[begin, end)`, clipped to it, unmerged across segments.
struct Raw<'a> {
    t: &'a SegmentTable,
    begin: u64,
    end: u64,
    /// Next segment to read, and the end of the segments to read.
    s: u64,
    s_end: u64,
    /// The rest of the current irregular segment's entries.
    irr: std::slice::Iter<'a, Entry>,
}

impl Iterator for Raw<'_> {
    type Item = Entry;

    fn next(&mut self) -> Option<Entry> {
        loop {
            if let Some(e) = self.irr.next() {
                match clip(e, self.begin, self.end) {
                    Some(c) => return Some(c),
                    None => continue,
                }
            }
            if self.s >= self.s_end {
                return None;
            }
            let s = self.s;
            let w = match self.t.page_at(s) {
                Ok(page) => page[(s & PAGE_MASK) as usize],
                Err(next) => {
                    self.s = next;
                    continue;
                }
            };
            self.s += 1;
            match decode(w) {
                Word::Unmapped => {}
                Word::Uniform(target, state) => {
                    let (begin, end) = self.t.span(s);
                    let e = Entry {
                        begin,
                        end,
                        target,
                        state,
                    };
                    if let Some(c) = clip(&e, self.begin, self.end) {
                        return Some(c);
                    }
                }
                Word::Irregular => {
                    self.irr = self
                        .t
                        .irregular
                        .get(&s)
                        .map(|v| v.iter())
                        .unwrap_or_default();
                }
            }
        }
    }
}

/// The merged entries of a [`SegmentTable`] (or of a range of it, clipped), in order.
pub struct Entries<'a> {
    raw: Raw<'a>,
    pending: Option<Entry>,
}

impl Iterator for Entries<'_> {
    type Item = Entry;

    fn next(&mut self) -> Option<Entry> {
        for e in self.raw.by_ref() {
            match &mut self.pending {
                Some(p) if p.merges_with(&e) => p.end = e.end,
                _ => {
                    if let Some(p) = self.pending.replace(e) {
                        return Some(p);
                    }
                }
            }
        }
        self.pending.take()
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
    fn words_round_trip() {
        for state in State::ALL {
            for target in [
                None,
                phys(0, 0),
                phys(1, 12345),
                phys((1 << CONTAINER_BITS) - 1, (1 << BLOCK_BITS) - 1),
            ] {
                if target.is_none() && state == State::Zero {
                    continue;
                }
                let w = encode(target, state).unwrap();
                assert_ne!(w, 0);
                assert_ne!(w & KIND_MASK, KIND_IRREGULAR);
                assert_eq!(decode(w), Word::Uniform(target, state));
            }
            assert_eq!(encode(phys(1 << CONTAINER_BITS, 0), state), None);
            assert_eq!(encode(phys(0, 1 << BLOCK_BITS), state), None);
            assert_eq!(encode(phys(u32::MAX, u64::MAX), state), None);
        }
    }

    #[test]
    fn whole_segments_are_words_and_merge_in_entries() {
        let mut t = SegmentTable::new(1024, 256);
        t.set(0, 256, phys(1, 0), State::Normal).unwrap();
        t.set(256, 512, phys(1, 256), State::Normal).unwrap();
        assert_eq!(t.len(), 1);
        t.set(512, 768, phys(1, 1000), State::Normal).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.irregular_segments(), 0);
        t.validate().unwrap();
        assert_eq!(
            t.lookup(100, 101),
            vec![Piece {
                begin: 100,
                end: 101,
                target: phys(1, 100),
                state: State::Normal
            }]
        );
        // One piece across the two merged segments, then the third, then a gap.
        let p = t.lookup(200, 800);
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].begin, p[0].end, p[0].target),
            (200, 512, phys(1, 200))
        );
        assert_eq!(
            (p[1].begin, p[1].end, p[1].target),
            (512, 768, phys(1, 1000))
        );
        assert_eq!((p[2].begin, p[2].end, p[2].state), (768, 800, State::Zero));
    }

    #[test]
    fn sub_segment_and_unpackable_pieces_go_irregular_and_back() {
        let mut t = SegmentTable::new(64, 16);
        t.set(0, 8, phys(1, 0), State::Normal).unwrap();
        assert_eq!(t.irregular_segments(), 1);
        t.set(8, 16, phys(1, 8), State::Normal).unwrap();
        assert_eq!(
            t.irregular_segments(),
            0,
            "the two halves merge into a word"
        );
        t.set(16, 32, phys(40000, 0), State::New).unwrap();
        assert_eq!(t.irregular_segments(), 1, "container beyond 15 bits");
        t.set(16, 32, phys(2, 0), State::New).unwrap();
        assert_eq!(t.irregular_segments(), 0);
        t.validate().unwrap();
        t.remove(0, 64).unwrap();
        assert!(t.is_empty());
        assert_eq!(t.heap_bytes(), 0, "pages of an emptied table are freed");
    }

    #[test]
    fn partial_last_segment_and_resize() {
        let mut t = SegmentTable::new(20, 8);
        t.set(16, 20, phys(1, 0), State::Normal).unwrap();
        assert_eq!(
            t.irregular_segments(),
            0,
            "the partial last segment is one word"
        );
        t.resize(24);
        assert_eq!(t.irregular_segments(), 1, "now it covers half its segment");
        assert_eq!(t.lookup(20, 24)[0].state, State::Zero);
        t.resize(18);
        assert_eq!(t.irregular_segments(), 0);
        assert_eq!(t.mapped_blocks(), 2);
        t.validate().unwrap();
    }

    #[test]
    fn huge_sparse_table_costs_little() {
        // 1 PiB at 64 KiB segments: 2^34 segments.
        let size = 1u64 << 38;
        let mut t = SegmentTable::new(size, 16);
        t.set(size - 16, size, phys(1, 0), State::Normal).unwrap();
        t.set(0, 16, phys(1, 16), State::Normal).unwrap();
        assert!(t.heap_bytes() < 1 << 20, "{}", t.heap_bytes());
        assert_eq!(t.len(), 2);
        t.set_mapped_state(0, size, State::New).unwrap();
        assert_eq!(t.lookup(size - 1, size)[0].state, State::New);
        t.remove(0, size).unwrap();
        assert_eq!(t.heap_bytes(), 0);
    }

    /// The largest vdisk `create` accepts is 4096 PiB: 2^50 blocks, 2^42 segments of 1 MiB.
    const LARGEST: u64 = 1 << 50;

    #[test]
    fn one_write_at_the_end_of_the_largest_vdisk_costs_little() {
        // Issue 17, finding 4: the top level was a Vec indexed by `segment >> 18`, so one
        // segment at the end of 2^42 cost 2^24 pointers (128 MiB) until the table was dropped.
        for seg in [256, 1] {
            let mut t = SegmentTable::new(LARGEST, seg);
            t.set(LARGEST - 1, LARGEST, phys(1, 0), State::Normal)
                .unwrap();
            assert!(
                t.heap_bytes() < 1 << 20,
                "segments of {seg} blocks: {} bytes",
                t.heap_bytes()
            );
            assert_eq!(t.lookup(LARGEST - 1, LARGEST)[0].target, phys(1, 0));
            assert_eq!(t.lookup(LARGEST - 2, LARGEST - 1)[0].target, None);
            // A write near the start, then one in every 2^k-th directory: each costs its
            // own pages and directory, never the space between them.
            t.set(0, 1, phys(1, 1), State::Normal).unwrap();
            let segs = LARGEST / seg;
            let mut k = 18;
            while (1u64 << k) < segs {
                let b = (1u64 << k) * seg;
                t.set(b, b + 1, phys(1, 2 + k), State::Normal).unwrap();
                k += 1;
            }
            assert!(t.heap_bytes() < 1 << 20, "{} bytes", t.heap_bytes());
            assert_eq!(t.entries().count() as u64, 2 + k - 18);
            t.validate().unwrap();
            // Walking the whole table skips the space between them.
            assert_eq!(t.mapped_blocks(), 2 + k - 18);
            t.set_mapped_state(0, LARGEST, State::New).unwrap();
            assert!(t.entries().all(|e| e.state == State::New));
            t.resize(LARGEST / 2);
            t.validate().unwrap();
            t.resize(LARGEST);
            t.remove(0, LARGEST).unwrap();
            assert!(t.is_empty());
            assert_eq!(t.heap_bytes(), 0);
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Set(u64, u64, Option<(u32, u64)>, State),
        Remove(u64, u64),
        Resize(u64),
        SetMappedState(u64, u64, State),
        Lookup(u64, u64),
    }

    /// Targets from a few containers, one of them too large for a word, and blocks that are
    /// segment-aligned, arbitrary, or too large for a word.
    fn target() -> impl Strategy<Value = Option<(u32, u64)>> {
        let container = proptest::sample::select(vec![0u32, 1, (1 << CONTAINER_BITS) - 1, 40000]);
        let block = prop_oneof![
            3 => (0u64..8).prop_map(|x| x * 4),
            2 => 0u64..40,
            1 => (0u64..8).prop_map(|x| (1 << BLOCK_BITS) + x * 4),
        ];
        proptest::option::weighted(0.85, (container, block))
    }

    fn op() -> impl Strategy<Value = Op> {
        let state = || proptest::sample::select(State::ALL.to_vec());
        prop_oneof![
            5 => (0u64..48, 0u64..20, target(), state())
                .prop_map(|(b, l, t, s)| Op::Set(b, b + l, t, s)),
            2 => (0u64..48, 0u64..20).prop_map(|(b, l)| Op::Remove(b, b + l)),
            1 => (0u64..52).prop_map(Op::Resize),
            2 => (0u64..48, 0u64..40, state()).prop_map(|(b, l, s)| Op::SetMappedState(b, b + l, s)),
            2 => (0u64..52, 0u64..30).prop_map(|(b, l)| Op::Lookup(b, b + l)),
        ]
    }

    fn segment() -> impl Strategy<Value = u64> {
        prop_oneof![4 => Just(4u64), 1 => Just(1u64), 1 => Just(3u64), 1 => Just(16u64)]
    }

    fn to_phys(t: Option<(u32, u64)>) -> Option<Phys> {
        t.and_then(|(c, b)| phys(c, b))
    }

    fn same(t: &SegmentTable, m: &MappingTable) -> Result<(), TestCaseError> {
        prop_assert_eq!(t.size(), m.size());
        prop_assert_eq!(
            t.entries().collect::<Vec<_>>(),
            m.entries().collect::<Vec<_>>()
        );
        prop_assert_eq!(t.len(), m.len());
        prop_assert_eq!(t.is_empty(), m.is_empty());
        prop_assert_eq!(t.mapped_blocks(), m.mapped_blocks());
        prop_assert_eq!(t.lookup(0, t.size() + 3), m.lookup(0, m.size() + 3));
        prop_assert_eq!(t.validate(), Ok(()));
        prop_assert_eq!(m.validate(), Ok(()));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every edit gives the same result (and the same error) as on a MappingTable, and
        /// the tables then hold the same entries and answer every lookup alike.
        #[test]
        fn matches_mapping_table(
            seg in segment(),
            size in 0u64..48,
            ops in proptest::collection::vec(op(), 1..50),
        ) {
            let mut t = SegmentTable::new(size, seg);
            let mut m = MappingTable::new(size);
            for op in ops {
                match op {
                    Op::Set(b, e, target, state) => {
                        let target = to_phys(target);
                        prop_assert_eq!(t.set(b, e, target, state), m.set(b, e, target, state));
                    }
                    Op::Remove(b, e) => prop_assert_eq!(t.remove(b, e), m.remove(b, e)),
                    Op::Resize(n) => {
                        t.resize(n);
                        m.resize(n);
                    }
                    Op::SetMappedState(b, e, s) => {
                        prop_assert_eq!(t.set_mapped_state(b, e, s), m.set_mapped_state(b, e, s));
                    }
                    Op::Lookup(b, e) => {
                        prop_assert_eq!(t.lookup(b, e), m.lookup(b, e));
                        prop_assert_eq!(t.entries_in(b, e), m.entries_in(b, e));
                        let mut pieces = Vec::new();
                        t.for_each_piece(b, e, |p| pieces.push(p));
                        prop_assert_eq!(pieces, m.lookup(b, e));
                    }
                }
                same(&t, &m)?;
            }
            // Every single-block and every in-segment lookup (the hot path's shape).
            for b in 0..t.size() {
                prop_assert_eq!(t.lookup(b, b + 1), m.lookup(b, b + 1));
                let e = (b / seg + 1) * seg;
                prop_assert_eq!(t.lookup(b, e), m.lookup(b, e));
            }
            prop_assert_eq!(&t.to_mapping_table(), &m);
            let rebuilt = SegmentTable::from_entries(t.size(), seg, m.entries()).unwrap();
            prop_assert_eq!(&rebuilt, &t);
            same(&rebuilt, &m)?;
        }

        /// The same comparison in a table of 2^50 blocks, with edits clustered at its start,
        /// around the end of the first directory, around the boundary between the indexed
        /// directories and the mapped ones, far out and at the end, and removals and state
        /// changes spanning clusters: the sparse upper level behaves like the dense one.
        #[test]
        fn matches_mapping_table_across_far_directories(
            seg in prop_oneof![Just(1u64), Just(4u64), Just(256u64)],
            ops in proptest::collection::vec(
                (0usize..6, 0usize..6, op()),
                1..40,
            ),
        ) {
            let size = LARGEST;
            let bases = |seg: u64| {
                let dir = seg << DIR_SHIFT;
                [0, dir - 24, DENSE_DIRS * dir - 24, 1 << 44, size / 2 + 3, size - 52]
            };
            let base = bases(seg);
            let mut t = SegmentTable::new(size, seg);
            let mut m = MappingTable::new(size);
            for (i, j, op) in ops {
                let (a, z) = (base[i], base[j].max(base[i]));
                match op {
                    Op::Set(b, e, target, state) => {
                        let target = to_phys(target);
                        let (b, e) = (a + b, a + e);
                        prop_assert_eq!(t.set(b, e, target, state), m.set(b, e, target, state));
                    }
                    Op::Remove(b, e) => {
                        let (b, e) = (a + b, z + e);
                        prop_assert_eq!(t.remove(b, e), m.remove(b, e));
                    }
                    Op::Resize(n) => {
                        // Shrinks and grows back, cutting wherever a cluster is.
                        t.resize(a + n);
                        m.resize(a + n);
                        t.resize(size);
                        m.resize(size);
                    }
                    Op::SetMappedState(b, e, s) => {
                        let (b, e) = (a + b, z + e);
                        prop_assert_eq!(t.set_mapped_state(b, e, s), m.set_mapped_state(b, e, s));
                    }
                    Op::Lookup(b, e) => {
                        let (b, e) = (a + b, z + e);
                        prop_assert_eq!(t.lookup(b, e), m.lookup(b, e));
                        prop_assert_eq!(t.entries_in(b, e), m.entries_in(b, e));
                    }
                }
                same(&t, &m)?;
            }
            for &b in &base {
                prop_assert_eq!(t.lookup(b, b + 64), m.lookup(b, b + 64));
            }
            let rebuilt = SegmentTable::from_entries(size, seg, m.entries()).unwrap();
            prop_assert_eq!(&rebuilt, &t);
            prop_assert!(t.heap_bytes() < 1 << 20, "{} bytes", t.heap_bytes());
            t.remove(0, size).unwrap();
            prop_assert_eq!(t.heap_bytes(), 0);
        }

        /// `from_entries` agrees with MappingTable's on arbitrary entry lists (valid or not,
        /// sorted or not), on a table's own entries and on those entries cut at every
        /// segment boundary.
        #[test]
        fn from_entries_matches_mapping_table(
            seg in segment(),
            size in 1u64..48,
            raw in proptest::collection::vec(
                (0u64..50, 0u64..14, target(), proptest::sample::select(State::ALL.to_vec())),
                0..12,
            ),
            ops in proptest::collection::vec(op(), 0..30),
        ) {
            let raw: Vec<Entry> = raw
                .into_iter()
                .map(|(b, l, t, s)| Entry { begin: b, end: b + l, target: to_phys(t), state: s })
                .collect();
            let got = SegmentTable::from_entries(size, seg, raw.clone());
            let want = MappingTable::from_entries(size, raw.clone());
            match (&got, &want) {
                (Ok(t), Ok(m)) => same(t, m)?,
                (Err(a), Err(b)) => prop_assert_eq!(a, b),
                _ => prop_assert!(false, "{:?} vs {:?}", got, want),
            }

            let mut m = MappingTable::new(size);
            for op in ops {
                match op {
                    Op::Set(b, e, target, state) => {
                        let _ = m.set(b, e, to_phys(target), state);
                    }
                    Op::Remove(b, e) => {
                        let _ = m.remove(b, e);
                    }
                    Op::SetMappedState(b, e, s) => {
                        let _ = m.set_mapped_state(b, e, s);
                    }
                    Op::Resize(_) | Op::Lookup(..) => {}
                }
            }
            let canonical: Vec<Entry> = m.entries().collect();
            let cut: Vec<Entry> = canonical
                .iter()
                .flat_map(|e| {
                    (e.begin / seg..=(e.end - 1) / seg)
                        .filter_map(move |s| clip(e, s * seg, (s + 1) * seg))
                })
                .collect();
            same(&SegmentTable::from_entries(size, seg, canonical.clone()).unwrap(), &m)?;
            same(&SegmentTable::from_entries(size, seg, cut.clone()).unwrap(), &m)?;
            // A well-formed prefix, then anything: written directly up to the first entry
            // that breaks the order or is invalid, then applied one by one.
            let mixed: Vec<Entry> = cut.into_iter().chain(raw.iter().copied()).collect();
            let got = SegmentTable::from_entries(size, seg, mixed.clone());
            let want = MappingTable::from_entries(size, mixed);
            match (&got, &want) {
                (Ok(t), Ok(m)) => same(t, m)?,
                (Err(a), Err(b)) => prop_assert_eq!(a, b),
                _ => prop_assert!(false, "{:?} vs {:?}", got, want),
            }
        }
    }
}
