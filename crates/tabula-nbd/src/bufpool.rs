//! Reuse of large I/O buffers between requests.
//!
//! Why: a 1 MiB read or write payload allocated fresh for every request costs the kernel
//! page faults, page clearing and unmapping whenever the allocator gives the memory back
//! (about 7 % of the CPU of sequential 1 MiB reads in the profile in BENCHMARKS.md).
//! Buffers are matched by exact capacity: readers rely on `Vec::with_capacity(len)`
//! leaving exactly `len` bytes of spare room, and a workload reuses a few sizes.

use std::sync::Mutex;

/// Smaller buffers are cheap to allocate and not kept.
const MIN_POOLED: usize = 64 << 10;
/// At most this many buffers are kept (with capacity up to MAX_POOLED each).
const MAX_BUFFERS: usize = 64;
const MAX_POOLED: usize = 4 << 20;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer with capacity exactly `len`: a pooled one if there is one.
pub fn take(len: usize) -> Vec<u8> {
    if (MIN_POOLED..=MAX_POOLED).contains(&len) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = pool.iter().rposition(|b| b.capacity() == len) {
            return pool.swap_remove(i);
        }
    }
    Vec::with_capacity(len)
}

/// Gives a buffer back for reuse (its contents are dropped, not read again).
pub fn give(mut buf: Vec<u8>) {
    if !(MIN_POOLED..=MAX_POOLED).contains(&buf.capacity()) {
        return;
    }
    buf.clear();
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < MAX_BUFFERS {
        pool.push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_with_their_exact_capacity() {
        // A size no other test uses, so that parallel tests do not interfere.
        let len = MIN_POOLED + 12345;
        let mut b = take(len);
        assert_eq!(b.capacity(), len);
        b.extend_from_slice(&[7u8; 100]);
        let ptr = b.as_ptr();
        give(b);
        let again = take(len);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), len);
        assert_eq!(again.as_ptr(), ptr, "the buffer given back is reused");
        // Other sizes get their own buffers; small ones are never pooled.
        assert_eq!(take(len + 4096).capacity(), len + 4096);
        let small = take(512);
        give(small);
        assert_eq!(take(512).capacity(), 512);
    }
}
