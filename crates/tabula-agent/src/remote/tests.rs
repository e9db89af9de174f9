//! `RemoteControl` against fake controllers on loopback (real gRPC): following a standby's
//! hint, rotating past addresses that do not answer, and refusing a deposed leader's epoch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tabula_api::{AgentPort, Command, ControlError, ControlPlane, Fault, FaultOp};
use tabula_core::{Generation, State, VdiskId};
use tabula_proto::pb::control_server::{Control, ControlServer};
use tabula_proto::pb::{self, agent_message, controller_message};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::RemoteControl;

type Outbound = mpsc::UnboundedSender<Result<pb::ControllerMessage, Status>>;

/// What a fake controller is and what it saw.
#[derive(Default)]
struct Seen {
    /// Answers as a leader of this epoch; a standby while `standby` is set.
    epoch: AtomicU64,
    standby: AtomicBool,
    /// The leader a standby names.
    hint: parking_lot::Mutex<Option<String>>,
    registers: AtomicUsize,
    faults: AtomicUsize,
    sessions_ended: AtomicUsize,
    /// Down the open session, for tests to push commands.
    session: parking_lot::Mutex<Option<Outbound>>,
    acks: parking_lot::Mutex<Vec<pb::Ack>>,
}

#[derive(Clone)]
struct Fake(Arc<Seen>);

impl Fake {
    fn check(&self) -> Result<u64, Status> {
        if self.0.standby.load(Ordering::SeqCst) {
            return Err(tabula_proto::not_leader(self.0.hint.lock().as_deref()));
        }
        Ok(self.0.epoch.load(Ordering::SeqCst))
    }
}

#[tonic::async_trait]
impl Control for Fake {
    async fn register(
        &self,
        _req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        let epoch = self.check()?;
        let n = self.0.registers.fetch_add(1, Ordering::SeqCst) as u64;
        Ok(Response::new(pb::RegisterReply {
            session: n + 1,
            lease_ms: 10_000,
            heartbeat_ms: 50,
            epoch,
        }))
    }

    type SessionStream =
        tokio_stream::wrappers::UnboundedReceiverStream<Result<pb::ControllerMessage, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.check()?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        *self.0.session.lock() = Some(tx.clone());
        let state = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                match m.msg {
                    Some(agent_message::Msg::Heartbeat(h)) => {
                        let grant = controller_message::Msg::Lease(pb::LeaseGrant { seq: h.seq });
                        let _ = tx.send(Ok(pb::ControllerMessage { msg: Some(grant) }));
                    }
                    Some(agent_message::Msg::Ack(a)) => state.acks.lock().push(a),
                    _ => {}
                }
            }
            state.sessions_ended.fetch_add(1, Ordering::SeqCst);
        });
        Ok(Response::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        ))
    }

    async fn open_vdisk(
        &self,
        req: Request<pb::OpenVdiskRequest>,
    ) -> Result<Response<pb::TableSnapshot>, Status> {
        let epoch = self.check()?;
        Ok(Response::new(pb::TableSnapshot {
            vdisk: 1,
            name: req.into_inner().name,
            size_bytes: 1 << 20,
            segment_blocks: 256,
            generation: 1,
            read_only: false,
            entries: Vec::new(),
            epoch,
        }))
    }

    async fn list_vdisks(
        &self,
        _req: Request<pb::ListVdisksRequest>,
    ) -> Result<Response<pb::VdiskNames>, Status> {
        self.check()?;
        Ok(Response::new(pb::VdiskNames {
            names: vec!["v".into()],
        }))
    }

    async fn describe_vdisk(
        &self,
        _req: Request<pb::DescribeVdiskRequest>,
    ) -> Result<Response<pb::VdiskSummary>, Status> {
        Err(self
            .check()
            .err()
            .unwrap_or_else(|| Status::unimplemented("")))
    }

    async fn get_container(
        &self,
        _req: Request<pb::GetContainerRequest>,
    ) -> Result<Response<pb::ContainerLocation>, Status> {
        Err(self
            .check()
            .err()
            .unwrap_or_else(|| Status::unimplemented("")))
    }

    async fn fault(
        &self,
        _req: Request<pb::FaultRequest>,
    ) -> Result<Response<pb::FaultReply>, Status> {
        let epoch = self.check()?;
        self.0.faults.fetch_add(1, Ordering::SeqCst);
        let update = pb::RangeUpdate {
            vdisk: 1,
            generation: 2,
            begin: 0,
            end: 256,
            entries: Vec::new(),
            change: true,
            copies: Vec::new(),
        };
        Ok(Response::new(pb::FaultReply {
            answer: Some(pb::fault_reply::Answer::Install(update)),
            epoch,
        }))
    }

    async fn report_container(
        &self,
        _req: Request<pb::ContainerReport>,
    ) -> Result<Response<pb::ContainerReportReply>, Status> {
        self.check()?;
        Ok(Response::new(pb::ContainerReportReply {}))
    }
}

/// A fake controller serving on a loopback port until the test's runtime ends.
async fn serve(epoch: u64) -> (String, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = Arc::new(Seen::default());
    state.epoch.store(epoch, Ordering::SeqCst);
    let svc = ControlServer::new(Fake(state.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (url, state)
}

fn standby(s: &Seen, hint: Option<&str>) {
    *s.hint.lock() = hint.map(str::to_string);
    s.standby.store(true, Ordering::SeqCst);
}

/// An address where nothing listens.
fn dead() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

#[derive(Default)]
struct Port {
    applied: AtomicUsize,
}

#[async_trait::async_trait]
impl AgentPort for Port {
    async fn apply(&self, _c: Command) -> Result<(), String> {
        self.applied.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn fault() -> Fault {
    Fault {
        agent: "a".into(),
        vdisk: VdiskId(1),
        op: FaultOp::Write,
        segments: (0, 1),
        state: State::Invalid,
        generation: Generation(1),
        copied: Vec::new(),
    }
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn start(urls: &[String]) -> (Arc<RemoteControl>, Arc<Port>) {
    let rc = RemoteControl::new(urls, Duration::from_secs(2)).unwrap();
    let port = Arc::new(Port::default());
    rc.register_agent("a", port.clone(), Vec::new())
        .await
        .unwrap();
    (rc, port)
}

#[tokio::test]
async fn registration_passes_a_dead_address_and_follows_a_standby_to_the_leader() {
    let (leader, l) = serve(7).await;
    let (standby_url, s) = serve(3).await;
    standby(&s, Some(&leader));
    // The leader is not in the list: the standby's hint adds it.
    let (rc, _port) = start(&[dead(), standby_url.clone()]).await;
    assert_eq!(rc.current_url(), leader);
    assert_eq!(l.registers.load(Ordering::SeqCst), 1);
    assert_eq!(rc.epoch(), 7);
    rc.fault(fault())
        .await
        .expect("the leader answers the fault");
    rc.list_vdisks().await.unwrap();

    // The leader steps down naming the other: a call fails Unavailable (the I/O retries it)
    // and the next one goes to the new leader.
    s.epoch.store(9, Ordering::SeqCst);
    s.standby.store(false, Ordering::SeqCst);
    standby(&l, Some(&standby_url));
    let e = rc.fault(fault()).await.unwrap_err();
    assert!(
        matches!(e, ControlError::Unavailable(ref m) if m.contains("not the leader")),
        "{e:?}"
    );
    assert_eq!(rc.current_url(), standby_url);
    rc.fault(fault()).await.expect("the new leader answers");
    assert_eq!(rc.epoch(), 9);
    // The session with the old leader ends (it is a standby now: no grants, no commands),
    // and the agent registers with the new one.
    until("the agent registers with the new leader", || {
        s.registers.load(Ordering::SeqCst) >= 1
    })
    .await;
}

#[tokio::test]
async fn answers_from_a_deposed_leader_are_refused() {
    let (new, n) = serve(9).await;
    let (old, o) = serve(4).await;
    let (rc, _port) = start(&[new.clone(), old.clone()]).await;
    assert_eq!(rc.epoch(), 9);
    assert_eq!(rc.current_url(), new);

    // The new leader is briefly unsure (no leader known): the agent moves on, to the old
    // leader that still thinks it leads. Its answers are dropped, not installed.
    standby(&n, None);
    assert!(matches!(
        rc.fault(fault()).await,
        Err(ControlError::Unavailable(_))
    ));
    assert_eq!(rc.current_url(), old);
    let e = rc.fault(fault()).await.unwrap_err();
    assert!(
        matches!(e, ControlError::Unavailable(ref m) if m.contains("epoch 4") && m.contains("epoch 9")),
        "{e:?}"
    );
    assert_eq!(
        o.faults.load(Ordering::SeqCst),
        1,
        "the old leader did answer"
    );
    // ... and the agent went back to the next address.
    assert_eq!(rc.current_url(), new);
    rc.fault(fault()).await.unwrap_err();
    assert_eq!(rc.current_url(), old);
    let e = rc.open_vdisk("a", "v").await.unwrap_err();
    assert!(
        matches!(e, ControlError::Unavailable(ref m) if m.contains("epoch 4")),
        "{e:?}"
    );

    // Registration with it is refused the same way: the round finds no leader.
    let before = o.registers.load(Ordering::SeqCst);
    match rc
        .register_round("a", &(Arc::new(Port::default()) as Arc<dyn AgentPort>))
        .await
    {
        super::Registration::Unreachable(why) => assert!(why.contains("epoch 4"), "{why}"),
        _ => panic!("registered with a deposed leader or a standby"),
    }
    assert!(o.registers.load(Ordering::SeqCst) > before);

    // The new leader is back: calls go through again.
    n.standby.store(false, Ordering::SeqCst);
    until_ok(&rc).await;
}

async fn until_ok(rc: &RemoteControl) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while rc.fault(fault()).await.is_err() {
        assert!(Instant::now() < deadline, "the leader never answered");
    }
}

#[tokio::test]
async fn a_command_from_an_older_epoch_is_not_applied_and_ends_the_session() {
    let (url, l) = serve(5).await;
    let (rc, port) = start(std::slice::from_ref(&url)).await;
    until("the session opens", || l.session.lock().is_some()).await;
    let push = |id: u64, epoch: u64| {
        let mut c = tabula_proto::command_to_pb(id, &Command::Unblock { vdisk: VdiskId(1) });
        c.epoch = epoch;
        let msg = controller_message::Msg::Command(c);
        l.session
            .lock()
            .as_ref()
            .unwrap()
            .send(Ok(pb::ControllerMessage { msg: Some(msg) }))
            .unwrap();
    };
    push(1, 5);
    until("the command is acknowledged", || l.acks.lock().len() == 1).await;
    assert_eq!(l.acks.lock()[0].error, "");
    assert_eq!(port.applied.load(Ordering::SeqCst), 1);

    push(2, 4);
    until("the stale command is refused", || l.acks.lock().len() == 2).await;
    let ack = l.acks.lock()[1].clone();
    assert_eq!(ack.command, 2);
    assert!(ack.error.contains("epoch 5"), "{ack:?}");
    assert_eq!(port.applied.load(Ordering::SeqCst), 1, "not applied");
    until("the session ends and the agent registers again", || {
        l.sessions_ended.load(Ordering::SeqCst) >= 1 && l.registers.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(rc.epoch(), 5);
}

#[tokio::test]
async fn a_newer_leader_answering_ends_the_session_with_the_old_one() {
    let (old, o) = serve(5).await;
    let (new, n) = serve(8).await;
    let (rc, _port) = start(&[old.clone(), new.clone()]).await;
    until("the session opens", || o.session.lock().is_some()).await;
    // A unary call reaches the new leader (the old one, cut off from etcd, says it is not
    // the leader to this call but its session stream still runs).
    standby(&o, Some(&new));
    rc.fault(fault()).await.unwrap_err();
    rc.fault(fault()).await.expect("the new leader answers");
    assert_eq!(rc.epoch(), 8);
    // The old leader's session ends within a heartbeat or two, and the agent registers
    // with the new one.
    until("the old session ends", || {
        o.sessions_ended.load(Ordering::SeqCst) >= 1
    })
    .await;
    until("the agent registers with the new leader", || {
        n.registers.load(Ordering::SeqCst) >= 1
    })
    .await;
}
