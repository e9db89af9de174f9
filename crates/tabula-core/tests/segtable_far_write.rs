//! Issue 17, finding 4: one 4 KiB write at the end of the largest vdisk (4096 PiB) must cost
//! the agent's table copy little memory, not memory in proportion to the offset. Counted by a
//! counting global allocator (exact bytes requested), so `heap_bytes()` cannot hide anything.
//!
//! One test only: the allocator counts every thread of this binary.

use std::alloc::System;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tabula_core::{ContainerId, Phys, SegmentTable, State};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// 4096 PiB in 4 KiB blocks: the largest size `vdisk create` accepts.
const LARGEST: u64 = 1 << 50;

/// Net heap bytes allocated by `f` and still held afterwards.
fn net(f: impl FnOnce()) -> isize {
    let region = Region::new(GLOBAL);
    f();
    let s = region.change();
    s.bytes_allocated as isize - s.bytes_deallocated as isize + s.bytes_reallocated
}

#[test]
fn one_block_at_the_end_of_the_largest_vdisk_costs_under_a_mebibyte() {
    let target = |block| {
        Some(Phys {
            container: ContainerId(1),
            block,
        })
    };
    // Default 1 MiB segments (2^42 of them) and 4 KiB segments (2^50).
    for seg in [256, 1] {
        let mut t = SegmentTable::new(LARGEST, seg);
        // A write near the start first, as a vdisk in use has.
        t.set(0, 1, target(0), State::Normal).unwrap();
        let far = net(|| {
            t.set(LARGEST - 1, LARGEST, target(8), State::Normal)
                .unwrap()
        });
        assert!(
            far < 1 << 20,
            "segments of {seg} blocks: one block at the end cost {far} bytes"
        );
        println!("segments of {seg} blocks: one block at the end costs {far} bytes");
        assert!(t.heap_bytes() < 1 << 20, "{}", t.heap_bytes());
        let back = net(|| t.remove(LARGEST - 1, LARGEST).unwrap());
        assert_eq!(back, -far, "unmapping it gives it all back");
    }
}
