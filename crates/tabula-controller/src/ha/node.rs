//! The life of one controller process in a highly available control plane: join, follow
//! (standby), campaign, lead, step down. See ARCHITECTURE.md, "High availability".

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tabula_api::admin::ControllerView;
use tabula_etcd::{Compare, Etcd, EtcdError, Op};
use tower::ServiceExt;
use tracing::{debug, error, info, warn};

use super::Leadership;
use super::log::{EtcdLog, Read, read_after, truncate};
use super::records::{ClusterInfo, Keys, LeaderInfo, MemberInfo, truncation_point};
use crate::service::DB_FILE;
use crate::store::{Image, POOL_ID, Store, StoreError};
use crate::{Controller, ControllerConfig};

/// `meta` key (local to each controller): the id of the control plane its store follows.
const CLUSTER_ID: &str = "ha_cluster";
/// Records read from etcd per request while catching up: each is at most 1 MiB inline, so a
/// reply stays well below the client's 64 MiB limit.
const READ_BATCH: i64 = 32;
/// Newest records kept in etcd whatever members have applied: a controller that just
/// installed an image follows on from them.
pub const KEEP_RECORDS: u64 = 1000;
/// How often each controller refreshes its member key, and the leader truncates the log.
const MEMBER_EVERY: Duration = Duration::from_secs(1);
const TRUNCATE_EVERY: Duration = Duration::from_secs(5);
/// Set for a controller re-executed on stepping down: its previous run's etcd lease.
const PREVIOUS_LEASE_ENV: &str = "TABULA_HA_PREVIOUS_LEASE";
/// The longest a takeover may take to open the controller.
const OPEN_LIMIT: Duration = Duration::from_secs(60);
/// The longest any one etcd call may take.
const ETCD_TIMEOUT: Duration = Duration::from_secs(3);

/// How this controller joins a control plane.
#[derive(Clone, Debug)]
pub struct HaConfig {
    pub etcd: Vec<String>,
    /// Every key of the control plane starts with it.
    pub prefix: String,
    /// This controller's name, unique in the control plane.
    pub name: String,
    /// The address others reach its admin API and gRPC at, `http://host:port`.
    pub api_url: String,
    /// The TTL of the etcd lease that holds leadership: a dead leader is replaced after
    /// about this long.
    pub election_ttl: Duration,
    /// Newest records kept in etcd in any case ([`KEEP_RECORDS`]; tests lower it).
    pub keep_records: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Controller(#[from] crate::ControllerError),
    #[error("{0}")]
    Refused(String),
}

/// One controller process.
struct Node {
    ha: HaConfig,
    etcd: Etcd,
    keys: Keys,
    store: Arc<Store>,
    /// This process's etcd lease (member key, and the leader key while it leads).
    lease: AtomicI64,
    leadership: Arc<Leadership>,
    /// Epoch while leading, else 0.
    epoch: AtomicU64,
    /// The leader as last seen.
    leader: RwLock<Option<LeaderInfo>>,
    members: RwLock<Vec<MemberInfo>>,
}

/// Runs this controller as a member of the control plane until `shutdown` resolves:
/// standby first, leader when elected. A leader that loses its leadership re-executes the
/// process (same arguments, same pid), which comes back as a standby.
pub async fn run(
    cfg: ControllerConfig,
    ha: HaConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), HaError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| crate::ControllerError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let store = Arc::new(Store::open(&cfg.data_dir.join(DB_FILE))?);
    let etcd = Etcd::connect(&ha.etcd, ETCD_TIMEOUT).await?;
    let keys = Keys::new(&ha.prefix);
    // etcd may be down or without quorum at a start (a leader stepping down because of
    // it comes straight back here): wait for it, saying so.
    until_etcd_answers("joining the control plane", || join(&etcd, &keys, &store)).await?;
    let node = Arc::new(Node {
        ha,
        etcd,
        keys,
        store,
        lease: AtomicI64::new(0),
        leadership: Arc::new(Leadership::default()),
        epoch: AtomicU64::new(0),
        leader: RwLock::new(None),
        members: RwLock::new(Vec::new()),
    });
    // A leader that stepped down re-executed itself: its old lease goes at once (and with
    // it its member key and the leader key), rather than when its TTL runs out.
    if let Some(old) = std::env::var(PREVIOUS_LEASE_ENV)
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
    {
        until_etcd_answers("revoking the previous run's lease", || async {
            node.etcd.lease_revoke(old).await.map_err(HaError::from)
        })
        .await?;
    }
    until_etcd_answers("taking an etcd lease", || node.grant_lease()).await?;
    until_etcd_answers("checking the name", || node.wait_for_name()).await?;
    // The admin port serves from the start: a standby's answers now, the leader's later.
    let limits = crate::http::Limits::default();
    let app = Arc::new(RwLock::new(standby_app(node.clone())));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = {
        let mut rx = stop_rx.clone();
        tokio::spawn(crate::http::serve_app(
            listener,
            switch(app.clone()),
            limits,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        ))
    };
    tokio::spawn(node.clone().keep_lease());
    tokio::spawn(node.clone().keep_member());
    tokio::spawn(node.clone().checkpoint_while_standing_by());
    let mut shutdown = std::pin::pin!(shutdown);
    let epoch = loop {
        tokio::select! {
            _ = &mut shutdown => {
                node.leave().await;
                let _ = stop_tx.send(true);
                let _ = server.await;
                return Ok(());
            }
            r = node.follow_until_vacant() => r?,
        }
        if let Some(epoch) = node.campaign().await? {
            break epoch;
        }
    };
    // Leading: first every record the previous leader committed.
    node.catch_up().await?;
    info!(
        name = node.ha.name,
        epoch,
        applied = node.store.last_seq(),
        "elected leader; taking over"
    );
    let mut cfg = cfg;
    cfg.epoch = epoch;
    cfg.restart_grace = true;
    cfg.leadership = Some(node.leadership.clone());
    node.store.set_replicator(Arc::new(EtcdLog {
        etcd: node.etcd.clone(),
        keys: node.keys.clone(),
        epoch: epoch as i64,
        leadership: node.leadership.clone(),
        rt: tokio::runtime::Handle::current(),
    }));
    let opening = Instant::now();
    // Bounded: a takeover that cannot finish (containers that hang beyond their timeouts,
    // etcd that stops answering mid-way) hands over to another controller.
    let ctl = match tokio::time::timeout(
        OPEN_LIMIT,
        Controller::open_with_store(cfg, node.store.clone()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => step_down(
            node.lease(),
            &format!("the controller could not start: {e}"),
        ),
        Err(_) => step_down(
            node.lease(),
            &format!("the controller did not start within {OPEN_LIMIT:?}"),
        ),
    };
    info!(
        ms = opening.elapsed().as_millis() as u64,
        "controller opened from the local store"
    );
    ctl.start_background();
    *app.write().expect("app lock") = leader_app(node.clone(), ctl.clone());
    tokio::spawn(node.clone().truncate_log());
    info!(name = node.ha.name, epoch, "leading");
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                // A short lapse (a slow keep-alive) only pauses answers to agents; the
                // lease may well live on in etcd. Lost for sure, or uncertain for a whole
                // TTL (a standby may hold the key by now): step down.
                // A local commit failure (the disk: ENOSPC, EIO) poisons the journal: this
                // controller can acknowledge nothing more, so another must lead.
                if ctl.metadata_failed() {
                    node.leadership.lose();
                    step_down(node.lease(), "a metadata commit failed here; another controller takes over");
                }
                if node.leadership.is_lost() {
                    step_down(node.lease(), "leadership was lost (a fenced commit, or etcd dropped the lease)");
                }
                if node.leadership.lapsed_for() > node.ha.election_ttl {
                    step_down(node.lease(), "etcd has not renewed this leader's lease for a whole TTL");
                }
            }
        }
    }
    // A clean stop hands over at once: the lease's end deletes the leader key. Nothing is
    // committed from here on (a background task that tries is fenced anyway).
    node.leadership.lose();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    node.leave().await;
    drop(ctl);
    Ok(())
}

/// Runs `f` until it succeeds or fails for another reason than etcd not answering.
async fn until_etcd_answers<F, Fut>(what: &str, mut f: F) -> Result<(), HaError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), HaError>>,
{
    let mut tries = 0u32;
    loop {
        match f().await {
            Err(HaError::Etcd(EtcdError::Unavailable(e))) => {
                if tries % 10 == 0 {
                    warn!(error = e, "{what}: etcd does not answer; retrying");
                }
                tries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            r => return r,
        }
    }
}

/// Checks that `store` belongs to the control plane (or is new), creating the control
/// plane's identity if this is its first controller.
async fn join(etcd: &Etcd, keys: &Keys, store: &Store) -> Result<(), HaError> {
    let mine = store.local_meta(CLUSTER_ID)?;
    let info = match etcd.get(&keys.cluster()).await? {
        Some(kv) => serde_json::from_slice::<ClusterInfo>(&kv.value).map_err(|e| {
            HaError::Refused(format!("the control plane's key in etcd is damaged: {e}"))
        })?,
        None => {
            if mine.is_some() || !store.is_empty()? {
                return Err(HaError::Refused(
                    "this data dir holds metadata, and etcd holds no control plane under this prefix: \
                     start the first controller of a control plane with an empty --data-dir \
                     (a store made without --etcd cannot join one yet)"
                        .into(),
                ));
            }
            let new = ClusterInfo {
                id: crate::label::random_pool_id()
                    .map_err(|e| HaError::Refused(format!("cannot make an id: {e}")))?,
                pool_id: store.local_meta(POOL_ID)?.unwrap_or(0),
            };
            let value = serde_json::to_vec(&new).expect("serializes");
            let r = etcd
                .txn(
                    vec![Compare::CreateRevision(keys.cluster(), 0)],
                    vec![Op::Put {
                        key: keys.cluster(),
                        value,
                        lease: 0,
                    }],
                    vec![Op::Get(keys.cluster())],
                )
                .await?;
            if r.succeeded {
                info!(cluster = new.id, "created a new control plane in etcd");
                new
            } else {
                let kv = r.gets.into_iter().flatten().next().ok_or_else(|| {
                    HaError::Refused("the control plane's key vanished from etcd".into())
                })?;
                serde_json::from_slice(&kv.value).map_err(|e| {
                    HaError::Refused(format!("the control plane's key in etcd is damaged: {e}"))
                })?
            }
        }
    };
    match mine {
        Some(id) if id == info.id => Ok(()),
        Some(id) => Err(HaError::Refused(format!(
            "this data dir follows another control plane ({id:016x}, not {:016x}); use an empty --data-dir",
            info.id
        ))),
        None if store.is_empty()? => {
            store.set_local_meta(POOL_ID, info.pool_id)?;
            store.set_local_meta(CLUSTER_ID, info.id)?;
            Ok(())
        }
        None => Err(HaError::Refused(
            "this data dir holds metadata of a tabula without --etcd; use an empty --data-dir"
                .into(),
        )),
    }
}

impl Node {
    fn lease(&self) -> i64 {
        self.lease.load(Ordering::Acquire)
    }

    fn ttl_secs(&self) -> i64 {
        self.ha.election_ttl.as_secs().max(1) as i64
    }

    async fn grant_lease(&self) -> Result<(), HaError> {
        let sent = Instant::now();
        let id = self.etcd.lease_grant(self.ttl_secs()).await?;
        self.lease.store(id, Ordering::Release);
        self.leadership
            .renewed(sent, Duration::from_secs(self.ttl_secs() as u64));
        Ok(())
    }

    /// Makes sure no other live controller runs under this name: a member key of the name
    /// under another lease is either a previous run of this controller (killed: its lease
    /// runs out within a TTL, and it is waited out) or another controller, refused.
    async fn wait_for_name(&self) -> Result<(), HaError> {
        let ttl = Duration::from_secs(self.ttl_secs() as u64);
        let deadline = Instant::now() + ttl * 3 + Duration::from_secs(1);
        let mut said = false;
        loop {
            let Some(kv) = self.etcd.get(&self.keys.member(&self.ha.name)).await? else {
                return Ok(());
            };
            if kv.lease == self.lease() {
                return Ok(());
            }
            let other: Option<MemberInfo> = serde_json::from_slice(&kv.value).ok();
            if Instant::now() > deadline {
                return Err(HaError::Refused(format!(
                    "another controller named {} is running{}: every controller needs its own --name",
                    self.ha.name,
                    other
                        .map(|m| format!(" (at {})", m.api))
                        .unwrap_or_default()
                )));
            }
            if !said {
                info!(
                    name = self.ha.name,
                    "a controller of this name was registered; waiting for its lease to end"
                );
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Keeps the etcd lease alive (every TTL/4). A leader whose lease is gone has lost its
    /// leadership; a standby's is simply granted again.
    async fn keep_lease(self: Arc<Self>) {
        let ttl = Duration::from_secs(self.ttl_secs() as u64);
        let every = (ttl / 4).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            let sent = Instant::now();
            match self.etcd.lease_keep_alive(self.lease()).await {
                Ok(left) if left > 0 => self.leadership.renewed(sent, ttl),
                Ok(_) => {
                    if self.epoch.load(Ordering::Acquire) != 0 {
                        self.leadership.lose();
                        step_down(self.lease(), "etcd no longer has this leader's lease");
                    }
                    warn!("etcd no longer has this controller's lease; taking a new one");
                    if let Err(e) = self.grant_lease().await {
                        warn!(error = %e, "cannot take a new etcd lease");
                    }
                }
                Err(e) => debug!(error = %e, "etcd lease keep-alive failed"),
            }
        }
    }

    fn member_info(&self) -> MemberInfo {
        let epoch = self.epoch.load(Ordering::Acquire);
        MemberInfo {
            name: self.ha.name.clone(),
            api: self.ha.api_url.clone(),
            role: if epoch != 0 { "leader" } else { "standby" }.into(),
            applied: self.store.last_seq(),
            epoch,
        }
    }

    /// Publishes this controller's member key, and reads everyone's.
    async fn keep_member(self: Arc<Self>) {
        loop {
            let me = serde_json::to_vec(&self.member_info()).expect("serializes");
            if let Err(e) = self
                .etcd
                .put(&self.keys.member(&self.ha.name), &me, self.lease())
                .await
            {
                debug!(error = %e, "cannot publish this controller's member key");
            }
            let (from, to) = self.keys.members();
            if let Ok((kvs, _)) = self.etcd.range(&from, &to, 0).await {
                let members: Vec<MemberInfo> = kvs
                    .iter()
                    .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
                    .collect();
                self.leadership.set_controllers(
                    members
                        .iter()
                        .map(|m| ControllerView {
                            name: m.name.clone(),
                            api: m.api.clone(),
                            role: m.role.clone(),
                            applied: m.applied,
                            epoch: m.epoch,
                        })
                        .collect(),
                );
                *self.members.write().expect("members lock") = members;
            }
            tokio::time::sleep(MEMBER_EVERY).await;
        }
    }

    /// Carries followed records from the redo log into redb a step at a time, as the
    /// journal's committer does on a leader, so that taking over does not start with a
    /// checkpoint of everything followed since the start. Ends when this controller leads.
    async fn checkpoint_while_standing_by(self: Arc<Self>) {
        while self.epoch.load(Ordering::Acquire) == 0 {
            if self.store.pending_changes() > 0 {
                let store = self.store.clone();
                let r = tokio::task::spawn_blocking(move || {
                    store.checkpoint_step(crate::journal::CHECKPOINT_STEP)
                })
                .await;
                if let Ok(Err(e)) = r {
                    warn!(error = %e, "checkpoint of followed records failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Follows the log until the leader key is absent (then it is time to campaign).
    async fn follow_until_vacant(&self) -> Result<(), HaError> {
        loop {
            // Apply whatever is there, then look at the leader, then wait for news.
            let rev = self.apply_available().await?;
            match self.etcd.get(&self.keys.leader()).await {
                Ok(None) => {
                    *self.leader.write().expect("leader lock") = None;
                    return Ok(());
                }
                Ok(Some(kv)) => {
                    let info: Option<LeaderInfo> = serde_json::from_slice(&kv.value).ok();
                    *self.leader.write().expect("leader lock") = info;
                }
                Err(e) => {
                    debug!(error = %e, "cannot read the leader key");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            let (from, to) = self.keys.all();
            match self.etcd.watch(&from, &to, rev + 1).await {
                Ok(mut w) => {
                    // Any change under the prefix but member refreshes is news.
                    let members = self.keys.members().0;
                    let wait = async {
                        while let Ok(Some((_, events))) = w.next().await {
                            if events.iter().any(|e| !e.key().starts_with(&members)) {
                                return;
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
                }
                Err(e) => {
                    debug!(error = %e, "cannot watch etcd");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Applies every record etcd has after the local store's last; installs an image from
    /// the leader first if the next one is gone. Returns the etcd revision read at.
    async fn apply_available(&self) -> Result<i64, HaError> {
        loop {
            let after = self.store.last_seq();
            let read = match read_after(&self.etcd, &self.keys, after, READ_BATCH).await {
                Ok(r) => r,
                Err(e) => {
                    debug!(error = %e, "cannot read the log");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            match read {
                Read::Records(records, rev) => {
                    let n = records.len();
                    for (seq, payload) in records {
                        let store = self.store.clone();
                        tokio::task::spawn_blocking(move || store.apply_record(seq, &payload))
                            .await
                            .expect("apply task")?;
                    }
                    if (n as i64) < READ_BATCH {
                        return Ok(rev);
                    }
                }
                Read::Gap { first } => {
                    warn!(
                        applied = after,
                        first_in_etcd = first,
                        "the log in etcd no longer has the records after this controller's; fetching an image from the leader"
                    );
                    if let Err(e) = self.install_leader_image().await {
                        warn!(error = %e, "cannot install an image from the leader; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }

    async fn install_leader_image(&self) -> Result<(), String> {
        if let Ok(Some(kv)) = self.etcd.get(&self.keys.leader()).await {
            *self.leader.write().expect("leader lock") = serde_json::from_slice(&kv.value).ok();
        }
        let leader = self
            .leader
            .read()
            .expect("leader lock")
            .clone()
            .ok_or("no leader is known yet")?;
        let url = format!("{}/v1/ha/image", leader.api.trim_end_matches('/'));
        let image: Image = tokio::task::spawn_blocking(move || -> Result<Image, String> {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(600)))
                .build()
                .into();
            let mut r = agent
                .get(&url)
                .call()
                .map_err(|e| format!("GET {url}: {e}"))?;
            r.body_mut()
                .with_config()
                .limit(u64::MAX)
                .read_json()
                .map_err(|e| format!("GET {url}: {e}"))
        })
        .await
        .map_err(|e| e.to_string())??;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.install_image(&image))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Tries to take the leader key; the epoch if this controller won.
    async fn campaign(&self) -> Result<Option<u64>, HaError> {
        let value = serde_json::to_vec(&LeaderInfo {
            name: self.ha.name.clone(),
            api: self.ha.api_url.clone(),
        })
        .expect("serializes");
        let r = match self
            .etcd
            .txn(
                vec![Compare::CreateRevision(self.keys.leader(), 0)],
                vec![Op::Put {
                    key: self.keys.leader(),
                    value,
                    lease: self.lease(),
                }],
                vec![Op::Get(self.keys.leader())],
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "campaign failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Ok(None);
            }
        };
        // The key's create revision is the epoch. A call retried after its first attempt
        // took the key finds it under this controller's lease: won all the same.
        let epoch = if r.succeeded {
            r.revision as u64
        } else {
            match r.gets.into_iter().flatten().next() {
                Some(kv) if kv.lease == self.lease() => kv.create_revision as u64,
                Some(kv) => {
                    *self.leader.write().expect("leader lock") =
                        serde_json::from_slice(&kv.value).ok();
                    return Ok(None);
                }
                None => return Ok(None),
            }
        };
        // Until it serves, its answers name no other leader (it is the leader).
        *self.leader.write().expect("leader lock") = Some(LeaderInfo {
            name: self.ha.name.clone(),
            api: self.ha.api_url.clone(),
        });
        self.epoch.store(epoch, Ordering::Release);
        Ok(Some(epoch))
    }

    /// Applies everything in the log (no one else can add to it now).
    async fn catch_up(&self) -> Result<(), HaError> {
        self.apply_available().await?;
        Ok(())
    }

    /// Removes records every live member has applied (when two or more have) from etcd.
    async fn truncate_log(self: Arc<Self>) {
        loop {
            tokio::time::sleep(TRUNCATE_EVERY).await;
            let members = self.members.read().expect("members lock").clone();
            let Some(upto) =
                truncation_point(&members, self.store.last_seq(), self.ha.keep_records)
            else {
                continue;
            };
            match truncate(&self.etcd, &self.keys, upto).await {
                Ok(()) => debug!(upto, "truncated the log in etcd"),
                Err(e) => debug!(error = %e, "cannot truncate the log in etcd"),
            }
        }
    }

    /// Leaves cleanly: revoking the lease removes the member key, and the leader key if held.
    async fn leave(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.etcd.lease_revoke(self.lease()))
            .await;
    }

    fn view(&self) -> serde_json::Value {
        let me = self.member_info();
        serde_json::json!({
            "name": me.name,
            "role": me.role,
            "applied": me.applied,
            "epoch": me.epoch,
            "leader": self.leader.read().expect("leader lock").as_ref().map(|l| &l.api),
            "controllers": self.leadership.controllers(),
        })
    }
}

/// Leaves the leader role for good: the process runs itself again (same arguments, same
/// pid) and comes back as a standby, so none of the old leader's state survives.
fn step_down(lease: i64, why: &str) -> ! {
    error!(reason = why, "stepping down: restarting as a standby");
    let exe = std::env::current_exe();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Ok(exe) = exe {
        use std::os::unix::process::CommandExt;
        let e = std::process::Command::new(exe)
            .args(args)
            .env(PREVIOUS_LEASE_ENV, lease.to_string())
            .exec();
        error!(error = %e, "cannot re-execute this controller; exiting");
    }
    std::process::exit(75)
}

/// Serves whichever app `current` holds at each request.
fn switch(current: Arc<RwLock<Router>>) -> Router {
    Router::new().fallback_service(tower::service_fn(move |req: Request| {
        let app = current.read().expect("app lock").clone();
        async move { app.oneshot(req).await }
    }))
}

fn ha_routes(node: Arc<Node>) -> Router {
    let n = node.clone();
    Router::new().route(
        "/v1/ha",
        axum::routing::get(move || {
            let n = n.clone();
            async move { axum::Json(n.view()) }
        }),
    )
}

/// A standby's answers: its own state on `/v1/ha`; everything else points at the leader.
fn standby_app(node: Arc<Node>) -> Router {
    let n = node.clone();
    ha_routes(node).fallback(move |req: Request| {
        let n = n.clone();
        async move { not_leader(&n, req) }
    })
}

fn not_leader(node: &Node, req: Request) -> Response {
    let leader = node
        .leader
        .read()
        .expect("leader lock")
        .clone()
        .filter(|l| l.name != node.ha.name);
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if is_grpc {
        return tabula_proto::not_leader(leader.as_ref().map(|l| l.api.as_str()))
            .into_http::<Body>()
            .into_response();
    }
    let body = serde_json::json!({
        "error": match &leader {
            Some(l) => format!("this controller ({}) is a standby; the leader is {} at {}", node.ha.name, l.name, l.api),
            None => format!("this controller ({}) is a standby and no leader is known yet; try again shortly", node.ha.name),
        },
        "leader": leader.as_ref().map(|l| &l.api),
    });
    let mut resp = (StatusCode::MISDIRECTED_REQUEST, axum::Json(body)).into_response();
    if let Some(l) = &leader {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        if let Ok(v) = HeaderValue::from_str(&format!("{}{path}", l.api.trim_end_matches('/'))) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
    }
    resp
}

/// The leader's answers: the controller's admin API and gRPC, plus `/v1/ha` and images.
fn leader_app(node: Arc<Node>, ctl: Arc<Controller>) -> Router {
    let store = node.store.clone();
    ha_routes(node)
        .route(
            "/v1/ha/image",
            axum::routing::get(move || {
                let store = store.clone();
                async move {
                    match tokio::task::spawn_blocking(move || store.image()).await {
                        Ok(Ok(image)) => axum::Json(image).into_response(),
                        Ok(Err(e)) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            axum::Json(serde_json::json!({"error": e.to_string()})),
                        )
                            .into_response(),
                        Err(e) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            axum::Json(serde_json::json!({"error": e.to_string()})),
                        )
                            .into_response(),
                    }
                }
            }),
        )
        .fallback_service(crate::http::app(ctl, true, crate::http::Limits::default()))
}
