//! Group commit: every metadata change goes through one ordered queue, and a committer
//! thread makes whatever has queued up durable as one record of the redo log
//! ([`crate::wal`]); checkpoint steps between batches carry the records into redb.
//!
//! Why: a fault must not be answered before its allocation is durable, and one fsync per
//! fault would serialize every first write behind the disk. With the journal, concurrent
//! faults share one commit.
//!
//! Rules:
//! - Changes are queued under the controller's metadata lock, so the store applies them in
//!   exactly the order memory saw them (free-list deltas depend on that order).
//! - A caller acts on a change (answers an agent, frees space, reports success) only after
//!   [`Journal::wait`] says its ticket is durable.
//! - A failed commit poisons the journal: nothing later is acknowledged, and the controller
//!   must be restarted, which reloads the store as the truth (fail-stop, as databases do on
//!   fsync failure: retrying could acknowledge data the disk has lost).

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use tabula_api::ControlError;
use tokio::sync::watch;
use tracing::error;

use crate::store::{Store, StoreError, Txn};

/// One queued change.
pub type Op = Box<dyn FnOnce(&mut Txn<'_>) -> Result<(), StoreError> + Send>;

/// Queued changes with their tickets, in order.
type Queue = mpsc::Sender<(u64, Op)>;

/// What the committer has made durable so far.
#[derive(Clone, Debug, Default)]
struct Durable {
    seq: u64,
    failed: Option<String>,
}

pub struct Journal {
    /// Ticket of the last queued change. Only touched under the controller's metadata lock.
    /// The last ticket handed out and the queue (`None` once the journal is shutting down).
    next: std::sync::Mutex<(u64, Option<Queue>)>,
    durable: watch::Receiver<Durable>,
    committer: Option<std::thread::JoinHandle<()>>,
}

impl Journal {
    /// Starts the committer thread over `store`.
    pub fn start(store: Arc<Store>) -> Journal {
        let (tx, rx) = mpsc::channel::<(u64, Op)>();
        let (dtx, drx) = watch::channel(Durable::default());
        let handle = std::thread::Builder::new()
            .name("tabula-journal".into())
            .spawn(move || committer(store, rx, dtx))
            .expect("spawn the journal thread");
        Journal {
            next: std::sync::Mutex::new((0, Some(tx))),
            durable: drx,
            committer: Some(handle),
        }
    }

    /// Queues a change; returns its ticket.
    pub fn push(&self, op: Op) -> u64 {
        let mut g = self.next.lock().expect("journal lock");
        g.0 += 1;
        let seq = g.0;
        // A send fails only if the committer is gone, which `wait` reports.
        if let Some(tx) = &g.1 {
            let _ = tx.send((seq, op));
        }
        seq
    }

    /// Whether a commit failed: nothing more is acknowledged (fail-stop).
    pub fn failed(&self) -> bool {
        self.durable.borrow().failed.is_some()
    }

    /// The ticket of the last queued change (0 if none).
    pub fn last(&self) -> u64 {
        self.next.lock().expect("journal lock").0
    }

    /// Waits until change `seq` (and every change before it) is durable.
    pub async fn wait(&self, seq: u64) -> Result<(), ControlError> {
        let mut rx = self.durable.clone();
        let d = rx
            .wait_for(|d| d.seq >= seq || d.failed.is_some())
            .await
            .map_err(|_| {
                ControlError::Storage("the metadata journal stopped; restart tabula".into())
            })?
            .clone();
        match d.failed {
            Some(e) if d.seq < seq => Err(ControlError::Storage(format!(
                "metadata commit failed ({e}); nothing after it was acknowledged; restart tabula"
            ))),
            _ => Ok(()),
        }
    }
}

impl Drop for Journal {
    /// Commits what is queued and waits for the committer, so the store is closed (and can
    /// be opened again) once the journal is gone.
    fn drop(&mut self) {
        if let Ok(mut g) = self.next.lock() {
            g.1 = None;
        }
        if let Some(h) = self.committer.take() {
            let _ = h.join();
        }
    }
}

/// Logged changes above which each batch is followed by a checkpoint step.
const CHECKPOINT_BACKLOG: usize = 32 * 1024;
/// Changes per checkpoint step: a few milliseconds of work, the most a batch waits
/// behind one.
pub const CHECKPOINT_STEP: usize = 4096;
/// A queue idle this long lets checkpoint steps run until the database has caught up.
const IDLE: Duration = Duration::from_millis(5);

fn committer(store: Arc<Store>, rx: mpsc::Receiver<(u64, Op)>, durable: watch::Sender<Durable>) {
    loop {
        let first = if store.pending_changes() > 0 {
            match rx.recv_timeout(IDLE) {
                Ok(op) => op,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = store.checkpoint_step(CHECKPOINT_STEP) {
                        return fail(&rx, &durable, &e);
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(op) => op,
                Err(_) => break,
            }
        };
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let last = batch.last().expect("non-empty").0;
        let result = store.write_logged(|t| {
            for (_, op) in batch {
                op(t)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            return fail(&rx, &durable, &e);
        }
        durable.send_modify(|d| d.seq = last);
        if store.pending_changes() >= CHECKPOINT_BACKLOG {
            if let Err(e) = store.checkpoint_step(CHECKPOINT_STEP) {
                return fail(&rx, &durable, &e);
            }
        }
    }
    // A clean stop leaves an empty log (a start then has nothing to replay).
    if let Err(e) = store.checkpoint() {
        error!(error = %e, "metadata checkpoint at shutdown failed; the next start replays the log");
    }
}

/// Poisons the journal after a failed commit or checkpoint.
fn fail(rx: &mpsc::Receiver<(u64, Op)>, durable: &watch::Sender<Durable>, e: &StoreError) {
    error!(error = %e, "metadata commit failed: the controller stops acknowledging changes; restart it");
    durable.send_modify(|d| d.failed = Some(e.to_string()));
    // Drain and drop everything else: none of it may be acknowledged.
    for _ in rx.iter() {}
}
