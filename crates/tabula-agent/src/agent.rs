//! The agent: volumes by name and id, open containers, the NBD export provider, and the
//! port through which the controller commands it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tabula_api::{AgentPort, AgentReport, Command, ControlError, ControlPlane, TableSnapshot};
use tabula_container::{Container, ContainerOptions, Location, Prober, label};
use tabula_core::{ContainerId, VdiskId};
use tabula_nbd::server::{Export, ExportInfo, ExportProvider, OpenError};
use tracing::{debug, info, warn};

use crate::lease::Lease;
use crate::volume::{Replaced, Volume, VolumeExport, export_info};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub name: String,
    /// Test hook: holds every container read this long while it holds the I/O gate, so
    /// tests can race table changes against reads in flight. `None` in production.
    pub read_delay: Option<std::time::Duration>,
    /// How long one I/O may wait, from when it begins, for what it needs before it fails
    /// with EIO: the controller's answer (an allocating write, a trim, a copy-on-write, a
    /// resync after the lease ran out), the end of a hold (snapshot, rollback), or a table
    /// that keeps changing under it (a drain's steps, snapshots, copy-on-write switches).
    /// Bounded by time, not by a number of rounds: a busy controller that makes progress can
    /// take any number.
    pub fault_wait: Duration,
    /// How long a change may be missing (a later one arrived) before the whole table is
    /// fetched again.
    pub gap_timeout: Duration,
    /// The longest container I/O may take before it fails (EIO to the host) and the
    /// container is reported as not answering.
    pub container_timeout: Duration,
}

impl AgentConfig {
    pub fn new(name: impl Into<String>) -> AgentConfig {
        AgentConfig {
            name: name.into(),
            read_delay: None,
            fault_wait: Duration::from_secs(30),
            gap_timeout: Duration::from_secs(2),
            container_timeout: Duration::from_secs(5),
        }
    }
}

/// An open container, whether it has writes not yet made durable by a flush, and whether
/// it answers.
pub(crate) struct OpenContainer {
    pub(crate) id: ContainerId,
    pub(crate) name: String,
    pub(crate) file: Container,
    pub(crate) dirty: AtomicBool,
    /// The controller says nobody can reach it.
    failed: AtomicBool,
    /// This agent's own I/O to it failed; its probe clears this.
    path_down: AtomicBool,
    /// Why it is down, for the host's error message.
    reason: parking_lot::Mutex<String>,
    /// A probe failed while writes were not yet flushed: its flush may have taken the error
    /// that says they were lost, so the host's next flush fails with this instead.
    unflushed_lost: parking_lot::Mutex<Option<String>>,
}

impl AsRef<Container> for OpenContainer {
    fn as_ref(&self) -> &Container {
        &self.file
    }
}

impl OpenContainer {
    /// `failed`: why the controller says nobody can reach it, if it does.
    pub(crate) fn new(
        id: ContainerId,
        name: String,
        file: Container,
        failed: Option<String>,
    ) -> OpenContainer {
        OpenContainer {
            id,
            name,
            file,
            dirty: AtomicBool::new(false),
            failed: AtomicBool::new(failed.is_some()),
            path_down: AtomicBool::new(false),
            reason: parking_lot::Mutex::new(failed.unwrap_or_default()),
            unflushed_lost: parking_lot::Mutex::new(None),
        }
    }

    /// Applies the controller's word on whether it is failed. True if that changed.
    fn set_failed(&self, failed: Option<&str>) -> bool {
        match failed {
            Some(reason) => {
                *self.reason.lock() = reason.to_string();
                !self.failed.swap(true, Ordering::AcqRel)
            }
            None => self.failed.swap(false, Ordering::AcqRel),
        }
    }

    /// Fails at once if the container is known to be down: the host gets its error now,
    /// not after another timeout.
    pub(crate) fn check_up(&self) -> Result<(), String> {
        if self.failed.load(Ordering::Acquire) || self.path_down.load(Ordering::Acquire) {
            return Err(format!(
                "container {} does not answer ({}); I/O to it fails until it does",
                self.name,
                self.reason.lock()
            ));
        }
        Ok(())
    }
}

pub(crate) struct Shared {
    pub(crate) cfg: AgentConfig,
    pub(crate) control: Arc<dyn ControlPlane>,
    volumes: parking_lot::Mutex<HashMap<String, Arc<Volume>>>,
    by_id: parking_lot::Mutex<HashMap<VdiskId, Arc<Volume>>>,
    /// Commands for vdisks being attached: the controller may change a table between taking
    /// the snapshot it sends and this agent installing it. Locked after `by_id`.
    pending: parking_lot::Mutex<HashMap<VdiskId, Vec<Command>>>,
    containers: parking_lot::Mutex<HashMap<ContainerId, Arc<OpenContainer>>>,
    open_lock: tokio::sync::Mutex<()>,
    pub(crate) lease: Arc<Lease>,
    /// The current session with the controller; copies synchronised in an older one must
    /// be resynchronised before use.
    epoch: AtomicU64,
    /// Wakes I/O waiting for the volume to become usable.
    pub(crate) changed: tokio::sync::Notify,
    mismatches: AtomicU64,
    gaps_healed: AtomicU64,
    /// Containers the controller reported failed (whether open here or not), with why.
    failed: parking_lot::Mutex<HashMap<ContainerId, String>>,
    /// Open exports (NBD connections) per vdisk, reported to the controller, which refuses
    /// to delete a vdisk under its clients.
    connections: parking_lot::Mutex<HashMap<VdiskId, u32>>,
    /// Wakes the heartbeat so the controller hears of a new or closed connection at once.
    report_changed: tokio::sync::Notify,
}

/// One open export of a vdisk, counted for as long as it lives.
pub(crate) struct Connection {
    shared: Arc<Shared>,
    vdisk: VdiskId,
}

impl Connection {
    pub(crate) fn new(shared: &Arc<Shared>, vdisk: VdiskId) -> Connection {
        *shared.connections.lock().entry(vdisk).or_default() += 1;
        shared.report_changed.notify_one();
        Connection {
            shared: shared.clone(),
            vdisk,
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut conns = self.shared.connections.lock();
        if let Some(n) = conns.get_mut(&self.vdisk) {
            *n -= 1;
            if *n == 0 {
                conns.remove(&self.vdisk);
            }
        }
        drop(conns);
        self.shared.report_changed.notify_one();
    }
}

impl Shared {
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Fetches the whole table of `vol` again and installs it, marking the copy current
    /// for this session.
    pub(crate) async fn resync(&self, vol: &Volume) -> Result<(), ControlError> {
        let _one = vol.resync_lock.lock().await;
        let epoch = self.epoch();
        if vol.synced_epoch.load(Ordering::Acquire) == epoch {
            return Ok(());
        }
        let snap = self
            .control
            .open_vdisk(&self.cfg.name, vol.name())
            .await
            .and_then(|snap| {
                if snap.vdisk == vol.id() {
                    Ok(snap)
                } else {
                    Err(ControlError::NotFound(format!(
                        "vdisk '{}' (deleted and created again; reconnect)",
                        vol.name()
                    )))
                }
            });
        let snap = match snap {
            Err(e @ ControlError::NotFound(_)) => {
                // Deleted while this agent was away: its I/O fails instead of waiting.
                vol.detach();
                self.changed.notify_waiters();
                return Err(e);
            }
            other => other?,
        };
        self.install_snapshot(vol, &snap, true)
            .map_err(ControlError::Invalid)?;
        vol.synced_epoch.store(epoch, Ordering::Release);
        // A newer session may have started while this one was fetched; then it stays unusable.
        if self.epoch() != epoch {
            vol.synced_epoch.store(0, Ordering::Release);
        }
        debug!(vdisk = vol.name(), generation = %vol.generation(), "table resynchronised");
        self.changed.notify_waiters();
        Ok(())
    }

    /// Installs a whole table and accounts for what the comparison found.
    fn install_snapshot(
        &self,
        vol: &Volume,
        snap: &TableSnapshot,
        resync: bool,
    ) -> Result<(), String> {
        match vol.replace(snap)? {
            Replaced::Mismatch if !resync => {
                self.mismatches.fetch_add(1, Ordering::Relaxed);
                warn!(
                    vdisk = vol.name(),
                    generation = %snap.generation,
                    "table copy differed from the controller's at the same generation; replaced"
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// The open container `id`, if it is open already (never waits).
    pub(crate) fn cached_container(&self, id: ContainerId) -> Option<Arc<OpenContainer>> {
        self.containers.lock().get(&id).cloned()
    }

    /// The open container `id`, opening it on first use with the controller's location.
    pub(crate) async fn container(
        &self,
        id: ContainerId,
    ) -> Result<Arc<OpenContainer>, ControlError> {
        if let Some(c) = self.containers.lock().get(&id) {
            return Ok(c.clone());
        }
        let loc = self.control.container(id).await?;
        // The controller's current word, newer than anything in `failed` so far.
        self.set_failed(id, loc.failed.as_deref());
        let name = loc.name.clone();
        let opts = ContainerOptions {
            io_timeout: self.cfg.container_timeout,
        };
        let location = Location::parse(&loc.path)
            .map_err(|e| ControlError::Storage(tabula_api::error_chain(&e)))?;
        let (pool, size) = (loc.pool_id, loc.size_bytes);
        let opened = tokio::time::timeout(
            self.cfg.container_timeout + Duration::from_secs(1),
            tokio::task::spawn_blocking(move || {
                let c = Container::open_location(&location, size, &opts)
                    .map_err(|e| tabula_api::error_chain(&e))?;
                // On this host the path may lead to another device than the one added:
                // no I/O to a container whose label is not its own.
                if pool != 0 {
                    let found = label::read(&c).map_err(|e| format!("reading its label: {e}"))?;
                    label::expect(&found, pool, id.0).map_err(|why| {
                        format!(
                            "{} is not the container that was added: {why}",
                            c.describe()
                        )
                    })?;
                }
                Ok::<_, String>(c)
            }),
        )
        .await;
        let file = match opened {
            Ok(Ok(Ok(f))) => f,
            other => {
                let e = match other {
                    Err(_) => "no answer".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(Err(e))) => e,
                    Ok(Ok(Ok(_))) => unreachable!(),
                };
                let e = format!("opening container {name}: {e}");
                let control = self.control.clone();
                let agent = self.cfg.name.clone();
                let report = e.clone();
                tokio::spawn(async move {
                    let _ = control.report_container(&agent, id, Some(report)).await;
                });
                return Err(ControlError::Storage(e));
            }
        };
        let failed = self.failed.lock().get(&id).cloned();
        let c = Arc::new(OpenContainer::new(id, name, file, failed));
        let c = self.containers.lock().entry(id).or_insert(c).clone();
        // News that came while it was opened found nothing to mark: apply it now.
        let failed = self.failed.lock().get(&id).cloned();
        c.set_failed(failed.as_deref());
        Ok(c)
    }

    /// The controller's word about a container: why it is failed, or `None` if it answers.
    fn set_failed(&self, id: ContainerId, failed: Option<&str>) {
        let changed = {
            let mut map = self.failed.lock();
            match failed {
                Some(reason) => map.insert(id, reason.to_string()).is_none(),
                None => map.remove(&id).is_some(),
            }
        };
        if changed {
            match failed {
                Some(reason) => {
                    warn!(container = %id, reason, "controller reports the container failed")
                }
                None => info!(container = %id, "controller reports the container answers again"),
            }
        }
        if let Some(c) = self.cached_container(id) {
            if c.set_failed(failed) && failed.is_none() {
                // Our own path gets another chance too: if it is still down, the next I/O
                // says so again.
                c.path_down.store(false, Ordering::Release);
            }
        }
    }

    /// Asks the controller again about every container this agent knows of (open, or
    /// reported failed): news sent while it was away never arrived.
    async fn refresh_health(&self) {
        let mut ids: Vec<ContainerId> = self.failed.lock().keys().copied().collect();
        ids.extend(self.containers.lock().keys().copied());
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            match self.control.container(id).await {
                Ok(loc) => self.set_failed(id, loc.failed.as_deref()),
                Err(ControlError::NotFound(_)) => {
                    self.failed.lock().remove(&id);
                }
                Err(e) => {
                    warn!(container = %id, error = %e, "could not ask the controller about a container; its state here may be stale until it next reports it")
                }
            }
        }
    }

    /// A container fault: I/O to `c` failed or timed out. Marks it down here (its I/O
    /// fails at once from now on), reports it to the controller, and probes it every second
    /// until it answers, then reports that.
    pub(crate) fn container_fault(self: &Arc<Self>, c: &Arc<OpenContainer>, error: String) {
        *c.reason.lock() = error.clone();
        if c.path_down.swap(true, Ordering::AcqRel) {
            return;
        }
        warn!(
            container = c.name,
            error, "container I/O failed; probing it until it answers"
        );
        let me = Arc::downgrade(self);
        let c = c.clone();
        tokio::spawn(async move {
            let Some(shared) = me.upgrade() else { return };
            let (control, agent, timeout) = (
                shared.control.clone(),
                shared.cfg.name.clone(),
                shared.cfg.container_timeout,
            );
            drop(shared);
            if let Err(e) = control.report_container(&agent, c.id, Some(error)).await {
                debug!(container = c.name, error = %e, "could not report a container fault");
            }
            // One probe at a time: a hung one is waited for again, not joined by another.
            let mut prober = Prober::default();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if me.strong_count() == 0 || !c.path_down.load(Ordering::Acquire) {
                    return;
                }
                match prober.probe(&c, timeout).await {
                    Ok(()) => {
                        c.path_down.store(false, Ordering::Release);
                        info!(container = c.name, "container answers again");
                        let _ = control.report_container(&agent, c.id, None).await;
                        return;
                    }
                    Err(e) if c.dirty.load(Ordering::Acquire) => {
                        c.unflushed_lost.lock().get_or_insert(e);
                    }
                    Err(_) => {}
                }
            }
        });
    }

    /// Makes every write completed so far durable, on every container written.
    pub(crate) async fn flush(self: &Arc<Self>) -> std::io::Result<()> {
        let dirty: Vec<Arc<OpenContainer>> = self
            .containers
            .lock()
            .values()
            .filter(|c| c.dirty.load(Ordering::Acquire))
            .cloned()
            .collect();
        for c in dirty {
            c.check_up().map_err(std::io::Error::other)?;
            if let Some(e) = c.unflushed_lost.lock().take() {
                return Err(std::io::Error::other(format!(
                    "container {}: writes not yet flushed may have been lost while it did not answer ({e}); check the data written since the last successful flush",
                    c.name
                )));
            }
            // Clear first: a write that lands during the sync sets it again.
            c.dirty.store(false, Ordering::Release);
            let c2 = c.clone();
            let r = tokio::time::timeout(
                self.cfg.container_timeout,
                tokio::task::spawn_blocking(move || c2.file.sync()),
            )
            .await
            .unwrap_or_else(|_| {
                Ok(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer",
                )))
            })
            .map_err(std::io::Error::other)?;
            if let Err(e) = r {
                c.dirty.store(true, Ordering::Release);
                self.container_fault(&c, format!("flush: {e}"));
                return Err(e);
            }
        }
        Ok(())
    }
}

/// The agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

impl Agent {
    /// Creates an in-process agent (no lease) and registers it with the controller.
    pub async fn start(
        cfg: AgentConfig,
        control: Arc<dyn ControlPlane>,
    ) -> Result<Agent, ControlError> {
        Self::start_with_lease(cfg, control, Arc::new(Lease::forever())).await
    }

    /// Creates the agent with `lease` (kept by the transport) and registers it.
    pub async fn start_with_lease(
        cfg: AgentConfig,
        control: Arc<dyn ControlPlane>,
        lease: Arc<Lease>,
    ) -> Result<Agent, ControlError> {
        let agent = Agent {
            shared: Arc::new(Shared {
                cfg,
                control,
                volumes: parking_lot::Mutex::new(HashMap::new()),
                by_id: parking_lot::Mutex::new(HashMap::new()),
                pending: parking_lot::Mutex::new(HashMap::new()),
                containers: parking_lot::Mutex::new(HashMap::new()),
                open_lock: tokio::sync::Mutex::new(()),
                lease,
                epoch: AtomicU64::new(1),
                changed: tokio::sync::Notify::new(),
                mismatches: AtomicU64::new(0),
                gaps_healed: AtomicU64::new(0),
                failed: parking_lot::Mutex::new(HashMap::new()),
                connections: parking_lot::Mutex::new(HashMap::new()),
                report_changed: tokio::sync::Notify::new(),
            }),
        };
        let port: Arc<dyn AgentPort> = Arc::new(agent.clone());
        agent
            .shared
            .control
            .register_agent(&agent.shared.cfg.name, port, Vec::new())
            .await?;
        info!(agent = agent.shared.cfg.name, "agent started");
        Ok(agent)
    }

    pub fn name(&self) -> &str {
        &self.shared.cfg.name
    }

    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The volume for an export name, attaching to the vdisk on first use.
    pub async fn volume(&self, name: &str) -> Result<Arc<Volume>, ControlError> {
        if let Some(v) = self.shared.volumes.lock().get(name) {
            return Ok(v.clone());
        }
        let _g = self.shared.open_lock.lock().await;
        if let Some(v) = self.shared.volumes.lock().get(name) {
            return Ok(v.clone());
        }
        let epoch = self.shared.epoch();
        // A client may connect before the session is up (the agent starts without the
        // controller): wait for it as an allocating write would.
        let deadline = Instant::now() + self.shared.cfg.fault_wait;
        let snap = loop {
            match self
                .shared
                .control
                .open_vdisk(&self.shared.cfg.name, name)
                .await
            {
                Err(ControlError::Unavailable(m)) if Instant::now() < deadline => {
                    debug!(
                        vdisk = name,
                        error = m,
                        "controller unavailable; attach waits"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => break other?,
            }
        };
        let vol = Arc::new(Volume::from_snapshot(snap).map_err(ControlError::Invalid)?);
        {
            // Apply what arrived while the snapshot was on its way, then publish the volume,
            // under the lock `apply` takes, so no command falls between the two.
            let mut by_id = self.shared.by_id.lock();
            let missed = self
                .shared
                .pending
                .lock()
                .remove(&vol.id())
                .unwrap_or_default();
            for cmd in missed {
                match cmd {
                    Command::Detach { .. } => {
                        return Err(ControlError::NotFound(format!("vdisk '{name}' (deleted)")));
                    }
                    other => {
                        Self::apply_to(&vol, &other, &self.shared).map_err(ControlError::Invalid)?
                    }
                }
            }
            // Usable only if no new session began while the table was on its way.
            vol.synced_epoch.store(epoch, Ordering::Release);
            by_id.insert(vol.id(), vol.clone());
        }
        debug!(vdisk = name, entries = vol.entries(), "attached");
        self.shared
            .volumes
            .lock()
            .insert(name.to_string(), vol.clone());
        Ok(vol)
    }

    /// Makes every write completed so far durable (used on a clean shutdown).
    pub async fn flush(&self) -> std::io::Result<()> {
        self.shared.flush().await
    }

    /// Checks for missing table changes twice a second, for as long as the agent lives.
    pub fn spawn_gap_healer(&self) {
        let weak = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(shared) = weak.upgrade() else { return };
                Agent { shared }.heal_gaps().await;
            }
        });
    }

    fn all_volumes(&self) -> Vec<Arc<Volume>> {
        self.shared.by_id.lock().values().cloned().collect()
    }

    /// Fetches the whole table of every volume with a missing change (a gap that did not
    /// fill within the gap timeout).
    pub async fn heal_gaps(&self) {
        for vol in self.all_volumes() {
            if vol.gap_overdue(self.shared.cfg.gap_timeout) {
                warn!(
                    vdisk = vol.name(),
                    "a table change never arrived; fetching the whole table"
                );
                vol.synced_epoch.store(0, Ordering::Release);
                if self.shared.resync(&vol).await.is_ok() {
                    self.shared.gaps_healed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Applies a command that installs entries or states (not `Detach`, not blocking).
    fn apply_to(vol: &Volume, cmd: &Command, shared: &Shared) -> Result<(), String> {
        match cmd {
            Command::Update(u) => vol.install(u),
            Command::Allocated(u) => vol.install_answer(u),
            Command::SetState {
                generation,
                range,
                state,
                ..
            } => vol.set_state(*generation, *range, *state),
            Command::Replace(snap) => shared.install_snapshot(vol, snap, false)?,
            Command::Block { timeout_ms, .. } => {
                vol.block(Instant::now() + Duration::from_millis(*timeout_ms))
            }
            Command::Unblock { .. } => {
                vol.unblock();
                shared.changed.notify_waiters();
            }
            Command::Detach { .. } | Command::ContainerHealth { .. } => {}
        }
        Ok(())
    }

    /// The volume a command is for (taken out of the map with `remove`); if it is still
    /// being attached, the command is kept for the attach to apply (no I/O can use the
    /// volume before then).
    fn volume_for(&self, id: VdiskId, cmd: &Command, remove: bool) -> Option<Arc<Volume>> {
        let mut by_id = self.shared.by_id.lock();
        let vol = if remove {
            by_id.remove(&id)
        } else {
            by_id.get(&id).cloned()
        };
        match vol {
            Some(v) => Some(v),
            None => {
                self.shared
                    .pending
                    .lock()
                    .entry(id)
                    .or_default()
                    .push(cmd.clone());
                None
            }
        }
    }
}

#[async_trait::async_trait]
impl ExportProvider for Agent {
    async fn list(&self) -> Vec<String> {
        self.shared.control.list_vdisks().await.unwrap_or_default()
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn Export>, OpenError> {
        match self.volume(name).await {
            Ok(vol) => Ok(Arc::new(VolumeExport::new(self.shared.clone(), vol))),
            Err(ControlError::NotFound(_)) => Err(OpenError::NotFound),
            Err(e) => Err(OpenError::Unavailable(e.to_string())),
        }
    }

    /// NBD_OPT_INFO: from the attached copy if there is one, else from the controller's
    /// metadata without attaching. Attaching would fetch the whole table and make this agent
    /// one of the vdisk's holders for good (every snapshot then waits for it): a client
    /// listing a few thousand exports would attach them all.
    async fn info(&self, name: &str) -> Result<ExportInfo, OpenError> {
        let attached = self.shared.volumes.lock().get(name).cloned();
        if let Some(vol) = attached {
            return Ok(export_info(vol.name(), vol.size_bytes(), vol.read_only()));
        }
        match self.shared.control.describe_vdisk(name).await {
            Ok(s) => Ok(export_info(&s.name, s.size_bytes, s.read_only)),
            Err(ControlError::NotFound(_)) => Err(OpenError::NotFound),
            // The controller cannot say now: attaching waits for it as a GO would.
            Err(e) => {
                debug!(vdisk = name, error = %e, "describing a vdisk failed; attaching instead");
                Ok(self.open(name).await?.info())
            }
        }
    }
}

#[async_trait::async_trait]
impl AgentPort for Agent {
    async fn apply(&self, command: Command) -> Result<(), String> {
        match command {
            Command::Detach { vdisk } => {
                // If it is being attached, the attach sees the command and refuses.
                if let Some(vol) = self.volume_for(vdisk, &command, true) {
                    self.shared.volumes.lock().retain(|_, v| v.id() != vdisk);
                    vol.detach();
                    self.shared.changed.notify_waiters();
                    vol.drain().await;
                    info!(vdisk = vol.name(), "detached");
                }
            }
            Command::ContainerHealth {
                container,
                failed,
                ref reason,
            } => self
                .shared
                .set_failed(container, failed.then_some(reason.as_str())),
            ref cmd => {
                let vdisk = cmd.vdisk().expect("every other command is about a vdisk");
                if let Some(vol) = self.volume_for(vdisk, cmd, false) {
                    Self::apply_to(&vol, cmd, &self.shared)?;
                    // Mappings that only fill gaps supersede nothing; everything else waits
                    // for the I/O that may have used what it replaced.
                    if !matches!(cmd, Command::Allocated(_) | Command::Unblock { .. }) {
                        vol.drain().await;
                    }
                }
            }
        }
        Ok(())
    }

    fn report(&self) -> Option<AgentReport> {
        let mut tables: Vec<_> = self
            .all_volumes()
            .iter()
            .map(|v| (v.id(), v.generation()))
            .collect();
        tables.sort();
        let mut connections: Vec<_> = self
            .shared
            .connections
            .lock()
            .iter()
            .map(|(v, n)| (*v, *n))
            .collect();
        connections.sort();
        Some(AgentReport {
            tables,
            table_mismatches: self.shared.mismatches.load(Ordering::Relaxed),
            gaps_healed: self.shared.gaps_healed.load(Ordering::Relaxed),
            connections,
        })
    }

    async fn report_changed(&self) {
        self.shared.report_changed.notified().await
    }

    fn held_vdisks(&self) -> Vec<VdiskId> {
        self.shared.by_id.lock().keys().copied().collect()
    }

    async fn session_started(&self) {
        // Every copy from before must be fetched again before use: the controller may have
        // changed tables without this agent while it was away.
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        self.shared.changed.notify_waiters();
        let resync = async {
            for vol in self.all_volumes() {
                if let Err(e) = self.shared.resync(&vol).await {
                    warn!(vdisk = vol.name(), error = %e, "resync after reconnecting failed; I/O will retry it");
                }
            }
        };
        // Container news sent meanwhile was lost too.
        tokio::join!(resync, self.shared.refresh_health());
    }
}
