//! Probes on tokio's blocking pool under a timeout (feature `tokio`): what the agent and the
//! controller use to tell whether a container answers.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::Container;

/// Probes one container again and again. A probe that does not answer in time is not
/// abandoned: the next call waits for it again instead of starting another, so a hung device
/// does not collect one stuck blocking thread per attempt.
#[derive(Debug, Default)]
pub struct Prober {
    /// The probe still running, and when it started.
    pending: Option<(JoinHandle<io::Result<()>>, Instant)>,
}

impl Prober {
    /// Probes `c` ([`Container::probe`]), or keeps waiting for the probe still pending, for
    /// up to `timeout`. The error says why the container is not healthy.
    pub async fn probe<C>(&mut self, c: &Arc<C>, timeout: Duration) -> Result<(), String>
    where
        C: AsRef<Container> + Send + Sync + 'static,
    {
        let (task, started) = self.pending.get_or_insert_with(|| {
            let c = c.clone();
            (
                tokio::task::spawn_blocking(move || (*c).as_ref().probe()),
                Instant::now(),
            )
        });
        let started = *started;
        let joined = tokio::time::timeout(timeout, task).await;
        let Ok(joined) = joined else {
            return Err(format!(
                "no answer within {} ms",
                started.elapsed().as_millis()
            ));
        };
        self.pending = None;
        match joined {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(format!("probe failed: {e}")),
        }
    }

    /// Whether a probe that has not answered yet is still running.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }
}

/// One probe of `c` under `timeout` (see [`Prober`] to probe repeatedly).
pub async fn probe_within<C>(c: &Arc<C>, timeout: Duration) -> Result<(), String>
where
    C: AsRef<Container> + Send + Sync + 'static,
{
    Prober::default().probe(c, timeout).await
}
