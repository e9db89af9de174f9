//! `SegmentTable` against `MappingTable` at a million non-mergeable 1 MiB segments: one 4 KiB
//! I/O split into its pieces (the agent's hot path), installing one whole segment (a fault's
//! answer), and building the table from its entries (a full resynchronisation).
//!
//!   cargo bench -p tabula-core --bench segtable             # ~15 s
//!   cargo bench -p tabula-core --bench segtable -- --quick  # a few seconds

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use tabula_core::{ContainerId, Entry, MappingTable, Phys, SegmentTable, State};

const N: u64 = 1_000_000;
/// Blocks per 1 MiB segment (4 KiB blocks).
const SEG: u64 = 256;

/// `N` fully mapped segments, none physically next to its virtual neighbour.
fn entries() -> Vec<Entry> {
    (0..N)
        .map(|i| Entry {
            begin: i * SEG,
            end: (i + 1) * SEG,
            target: Some(Phys {
                container: ContainerId(1),
                block: (i * 7919 % N) * SEG,
            }),
            state: State::Normal,
        })
        .collect()
}

/// Pseudo-random block numbers below `limit`, multiples of `align` (xorshift; the same every
/// run).
fn offsets(limit: u64, align: u64) -> Vec<u64> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (limit / align)) * align
        })
        .collect()
}

fn config<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(1));
    g
}

/// The operations both tables share, to run the same benchmark on each.
trait Table {
    fn pieces(&self, begin: u64, end: u64) -> u32;
    fn set_one(&mut self, begin: u64, end: u64, target: Phys);
}

impl Table for MappingTable {
    fn pieces(&self, begin: u64, end: u64) -> u32 {
        let mut n = 0;
        self.for_each_piece(begin, end, |p| {
            black_box(p);
            n += 1;
        });
        n
    }
    fn set_one(&mut self, begin: u64, end: u64, target: Phys) {
        self.set(begin, end, Some(target), State::Normal)
            .expect("in range");
    }
}

impl Table for SegmentTable {
    fn pieces(&self, begin: u64, end: u64) -> u32 {
        let mut n = 0;
        self.for_each_piece(begin, end, |p| {
            black_box(p);
            n += 1;
        });
        n
    }
    fn set_one(&mut self, begin: u64, end: u64, target: Phys) {
        self.set(begin, end, Some(target), State::Normal)
            .expect("in range");
    }
}

fn bench_one<T: Table>(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, t: &mut T) {
    // One 4 KiB I/O: one piece.
    let at = offsets(N * SEG, 1);
    let mut i = 0;
    g.bench_function("lookup_4k", |b| {
        b.iter(|| {
            let s = at[i % at.len()];
            i += 1;
            black_box(t.pieces(s, s + 1))
        })
    });
    // A 1 MiB I/O across a segment boundary: two pieces.
    let at2: Vec<u64> = offsets((N - 1) * SEG, SEG)
        .into_iter()
        .map(|b| b + SEG / 2)
        .collect();
    g.bench_function("lookup_1m_unaligned", |b| {
        b.iter(|| {
            let s = at2[i % at2.len()];
            i += 1;
            black_box(t.pieces(s, s + SEG))
        })
    });
    // Remapping one whole segment elsewhere (beyond every physical block in use, so it
    // never merges): the table keeps its million entries.
    let at = offsets(N * SEG, SEG);
    let mut k = 0u64;
    g.bench_function("set_one_segment", |b| {
        b.iter(|| {
            let s = at[(k as usize) % at.len()];
            k += 1;
            let target = Phys {
                container: ContainerId(2),
                block: (N + 2 * (k % N)) * SEG,
            };
            t.set_one(s, s + SEG, target);
        })
    });
}

fn bench_tables(c: &mut Criterion) {
    let e = entries();
    let mut m = MappingTable::from_entries(N * SEG, e.iter().copied()).expect("valid");
    let mut g = config(c, "segtable_vs_table/1M_segments/MappingTable");
    bench_one(&mut g, &mut m);
    g.finish();
    drop(m);
    let mut s = SegmentTable::from_entries(N * SEG, SEG, e.iter().copied()).expect("valid");
    let mut g = config(c, "segtable_vs_table/1M_segments/SegmentTable");
    bench_one(&mut g, &mut s);
    g.finish();
    drop(s);

    let mut g = config(c, "segtable_vs_table/1M_segments/from_entries");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(2));
    g.bench_function("MappingTable", |b| {
        b.iter(|| MappingTable::from_entries(N * SEG, e.iter().copied()).expect("valid"))
    });
    g.bench_function("SegmentTable", |b| {
        b.iter(|| SegmentTable::from_entries(N * SEG, SEG, e.iter().copied()).expect("valid"))
    });
    g.finish();
}

criterion_group!(benches, bench_tables);
criterion_main!(benches);
