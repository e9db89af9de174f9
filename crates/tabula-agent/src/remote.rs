//! The agent's end of the gRPC channel: [`RemoteControl`] implements [`ControlPlane`] with
//! calls to the controller, and keeps the session: registration, heartbeats that renew the
//! lease, the commands that come down the stream, and reconnection.
//!
//! Lease rules (the controller's half is in `tabula-controller`'s `agents` module): a grant
//! answers a heartbeat, and the lease then runs from when that heartbeat was *sent*. Only a
//! grant extends it. Nothing the agent can observe on its own proves that no controller is
//! alive: a refused connection may come from a firewall's REJECT or a controller that moved
//! while the old one still runs and has evicted this agent (a test serves freed space
//! through exactly that hole if refusals extend the lease). So with the controller
//! unreachable the agent serves from its copies until its lease ends, then holds I/O until
//! it has reconnected and resynchronised; `--lease` is the outage it rides through.
//!
//! Names: the controller refuses a name whose session is live. Before this agent ever had
//! a session that means another agent runs under its name, and the agent gives up (see
//! [`RemoteControl::refused`]); later it means the controller still counts this agent's
//! previous session (a cut it noticed after the agent did), and the agent retries until
//! that session's lease has run out.
//!
//! Several controllers (HA): the agent is given their addresses and talks to one at a time,
//! the *current* one. A standby answers every call with "not the leader" and the leader's
//! address when it knows it ([`tabula_proto::not_leader`]); on that, or on no answer, the
//! agent moves to the leader named, else to the next address ([`follow`]), and the call
//! fails as Unavailable (I/O retries faults until `--fault-wait`). Every answer and command
//! carries the leader's epoch; the agent keeps the newest it has seen and refuses anything
//! older: a deposed leader's registration, fault answer, table or command.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tabula_api::{
    AgentPort, ContainerLocation, ControlError, ControlPlane, Fault, RangeUpdate, TableSnapshot,
    VdiskSummary,
};
use tabula_core::{ContainerId, VdiskId};
use tabula_proto::pb::control_client::ControlClient;
use tabula_proto::pb::{self, agent_message, controller_message};
use tabula_proto::{
    command_from_pb, error_from_pb, error_from_status, fault_to_pb, is_not_leader, leader_hint,
    location_from_pb, snapshot_from_pb, update_from_pb,
};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, error, info, warn};

use crate::lease::Lease;

pub mod follow;
#[cfg(test)]
mod tests;

use follow::{Failure, Next};

/// Tables of a million entries are tens of MiB on the wire.
const MAX_MESSAGE: usize = 1 << 30;

pub struct RemoteControl {
    me: std::sync::Weak<RemoteControl>,
    targets: parking_lot::Mutex<Targets>,
    session: AtomicU64,
    /// The newest leader epoch seen in any answer or command.
    epoch: AtomicU64,
    lease: Arc<Lease>,
    /// How long to wait for any one call before treating the controller as unreachable.
    call_timeout: Duration,
    /// Why the controller refused this agent's name before it ever had a session.
    refused: tokio::sync::watch::Sender<Option<String>>,
}

/// The controller addresses and the one calls go to.
struct Targets {
    /// The addresses given, then at most one leader's address learned from a hint.
    list: Vec<Target>,
    given: usize,
    current: usize,
    /// Counts moves, so that of several calls failing on one controller only the first moves.
    moves: u64,
}

struct Target {
    url: String,
    client: ControlClient<Channel>,
}

/// The controller a call went to.
#[derive(Clone)]
struct Via {
    url: String,
    client: ControlClient<Channel>,
    moves: u64,
}

fn client_for(url: &str) -> Result<ControlClient<Channel>, String> {
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("controller address {url}: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        // A controller that stops answering (paused, its host gone without a reset) is
        // given up within about 3 s, so the agent moves to the next leader soon after it
        // is elected.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true);
    Ok(ControlClient::new(ep.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Whether a failed call should make the agent try another controller, and why: a standby's
/// answer, or no answer from tabula at all (a transport failure, a timeout, something else
/// at that address). The controller's own errors (with a tabula error payload: a refused
/// name, a session that is over) do not.
fn failure_of(s: &tonic::Status) -> Option<Failure> {
    if is_not_leader(s) {
        return Some(Failure::NotLeader(leader_hint(s)));
    }
    s.details().is_empty().then_some(Failure::Unreachable)
}

/// The outcome of one registration attempt.
enum Registration {
    /// A session, when the request was sent (the lease runs from then), and the controller
    /// that gave it.
    Session(pb::RegisterReply, Instant, Box<Via>),
    /// The controller answered and refused the name (in use by a live session, or invalid).
    Refused(ControlError),
    /// No answer from the controller.
    Unreachable(String),
}

fn unavailable(what: &str, s: &tonic::Status) -> ControlError {
    match error_from_status(s) {
        ControlError::Unavailable(m) => ControlError::Unavailable(format!("{what}: {m}")),
        other => other,
    }
}

fn malformed(e: tabula_proto::Malformed) -> ControlError {
    ControlError::Invalid(e.to_string())
}

impl RemoteControl {
    /// A client for the controllers at `urls` (`http://host:port`, see [`follow::parse_list`]);
    /// calls go to the first until it fails. Nothing is dialled yet.
    pub fn new(urls: &[String], call_timeout: Duration) -> Result<Arc<RemoteControl>, String> {
        if urls.is_empty() {
            return Err("no controller address given".into());
        }
        let list = urls
            .iter()
            .map(|u| {
                let url = follow::normalize(u);
                Ok(Target {
                    client: client_for(&url)?,
                    url,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Arc::new_cyclic(|me| RemoteControl {
            me: me.clone(),
            targets: parking_lot::Mutex::new(Targets {
                given: list.len(),
                list,
                current: 0,
                moves: 0,
            }),
            session: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            lease: Arc::new(Lease::expired()),
            call_timeout,
            refused: tokio::sync::watch::channel(None).0,
        }))
    }

    /// The controller calls go to now.
    fn current(&self) -> Via {
        let t = self.targets.lock();
        let c = &t.list[t.current];
        Via {
            url: c.url.clone(),
            client: c.client.clone(),
            moves: t.moves,
        }
    }

    /// The address calls go to now (for logs and tests).
    pub fn current_url(&self) -> String {
        self.current().url
    }

    /// The newest leader epoch this agent has seen.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The controller `via` failed a call: move to the leader it named, else the next
    /// address, unless another call has moved already.
    fn failed(&self, via: &Via, failure: &Failure) {
        let mut t = self.targets.lock();
        if t.moves != via.moves {
            return;
        }
        let urls: Vec<String> = t.list.iter().map(|c| c.url.clone()).collect();
        let next = match follow::next_controller(&urls, t.current, failure) {
            Next::Index(i) => i,
            Next::Add(url) => match client_for(&url) {
                Ok(client) => {
                    // One learned address at a time, after the given ones.
                    let given = t.given;
                    t.list.truncate(given);
                    t.list.push(Target { url, client });
                    t.list.len() - 1
                }
                Err(e) => {
                    warn!(error = e, "the leader's address a standby gave is unusable");
                    (t.current + 1) % t.list.len()
                }
            },
        };
        t.moves += 1;
        t.current = next;
        let to = &t.list[next].url;
        if *to != via.url {
            match failure {
                Failure::NotLeader(Some(_)) => {
                    info!(from = via.url, to, "following the leader")
                }
                _ => debug!(from = via.url, to, ?failure, "trying another controller"),
            }
        }
    }

    /// An answer at `epoch` from `via`: refused (and another controller tried next) if an
    /// answer from a newer leader was seen already.
    fn check_epoch(&self, via: &Via, epoch: u64, what: &str) -> Result<(), ControlError> {
        let newest = self.epoch.fetch_max(epoch, Ordering::AcqRel);
        if epoch < newest {
            self.failed(via, &Failure::StaleEpoch);
            warn!(
                controller = via.url,
                epoch, newest, "dropped an answer from a deposed leader"
            );
            return Err(ControlError::Unavailable(format!(
                "{what}: the controller at {} answered as leader of epoch {epoch}, older than epoch {newest} this agent has seen (a deposed leader); retrying elsewhere",
                via.url
            )));
        }
        Ok(())
    }

    /// A unary call to the current controller; when it fails without an answer from a
    /// leader, the next call goes elsewhere.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<(T, Via), ControlError>
    where
        F: FnOnce(ControlClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let via = self.current();
        match f(via.client.clone()).await {
            Ok(r) => Ok((r.into_inner(), via)),
            Err(s) => {
                if let Some(failure) = failure_of(&s) {
                    self.failed(&via, &failure);
                }
                Err(unavailable(&format!("{what} (controller {})", via.url), &s))
            }
        }
    }

    /// Resolves if the controller refused this agent's name before the agent ever had a
    /// session (another agent runs under it, or it is invalid), with the controller's
    /// reason: the agent cannot serve under that name and should exit.
    pub async fn refused(&self) -> String {
        let mut rx = self.refused.subscribe();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    async fn try_register(&self, name: &str, port: &Arc<dyn AgentPort>) -> Registration {
        let began = Instant::now();
        let req = pb::RegisterRequest {
            agent: name.to_string(),
            held_vdisks: port.held_vdisks().into_iter().map(|v| v.0).collect(),
        };
        let via = self.current();
        match via.client.clone().register(self.request(req)).await {
            Ok(r) => {
                let reply = r.into_inner();
                match self.check_epoch(&via, reply.epoch, "registering") {
                    Ok(()) => Registration::Session(reply, began, Box::new(via)),
                    Err(e) => Registration::Unreachable(e.to_string()),
                }
            }
            Err(s) => {
                if let Some(failure) = failure_of(&s) {
                    self.failed(&via, &failure);
                    return Registration::Unreachable(format!("{}: {}", via.url, s.message()));
                }
                match error_from_status(&s) {
                    e @ (ControlError::Exists(_) | ControlError::Invalid(_)) => {
                        Registration::Refused(e)
                    }
                    _ => Registration::Unreachable(format!("{}: {}", via.url, s.message())),
                }
            }
        }
    }

    /// Registration attempts until one gets an answer: each address (and each leader a
    /// standby names on the way) asked once.
    async fn register_round(&self, name: &str, port: &Arc<dyn AgentPort>) -> Registration {
        let mut asked: Vec<String> = Vec::new();
        let mut why = Vec::new();
        // Bounded also when standbys keep naming new leaders.
        let most = 2 * self.targets.lock().list.len() + 2;
        loop {
            let url = self.current_url();
            if asked.contains(&url) || asked.len() >= most {
                return Registration::Unreachable(why.join("; "));
            }
            asked.push(url);
            match self.try_register(name, port).await {
                Registration::Unreachable(e) => why.push(e),
                done => return done,
            }
        }
    }

    pub fn lease(&self) -> Arc<Lease> {
        self.lease.clone()
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.call_timeout);
        r
    }

    /// Keeps a session with the controller for as long as the agent lives, starting with
    /// `first` if the first attempt (at start) got one.
    async fn keep_session(
        self: Arc<Self>,
        name: String,
        port: Arc<dyn AgentPort>,
        mut first: Option<(pb::RegisterReply, Instant, Box<Via>)>,
    ) {
        let mut backoff = Duration::from_millis(100);
        let mut was_connected = first.is_some();
        // Whether a session stream ever opened: until then a refusal means the name is
        // another agent's.
        let mut established = false;
        let mut refusals = 0u64;
        loop {
            let attempt = match first.take() {
                Some((reply, began, via)) => Registration::Session(reply, began, via),
                None => self.register_round(&name, &port).await,
            };
            let (reply, began, via) = match attempt {
                Registration::Session(reply, began, via) => (reply, began, via),
                Registration::Refused(e) if !established => {
                    error!(error = %e, "the controller refused this agent's name; stopping");
                    self.refused.send_replace(Some(e.to_string()));
                    return;
                }
                Registration::Refused(e) => {
                    // The controller still counts this agent's previous session (it noticed
                    // the cut later than the agent did): retry until its lease has run out.
                    // Still refused after many tries, another agent has taken the name
                    // (this one was paused past its lease): keep saying so.
                    if refusals % 60 == 0 {
                        warn!(error = %e, refusals, "the controller refused to register this agent again; retrying until its previous session's lease runs out");
                    } else {
                        debug!(error = %e, "registration refused again; retrying");
                    }
                    refusals += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                Registration::Unreachable(e) => {
                    if was_connected {
                        warn!(error = e, "controller unreachable; retrying");
                        was_connected = false;
                    } else {
                        debug!(error = e, "controller unreachable; retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            refusals = 0;
            let lease = Duration::from_millis(reply.lease_ms);
            self.session.store(reply.session, Ordering::Release);
            self.lease.extend_to(began + lease);
            info!(session = reply.session, lease = ?lease, controller = via.url, epoch = reply.epoch, "session with the controller started");
            was_connected = true;
            let resync = {
                let port = port.clone();
                tokio::spawn(async move { port.session_started().await })
            };
            established |= self.run_session(&port, &via, reply, lease).await;
            resync.abort();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One session: heartbeats up, grants and commands down, until either side ends it.
    /// Returns whether its stream opened.
    async fn run_session(
        &self,
        port: &Arc<dyn AgentPort>,
        via: &Via,
        reply: pb::RegisterReply,
        lease: Duration,
    ) -> bool {
        let session_epoch = reply.epoch;
        let (tx, rx) = mpsc::unbounded_channel::<pb::AgentMessage>();
        let send = |msg: agent_message::Msg| tx.send(pb::AgentMessage { msg: Some(msg) }).is_ok();
        send(agent_message::Msg::HelloSession(reply.session));
        let mut inbound = match via
            .client
            .clone()
            .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => {
                warn!(error = %s.message(), "could not open the session stream");
                return false;
            }
        };
        // Commands are applied in order, by one task, so heartbeats never wait behind a drain.
        let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<pb::Command>();
        let applier = {
            let port = port.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(c) = cmd_rx.recv().await {
                    let (id, error) = match command_from_pb(c.clone()) {
                        Ok((id, cmd)) => (id, port.apply(cmd).await.err().unwrap_or_default()),
                        Err(e) => (c.id, e.to_string()),
                    };
                    let ack = agent_message::Msg::Ack(pb::Ack { command: id, error });
                    if tx.send(pb::AgentMessage { msg: Some(ack) }).is_err() {
                        break;
                    }
                }
            })
        };
        let heartbeat = Duration::from_millis(reply.heartbeat_ms.max(20));
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent: BTreeMap<u64, Instant> = BTreeMap::new();
        let mut seq = 0u64;
        // A client connecting is reported at once: the controller refuses to delete a vdisk
        // under its clients, and must not miss one that just connected (and whose first
        // request may already be on its way). Departures are reported at most every 50 ms.
        let mut early_after = Instant::now();
        let mut reported: Vec<(VdiskId, u32)> = Vec::new();
        loop {
            let next_heartbeat = async {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = async {
                        port.report_changed().await;
                        let now = port.report().unwrap_or_default().connections;
                        if !gained_clients(&reported, &now) {
                            tokio::time::sleep_until(early_after.into()).await;
                        }
                    } => {}
                }
            };
            // A newer leader answered a call meanwhile: this session's controller is deposed,
            // and nothing more from it counts (no grant, no command).
            if self.deposed(via, session_epoch) {
                break;
            }
            tokio::select! {
                _ = next_heartbeat => {
                    early_after = Instant::now() + Duration::from_millis(50);
                    seq += 1;
                    sent.insert(seq, Instant::now());
                    // Grants that never come must not pile up.
                    while sent.len() > 64 {
                        sent.pop_first();
                    }
                    let report = port.report().unwrap_or_default();
                    reported.clone_from(&report.connections);
                    let hb = pb::Heartbeat {
                        seq,
                        tables: report
                            .tables
                            .iter()
                            .map(|(v, g)| pb::TableReport { vdisk: v.0, generation: g.0 })
                            .collect(),
                        table_mismatches: report.table_mismatches,
                        gaps_healed: report.gaps_healed,
                        connections: report
                            .connections
                            .iter()
                            .map(|(v, n)| pb::ConnectionReport { vdisk: v.0, count: *n })
                            .collect(),
                    };
                    if !send(agent_message::Msg::Heartbeat(hb)) {
                        break;
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(pb::ControllerMessage { msg: Some(m) })) => match m {
                        controller_message::Msg::Lease(g) => {
                            if self.deposed(via, session_epoch) {
                                break;
                            }
                            if let Some(at) = sent.get(&g.seq).copied() {
                                self.lease.extend_to(at + lease);
                                sent.retain(|&s, _| s > g.seq);
                            }
                        }
                        controller_message::Msg::Command(c) => {
                            let newest = self.epoch.fetch_max(c.epoch, Ordering::AcqRel).max(session_epoch);
                            if c.epoch < newest {
                                warn!(controller = via.url, epoch = c.epoch, newest, "refused a command from a deposed leader; ending the session");
                                let error = format!("refused: this agent has seen leader epoch {newest}, newer than the command's {}", c.epoch);
                                let ack = agent_message::Msg::Ack(pb::Ack { command: c.id, error });
                                let _ = tx.send(pb::AgentMessage { msg: Some(ack) });
                                self.failed(via, &Failure::StaleEpoch);
                                break;
                            }
                            if cmd_tx.send(c).is_err() {
                                break;
                            }
                        }
                        controller_message::Msg::Revoked(why) => {
                            warn!(reason = why, "the controller ended this agent's session");
                            self.lease.expire();
                            break;
                        }
                    },
                    Ok(Some(pb::ControllerMessage { msg: None })) => {}
                    Ok(None) => {
                        warn!("the controller closed the session");
                        break;
                    }
                    Err(s) => {
                        warn!(error = %s.message(), "the session with the controller failed");
                        break;
                    }
                }
            }
        }
        applier.abort();
        true
    }

    /// Whether a leader newer than the session's (of `epoch`) has answered: then the
    /// session's controller is deposed and the session ends.
    fn deposed(&self, via: &Via, epoch: u64) -> bool {
        let newest = self.epoch();
        if epoch < newest {
            warn!(
                controller = via.url,
                epoch, newest, "a newer leader answered; ending the session with the deposed one"
            );
            self.failed(via, &Failure::StaleEpoch);
            return true;
        }
        false
    }
}

#[async_trait::async_trait]
impl ControlPlane for RemoteControl {
    /// Registers once, then leaves the session to the keeper. A refusal (the name is in use
    /// by a live session, or invalid) is returned; an unreachable controller is not: the
    /// agent serves (from nothing, at first) and the keeper retries.
    async fn register_agent(
        &self,
        name: &str,
        port: Arc<dyn AgentPort>,
        _held: Vec<VdiskId>,
    ) -> Result<(), ControlError> {
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| ControlError::Unavailable("the agent is shutting down".into()))?;
        let first = match self.register_round(name, &port).await {
            Registration::Session(reply, began, via) => Some((reply, began, via)),
            Registration::Refused(e) => return Err(e),
            Registration::Unreachable(e) => {
                warn!(error = e, "controller unreachable at start; retrying");
                None
            }
        };
        tokio::spawn(me.keep_session(name.to_string(), port, first));
        Ok(())
    }

    async fn open_vdisk(&self, agent: &str, name: &str) -> Result<TableSnapshot, ControlError> {
        let req = pb::OpenVdiskRequest {
            session: self.session.load(Ordering::Acquire),
            agent: agent.to_string(),
            name: name.to_string(),
        };
        let (snap, via) = self
            .call("opening the vdisk", |mut c| async move {
                c.open_vdisk(self.request(req)).await
            })
            .await?;
        self.check_epoch(&via, snap.epoch, "opening the vdisk")?;
        snapshot_from_pb(snap).map_err(malformed)
    }

    async fn list_vdisks(&self) -> Result<Vec<String>, ControlError> {
        let (r, _) = self
            .call("listing vdisks", |mut c| async move {
                c.list_vdisks(self.request(pb::ListVdisksRequest {})).await
            })
            .await?;
        Ok(r.names)
    }

    async fn describe_vdisk(&self, name: &str) -> Result<VdiskSummary, ControlError> {
        let req = pb::DescribeVdiskRequest {
            name: name.to_string(),
        };
        let (r, _) = self
            .call("describing a vdisk", |mut c| async move {
                c.describe_vdisk(self.request(req)).await
            })
            .await?;
        Ok(VdiskSummary {
            vdisk: VdiskId(r.vdisk),
            name: r.name,
            size_bytes: r.size_bytes,
            read_only: r.read_only,
        })
    }

    async fn container(&self, id: ContainerId) -> Result<ContainerLocation, ControlError> {
        let (r, _) = self
            .call("looking up a container", |mut c| async move {
                c.get_container(self.request(pb::GetContainerRequest { id: id.0 }))
                    .await
            })
            .await?;
        Ok(location_from_pb(r))
    }

    async fn fault(&self, fault: Fault) -> Result<RangeUpdate, ControlError> {
        let req = pb::FaultRequest {
            session: self.session.load(Ordering::Acquire),
            fault: Some(fault_to_pb(&fault)),
        };
        let (reply, via) = self
            .call("sending a fault", |mut c| async move {
                c.fault(self.request(req)).await
            })
            .await?;
        // A deposed leader's answer is dropped; the fault is asked again (of the leader).
        self.check_epoch(&via, reply.epoch, "sending a fault")?;
        match reply.answer {
            Some(pb::fault_reply::Answer::Install(u)) => update_from_pb(&u).map_err(malformed),
            Some(pb::fault_reply::Answer::Fail(e)) => Err(error_from_pb(e)),
            None => Err(ControlError::Invalid("empty fault reply".into())),
        }
    }

    async fn report_container(
        &self,
        agent: &str,
        container: ContainerId,
        error: Option<String>,
    ) -> Result<(), ControlError> {
        let req = pb::ContainerReport {
            session: self.session.load(Ordering::Acquire),
            agent: agent.to_string(),
            container: container.0,
            error: error.unwrap_or_default(),
        };
        self.call("reporting a container fault", |mut c| async move {
            c.report_container(self.request(req)).await
        })
        .await?;
        Ok(())
    }
}

/// Whether some vdisk has more connections in `now` than were last `reported`.
fn gained_clients(reported: &[(VdiskId, u32)], now: &[(VdiskId, u32)]) -> bool {
    now.iter().any(|(v, n)| {
        let before = reported.iter().find(|(w, _)| w == v).map_or(0, |(_, m)| *m);
        *n > before
    })
}
