//! The agents' channel: the `tabula.v1.Control` gRPC service (see
//! `crates/tabula-proto/proto/tabula/v1/control.proto`), served on the admin API's port.
//!
//! It only converts and routes. Each agent session gets a [`RemotePort`]: commands go down
//! the session stream with an id, and the agent's acknowledgement comes back up it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use tabula_api::{AgentPort, AgentReport, Command, ControlError, ControlPlane};
use tabula_core::{Generation, VdiskId};
use tabula_proto::pb::control_server::{Control, ControlServer};
use tabula_proto::pb::{self, agent_message, controller_message};
use tabula_proto::{
    command_to_pb, error_to_pb, error_to_status, fault_from_pb, location_to_pb, snapshot_to_pb,
    update_to_pb,
};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::Controller;
use crate::service::validate_name;

/// Tables of a million entries are tens of MiB on the wire.
pub const MAX_MESSAGE: usize = 1 << 30;

type Outbound = mpsc::UnboundedSender<Result<pb::ControllerMessage, Status>>;

/// The controller's end of one agent session.
struct RemotePort {
    tx: Outbound,
    /// The controller's leadership epoch, on every command.
    epoch: u64,
    pending: parking_lot::Mutex<HashMap<u64, oneshot::Sender<Result<(), String>>>>,
    next: AtomicU64,
}

impl RemotePort {
    fn send(&self, msg: controller_message::Msg) -> bool {
        self.tx
            .send(Ok(pb::ControllerMessage { msg: Some(msg) }))
            .is_ok()
    }

    fn acked(&self, id: u64, error: String) {
        if let Some(tx) = self.pending.lock().remove(&id) {
            let _ = tx.send(if error.is_empty() { Ok(()) } else { Err(error) });
        }
    }

    /// The session is over: every command waiting for an acknowledgement fails.
    fn close(&self) {
        self.pending.lock().clear();
    }
}

#[async_trait::async_trait]
impl AgentPort for RemotePort {
    async fn apply(&self, command: Command) -> Result<(), String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let mut cmd = command_to_pb(id, &command);
        cmd.epoch = self.epoch;
        if !self.send(controller_message::Msg::Command(cmd)) {
            self.pending.lock().remove(&id);
            return Err("the agent's session is closed".into());
        }
        rx.await
            .map_err(|_| "the agent's session closed before it acknowledged".to_string())?
    }
}

struct NewSession {
    agent: String,
    port: Arc<RemotePort>,
    rx: mpsc::UnboundedReceiver<Result<pb::ControllerMessage, Status>>,
}

pub struct ControlService {
    ctl: Arc<Controller>,
    /// Sessions registered but whose stream has not opened yet.
    waiting: parking_lot::Mutex<HashMap<u64, NewSession>>,
}

/// The gRPC routes, to merge into the admin API's router.
pub fn router(ctl: Arc<Controller>) -> axum::Router {
    let svc = ControlServer::new(ControlService {
        ctl,
        waiting: parking_lot::Mutex::new(HashMap::new()),
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    tonic::service::Routes::new(svc).into_axum_router()
}

fn status(e: ControlError) -> Status {
    error_to_status(&e)
}

fn malformed(e: tabula_proto::Malformed) -> Status {
    status(ControlError::Invalid(e.to_string()))
}

impl ControlService {
    fn check_session(&self, agent: &str, session: u64) -> Result<(), Status> {
        if self.ctl.agents.is_current(agent, session) {
            Ok(())
        } else {
            Err(status(ControlError::Unavailable(format!(
                "session {session} of agent '{agent}' is over; register again"
            ))))
        }
    }
}

fn report_from(h: &pb::Heartbeat) -> AgentReport {
    AgentReport {
        tables: h
            .tables
            .iter()
            .map(|t| (VdiskId(t.vdisk), Generation(t.generation)))
            .collect(),
        table_mismatches: h.table_mismatches,
        gaps_healed: h.gaps_healed,
        connections: h
            .connections
            .iter()
            .map(|c| (VdiskId(c.vdisk), c.count))
            .collect(),
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

impl ControlService {
    /// Refuses to answer agents unless this controller's leadership is certain (always,
    /// without high availability).
    fn lead(&self) -> Result<(), Status> {
        if self.ctl.leading() {
            Ok(())
        } else {
            Err(tabula_proto::not_leader(None))
        }
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        let peer = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map_or_else(|| "an unknown address".to_string(), |c| c.0.to_string());
        self.lead()?;
        let req = req.into_inner();
        validate_name("agent", &req.agent).map_err(status)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let port = Arc::new(RemotePort {
            tx,
            epoch: self.ctl.epoch(),
            pending: parking_lot::Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        });
        let lease = self.ctl.config().lease;
        let session = self
            .ctl
            .agents
            .register(
                &req.agent,
                port.clone(),
                req.held_vdisks.into_iter().map(VdiskId).collect(),
                Some(lease),
                &peer,
            )
            .map_err(status)?;
        let mut waiting = self.waiting.lock();
        waiting.retain(|_, s| s.agent != req.agent);
        waiting.insert(
            session,
            NewSession {
                agent: req.agent,
                port,
                rx,
            },
        );
        Ok(Response::new(pb::RegisterReply {
            session,
            lease_ms: lease.as_millis() as u64,
            heartbeat_ms: crate::agents::heartbeat_interval(lease).as_millis() as u64,
            epoch: self.ctl.epoch(),
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let Some(pb::AgentMessage {
            msg: Some(agent_message::Msg::HelloSession(session)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first session message must be a hello",
            ));
        };
        let Some(NewSession { agent, port, rx }) = self.waiting.lock().remove(&session) else {
            return Err(status(ControlError::Unavailable(format!(
                "session {session} is unknown or already open; register again"
            ))));
        };
        debug!(agent, session, "session open");
        self.ctl.agents.opened(&agent, session);
        let ctl = self.ctl.clone();
        tokio::spawn(async move {
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        debug!(agent, error = %e, "session stream failed");
                        break;
                    }
                };
                match msg.msg {
                    Some(agent_message::Msg::Heartbeat(h)) => {
                        // A leader that is no longer sure of its leadership grants nothing:
                        // the agent's lease then runs out before the next leader frees
                        // anything this one may have told it about.
                        if !ctl.leading() {
                            continue;
                        }
                        if ctl.agents.renew(&agent, session, report_from(&h)) {
                            port.send(controller_message::Msg::Lease(pb::LeaseGrant {
                                seq: h.seq,
                            }));
                        } else {
                            port.send(controller_message::Msg::Revoked(
                                "the session was replaced or evicted; register again".into(),
                            ));
                            break;
                        }
                    }
                    Some(agent_message::Msg::Ack(a)) => port.acked(a.command, a.error),
                    Some(agent_message::Msg::HelloSession(_)) | None => {
                        warn!(agent, "unexpected session message; closing the session");
                        break;
                    }
                }
            }
            ctl.agents.disconnected(&agent, session);
            port.close();
        });
        let out = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        Ok(Response::new(Box::pin(out)))
    }

    async fn open_vdisk(
        &self,
        req: Request<pb::OpenVdiskRequest>,
    ) -> Result<Response<pb::TableSnapshot>, Status> {
        self.lead()?;
        let req = req.into_inner();
        self.check_session(&req.agent, req.session)?;
        let snap = self
            .ctl
            .open_vdisk_in(&req.agent, Some(req.session), &req.name)
            .await
            .map_err(status)?;
        let mut snap = snapshot_to_pb(&snap);
        snap.epoch = self.ctl.epoch();
        self.lead()?;
        Ok(Response::new(snap))
    }

    async fn list_vdisks(
        &self,
        _req: Request<pb::ListVdisksRequest>,
    ) -> Result<Response<pb::VdiskNames>, Status> {
        let names = self.ctl.list_vdisks().await.map_err(status)?;
        Ok(Response::new(pb::VdiskNames { names }))
    }

    async fn describe_vdisk(
        &self,
        req: Request<pb::DescribeVdiskRequest>,
    ) -> Result<Response<pb::VdiskSummary>, Status> {
        let s = self
            .ctl
            .describe_vdisk(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::VdiskSummary {
            vdisk: s.vdisk.0,
            name: s.name,
            size_bytes: s.size_bytes,
            read_only: s.read_only,
        }))
    }

    async fn get_container(
        &self,
        req: Request<pb::GetContainerRequest>,
    ) -> Result<Response<pb::ContainerLocation>, Status> {
        let id = tabula_core::ContainerId(req.into_inner().id);
        let loc = self.ctl.container(id).await.map_err(status)?;
        Ok(Response::new(location_to_pb(&loc)))
    }

    async fn fault(
        &self,
        req: Request<pb::FaultRequest>,
    ) -> Result<Response<pb::FaultReply>, Status> {
        let req = req.into_inner();
        let fault = fault_from_pb(
            req.fault
                .ok_or_else(|| Status::invalid_argument("fault missing"))?,
        )
        .map_err(malformed)?;
        self.lead()?;
        self.check_session(&fault.agent, req.session)?;
        let answer = match self.ctl.fault(fault).await {
            Ok(u) => pb::fault_reply::Answer::Install(update_to_pb(&u)),
            Err(e) => pb::fault_reply::Answer::Fail(error_to_pb(&e)),
        };
        if let Some(p) = self.ctl.config().test_pauses.fault_answer {
            warn!(
                ms = p.as_millis() as u64,
                "test hook: a committed fault waits before its answer"
            );
            tokio::time::sleep(p).await;
        }
        // Checked again: leadership may have lapsed while the fault waited.
        self.lead()?;
        Ok(Response::new(pb::FaultReply {
            answer: Some(answer),
            epoch: self.ctl.epoch(),
        }))
    }

    async fn report_container(
        &self,
        req: Request<pb::ContainerReport>,
    ) -> Result<Response<pb::ContainerReportReply>, Status> {
        let req = req.into_inner();
        self.check_session(&req.agent, req.session)?;
        let error = (!req.error.is_empty()).then_some(req.error);
        self.ctl
            .report_container(&req.agent, tabula_core::ContainerId(req.container), error)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ContainerReportReply {}))
    }
}
