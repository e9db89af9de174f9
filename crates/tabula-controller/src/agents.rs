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
//! A holder the controller has not heard from for more than two heartbeats, or whose stream
//! closed, is *silent* ([`Standing`]): a change that would hold I/O or wait for it with the
//! metadata locked waits it out first (it speaks again, or its lease runs out and it is
//! counted *fenced*: evicted, it resynchronises when it reaches the controller again).
//!
//! An in-process agent (inside `tabula serve`) has no lease: it shares the controller's fate.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tabula_api::admin::{AgentTableView, AgentView};
use tabula_api::{AgentPort, AgentReport, Command, ControlError};
use tabula_core::VdiskId;
use tracing::{info, warn};

/// Extra time the controller waits beyond a lease, for clocks that run at different rates.
pub fn lease_margin(lease: Duration) -> Duration {
    lease / 10 + Duration::from_millis(200)
}

/// How often an agent with `lease` sends heartbeats (the controller tells it at registration).
pub fn heartbeat_interval(lease: Duration) -> Duration {
    (lease / 4).max(Duration::from_millis(50))
}

/// How the controller stands with one holder of a table, from what it last heard of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Heard from lately (or in-process): it can be asked to hold its I/O.
    Heard,
    /// Not heard from for more than two heartbeats, or its session ended or its stream
    /// closed: a hold would wait on it with everyone else's I/O held. It may still do I/O
    /// until `until`, when its lease runs out.
    Silent { until: Instant },
    /// Its lease ran out: it does no I/O (its own lease ended earlier) and resynchronises
    /// its tables before serving again. A change may proceed as if it had acknowledged.
    Fenced,
}

/// The standing of a session with `lease` (none: in-process) whose lease runs out at
/// `expires` (as the controller counts it), last heard from at `heard`, its stream `open`
/// or not (an ended session's is not).
pub fn standing(
    lease: Option<Duration>,
    expires: Instant,
    heard: Instant,
    open: bool,
    now: Instant,
) -> Standing {
    let Some(lease) = lease else {
        return Standing::Heard;
    };
    if expires <= now {
        return Standing::Fenced;
    }
    // Two heartbeats: one may be late on a loaded host without the agent being cut off.
    if !open || now.saturating_duration_since(heard) > 2 * heartbeat_interval(lease) {
        return Standing::Silent { until: expires };
    }
    Standing::Heard
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
    /// When the controller last heard from the agent: registration, a heartbeat, or an
    /// acknowledgement.
    heard: Instant,
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

struct Probed {
    h: Holder,
    /// It answered, or was counted fenced.
    done: bool,
}

/// Probes sent to the holders of a table ([`Agents::probe`]), and their answers as they come.
pub struct Probe {
    holders: Vec<Probed>,
    answers: tokio::sync::mpsc::UnboundedReceiver<(usize, Result<(), String>)>,
    sent: Instant,
}

impl Probe {
    /// Waits until every holder probed has answered or, not answering, lost its lease (then
    /// it is counted fenced: see [`Standing::Fenced`]), or until `deadline` if one is given.
    /// Returns the holders still waited for, described (empty when all are settled). A
    /// holder heard from (heartbeats) after the probe went out, but that has not answered it
    /// within `cap`, is stuck, not cut off: `Err` describes it.
    pub async fn wait(
        &mut self,
        agents: &Agents,
        deadline: Option<Instant>,
        cap: Duration,
        what: &str,
    ) -> Result<Vec<String>, String> {
        loop {
            let now = Instant::now();
            let mut pending = Vec::new();
            for p in self.holders.iter_mut().filter(|p| !p.done) {
                match agents.standing_of(&p.h) {
                    Standing::Fenced => {
                        agents.fence(&p.h, what);
                        p.done = true;
                    }
                    // Heard from since the probe went out, so not cut off.
                    Standing::Heard
                        if now.saturating_duration_since(self.sent) > cap
                            && agents.heard(&p.h).is_some_and(|t| t > self.sent) =>
                    {
                        return Err(format!(
                            "agent {} renews its lease but did not answer a command within {cap:?}",
                            agents.describe(&p.h)
                        ));
                    }
                    _ => pending.push(agents.describe(&p.h)),
                }
            }
            if pending.is_empty() || deadline.is_some_and(|d| now >= d) {
                return Ok(pending);
            }
            // Leases are checked again at least this often.
            let mut wake = now + Duration::from_millis(50);
            if let Some(d) = deadline {
                wake = wake.min(d);
            }
            tokio::select! {
                a = self.answers.recv() => match a {
                    Some((i, Ok(()))) => {
                        let p = &mut self.holders[i];
                        agents.heard_from(&p.h.name, p.h.session);
                        p.done = true;
                    }
                    // Its session closed, or it refused: it settles when its lease runs out
                    // (or, heard from, by the cap above).
                    Some((i, Err(e))) => warn!(
                        agent = self.holders[i].h.name,
                        error = e,
                        "{what}: agent did not take a probe"
                    ),
                    None => tokio::time::sleep_until(wake.into()).await,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }
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
                heard: now,
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
                s.heard = now;
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

    /// How the controller stands with holder `h` now.
    pub fn standing_of(&self, h: &Holder) -> Standing {
        let now = Instant::now();
        let inner = self.inner.lock();
        if let Some(s) = inner.slots.get(&h.name).filter(|s| s.session == h.session) {
            return standing(s.lease, s.expires, s.heard, s.stream != Stream::Closed, now);
        }
        match inner.ended(&h.name, h.session) {
            Some(e) if e.expires > now => Standing::Silent { until: e.expires },
            Some(_) => Standing::Fenced,
            // Forgotten: only ever after its lease ran out.
            None => Standing::Fenced,
        }
    }

    /// `h`, for a log line or a message: its name, and how long ago it was heard from and
    /// when its lease runs out, if it has one.
    pub fn describe(&self, h: &Holder) -> String {
        let now = Instant::now();
        let inner = self.inner.lock();
        let (heard, expires) = match inner.slots.get(&h.name).filter(|s| s.session == h.session) {
            Some(s) if s.lease.is_some() => (Some(s.heard), s.expires),
            Some(_) => return format!("'{}' (in-process)", h.name),
            None => match inner.ended(&h.name, h.session) {
                Some(e) => (None, e.expires),
                None => return format!("'{}' (session {} over)", h.name, h.session),
            },
        };
        format!(
            "'{}' ({}lease runs out in {} ms)",
            h.name,
            heard.map_or("session ended, ".to_string(), |t| format!(
                "last heard from {} ms ago, ",
                now.saturating_duration_since(t).as_millis()
            )),
            expires.saturating_duration_since(now).as_millis()
        )
    }

    /// When the controller last heard from `h` (`None` for an ended session).
    fn heard(&self, h: &Holder) -> Option<Instant> {
        let inner = self.inner.lock();
        inner
            .slots
            .get(&h.name)
            .filter(|s| s.session == h.session)
            .map(|s| s.heard)
    }

    /// Records that the agent of `session` was heard from (it acknowledged a command).
    fn heard_from(&self, name: &str, session: u64) {
        if let Some(s) = self.inner.lock().slots.get_mut(name) {
            if s.session == session {
                s.heard = Instant::now();
            }
        }
    }

    /// Counts `h`, whose lease ran out, as fenced: its session is over (the agent stopped
    /// I/O when its own lease ended, and registers again and resynchronises when it next
    /// reaches the controller), so it no longer holds any table.
    fn fence(&self, h: &Holder, why: &str) {
        info!(
            agent = h.name,
            session = h.session,
            "{why}: the agent's lease ran out, so it does no I/O; counted fenced (it resynchronises \
             its tables when it reaches the controller again)"
        );
        self.evict(&h.name, h.session);
    }

    /// Waits until no holder of `vdisks` (of any table, with `None`) is silent: each has been
    /// heard from again or lost its lease (then it is counted fenced). A change that pushes
    /// commands with the metadata locked calls this first, so that the wait for a cut-off
    /// agent, bounded by its lease, does not keep every other agent's faults waiting on the
    /// lock. (An agent that falls silent after this is still waited for under the lock.)
    pub async fn wait_heard(&self, vdisks: Option<&[VdiskId]>, what: &str) {
        let mut told = BTreeSet::new();
        loop {
            let holders: Vec<Holder> = match vdisks {
                Some(v) => v.iter().flat_map(|&v| self.holders(v, None)).collect(),
                None => {
                    let mut all = self.held_vdisks();
                    let ended: Vec<VdiskId> = {
                        let inner = self.inner.lock();
                        inner.ended.iter().flat_map(|e| e.vdisks.clone()).collect()
                    };
                    all.extend(ended);
                    all.into_iter()
                        .flat_map(|v| self.holders(v, None))
                        .collect()
                }
            };
            let mut silent = false;
            for h in holders {
                match self.standing_of(&h) {
                    Standing::Heard => {}
                    Standing::Fenced => self.fence(&h, what),
                    Standing::Silent { .. } => {
                        silent = true;
                        if told.insert((h.name.clone(), h.session)) {
                            info!(
                                agent = self.describe(&h),
                                "{what}: waiting until a silent agent is heard from again or \
                                 loses its lease, before locking the metadata"
                            );
                        }
                    }
                }
            }
            if !silent {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `cmd`, which must change nothing on an agent (an `Unblock` of a vdisk not held),
    /// to every holder in `holders` whose session can take it, to learn which of them hear
    /// the controller now. Nothing waits for the answers here: see [`Probe::wait`].
    pub fn probe(&self, holders: Vec<Holder>, cmd: Command) -> Probe {
        let (tx, answers) = tokio::sync::mpsc::unbounded_channel();
        let holders: Vec<Probed> = holders
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                // An ended session can no longer answer.
                if h.ended_until.is_none() {
                    let (port, cmd, tx) = (h.port.clone(), cmd.clone(), tx.clone());
                    let mut answer = Box::pin(async move { port.apply(cmd).await });
                    // Sent (or, in-process, applied) by the first poll, here: a probe must
                    // not reach its agent after a hold begun later, which it would release.
                    match (&mut answer).now_or_never() {
                        Some(r) => {
                            let _ = tx.send((i, r));
                        }
                        None => {
                            tokio::spawn(async move {
                                let _ = tx.send((i, answer.await));
                            });
                        }
                    }
                }
                Probed { h, done: false }
            })
            .collect();
        Probe {
            holders,
            answers,
            sent: Instant::now(),
        }
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
                    Ok(()) => {
                        self.heard_from(&h.name, h.session);
                        return Delivery::Acked;
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_is_silent_after_two_missed_heartbeats_and_fenced_when_its_lease_ends() {
        let lease = Duration::from_secs(8);
        let beat = heartbeat_interval(lease);
        assert_eq!(beat, Duration::from_secs(2));
        let heard = Instant::now();
        let expires = heard + lease + lease_margin(lease);
        let at = |d: Duration| heard + d;
        let open = |now| standing(Some(lease), expires, heard, true, now);
        // A late heartbeat is not silence; two missed ones are.
        assert_eq!(open(at(beat)), Standing::Heard);
        assert_eq!(open(at(2 * beat)), Standing::Heard);
        assert_eq!(
            open(at(2 * beat + Duration::from_millis(1))),
            Standing::Silent { until: expires }
        );
        // A closed stream cannot be held however recent the last heartbeat.
        assert_eq!(
            standing(Some(lease), expires, heard, false, at(Duration::ZERO)),
            Standing::Silent { until: expires }
        );
        // Once the controller's lease has run out, the agent's has too: fenced, open or not.
        assert_eq!(open(expires), Standing::Fenced);
        assert_eq!(
            standing(Some(lease), expires, heard, false, expires),
            Standing::Fenced
        );
        // An in-process agent shares the controller's fate: always heard.
        assert_eq!(
            standing(None, heard, heard, true, at(Duration::from_secs(3600))),
            Standing::Heard
        );
        // Short leases: heartbeats never come faster than every 50 ms.
        assert_eq!(
            heartbeat_interval(Duration::from_millis(100)),
            Duration::from_millis(50)
        );
    }

    #[tokio::test]
    async fn a_probe_settles_by_answer_or_by_lease_and_tells_a_stuck_holder_apart() {
        struct Answers;
        #[async_trait::async_trait]
        impl AgentPort for Answers {
            async fn apply(&self, _: Command) -> Result<(), String> {
                Ok(())
            }
        }
        struct Never;
        #[async_trait::async_trait]
        impl AgentPort for Never {
            async fn apply(&self, _: Command) -> Result<(), String> {
                std::future::pending().await
            }
        }
        let agents = Agents::default();
        let v = VdiskId(1);
        let lease = Some(Duration::from_millis(200));
        let reg = |name: &str, port: Arc<dyn AgentPort>| {
            let s = agents.register(name, port, vec![v], lease, "p").unwrap();
            agents.opened(name, s);
            s
        };
        reg("ok", Arc::new(Answers));
        reg("cut", Arc::new(Never));
        let probe = Command::Unblock { vdisk: v };
        let cap = Duration::from_secs(10);
        // Within a short deadline only the cut-off one is left.
        let mut p = agents.probe(agents.holders(v, None), probe.clone());
        let late = p
            .wait(
                &agents,
                Some(Instant::now() + Duration::from_millis(50)),
                cap,
                "t",
            )
            .await
            .unwrap();
        assert_eq!(late.len(), 1, "{late:?}");
        assert!(late[0].starts_with("'cut'"), "{late:?}");
        // Without one, it settles when its lease runs out: fenced, no longer a holder.
        let t = Instant::now();
        assert!(p.wait(&agents, None, cap, "t").await.unwrap().is_empty());
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        let names: Vec<String> = agents
            .holders(v, None)
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(names, vec!["ok".to_string()]);
        // One that keeps renewing but never answers is stuck, not cut off.
        let s = reg("stuck", Arc::new(Never));
        let mut p = agents.probe(agents.holders(v, None), probe);
        let cap = Duration::from_millis(150);
        let renewing = async {
            loop {
                agents.renew("stuck", s, AgentReport::default());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let e = tokio::select! {
            r = p.wait(&agents, None, cap, "t") => r.unwrap_err(),
            _ = renewing => unreachable!(),
        };
        assert!(e.contains("'stuck'") && e.contains("did not answer"), "{e}");
    }
}
