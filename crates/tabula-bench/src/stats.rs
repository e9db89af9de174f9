//! Percentiles, medians and a small deterministic shuffle (no dependency on `rand`).

use std::time::Duration;

/// The `q` quantile (0..=1) of sorted samples, nearest-rank.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    if s.is_empty() {
        return Duration::ZERO;
    }
    s[(s.len() - 1) / 2]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// xorshift64*: reproducible orders from a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Prints `done` every 10 s while a long build runs (abort the handle when it ends).
pub fn report_progress(
    label: &'static str,
    unit: &'static str,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    started: std::time::Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let d = done.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!(
                "{label}: {d} {unit} after {:.0} s ({} faults/s over the last 10 s)",
                started.elapsed().as_secs_f64(),
                (d - last) / 10
            );
            last = d;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile(&v, 0.5), 500);
        assert_eq!(quantile(&v, 0.99), 990);
        assert_eq!(quantile(&v, 0.999), 999);
        assert_eq!(quantile(&v, 1.0), 1000);
        assert_eq!(quantile(&[7], 0.999), 7);
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u64> = (0..10_000).collect();
        Rng::new(3).shuffle(&mut v);
        assert_ne!(v, (0..10_000).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..10_000).collect::<Vec<_>>());
    }
}
