//! The agent's lease: the time until which the controller counts on this agent to use its
//! table copies, and after which the agent stops I/O on its own (see the controller's
//! `agents` module for the other half).
//!
//! The deadline is kept in a monotonic clock, which keeps running while the process is
//! stopped (SIGSTOP): an agent resumed after its lease ran out sees it expired before its
//! next I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

const FOREVER: u64 = u64::MAX;

pub struct Lease {
    base: Instant,
    /// Nanoseconds after `base`; `FOREVER` for an agent without a lease (in-process).
    deadline_ns: AtomicU64,
}

impl Lease {
    /// The lease of an in-process agent: it lives and dies with its controller.
    pub fn forever() -> Lease {
        Lease {
            base: Instant::now(),
            deadline_ns: AtomicU64::new(FOREVER),
        }
    }

    /// A lease not yet granted.
    pub fn expired() -> Lease {
        Lease {
            base: Instant::now(),
            deadline_ns: AtomicU64::new(0),
        }
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Whether I/O may use table copies now.
    #[inline]
    pub fn valid(&self) -> bool {
        let d = self.deadline_ns.load(Ordering::Acquire);
        d == FOREVER || self.ns(Instant::now()) < d
    }

    /// Moves the deadline to `until` if that is later.
    pub fn extend_to(&self, until: Instant) {
        self.deadline_ns
            .fetch_max(self.ns(until).max(1), Ordering::AcqRel);
    }

    /// Ends the lease now (the controller revoked the session).
    pub fn expire(&self) {
        let d = self.deadline_ns.load(Ordering::Acquire);
        if d != FOREVER {
            self.deadline_ns.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_lease_runs_out_and_only_moves_forward() {
        let l = Lease::expired();
        assert!(!l.valid());
        let now = Instant::now();
        l.extend_to(now + Duration::from_secs(60));
        assert!(l.valid());
        l.extend_to(now); // earlier: ignored
        assert!(l.valid());
        l.expire();
        assert!(!l.valid());
        let f = Lease::forever();
        f.expire();
        assert!(f.valid());
        let short = Lease::expired();
        short.extend_to(Instant::now() + Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!short.valid());
    }
}
