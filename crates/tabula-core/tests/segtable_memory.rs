//! Heap cost per mapped segment of the agent's table copy at a million segments, counted by a
//! counting global allocator (exact bytes requested, without malloc's own overhead):
//! `SegmentTable` must stay within 16 bytes per segment; `MappingTable` is printed for
//! comparison.
//!
//!   cargo test -p tabula-core --test segtable_memory -- --nocapture
//!
//! One test only: the allocator counts every thread of this binary.

use std::alloc::System;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tabula_core::{ContainerId, Entry, MappingTable, Phys, SegmentTable, State};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const N: u64 = 1_000_000;
/// 1 MiB segments of 4 KiB blocks.
const SEG: u64 = 256;

/// Net heap bytes allocated by `f` and still held by what it returns.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let region = Region::new(GLOBAL);
    let out = f();
    let s = region.change();
    let net = s.bytes_allocated as isize - s.bytes_deallocated as isize + s.bytes_reallocated;
    (out, net.max(0) as usize)
}

/// Physical segment of virtual segment `i`: a permutation in which no two virtual neighbours
/// are physical neighbours (a stride coprime with N), so nothing merges: N entries.
fn phys_segment(i: u64) -> u64 {
    (i * 7919) % N
}

fn entry(i: u64) -> Entry {
    Entry {
        begin: i * SEG,
        end: (i + 1) * SEG,
        target: Some(Phys {
            container: ContainerId(3),
            block: phys_segment(i) * SEG,
        }),
        state: State::Normal,
    }
}

/// Virtual segments in a shuffled order (a different stride), as faults would fill them.
fn fill_order() -> impl Iterator<Item = u64> {
    (0..N).map(|k| (k * 104_729 + 17) % N)
}

#[test]
fn heap_bytes_per_segment_at_a_million_segments() {
    let entries: Vec<Entry> = (0..N).map(entry).collect();

    let (seg_bulk, seg_bulk_bytes) =
        measure(|| SegmentTable::from_entries(N * SEG, SEG, entries.iter().copied()).unwrap());
    assert_eq!(seg_bulk.len() as u64, N, "no two segments merge");
    assert_eq!(seg_bulk.irregular_segments(), 0);
    let (seg_faults, seg_faults_bytes) = measure(|| {
        let mut t = SegmentTable::new(N * SEG, SEG);
        for i in fill_order() {
            let e = entry(i);
            t.set(e.begin, e.end, e.target, e.state).unwrap();
        }
        t
    });
    assert!(seg_faults == seg_bulk);

    let (map_bulk, map_bulk_bytes) =
        measure(|| MappingTable::from_entries(N * SEG, entries.iter().copied()).unwrap());
    assert_eq!(map_bulk.len() as u64, N);
    let (map_faults, map_faults_bytes) = measure(|| {
        let mut t = MappingTable::new(N * SEG);
        for i in fill_order() {
            let e = entry(i);
            t.set(e.begin, e.end, e.target, e.state).unwrap();
        }
        t
    });
    assert!(map_faults == map_bulk);
    assert!(seg_bulk.entries().eq(map_bulk.entries()));

    let per = |b: usize| b as f64 / N as f64;
    println!("heap bytes per segment, {N} non-mergeable 1 MiB segments:");
    println!(
        "  SegmentTable from_entries {:6.2}  (heap_bytes() says {:.2})",
        per(seg_bulk_bytes),
        per(seg_bulk.heap_bytes())
    );
    println!("  SegmentTable set x N      {:6.2}", per(seg_faults_bytes));
    println!("  MappingTable from_entries {:6.2}", per(map_bulk_bytes));
    println!("  MappingTable set x N      {:6.2}", per(map_faults_bytes));

    for (what, bytes) in [
        ("from_entries", seg_bulk_bytes),
        ("set x N", seg_faults_bytes),
    ] {
        assert!(
            bytes as u64 <= 16 * N,
            "SegmentTable {what}: {:.2} bytes per segment",
            per(bytes)
        );
    }
    // The capacity-based count agrees with the allocator's for a table without irregular
    // segments.
    assert_eq!(seg_bulk.heap_bytes(), seg_bulk_bytes);
    assert_eq!(seg_faults.heap_bytes(), seg_faults_bytes);
}
