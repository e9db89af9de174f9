//! High availability: several controllers on etcd, one leading, the others following every
//! committed record (ARCHITECTURE.md, "High availability").
//!
//! - [`records`]: the keys in etcd and how records are stored there (pure);
//! - [`log`]: the replicated log: fenced commits ([`log::EtcdLog`], the store's
//!   [`crate::store::Replicator`]), reading records, truncation;
//! - [`node`]: the life of one controller process: join, follow, campaign, lead, step down.

pub mod log;
pub mod node;
pub mod records;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tabula_api::admin::ControllerView;

pub use node::{HaConfig, run};

/// How certain this controller is of its leadership: until the last keep-alive of its etcd
/// lease that etcd answered was *sent*, plus the lease's TTL, minus a margin. etcd cannot
/// give the key to another controller before the lease expires there, which is later.
pub struct Leadership {
    base: Instant,
    /// Milliseconds after `base` until which leadership is certain.
    until_ms: AtomicU64,
    lost: AtomicBool,
    /// The control plane's controllers, as last read from etcd (for `tabula status`).
    controllers: Mutex<Vec<ControllerView>>,
}

impl Default for Leadership {
    fn default() -> Self {
        Leadership {
            base: Instant::now(),
            until_ms: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            controllers: Mutex::new(Vec::new()),
        }
    }
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("valid", &self.valid())
            .finish()
    }
}

impl Leadership {
    /// Whether leadership is certain now.
    pub fn valid(&self) -> bool {
        !self.lost.load(Ordering::Acquire)
            && (self.base.elapsed().as_millis() as u64) < self.until_ms.load(Ordering::Acquire)
    }

    /// A keep-alive sent at `sent` was answered: the lease lives `ttl` from then.
    pub fn renewed(&self, sent: Instant, ttl: Duration) {
        let margin = (ttl / 5).max(Duration::from_millis(200));
        let until = sent.saturating_duration_since(self.base) + ttl.saturating_sub(margin);
        self.until_ms
            .fetch_max(until.as_millis() as u64, Ordering::AcqRel);
    }

    /// Leadership is gone for good (a fenced commit, a lease etcd no longer has).
    pub fn lose(&self) {
        self.lost.store(true, Ordering::Release);
    }

    /// How long leadership has not been certain (zero while it is).
    pub fn lapsed_for(&self) -> Duration {
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.until_ms.load(Ordering::Acquire)))
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    pub fn controllers(&self) -> Vec<ControllerView> {
        self.controllers.lock().expect("controllers lock").clone()
    }

    pub fn set_controllers(&self, v: Vec<ControllerView>) {
        *self.controllers.lock().expect("controllers lock") = v;
    }
}
