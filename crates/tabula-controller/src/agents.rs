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
//! A session may end while its agent can still use its copies: its stream dropped and the
//! agent registered again (a restart, a reconnect after a cut, or a second process with the
//! same name), or it was evicted for not acknowledging. Until its lease has run out such a
//! session still counts as a holder of every table it held (an [`Ended`] session): a change
//! waits for its lease as for any holder that cannot acknowledge. A name whose session is
//! live (its stream open, its lease running) is refused to a second registration, so two
//! agents never share one name.
//!
//! An in-process agent (inside `tabula serve`) has no lease: it shares the controller's fate.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tabula_api::admin::{AgentTableView, AgentView};
use tabula_api::{AgentPort, AgentReport, Command, ControlError};
use tabula_core::VdiskId;
use tracing::{info, warn};

/// Extra time the controller waits beyond a lease, for clocks that run at different rates.
pub fn lease_margin(lease: Duration) -> Duration {
    lease / 10 + Duration::from_millis(200)
}

/// Where a session's command stream is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    /// Registered; the stream has not opened yet (commands wait in the port).
    Pending,
    Open,
    /// Ended: the session can neither renew nor acknowledge any more.
    Closed,
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
    stream: Stream,
    /// The address the agent registered from, to name it in a refusal.
    peer: String,
    report: AgentReport,
}

impl Slot {
    /// When its lease was last renewed (or granted): `expires` is always set a lease and a
    /// margin later. `None` without a lease.
    fn renewed(&self) -> Option<Instant> {
        self.lease.map(|l| {
            self.expires
                .checked_sub(l + lease_margin(l))
                .unwrap_or(self.expires)
        })
    }

    /// What the agent last reported: asked directly in-process, else its last heartbeat's.
    fn report(&self) -> AgentReport {
        self.port.report().unwrap_or_else(|| self.report.clone())
    }

    /// Whether the session is in use: its stream is open and its lease has not run out. A
    /// second agent with the same name is refused meanwhile.
    fn live(&self, now: Instant) -> bool {
        self.stream == Stream::Open && self.lease.is_none_or(|_| self.expires > now)
    }
}

/// A session that ended while its lease still ran (replaced by a new registration of its
/// name, or evicted): its agent may still read and write through its copies until
/// `expires`, so it stays a holder of them, one that can no longer acknowledge.
struct Ended {
    name: String,
    session: u64,
    vdisks: BTreeSet<VdiskId>,
    expires: Instant,
    port: Arc<dyn AgentPort>,
}

#[derive(Default)]
struct Inner {
    /// The current session of each name.
    slots: BTreeMap<String, Slot>,
    ended: Vec<Ended>,
}

impl Inner {
    /// Keeps `s` as an ended session if its lease has not run out.
    fn end(&mut self, name: &str, s: Slot, now: Instant) {
        if s.lease.is_some() && s.expires > now {
            self.ended.push(Ended {
                name: name.to_string(),
                session: s.session,
                vdisks: s.vdisks,
                expires: s.expires,
                port: s.port,
            });
        }
    }

    fn ended(&self, name: &str, session: u64) -> Option<&Ended> {
        self.ended
            .iter()
            .find(|e| e.name == name && e.session == session)
    }
}

/// One holder of a table, as a push sees it.
#[derive(Clone)]
pub struct Holder {
    pub name: String,
    pub session: u64,
    pub port: Arc<dyn AgentPort>,
    /// For an ended session: when its lease runs out (it cannot acknowledge any more).
    pub ended_until: Option<Instant>,
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
    inner: parking_lot::Mutex<Inner>,
    next_session: std::sync::atomic::AtomicU64,
}

impl Agents {
    /// Starts a session for `name`, from address `peer`. A name whose current session is
    /// live (stream open, lease running) is refused to a networked agent: two agents with
    /// one name would take each other's sessions. A session that is not live any more is
    /// replaced at once (a restart must not wait), but kept as an ended session until its
    /// lease runs out: its agent may still be using its copies. An in-process agent (no
    /// lease) simply replaces its previous session.
    pub fn register(
        &self,
        name: &str,
        port: Arc<dyn AgentPort>,
        held: Vec<VdiskId>,
        lease: Option<Duration>,
        peer: &str,
    ) -> Result<u64, ControlError> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        if let Some(s) = inner.slots.get(name) {
            if lease.is_some() && s.live(now) {
                warn!(
                    agent = name,
                    from = peer,
                    session = s.session,
                    session_from = s.peer,
                    "agent name in use by a live session; registration refused"
                );
                return Err(ControlError::Exists(format!(
                    "agent name '{name}' is in use by a live session from {} (session {}{}): \
                     give this agent a name of its own with --name (names must be unique among a controller's \
                     agents; the default is the host name), or stop the other agent",
                    s.peer,
                    s.session,
                    s.renewed().map_or(String::new(), |t| format!(
                        ", lease renewed {} ms ago",
                        now.saturating_duration_since(t).as_millis()
                    ))
                )));
            }
        }
        let session = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let expires = now + lease.map(|l| l + lease_margin(l)).unwrap_or_default();
        let previous = inner.slots.insert(
            name.to_string(),
            Slot {
                session,
                port,
                vdisks: held.into_iter().collect(),
                lease,
                expires,
                stream: if lease.is_some() {
                    Stream::Pending
                } else {
                    Stream::Open
                },
                peer: peer.to_string(),
                report: AgentReport::default(),
            },
        );
        if let Some(p) = previous {
            let fenced_ms = p.expires.saturating_duration_since(now).as_millis();
            info!(
                agent = name,
                session,
                from = peer,
                old_session = p.session,
                old_from = p.peer,
                "agent registered again (new session)"
            );
            if p.lease.is_some() && fenced_ms > 0 && !p.vdisks.is_empty() {
                info!(
                    agent = name,
                    old_session = p.session,
                    lease_ms_left = fenced_ms as u64,
                    "the previous session may still use its table copies until its lease runs out: \
                     changes to those tables wait for it"
                );
            }
            inner.end(name, p, now);
        } else {
            info!(agent = name, session, from = peer, "agent registered");
        }
        Ok(session)
    }

    /// The session's stream is open.
    pub fn opened(&self, name: &str, session: u64) {
        if let Some(s) = self.inner.lock().slots.get_mut(name) {
            if s.session == session && s.stream == Stream::Pending {
                s.stream = Stream::Open;
            }
        }
    }

    /// Renews the lease of a current session. Returns false if the session is over (the
    /// agent must register again).
    pub fn renew(&self, name: &str, session: u64, report: AgentReport) -> bool {
        let mut inner = self.inner.lock();
        match inner.slots.get_mut(name) {
            Some(s) if s.session == session => {
                let now = Instant::now();
                if let Some(l) = s.lease {
                    s.expires = now + l + lease_margin(l);
                }
                // A heartbeat arrives on the open stream.
                s.stream = Stream::Open;
                s.report = report;
                true
            }
            _ => false,
        }
    }

    /// Whether `session` is the current session of `name`.
    pub fn is_current(&self, name: &str, session: u64) -> bool {
        self.inner
            .lock()
            .slots
            .get(name)
            .is_some_and(|s| s.session == session)
    }

    /// The current session of `name`, if it has one.
    pub fn session_of(&self, name: &str) -> Option<u64> {
        self.inner.lock().slots.get(name).map(|s| s.session)
    }

    /// The session's stream ended; its lease runs on until it expires.
    pub fn disconnected(&self, name: &str, session: u64) {
        if let Some(s) = self.inner.lock().slots.get_mut(name) {
            if s.session == session {
                s.stream = Stream::Closed;
                warn!(agent = name, session, "agent session ended");
            }
        }
    }

    /// Records that `name` holds a copy of `vdisk`'s table: in its current session, if that
    /// is `session` (when given). A session replaced meanwhile must not get the table, or it
    /// would hold a copy recorded under its successor, not under itself.
    pub fn attach(&self, name: &str, session: Option<u64>, vdisk: VdiskId) -> bool {
        match self.inner.lock().slots.get_mut(name) {
            Some(s) if session.is_none_or(|x| x == s.session) => {
                s.vdisks.insert(vdisk);
                true
            }
            _ => false,
        }
    }

    /// Forgets `vdisk` everywhere (it was deleted, and every holder acknowledged or was
    /// waited out).
    pub fn forget_vdisk(&self, vdisk: VdiskId) {
        let mut inner = self.inner.lock();
        for s in inner.slots.values_mut() {
            s.vdisks.remove(&vdisk);
        }
        for e in &mut inner.ended {
            e.vdisks.remove(&vdisk);
        }
    }

    /// Every agent session that may use a copy of `vdisk`: the current sessions (but that
    /// of `except`, which is answered directly) and the ended sessions whose lease still
    /// runs, whatever their name.
    pub fn holders(&self, vdisk: VdiskId, except: Option<&str>) -> Vec<Holder> {
        let now = Instant::now();
        let inner = self.inner.lock();
        let current = inner
            .slots
            .iter()
            .filter(|(n, s)| s.vdisks.contains(&vdisk) && Some(n.as_str()) != except)
            .map(|(n, s)| Holder {
                name: n.clone(),
                session: s.session,
                port: s.port.clone(),
                ended_until: None,
            });
        let ended = inner
            .ended
            .iter()
            .filter(|e| e.vdisks.contains(&vdisk) && e.expires > now)
            .map(|e| Holder {
                name: e.name.clone(),
                session: e.session,
                port: e.port.clone(),
                ended_until: Some(e.expires),
            });
        current.chain(ended).collect()
    }

    /// When the last session holding `vdisk` that can no longer acknowledge anything (ended,
    /// or its stream closed) loses its lease, if one's lease still runs. An operation that
    /// must hold every holder's I/O waits until then first: such a session cannot be held,
    /// only waited out.
    pub fn unreachable_until(&self, vdisk: VdiskId) -> Option<Instant> {
        let now = Instant::now();
        let inner = self.inner.lock();
        let closed = inner
            .slots
            .values()
            .filter(|s| {
                s.lease.is_some() && s.stream == Stream::Closed && s.vdisks.contains(&vdisk)
            })
            .map(|s| s.expires);
        let ended = inner
            .ended
            .iter()
            .filter(|e| e.vdisks.contains(&vdisk))
            .map(|e| e.expires);
        closed.chain(ended).filter(|&t| t > now).max()
    }

    /// Every agent with a session that can take commands (for commands about containers,
    /// which concern them all).
    pub fn all(&self) -> Vec<Holder> {
        self.inner
            .lock()
            .slots
            .iter()
            .filter(|(_, s)| s.stream != Stream::Closed)
            .map(|(n, s)| Holder {
                name: n.clone(),
                session: s.session,
                port: s.port.clone(),
                ended_until: None,
            })
            .collect()
    }

    /// The NBD connections agents report to any of `vdisks`: (agent, vdisk, count), in agent
    /// order. An agent whose lease ran out serves nothing any more and is not counted.
    pub fn connections(&self, vdisks: &[VdiskId]) -> Vec<(String, VdiskId, u32)> {
        let now = Instant::now();
        let mut out = Vec::new();
        for (n, s) in self.inner.lock().slots.iter() {
            if s.lease.is_some() && s.expires <= now {
                continue;
            }
            let report = s.report();
            for (v, count) in report.connections {
                if count > 0 && vdisks.contains(&v) {
                    out.push((n.clone(), v, count));
                }
            }
        }
        out
    }

    /// Every vdisk some current session holds a table of (for periodic replacement).
    pub fn held_vdisks(&self) -> BTreeSet<VdiskId> {
        self.inner
            .lock()
            .slots
            .values()
            .flat_map(|s| s.vdisks.iter().copied())
            .collect()
    }

    /// When the lease of `session` runs out: `Some(None)` for a current session without a
    /// lease, `None` once the session is forgotten (which happens only after its lease).
    fn expiry(&self, name: &str, session: u64) -> Option<Option<Instant>> {
        let inner = self.inner.lock();
        if let Some(s) = inner.slots.get(name).filter(|s| s.session == session) {
            return Some(s.lease.map(|_| s.expires));
        }
        inner.ended(name, session).map(|e| Some(e.expires))
    }

    /// Ends a session: it can no longer renew, so its lease runs out by its current expiry,
    /// which is returned for the caller to wait out. Until then it stays a holder of its
    /// tables for every other change too.
    fn evict(&self, name: &str, session: u64) -> Option<Instant> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        if inner.slots.get(name).is_some_and(|s| s.session == session) {
            let s = inner.slots.remove(name).expect("present");
            let expires = s.expires;
            inner.end(name, s, now);
            return Some(expires);
        }
        inner.ended(name, session).map(|e| e.expires)
    }

    /// Drops agents whose lease ran out while disconnected (they will register again), and
    /// ended sessions whose lease ran out.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        inner.slots.retain(|name, s| {
            let dead = s.lease.is_some() && s.stream != Stream::Open && s.expires < now;
            if dead {
                info!(
                    agent = name,
                    "agent's lease expired while disconnected; forgotten"
                );
            }
            !dead
        });
        inner.ended.retain(|e| e.expires > now);
    }

    /// Sends `cmd` to one agent and waits until it acknowledges, or until the controller may
    /// act as if it had: its lease ran out. An agent that keeps renewing but does not answer
    /// within `ack_timeout` is evicted, and its lease waited out. An ended session cannot
    /// answer: its lease is waited out.
    pub async fn deliver(&self, h: &Holder, cmd: Command, ack_timeout: Duration) -> Delivery {
        if let Some(until) = h.ended_until {
            info!(
                agent = h.name,
                session = h.session,
                wait_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64,
                "waiting for the lease of an ended session that may still use its table copy"
            );
            tokio::time::sleep_until(until.into()).await;
            return Delivery::Evicted;
        }
        let give_up = Instant::now() + ack_timeout;
        let apply = h.port.apply(cmd);
        tokio::pin!(apply);
        loop {
            // Re-read each time round: heartbeats may have renewed the lease meanwhile.
            let Some(expiry) = self.expiry(&h.name, h.session) else {
                // Forgotten: only ever after its lease ran out.
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
        self.inner
            .lock()
            .slots
            .iter()
            .map(|(n, s)| {
                let report = s.report();
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
                    connected: s.live(now),
                    address: s.lease.map(|_| s.peer.clone()),
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
