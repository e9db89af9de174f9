//! Microbenchmarks of the mapping table on the I/O path: splitting one I/O into the pieces it
//! covers (`for_each_piece`, what the agent does for every read and write; `lookup`, its
//! allocating form) and installing one segment (`set`, what a fault's answer does), on tables
//! of a thousand and a million entries.
//!
//!   cargo bench -p tabula-core --bench table            # ~20 s
//!   cargo bench -p tabula-core --bench table -- --quick # a few seconds
//!   cargo bench -p tabula-core --bench table -- lookup_4k   # one family

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use tabula_core::{ContainerId, Entry, MappingTable, Phys, State};

/// Blocks per 1 MiB segment (4 KiB blocks).
const SEG: u64 = 256;

/// `n` fully mapped 1 MiB segments, none physically next to its virtual neighbour (as after
/// a random fill): `n` entries.
fn segmented(n: u64) -> MappingTable {
    let entries = (0..n).map(|i| Entry {
        begin: i * SEG,
        end: (i + 1) * SEG,
        target: Some(Phys {
            container: ContainerId(1),
            block: (n - 1 - i) * SEG,
        }),
        state: State::Normal,
    });
    MappingTable::from_entries(n * SEG, entries).expect("valid entries")
}

/// Every other 4 KiB block mapped: `n` entries separated by `n` gaps (4 KiB segments after
/// a sparse random fill): the most fragmented table there is.
fn sparse(n: u64) -> MappingTable {
    let entries = (0..n).map(|i| Entry {
        begin: 2 * i,
        end: 2 * i + 1,
        target: Some(Phys {
            container: ContainerId(1),
            block: 2 * i,
        }),
        state: State::Normal,
    });
    MappingTable::from_entries(2 * n, entries).expect("valid entries")
}

/// Pseudo-random block numbers below `limit` (xorshift; the same every run).
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

fn config<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(1));
    g
}

/// Splits `len` blocks at each offset in turn; `black_box` keeps the pieces alive.
fn split(t: &MappingTable, at: &[u64], len: u64) -> impl FnMut() {
    let mut i = 0;
    move || {
        let b = at[i % at.len()];
        i += 1;
        let mut pieces = 0u32;
        t.for_each_piece(b, b + len, |p| {
            black_box(p);
            pieces += 1;
        });
        black_box(pieces);
    }
}

fn bench_lookup(c: &mut Criterion) {
    for (label, n) in [("1k", 1_000u64), ("1M", 1_000_000)] {
        let seg = segmented(n);
        let fine = sparse(n);
        let mut g = config(c, &format!("table/{label}_entries"));
        // One 4 KiB I/O: one piece.
        let at = offsets(n * SEG, 1);
        let mut f = split(&seg, &at, 1);
        g.bench_function("lookup_4k", |b| b.iter(&mut f));
        // A 1 MiB I/O on a segment boundary: one piece.
        let at = offsets(n * SEG, SEG);
        let mut f = split(&seg, &at, SEG);
        g.bench_function("lookup_1m_aligned", |b| b.iter(&mut f));
        // A 1 MiB I/O across a segment boundary: two pieces.
        let at: Vec<u64> = offsets((n - 1) * SEG, SEG)
            .into_iter()
            .map(|b| b + SEG / 2)
            .collect();
        let mut f = split(&seg, &at, SEG);
        g.bench_function("lookup_1m_unaligned", |b| b.iter(&mut f));
        // The allocating form of the same.
        let mut i = 0;
        g.bench_function("lookup_vec_1m_unaligned", |b| {
            b.iter(|| {
                let s = at[i % at.len()];
                i += 1;
                black_box(seg.lookup(s, s + SEG))
            })
        });
        // A 1 MiB I/O over the sparse table: 256 pieces (128 mapped blocks, 128 gaps).
        let at = offsets(2 * n - SEG, 2);
        let mut f = split(&fine, &at, SEG);
        g.bench_function("lookup_1m_fragmented", |b| b.iter(&mut f));
        g.finish();
    }
}

fn bench_install(c: &mut Criterion) {
    for (label, n) in [("1k", 1_000u64), ("1M", 1_000_000)] {
        // Mapping one 4 KiB segment into a gap of the sparse table (a fault's answer), then
        // unmapping it again (a trim), so every iteration starts from the same table.
        let mut t = sparse(n);
        let at: Vec<u64> = offsets(2 * n, 2).into_iter().map(|b| b + 1).collect();
        let mut g = config(c, &format!("table/{label}_entries"));
        let mut i = 0;
        g.bench_function("set_and_remove_one_segment", |b| {
            b.iter(|| {
                let s = at[i % at.len()];
                i += 1;
                let target = Some(Phys {
                    container: ContainerId(2),
                    block: s,
                });
                t.set(s, s + 1, target, State::Normal).expect("in range");
                t.remove(s, s + 1).expect("in range");
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench_lookup, bench_install);
criterion_main!(benches);
