//! The agent: volumes by name and id, open containers, the NBD export provider, and the
//! port through which the controller commands it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tabula_api::{AgentPort, Command, ControlError, ControlPlane};
use tabula_container::Container;
use tabula_core::{ContainerId, VdiskId};
use tabula_nbd::server::{Export, ExportProvider, OpenError};
use tracing::{debug, info};

use crate::volume::{Volume, VolumeExport};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub name: String,
    /// Faults retried on the same I/O before it fails with EIO (tables can change between a
    /// fault's answer and the retry; endless change means something is wrong).
    pub max_fault_retries: u32,
    /// Test hook: holds every container read this long while it holds the I/O gate, so
    /// tests can race table changes against reads in flight. `None` in production.
    pub read_delay: Option<std::time::Duration>,
}

impl AgentConfig {
    pub fn new(name: impl Into<String>) -> AgentConfig {
        AgentConfig {
            name: name.into(),
            max_fault_retries: 16,
            read_delay: None,
        }
    }
}

/// An open container and whether it has writes not yet made durable by a flush.
pub(crate) struct OpenContainer {
    pub(crate) file: Container,
    pub(crate) dirty: AtomicBool,
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
}

impl Shared {
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
        let file = tokio::task::spawn_blocking(move || {
            Container::open(Path::new(&loc.path), loc.size_bytes)
        })
        .await
        .map_err(|e| ControlError::Storage(e.to_string()))?
        .map_err(|e| ControlError::Storage(tabula_api::error_chain(&e)))?;
        let c = Arc::new(OpenContainer {
            file,
            dirty: AtomicBool::new(false),
        });
        Ok(self.containers.lock().entry(id).or_insert(c).clone())
    }

    /// Makes every write completed so far durable, on every container written.
    pub(crate) async fn flush(&self) -> std::io::Result<()> {
        let dirty: Vec<Arc<OpenContainer>> = self
            .containers
            .lock()
            .values()
            .filter(|c| c.dirty.load(Ordering::Acquire))
            .cloned()
            .collect();
        for c in dirty {
            // Clear first: a write that lands during the sync sets it again.
            c.dirty.store(false, Ordering::Release);
            let c2 = c.clone();
            let r = tokio::task::spawn_blocking(move || c2.file.sync())
                .await
                .map_err(std::io::Error::other)?;
            if let Err(e) = r {
                c.dirty.store(true, Ordering::Release);
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
    /// Creates the agent and registers it with the controller.
    pub async fn start(
        cfg: AgentConfig,
        control: Arc<dyn ControlPlane>,
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
            }),
        };
        let port: Arc<dyn AgentPort> = Arc::new(agent.clone());
        agent
            .shared
            .control
            .register_agent(&agent.shared.cfg.name, port)
            .await?;
        info!(agent = agent.shared.cfg.name, "agent started");
        Ok(agent)
    }

    pub fn name(&self) -> &str {
        &self.shared.cfg.name
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
        let snap = self
            .shared
            .control
            .open_vdisk(&self.shared.cfg.name, name)
            .await?;
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
                    Command::Update(u) => vol.install(&u),
                    Command::Replace(snap) => vol.replace(&snap).map_err(ControlError::Invalid)?,
                    Command::Detach { .. } => {
                        return Err(ControlError::NotFound(format!("vdisk '{name}' (deleted)")));
                    }
                }
            }
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

    /// The volume a command is for; if it is still being attached, the command is kept
    /// for the attach to apply (no I/O can use the volume before then).
    fn volume_for(&self, id: VdiskId, cmd: &Command) -> Option<Arc<Volume>> {
        let by_id = self.shared.by_id.lock();
        match by_id.get(&id) {
            Some(v) => Some(v.clone()),
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
}

#[async_trait::async_trait]
impl AgentPort for Agent {
    async fn apply(&self, command: Command) -> Result<(), String> {
        match command {
            Command::Update(ref u) => {
                if let Some(vol) = self.volume_for(u.vdisk, &command) {
                    vol.install(u);
                    vol.drain().await;
                }
            }
            Command::Replace(ref snap) => {
                if let Some(vol) = self.volume_for(snap.vdisk, &command) {
                    vol.replace(snap)?;
                    vol.drain().await;
                }
            }
            Command::Detach { vdisk } => {
                let vol = {
                    let mut by_id = self.shared.by_id.lock();
                    let vol = by_id.remove(&vdisk);
                    if vol.is_none() {
                        // Being attached: the attach will see this and refuse.
                        self.shared
                            .pending
                            .lock()
                            .entry(vdisk)
                            .or_default()
                            .push(command.clone());
                    }
                    vol
                };
                if let Some(vol) = vol {
                    self.shared.volumes.lock().retain(|_, v| v.id() != vdisk);
                    vol.detach();
                    vol.drain().await;
                    info!(vdisk = vol.name(), "detached");
                }
            }
        }
        Ok(())
    }
}
