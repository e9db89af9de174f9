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
    command_from_pb, error_from_pb, error_from_status, fault_to_pb, location_from_pb,
    snapshot_from_pb, update_from_pb,
};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, error, info, warn};

use crate::lease::Lease;

/// Tables of a million entries are tens of MiB on the wire.
const MAX_MESSAGE: usize = 1 << 30;

pub struct RemoteControl {
    me: std::sync::Weak<RemoteControl>,
    client: ControlClient<Channel>,
    session: AtomicU64,
    lease: Arc<Lease>,
    /// How long to wait for any one call before treating the controller as unreachable.
    call_timeout: Duration,
    /// Why the controller refused this agent's name before it ever had a session.
    refused: tokio::sync::watch::Sender<Option<String>>,
}

/// The outcome of one registration attempt.
enum Registration {
    /// A session, and when the request was sent (the lease runs from then).
    Session(pb::RegisterReply, Instant),
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
    /// A client for the controller at `url` (`http://host:port`). Nothing is dialled yet.
    pub fn new(url: &str, call_timeout: Duration) -> Result<Arc<RemoteControl>, String> {
        let ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("controller address {url}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(4))
            .keep_alive_while_idle(true);
        let client = ControlClient::new(ep.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(Arc::new_cyclic(|me| RemoteControl {
            me: me.clone(),
            client,
            session: AtomicU64::new(0),
            lease: Arc::new(Lease::expired()),
            call_timeout,
            refused: tokio::sync::watch::channel(None).0,
        }))
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
        match self.client.clone().register(self.request(req)).await {
            Ok(r) => Registration::Session(r.into_inner(), began),
            Err(s) => match error_from_status(&s) {
                e @ (ControlError::Exists(_) | ControlError::Invalid(_)) => {
                    Registration::Refused(e)
                }
                _ => Registration::Unreachable(s.message().to_string()),
            },
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
        mut first: Option<(pb::RegisterReply, Instant)>,
    ) {
        let mut backoff = Duration::from_millis(100);
        let mut was_connected = first.is_some();
        // Whether a session stream ever opened: until then a refusal means the name is
        // another agent's.
        let mut established = false;
        let mut refusals = 0u64;
        loop {
            let attempt = match first.take() {
                Some((reply, began)) => Registration::Session(reply, began),
                None => self.try_register(&name, &port).await,
            };
            let (reply, began) = match attempt {
                Registration::Session(reply, began) => (reply, began),
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
            info!(session = reply.session, lease = ?lease, "session with the controller started");
            was_connected = true;
            let resync = {
                let port = port.clone();
                tokio::spawn(async move { port.session_started().await })
            };
            established |= self.run_session(&port, reply, lease).await;
            resync.abort();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One session: heartbeats up, grants and commands down, until either side ends it.
    /// Returns whether its stream opened.
    async fn run_session(
        &self,
        port: &Arc<dyn AgentPort>,
        reply: pb::RegisterReply,
        lease: Duration,
    ) -> bool {
        let (tx, rx) = mpsc::unbounded_channel::<pb::AgentMessage>();
        let send = |msg: agent_message::Msg| tx.send(pb::AgentMessage { msg: Some(msg) }).is_ok();
        send(agent_message::Msg::HelloSession(reply.session));
        let mut inbound = match self
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
                            if let Some(at) = sent.get(&g.seq).copied() {
                                self.lease.extend_to(at + lease);
                                sent.retain(|&s, _| s > g.seq);
                            }
                        }
                        controller_message::Msg::Command(c) => {
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
        let first = match self.try_register(name, &port).await {
            Registration::Session(reply, began) => Some((reply, began)),
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
        let snap = self
            .client
            .clone()
            .open_vdisk(self.request(req))
            .await
            .map_err(|s| unavailable("opening the vdisk", &s))?
            .into_inner();
        snapshot_from_pb(snap).map_err(malformed)
    }

    async fn list_vdisks(&self) -> Result<Vec<String>, ControlError> {
        let r = self
            .client
            .clone()
            .list_vdisks(self.request(pb::ListVdisksRequest {}))
            .await
            .map_err(|s| unavailable("listing vdisks", &s))?;
        Ok(r.into_inner().names)
    }

    async fn describe_vdisk(&self, name: &str) -> Result<VdiskSummary, ControlError> {
        let r = self
            .client
            .clone()
            .describe_vdisk(self.request(pb::DescribeVdiskRequest {
                name: name.to_string(),
            }))
            .await
            .map_err(|s| unavailable("describing a vdisk", &s))?
            .into_inner();
        Ok(VdiskSummary {
            vdisk: VdiskId(r.vdisk),
            name: r.name,
            size_bytes: r.size_bytes,
            read_only: r.read_only,
        })
    }

    async fn container(&self, id: ContainerId) -> Result<ContainerLocation, ControlError> {
        let r = self
            .client
            .clone()
            .get_container(self.request(pb::GetContainerRequest { id: id.0 }))
            .await
            .map_err(|s| unavailable("looking up a container", &s))?;
        Ok(location_from_pb(r.into_inner()))
    }

    async fn fault(&self, fault: Fault) -> Result<RangeUpdate, ControlError> {
        let req = pb::FaultRequest {
            session: self.session.load(Ordering::Acquire),
            fault: Some(fault_to_pb(&fault)),
        };
        let reply = self
            .client
            .clone()
            .fault(self.request(req))
            .await
            .map_err(|s| unavailable("sending a fault", &s))?
            .into_inner();
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
        self.client
            .clone()
            .report_container(self.request(req))
            .await
            .map_err(|s| unavailable("reporting a container fault", &s))?;
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
