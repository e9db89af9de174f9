//! The agents the controller knows: their sessions, leases, the tables they hold, and the
//! push of table commands to them.
//!
//! A lease is what lets the controller finish a change that makes an entry unsafe (a free, a
//! snapshot, a migration) when an agent does not answer: the agent renews it with
//! heartbeats and stops I/O on its own once it runs out, so after its expiry the controller
//! may proceed as if the agent had acknowledged. The agent's lease runs from when it *sent*
//! the renewing heartbeat, the controller's from when it *received* it, plus a margin for
//! clock rates, so the agent's always ends first.
//!
//! An in-process agent (inside `tabula serve`) has no lease: it shares the controller's fate.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tabula_api::admin::{AgentTableView, AgentView};
use tabula_api::{AgentPort, AgentReport, Command};
use tabula_core::VdiskId;
use tracing::{info, warn};

/// Extra time the controller waits beyond a lease, for clocks that run at different rates.
pub fn lease_margin(lease: Duration) -> Duration {
    lease / 10 + Duration::from_millis(200)
}

struct Slot {
    session: u64,
    port: Arc<dyn AgentPort>,
    vdisks: BTreeSet<VdiskId>,
    /// `None` for an in-process agent.
    lease: Option<Duration>,
    /// When the controller stops counting on the agent having stopped (if it stops
    /// renewing). Only meaningful with a lease.
    expires: Instant,
    connected: bool,
    report: AgentReport,
}

/// One holder of a table, as a push sees it.
#[derive(Clone)]
pub struct Holder {
    pub name: String,
    pub session: u64,
    pub port: Arc<dyn AgentPort>,
}

/// What became of a command pushed to one agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    Acked,
    /// It refused or did not answer, and its lease ran out: it no longer holds any table.
    Evicted,
    /// No lease to wait out (an in-process agent) and no answer: the change cannot be
    /// completed safely until a restart.
    Failed,
}

#[derive(Default)]
pub struct Agents {
    slots: parking_lot::Mutex<BTreeMap<String, Slot>>,
    next_session: std::sync::atomic::AtomicU64,
}

impl Agents {
    /// Starts a session for `name`, replacing any previous one (whose commands will never be
    /// acknowledged: the agent's new session resynchronises every table it holds).
    pub fn register(
        &self,
        name: &str,
        port: Arc<dyn AgentPort>,
        held: Vec<VdiskId>,
        lease: Option<Duration>,
    ) -> u64 {
        let session = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let expires = Instant::now() + lease.map(|l| l + lease_margin(l)).unwrap_or_default();
        let mut slots = self.slots.lock();
        let previous = slots.insert(
            name.to_string(),
            Slot {
                session,
                port,
                vdisks: held.into_iter().collect(),
                lease,
                expires,
                connected: true,
                report: AgentReport::default(),
            },
        );
        if let Some(p) = previous {
            info!(
                agent = name,
                session,
                old_session = p.session,
                "agent registered again (new session)"
            );
        } else {
            info!(agent = name, session, "agent registered");
        }
        session
    }

    /// Renews the lease of a current session. Returns false if the session is over (the
    /// agent must register again).
    pub fn renew(&self, name: &str, session: u64, report: AgentReport) -> bool {
        let mut slots = self.slots.lock();
        match slots.get_mut(name) {
            Some(s) if s.session == session => {
                if let Some(l) = s.lease {
                    s.expires = Instant::now() + l + lease_margin(l);
                }
                s.connected = true;
                s.report = report;
                true
            }
            _ => false,
        }
    }

    /// Whether `session` is the current session of `name`.
    pub fn is_current(&self, name: &str, session: u64) -> bool {
        self.slots
            .lock()
            .get(name)
            .is_some_and(|s| s.session == session)
    }

    /// The current session of `name`, if it has one.
    pub fn session_of(&self, name: &str) -> Option<u64> {
        self.slots.lock().get(name).map(|s| s.session)
    }

    /// The session's stream ended; its lease runs on until it expires.
    pub fn disconnected(&self, name: &str, session: u64) {
        if let Some(s) = self.slots.lock().get_mut(name) {
            if s.session == session {
                s.connected = false;
                warn!(agent = name, session, "agent session ended");
            }
        }
    }

    /// Records that `name` holds a copy of `vdisk`'s table.
    pub fn attach(&self, name: &str, vdisk: VdiskId) -> bool {
        match self.slots.lock().get_mut(name) {
            Some(s) => {
                s.vdisks.insert(vdisk);
                true
            }
            None => false,
        }
    }

    /// Forgets `vdisk` everywhere (it was deleted).
    pub fn forget_vdisk(&self, vdisk: VdiskId) {
        for s in self.slots.lock().values_mut() {
            s.vdisks.remove(&vdisk);
        }
    }

    /// Every agent holding `vdisk`, except `except`.
    pub fn holders(&self, vdisk: VdiskId, except: Option<&str>) -> Vec<Holder> {
        self.slots
            .lock()
            .iter()
            .filter(|(n, s)| s.vdisks.contains(&vdisk) && Some(n.as_str()) != except)
            .map(|(n, s)| Holder {
                name: n.clone(),
                session: s.session,
                port: s.port.clone(),
            })
            .collect()
    }

    /// Every connected agent (for commands about containers, which concern them all).
    pub fn all(&self) -> Vec<Holder> {
        self.slots
            .lock()
            .iter()
            .filter(|(_, s)| s.connected)
            .map(|(n, s)| Holder {
                name: n.clone(),
                session: s.session,
                port: s.port.clone(),
            })
            .collect()
    }

    /// The NBD connections agents report to any of `vdisks`: (agent, vdisk, count), in agent
    /// order. An agent whose lease ran out serves nothing any more and is not counted.
    pub fn connections(&self, vdisks: &[VdiskId]) -> Vec<(String, VdiskId, u32)> {
        let now = Instant::now();
        let mut out = Vec::new();
        for (n, s) in self.slots.lock().iter() {
            if s.lease.is_some() && s.expires <= now {
                continue;
            }
            let report = s.port.report().unwrap_or_else(|| s.report.clone());
            for (v, count) in report.connections {
                if count > 0 && vdisks.contains(&v) {
                    out.push((n.clone(), v, count));
                }
            }
        }
        out
    }

    /// Every vdisk some agent holds a table of (for periodic replacement).
    pub fn held_vdisks(&self) -> BTreeSet<VdiskId> {
        self.slots
            .lock()
            .values()
            .flat_map(|s| s.vdisks.iter().copied())
            .collect()
    }

    /// When the lease of `session` runs out, if it has one and is still current.
    fn expiry(&self, name: &str, session: u64) -> Option<Option<Instant>> {
        let slots = self.slots.lock();
        let s = slots.get(name).filter(|s| s.session == session)?;
        Some(s.lease.map(|_| s.expires))
    }

    /// Ends a session: it can no longer renew, so its lease runs out by its current expiry,
    /// which is returned for the caller to wait out.
    fn evict(&self, name: &str, session: u64) -> Option<Instant> {
        let mut slots = self.slots.lock();
        match slots.get(name) {
            Some(s) if s.session == session => {
                let expires = s.expires;
                slots.remove(name);
                Some(expires)
            }
            _ => None,
        }
    }

    /// Drops agents whose lease ran out while disconnected (they will register again).
    pub fn sweep(&self) {
        let now = Instant::now();
        self.slots.lock().retain(|name, s| {
            let dead = s.lease.is_some() && !s.connected && s.expires < now;
            if dead {
                info!(
                    agent = name,
                    "agent's lease expired while disconnected; forgotten"
                );
            }
            !dead
        });
    }

    /// Sends `cmd` to one agent and waits until it acknowledges, or until the controller may
    /// act as if it had: its lease ran out. An agent that keeps renewing but does not answer
    /// within `ack_timeout` is evicted, and its lease waited out.
    pub async fn deliver(&self, h: &Holder, cmd: Command, ack_timeout: Duration) -> Delivery {
        let give_up = Instant::now() + ack_timeout;
        let apply = h.port.apply(cmd);
        tokio::pin!(apply);
        loop {
            // Re-read each time round: heartbeats may have renewed the lease meanwhile.
            let Some(expiry) = self.expiry(&h.name, h.session) else {
                // Replaced by a new session (which resyncs) or evicted meanwhile.
                return Delivery::Evicted;
            };
            let now = Instant::now();
            match expiry {
                Some(e) if e <= now => {
                    warn!(
                        agent = h.name,
                        "agent's lease expired before it acknowledged; evicted"
                    );
                    self.evict(&h.name, h.session);
                    return Delivery::Evicted;
                }
                None if now >= give_up => {
                    warn!(
                        agent = h.name,
                        "agent did not acknowledge a table command in time"
                    );
                    return Delivery::Failed;
                }
                Some(_) if now >= give_up => {
                    warn!(
                        agent = h.name,
                        "agent renews its lease but does not acknowledge; evicting it"
                    );
                    return self.evict_and_wait(h, true).await;
                }
                _ => {}
            }
            let wake = expiry.map_or(give_up, |e| e.min(give_up));
            tokio::select! {
                r = &mut apply => match r {
                    Ok(()) => return Delivery::Acked,
                    Err(e) => {
                        warn!(agent = h.name, error = e, "agent refused a table command");
                        return self.evict_and_wait(h, expiry.is_some()).await;
                    }
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    async fn evict_and_wait(&self, h: &Holder, leased: bool) -> Delivery {
        if !leased {
            return Delivery::Failed;
        }
        if let Some(expires) = self.evict(&h.name, h.session) {
            tokio::time::sleep_until(expires.into()).await;
        }
        Delivery::Evicted
    }

    pub fn views(&self, name_of: impl Fn(VdiskId) -> Option<(String, u64)>) -> Vec<AgentView> {
        let now = Instant::now();
        self.slots
            .lock()
            .iter()
            .map(|(n, s)| {
                let report = s.port.report().unwrap_or_else(|| s.report.clone());
                let reported: BTreeMap<VdiskId, u64> =
                    report.tables.iter().map(|(v, g)| (*v, g.0)).collect();
                AgentView {
                    name: n.clone(),
                    vdisks: s
                        .vdisks
                        .iter()
                        .filter_map(|id| name_of(*id).map(|x| x.0))
                        .collect(),
                    transport: if s.lease.is_some() {
                        "grpc"
                    } else {
                        "in-process"
                    }
                    .into(),
                    // A stream can look open long after its peer is gone; a lapsed
                    // lease says it is.
                    connected: s.connected && s.lease.is_none_or(|_| s.expires > now),
                    lease_ms_left: s
                        .lease
                        .map(|_| s.expires.saturating_duration_since(now).as_millis() as u64),
                    tables: s
                        .vdisks
                        .iter()
                        .filter_map(|id| {
                            let (vdisk, controller_generation) = name_of(*id)?;
                            Some(AgentTableView {
                                vdisk,
                                generation: reported.get(id).copied(),
                                controller_generation,
                            })
                        })
                        .collect(),
                    table_mismatches: report.table_mismatches,
                    gaps_healed: report.gaps_healed,
                }
            })
            .collect()
    }
}
