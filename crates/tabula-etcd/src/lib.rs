//! A small async etcd v3 client: KV, transactions, leases, watches and member status over
//! etcd's gRPC API, with failover between the members of a cluster.
//!
//! One lazily connected tonic channel per endpoint and a "current" endpoint that calls go to
//! first. A call that fails for a reason another member might not have (transport error,
//! `Unavailable`, `DeadlineExceeded`, etcd's "no leader" / "leader changed" / "request timed
//! out") is retried on the next endpoint, round after round with a short pause, until it
//! succeeds or its `timeout` is spent; then it is [`EtcdError::Unavailable`] with what each
//! member said. So one dead member is not noticed by callers, and a lost quorum is an error
//! after `timeout`, never a hang.
//!
//! Every request carries etcd's `hasleader` metadata: a member that has no leader refuses it
//! at once ("etcdserver: no leader") instead of holding it until its own request timeout, and
//! a watch on a member that loses its leader is cancelled, so the caller re-watches elsewhere.
//!
//! A mutation whose attempt failed ambiguously (timed out, connection lost after sending) may
//! have been applied before it is retried on another member: a retried `put` writes twice
//! (same value, later revision); a retried `txn` reports the outcome of its *last* attempt, so
//! a compare that the first attempt made false by succeeding reports `succeeded: false`.
//! Callers that must know (elections) write values that identify the writer and re-read the
//! key when a txn fails.

#[cfg(feature = "testing")]
pub mod testing;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

#[allow(clippy::all, clippy::pedantic, dead_code, missing_docs)]
mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

use pb::etcdserverpb as rpc;
use pb::etcdserverpb::cluster_client::ClusterClient;
use pb::etcdserverpb::kv_client::KvClient;
use pb::etcdserverpb::lease_client::LeaseClient;
use pb::etcdserverpb::maintenance_client::MaintenanceClient;
use pb::etcdserverpb::watch_client::WatchClient;

/// etcd's default request limit (`--max-request-bytes`, 1.5 MiB) plus the 512 KiB it allows
/// for gRPC overhead: larger requests fail here instead of on the wire. Between 1.5 and 2 MiB
/// etcd itself answers "request is too large".
const MAX_REQUEST: usize = 2 * 1024 * 1024;
/// Replies (ranges, watch batches) may be much larger than requests.
const MAX_REPLY: usize = 64 * 1024 * 1024;
/// HTTP/2 pings on connections with open streams (watches), to notice a member that vanished
/// without closing its connections. etcd refuses pings more often than every 5 s
/// (`--grpc-keepalive-min-time`) and any on idle connections, answering with GOAWAY.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// The first pause between rounds over all endpoints; doubles up to `MAX_PAUSE`.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_millis(500);

/// What went wrong talking to etcd.
#[derive(Clone, Debug, thiserror::Error)]
pub enum EtcdError {
    /// No member answered in time: transport errors, timeouts, no leader / no quorum. Worth
    /// retrying later.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// etcd answered with an error (a bad request, a full database, ...). Retrying the same
    /// request will not help.
    #[error("etcd refused the request: {0}")]
    Failed(String),
    /// A watch's start revision (or a later one it needed) has been compacted away; the
    /// oldest revision still available is given. Re-read, and watch from the read's revision.
    #[error(
        "etcd has compacted the revisions this watch needed (oldest available: {0}); re-read the keys and watch again from the read's revision"
    )]
    Compacted(i64),
    /// The endpoint list is unusable.
    #[error("bad etcd endpoints: {0}")]
    Config(String),
}

/// A key with its value and revisions, as etcd stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The revision that created the key (since its last deletion).
    pub create_revision: i64,
    /// The revision of the key's last change.
    pub mod_revision: i64,
    /// The lease the key is attached to; 0 for none.
    pub lease: i64,
}

/// One condition of a transaction; every variant means "equal".
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key's create_revision is `n`; 0 means the key does not exist.
    CreateRevision(Vec<u8>, i64),
    /// The key's mod_revision is `n`; 0 means the key does not exist.
    ModRevision(Vec<u8>, i64),
    /// The key exists and has this value.
    Value(Vec<u8>, Vec<u8>),
}

/// One operation of a transaction branch.
#[derive(Clone, Debug)]
pub enum Op {
    /// Writes `key`; `lease` 0 for none.
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    /// Deletes one key.
    Delete(Vec<u8>),
    /// Deletes the keys in `[from, to)`.
    DeleteRange(Vec<u8>, Vec<u8>),
    /// Reads one key; its result is in [`TxnReply::gets`].
    Get(Vec<u8>),
}

/// The outcome of [`Etcd::txn`].
#[derive(Clone, Debug)]
pub struct TxnReply {
    /// Whether every compare held (the `then` branch ran).
    pub succeeded: bool,
    /// The store's revision after the transaction (the header revision).
    pub revision: i64,
    /// The results of the taken branch's [`Op::Get`]s, in order; `None` for an absent key.
    pub gets: Vec<Option<Kv>>,
}

/// One change seen by a [`Watch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The key was written; `Kv` is its new state.
    Put(Kv),
    /// The key was deleted; `Kv` holds the key and, in `mod_revision`, the deletion's
    /// revision (the value is empty).
    Delete(Kv),
}

impl Event {
    /// The key that changed.
    pub fn key(&self) -> &[u8] {
        match self {
            Event::Put(kv) | Event::Delete(kv) => &kv.key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> i64 {
        match self {
            Event::Put(kv) | Event::Delete(kv) => kv.mod_revision,
        }
    }
}

/// One member's view of itself, from its own endpoint.
#[derive(Clone, Debug)]
pub struct MemberStatus {
    pub member_id: u64,
    /// The member it believes leads (0 for none).
    pub leader_id: u64,
    pub is_leader: bool,
    pub raft_index: u64,
    pub raft_term: u64,
    /// Size of its backend database file, in bytes.
    pub db_size: i64,
    /// The etcd server version, e.g. "3.4.23".
    pub version: String,
    /// Alarms and other errors the member reports (e.g. "NOSPACE").
    pub errors: Vec<String>,
}

/// A cluster member as listed by [`Etcd::members`].
#[derive(Clone, Debug)]
pub struct Member {
    pub id: u64,
    /// Empty for a member that was added but has not started yet.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// An etcd client. Cheap to clone; clones share connections and the current endpoint.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    /// The endpoint calls try first: the last one that answered, or the next after one that
    /// failed.
    current: AtomicUsize,
    timeout: Duration,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.inner.endpoints)
            .field("timeout", &self.inner.timeout)
            .finish()
    }
}

/// etcd's "range end" for all keys that start with `prefix`: the prefix with its last byte
/// below 0xff incremented (and the rest dropped); `[0]` (every key) when there is none.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    /// Endpoints like "http://127.0.0.1:2379" (a bare "host:port" means http). `timeout`
    /// bounds every call, connecting included. Connects lazily: no member needs to be up yet.
    pub async fn connect(endpoints: &[String], timeout: Duration) -> Result<Etcd, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::Config(
                "no endpoints given; pass the client URLs of the etcd members, e.g. http://127.0.0.1:2379".into(),
            ));
        }
        if timeout.is_zero() {
            return Err(EtcdError::Config(
                "the call timeout must not be zero".into(),
            ));
        }
        let mut urls = Vec::with_capacity(endpoints.len());
        let mut channels = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let url = normalize(endpoint)?;
            let channel = Endpoint::from_shared(url.clone())
                .map_err(|e| EtcdError::Config(format!("{endpoint:?} is not a valid URL: {e}")))?
                .connect_timeout(timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(timeout.clamp(Duration::from_secs(1), Duration::from_secs(20)))
                .keep_alive_while_idle(false)
                .connect_lazy();
            urls.push(url);
            channels.push(channel);
        }
        Ok(Etcd {
            inner: Arc::new(Inner {
                endpoints: urls,
                channels,
                current: AtomicUsize::new(0),
                timeout,
            }),
        })
    }

    /// The endpoints, as normalised URLs.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// The bound on every call.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// One key, or `None` when it does not exist.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Kv>, EtcdError> {
        let req = rpc::RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        };
        let reply = self
            .call("get", |ch| {
                let req = req.clone();
                async move { Ok(kv_client(ch).range(with_leader(req)).await?.into_inner()) }
            })
            .await?;
        Ok(reply.kvs.into_iter().next().map(Kv::from))
    }

    /// Keys in `[from, to)` in key order, at most `limit` (0 = no limit), plus the header
    /// revision (the store's revision the read saw). An empty `to` reads just `from`.
    pub async fn range(
        &self,
        from: &[u8],
        to: &[u8],
        limit: i64,
    ) -> Result<(Vec<Kv>, i64), EtcdError> {
        let req = rpc::RangeRequest {
            key: from.to_vec(),
            range_end: to.to_vec(),
            limit,
            ..Default::default()
        };
        let reply = self
            .call("range", |ch| {
                let req = req.clone();
                async move { Ok(kv_client(ch).range(with_leader(req)).await?.into_inner()) }
            })
            .await?;
        let revision = header_revision(&reply.header);
        Ok((reply.kvs.into_iter().map(Kv::from).collect(), revision))
    }

    /// Writes `key`; `lease` 0 for none. Returns the header revision (the write's revision).
    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let req = rpc::PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        };
        let reply = self
            .call("put", |ch| {
                let req = req.clone();
                async move { Ok(kv_client(ch).put(with_leader(req)).await?.into_inner()) }
            })
            .await?;
        Ok(header_revision(&reply.header))
    }

    /// Deletes the keys in `[from, to)` (an empty `to` deletes just `from`). Returns the
    /// header revision.
    pub async fn delete_range(&self, from: &[u8], to: &[u8]) -> Result<i64, EtcdError> {
        let req = rpc::DeleteRangeRequest {
            key: from.to_vec(),
            range_end: to.to_vec(),
            ..Default::default()
        };
        let reply = self
            .call("delete", |ch| {
                let req = req.clone();
                async move {
                    Ok(kv_client(ch)
                        .delete_range(with_leader(req))
                        .await?
                        .into_inner())
                }
            })
            .await?;
        Ok(header_revision(&reply.header))
    }

    /// If every `when` holds, runs `then`, otherwise `otherwise`, atomically. See the crate
    /// docs for what a retried transaction reports.
    pub async fn txn(
        &self,
        when: Vec<Compare>,
        then: Vec<Op>,
        otherwise: Vec<Op>,
    ) -> Result<TxnReply, EtcdError> {
        let req = rpc::TxnRequest {
            compare: when.into_iter().map(compare_pb).collect(),
            success: then.into_iter().map(op_pb).collect(),
            failure: otherwise.into_iter().map(op_pb).collect(),
        };
        let reply = self
            .call("txn", |ch| {
                let req = req.clone();
                async move { Ok(kv_client(ch).txn(with_leader(req)).await?.into_inner()) }
            })
            .await?;
        let gets = reply
            .responses
            .into_iter()
            .filter_map(|r| match r.response {
                Some(rpc::response_op::Response::ResponseRange(range)) => {
                    Some(range.kvs.into_iter().next().map(Kv::from))
                }
                _ => None,
            })
            .collect();
        Ok(TxnReply {
            succeeded: reply.succeeded,
            revision: header_revision(&reply.header),
            gets,
        })
    }

    /// Compacts the key-value history up to `revision`: older revisions can no longer be
    /// read or watched.
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        let req = rpc::CompactionRequest {
            revision,
            physical: false,
        };
        self.call("compact", |ch| async move {
            kv_client(ch).compact(with_leader(req)).await?;
            Ok(())
        })
        .await
    }

    /// Grants a lease of `ttl_secs` seconds (etcd may raise it to its minimum); returns its id.
    pub async fn lease_grant(&self, ttl_secs: i64) -> Result<i64, EtcdError> {
        let req = rpc::LeaseGrantRequest {
            ttl: ttl_secs,
            id: 0,
        };
        let reply = self
            .call("lease grant", |ch| async move {
                Ok(lease_client(ch)
                    .lease_grant(with_leader(req))
                    .await?
                    .into_inner())
            })
            .await?;
        if !reply.error.is_empty() {
            return Err(EtcdError::Failed(format!(
                "granting a lease of {ttl_secs} s: {}",
                reply.error
            )));
        }
        Ok(reply.id)
    }

    /// One keep-alive round trip: `Ok(ttl)` with the seconds the lease now has left, `Ok(0)`
    /// when the lease no longer exists (expired or revoked).
    pub async fn lease_keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        self.call("lease keep-alive", |ch| async move {
            let (tx, rx) = mpsc::channel(1);
            tx.send(rpc::LeaseKeepAliveRequest { id })
                .await
                .map_err(|_| Status::internal("keep-alive request channel closed"))?;
            let mut stream = lease_client(ch)
                .lease_keep_alive(with_leader(ReceiverStream::new(rx)))
                .await?
                .into_inner();
            let reply = stream.message().await?;
            // The request side stays open until the answer is in, so etcd does not see the
            // stream end first.
            drop(tx);
            match reply {
                Some(r) => Ok(r.ttl.max(0)),
                None => Err(Status::unavailable(
                    "the keep-alive stream closed without an answer",
                )),
            }
        })
        .await
    }

    /// Revokes a lease, deleting its keys. A lease that no longer exists is not an error.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        let req = rpc::LeaseRevokeRequest { id };
        self.call("lease revoke", |ch| {
            async move {
                match lease_client(ch).lease_revoke(with_leader(req)).await {
                    Ok(_) => Ok(()),
                    // Also what a retry sees after an attempt that did revoke.
                    Err(s) if s.code() == Code::NotFound => Ok(()),
                    Err(s) => Err(s),
                }
            }
        })
        .await
    }

    /// Watches `[from, to)` (an empty `to` watches just `from`) from `start_revision`
    /// (0 = from now). Opening the watch is bounded by the timeout; waiting for events is not.
    pub async fn watch(
        &self,
        from: &[u8],
        to: &[u8],
        start_revision: i64,
    ) -> Result<Watch, EtcdError> {
        let create = rpc::WatchRequest {
            request_union: Some(rpc::watch_request::RequestUnion::CreateRequest(
                rpc::WatchCreateRequest {
                    key: from.to_vec(),
                    range_end: to.to_vec(),
                    start_revision,
                    ..Default::default()
                },
            )),
        };
        let inner = self.inner.clone();
        self.call_at("watch", |ch, i| {
            let create = create.clone();
            let endpoint = inner.endpoints[i].clone();
            async move {
                let (tx, rx) = mpsc::channel(1);
                tx.send(create)
                    .await
                    .map_err(|_| Status::internal("watch request channel closed"))?;
                let mut stream = watch_client(ch)
                    .watch(with_leader(ReceiverStream::new(rx)))
                    .await?
                    .into_inner();
                loop {
                    let Some(reply) = stream.message().await? else {
                        return Err(Status::unavailable(
                            "the watch stream closed before the watch was created",
                        ));
                    };
                    if !reply.created {
                        continue;
                    }
                    if reply.canceled {
                        // etcd answers created + canceled for a watch it refuses.
                        return Err(Status::invalid_argument(format!(
                            "etcd refused the watch: {}",
                            reply.cancel_reason
                        )));
                    }
                    return Ok(Watch {
                        endpoint,
                        stream: Some(stream),
                        _requests: Some(tx),
                        broken: None,
                    });
                }
            }
        })
        .await
    }

    /// Every member's status as seen from its own endpoint, in endpoint order; a member
    /// that does not answer within the timeout gets its error.
    pub async fn member_status(&self) -> Vec<(String, Result<MemberStatus, EtcdError>)> {
        let timeout = self.inner.timeout;
        let asks = self
            .inner
            .endpoints
            .iter()
            .zip(&self.inner.channels)
            .map(|(endpoint, channel)| {
                let channel = channel.clone();
                async move {
                    let mut client =
                        MaintenanceClient::new(channel).max_decoding_message_size(MAX_REPLY);
                    let ask = client.status(rpc::StatusRequest {});
                    let result = match tokio::time::timeout(timeout, ask).await {
                        Ok(Ok(reply)) => {
                            let r = reply.into_inner();
                            let member_id = r.header.as_ref().map_or(0, |h| h.member_id);
                            Ok(MemberStatus {
                                member_id,
                                leader_id: r.leader,
                                is_leader: member_id != 0 && r.leader == member_id,
                                raft_index: r.raft_index,
                                raft_term: r.raft_term,
                                db_size: r.db_size,
                                version: r.version,
                                errors: r.errors,
                            })
                        }
                        Ok(Err(s)) if retryable(&s) => Err(EtcdError::Unavailable(format!(
                            "status of {endpoint}: {}; is etcd running there?",
                            status_text(&s)
                        ))),
                        Ok(Err(s)) => Err(EtcdError::Failed(format!(
                            "status of {endpoint}: {}",
                            status_text(&s)
                        ))),
                        Err(_) => Err(EtcdError::Unavailable(format!(
                            "status of {endpoint}: no answer within {timeout:?}; is etcd running there?"
                        ))),
                    };
                    (endpoint.clone(), result)
                }
            });
        futures::future::join_all(asks).await
    }

    /// The cluster's members, as the answering member knows them.
    pub async fn members(&self) -> Result<Vec<Member>, EtcdError> {
        let reply = self
            .call("member list", |ch| async move {
                Ok(ClusterClient::new(ch)
                    .max_decoding_message_size(MAX_REPLY)
                    .member_list(with_leader(rpc::MemberListRequest::default()))
                    .await?
                    .into_inner())
            })
            .await?;
        Ok(reply
            .members
            .into_iter()
            .map(|m| Member {
                id: m.id,
                name: m.name,
                peer_urls: m.peer_ur_ls,
                client_urls: m.client_ur_ls,
                is_learner: m.is_learner,
            })
            .collect())
    }

    async fn call<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, EtcdError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_at(what, |ch, _| f(ch)).await
    }

    /// Runs `f` against the current endpoint, moving on to the next one on errors another
    /// member might not have, until it succeeds or the timeout is spent. Each attempt gets
    /// an even share of the time left for the endpoints not yet tried in this round, so one
    /// member that hangs cannot use up the whole call.
    async fn call_at<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, EtcdError>
    where
        F: FnMut(Channel, usize) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let inner = &*self.inner;
        let n = inner.channels.len();
        let deadline = Instant::now() + inner.timeout;
        let mut last: Vec<Option<String>> = vec![None; n];
        let mut pause = FIRST_PAUSE;
        loop {
            let start = inner.current.load(Ordering::Relaxed) % n;
            for k in 0..n {
                let i = (start + k) % n;
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(self.unavailable(what, &last));
                }
                let share = left / (n - k) as u32;
                match tokio::time::timeout(share, f(inner.channels[i].clone(), i)).await {
                    Ok(Ok(v)) => {
                        inner.current.store(i, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Ok(Err(s)) if retryable(&s) => {
                        tracing::debug!(endpoint = %inner.endpoints[i], error = %status_text(&s), "etcd {what} failed; trying the next member");
                        last[i] = Some(status_text(&s));
                    }
                    Ok(Err(s)) => {
                        return Err(EtcdError::Failed(format!(
                            "{what} at {}: {}",
                            inner.endpoints[i],
                            status_text(&s)
                        )));
                    }
                    Err(_) => {
                        tracing::debug!(endpoint = %inner.endpoints[i], "etcd {what}: no answer within {share:?}; trying the next member");
                        last[i] = Some(format!("no answer within {share:?}"));
                    }
                }
                // Later calls start at the next member rather than at one that just failed.
                inner.current.store((i + 1) % n, Ordering::Relaxed);
            }
            // Every member failed this round: no leader (an election is running) or members
            // down. Pause briefly and go round again while time is left.
            let left = deadline.saturating_duration_since(Instant::now());
            if left <= pause {
                return Err(self.unavailable(what, &last));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    fn unavailable(&self, what: &str, last: &[Option<String>]) -> EtcdError {
        let tried: Vec<String> = self
            .inner
            .endpoints
            .iter()
            .zip(last)
            .filter_map(|(e, err)| err.as_ref().map(|err| format!("{e}: {err}")))
            .collect();
        EtcdError::Unavailable(format!(
            "{what}: no etcd member could serve it within {:?} ({}); is etcd running at {} with a majority of its members up?",
            self.inner.timeout,
            if tried.is_empty() {
                "no attempt finished".to_string()
            } else {
                tried.join("; ")
            },
            self.inner.endpoints.join(",")
        ))
    }
}

/// An open watch. Dropping it cancels the watch on the server.
pub struct Watch {
    endpoint: String,
    stream: Option<tonic::Streaming<rpc::WatchResponse>>,
    /// Keeps the request side of the stream open: etcd ends the watch when it closes.
    _requests: Option<mpsc::Sender<rpc::WatchRequest>>,
    /// The error that broke the stream, returned again by later calls.
    broken: Option<EtcdError>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("endpoint", &self.endpoint)
            .field("open", &self.stream.is_some())
            .finish()
    }
}

impl Watch {
    /// The next batch of events, in revision order, with the revision of its last event:
    /// every change in the watched range up to that revision has been delivered, so a
    /// re-watch continues from revision + 1. `Err` when the stream breaks (member gone, it
    /// lost its leader) or the history it needs was compacted: the caller re-reads and
    /// watches again. `Ok(None)` only after [`cancel`](Self::cancel).
    pub async fn next(&mut self) -> Result<Option<(i64, Vec<Event>)>, EtcdError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        loop {
            let Some(stream) = self.stream.as_mut() else {
                return Ok(None);
            };
            let reply = match stream.message().await {
                Ok(Some(reply)) => reply,
                Ok(None) => {
                    return Err(self.break_with(EtcdError::Unavailable(format!(
                        "the watch stream from {} ended; re-read and watch again",
                        self.endpoint
                    ))));
                }
                Err(s) => {
                    let text = format!(
                        "the watch stream from {} broke: {}; re-read and watch again",
                        self.endpoint,
                        status_text(&s)
                    );
                    let e = if retryable(&s) {
                        EtcdError::Unavailable(text)
                    } else {
                        EtcdError::Failed(text)
                    };
                    return Err(self.break_with(e));
                }
            };
            if reply.canceled {
                let e = if reply.compact_revision > 0 {
                    EtcdError::Compacted(reply.compact_revision)
                } else {
                    EtcdError::Unavailable(format!(
                        "etcd at {} cancelled the watch ({}); re-read and watch again",
                        self.endpoint,
                        if reply.cancel_reason.is_empty() {
                            "no reason given"
                        } else {
                            &reply.cancel_reason
                        }
                    ))
                };
                return Err(self.break_with(e));
            }
            if reply.compact_revision > 0 {
                return Err(self.break_with(EtcdError::Compacted(reply.compact_revision)));
            }
            let events: Vec<Event> = reply
                .events
                .into_iter()
                .filter_map(|e| {
                    let kv = Kv::from(e.kv?);
                    Some(if e.r#type == pb::mvccpb::event::EventType::Delete as i32 {
                        Event::Delete(kv)
                    } else {
                        Event::Put(kv)
                    })
                })
                .collect();
            // Replies without events (progress notifications) carry nothing for the caller.
            if let Some(last) = events.last() {
                return Ok(Some((last.revision(), events)));
            }
        }
    }

    /// Stops the watch; later [`next`](Self::next) calls answer `Ok(None)`.
    pub fn cancel(&mut self) {
        self.stream = None;
        self._requests = None;
        self.broken = None;
    }

    /// The endpoint this watch runs on.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn break_with(&mut self, e: EtcdError) -> EtcdError {
        self.stream = None;
        self._requests = None;
        self.broken = Some(e.clone());
        e
    }
}

impl From<pb::mvccpb::KeyValue> for Kv {
    fn from(kv: pb::mvccpb::KeyValue) -> Kv {
        Kv {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }
    }
}

fn normalize(endpoint: &str) -> Result<String, EtcdError> {
    let e = endpoint.trim().trim_end_matches('/');
    if e.is_empty() {
        return Err(EtcdError::Config("an empty endpoint".into()));
    }
    if e.starts_with("https://") {
        return Err(EtcdError::Config(format!(
            "{endpoint}: TLS is not supported by this client; use an http:// client URL"
        )));
    }
    if e.starts_with("http://") {
        Ok(e.to_string())
    } else if e.contains("://") {
        Err(EtcdError::Config(format!(
            "{endpoint}: expected an http:// client URL like http://127.0.0.1:2379"
        )))
    } else {
        Ok(format!("http://{e}"))
    }
}

fn header_revision(header: &Option<rpc::ResponseHeader>) -> i64 {
    header.as_ref().map_or(0, |h| h.revision)
}

/// Asks the member to refuse the request at once when it has no leader (etcd's
/// `rpctypes.MetadataRequireLeaderKey`), rather than hold it until its own timeout.
fn with_leader<T>(message: T) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut().insert(
        "hasleader",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

fn kv_client(ch: Channel) -> KvClient<Channel> {
    KvClient::new(ch)
        .max_decoding_message_size(MAX_REPLY)
        .max_encoding_message_size(MAX_REQUEST)
}

fn lease_client(ch: Channel) -> LeaseClient<Channel> {
    LeaseClient::new(ch)
        .max_decoding_message_size(MAX_REPLY)
        .max_encoding_message_size(MAX_REQUEST)
}

fn watch_client(ch: Channel) -> WatchClient<Channel> {
    WatchClient::new(ch)
        .max_decoding_message_size(MAX_REPLY)
        .max_encoding_message_size(MAX_REQUEST)
}

/// Whether another member might answer where this one failed: transport errors and etcd's
/// transient errors ("no leader", "leader changed", "request timed out", "server stopped"
/// are all `Unavailable`).
fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

/// The status message with its source chain (a transport error's cause is in the source).
fn status_text(s: &Status) -> String {
    let mut text = if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        s.message().to_string()
    };
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

fn compare_pb(c: Compare) -> rpc::Compare {
    use rpc::compare::{CompareResult, CompareTarget, TargetUnion};
    let (key, target, union) = match c {
        Compare::CreateRevision(key, n) => {
            (key, CompareTarget::Create, TargetUnion::CreateRevision(n))
        }
        Compare::ModRevision(key, n) => (key, CompareTarget::Mod, TargetUnion::ModRevision(n)),
        Compare::Value(key, v) => (key, CompareTarget::Value, TargetUnion::Value(v)),
    };
    rpc::Compare {
        result: CompareResult::Equal as i32,
        target: target as i32,
        key,
        range_end: Vec::new(),
        target_union: Some(union),
    }
}

fn op_pb(op: Op) -> rpc::RequestOp {
    use rpc::request_op::Request as R;
    let request = match op {
        Op::Put { key, value, lease } => R::RequestPut(rpc::PutRequest {
            key,
            value,
            lease,
            ..Default::default()
        }),
        Op::Delete(key) => R::RequestDeleteRange(rpc::DeleteRangeRequest {
            key,
            ..Default::default()
        }),
        Op::DeleteRange(from, to) => R::RequestDeleteRange(rpc::DeleteRangeRequest {
            key: from,
            range_end: to,
            ..Default::default()
        }),
        Op::Get(key) => R::RequestRange(rpc::RangeRequest {
            key,
            ..Default::default()
        }),
    };
    rpc::RequestOp {
        request: Some(request),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_below_0xff() {
        assert_eq!(prefix_end(b"abc"), b"abd");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn endpoints_are_normalised_and_tls_refused() {
        assert_eq!(
            normalize("127.0.0.1:2379").unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            normalize("http://10.0.0.1:2379/").unwrap(),
            "http://10.0.0.1:2379"
        );
        assert!(matches!(
            normalize("https://10.0.0.1:2379"),
            Err(EtcdError::Config(_))
        ));
        assert!(matches!(normalize(" "), Err(EtcdError::Config(_))));
    }
}
