//! The storage pool: containers of every kind (file, block device, remote NBD export), their
//! health, and the space warnings.
//!
//! A container is `ok`, or `failed` when nobody can reach it: an agent's I/O failed or timed
//! out (a container fault, reported with [`ControlPlane::report_container`]) and the
//! controller's own probe failed too. Then nothing new is allocated in it, every agent is
//! told so its I/O there fails at once, and a probe runs every second until it answers
//! again, which clears the state everywhere; nothing needs a restart. When the controller's
//! probe succeeds, only the path from that agent is down: it is recorded per agent, and the
//! agent reports again when its own probe gets through.
//!
//! [`ControlPlane::report_container`]: tabula_api::ControlPlane::report_container

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tabula_api::Command;
use tabula_api::ControlError;
use tabula_api::admin::ContainerView;
use tabula_container::{Container, ContainerOptions, Location, Prober, probe_within};
use tabula_core::{BLOCK_SIZE, ContainerId, FreeMap, format_size};
use tracing::{info, warn};

use super::{Controller, Meta, storage, storage_chain, validate_name};
use crate::store::ContainerRecord;

/// How often a failed container is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long zeroing of freed space in an unreachable container waits before it is tried
/// again.
pub(super) const ZEROING_RETRY: Duration = Duration::from_secs(5);

/// Whether a container answers.
#[derive(Clone, Debug)]
pub(super) enum Health {
    Ok,
    /// Nobody can reach it (the controller's probe failed too).
    Failed {
        since: Instant,
        reason: String,
    },
}

pub(super) struct ContainerMeta {
    pub(super) rec: ContainerRecord,
    /// The controller's own handle, for probing and zeroing freed space; `None` while it
    /// cannot be opened (a remote container that was down at start).
    pub(super) file: Option<Arc<Container>>,
    pub(super) health: Health,
    /// Agents that reported they cannot reach it while the controller can: a path down
    /// from one agent, not a failed container. Agent name to its error.
    pub(super) unreachable_from: BTreeMap<String, String>,
}

impl ContainerMeta {
    pub(super) fn new(rec: ContainerRecord, file: Option<Arc<Container>>) -> ContainerMeta {
        ContainerMeta {
            rec,
            file,
            health: Health::Ok,
            unreachable_from: BTreeMap::new(),
        }
    }

    /// Whether new space may come from it.
    pub(super) fn allocatable(&self) -> bool {
        matches!(self.health, Health::Ok) && !self.rec.draining && self.file.is_some()
    }

    /// Its handle, if it is open and not failed.
    pub(super) fn reachable(&self) -> Option<&Arc<Container>> {
        match self.health {
            Health::Ok => self.file.as_ref(),
            Health::Failed { .. } => None,
        }
    }

    fn state_name(&self) -> &'static str {
        match (&self.health, self.rec.draining) {
            (Health::Failed { .. }, _) => "failed",
            (Health::Ok, true) => "draining",
            (Health::Ok, false) => "ok",
        }
    }
}

/// Opens a container's location on the blocking pool, bounded by `timeout`.
pub(super) async fn open_location(
    location: &str,
    expected: u64,
    timeout: Duration,
) -> Result<Container, String> {
    let loc = Location::parse(location).map_err(|e| tabula_api::error_chain(&e))?;
    let opts = ContainerOptions {
        io_timeout: timeout,
    };
    let task = tokio::task::spawn_blocking(move || Container::open_location(&loc, expected, &opts));
    match tokio::time::timeout(timeout + Duration::from_secs(1), task).await {
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(r)) => r.map_err(|e| tabula_api::error_chain(&e)),
    }
}

impl Controller {
    /// Adds the default container on first start (a sparse file in the data directory).
    pub async fn ensure_default_container(&self, size: u64) -> Result<(), ControlError> {
        if !self.meta.lock().await.containers.is_empty() {
            return Ok(());
        }
        tabula_core::check_container_size(size)
            .map_err(|e| ControlError::Invalid(format!("the default container: {e}")))?;
        let dir = self.cfg.data_dir.join("containers");
        std::fs::create_dir_all(&dir).map_err(storage)?;
        let path = dir.join("default.img");
        // A file here that the store does not know is left by a first start that died
        // before its commit (or put here by hand): no table can map it, so it is taken as
        // it is, unless it never got its size.
        let existing = std::fs::metadata(&path).ok().map(|m| m.len());
        let size = match existing {
            Some(len) if len >= BLOCK_SIZE => {
                info!(
                    path = %path.display(),
                    bytes = len,
                    "using the file already there as the default container"
                );
                None
            }
            Some(_) => {
                std::fs::remove_file(&path).map_err(storage)?;
                Some(size)
            }
            None => Some(size),
        };
        self.add_container("default", &path.to_string_lossy(), size)
            .await
            .map(|_| ())
    }

    /// Adds a container: a file (created sparse with `size`, or existing), a block device or
    /// an NBD URI. Its space is allocatable by every agent at once.
    pub async fn add_container(
        &self,
        name: &str,
        location: &str,
        size: Option<u64>,
    ) -> Result<ContainerView, ControlError> {
        validate_name("container", name)?;
        let loc = Location::parse(location).map_err(|e| {
            ControlError::Invalid(format!(
                "container location: {}",
                tabula_api::error_chain(&e)
            ))
        })?;
        let mut meta = self.meta.lock().await;
        if meta.containers.values().any(|c| c.rec.name == name) {
            return Err(ControlError::Exists(format!(
                "container '{name}' already exists: pick another name"
            )));
        }
        let (stored_loc, created) = match &loc {
            Location::Path(path) => {
                let abs = std::path::absolute(path).map_err(storage)?;
                (abs.to_string_lossy().to_string(), Some(abs))
            }
            Location::Nbd(_) => {
                if size.is_some() {
                    return Err(ControlError::Invalid(
                        "--size applies only to a new container file; a remote export has the size its server gives it".into(),
                    ));
                }
                (loc.to_string(), None)
            }
        };
        if meta.containers.values().any(|c| c.rec.path == stored_loc) {
            return Err(ControlError::Exists(format!(
                "a container at {stored_loc} already exists"
            )));
        }
        let file = match (size, &created) {
            (Some(s), Some(abs)) => {
                if s == 0 || s % BLOCK_SIZE != 0 {
                    return Err(ControlError::Invalid(format!(
                        "container size {s} is not a positive multiple of the block size {BLOCK_SIZE}"
                    )));
                }
                if abs.exists() {
                    return Err(ControlError::Exists(format!(
                        "file {stored_loc} already exists: give --size only for a new file, or omit --size to use the existing file as it is"
                    )));
                }
                Container::create(abs, s).map_err(|e| storage_chain(&e))?
            }
            _ => {
                let c = open_location(&stored_loc, 0, self.cfg.container_timeout)
                    .await
                    // The caller named something that cannot be opened (no such file, no
                    // permission, no server there): a bad request, not a fault of ours.
                    .map_err(|e| ControlError::Invalid(format!("opening {stored_loc}: {e}")))?;
                if c.len_bytes().map_err(storage)? < BLOCK_SIZE {
                    return Err(ControlError::Invalid(format!(
                        "{stored_loc} is empty: give --size to create a container file"
                    )));
                }
                c
            }
        };
        let size_blocks = file.len_bytes().map_err(storage)? / BLOCK_SIZE;
        let kind = file.kind().name();
        let id = ContainerId(meta.next_container);
        let rec = ContainerRecord {
            name: name.to_string(),
            path: stored_loc,
            size_blocks,
            draining: false,
        };
        let stored = rec.clone();
        let result = self
            .commit(move |t| {
                t.set_meta("next_container", (id.0 + 1) as u64)?;
                t.put_container(id, &stored)?;
                t.put_free(id, 0, size_blocks)
            })
            .await;
        if let Err(e) = result {
            if let (Some(_), Some(abs)) = (size, created) {
                let _ = std::fs::remove_file(abs);
            }
            return Err(e);
        }
        meta.next_container += 1;
        meta.pool.insert(id, FreeMap::all_free(size_blocks));
        meta.containers
            .insert(id, ContainerMeta::new(rec, Some(Arc::new(file))));
        self.check_low_space(&meta);
        info!(container = name, kind, size = %format_size(size_blocks * BLOCK_SIZE), "container added");
        Ok(self.container_view(&meta, id))
    }

    pub(super) fn container_view(&self, meta: &Meta, id: ContainerId) -> ContainerView {
        let c = &meta.containers[&id];
        let free = meta.pool.get(id).map(FreeMap::free_blocks).unwrap_or(0);
        let zeroing: u64 = meta
            .zeroing
            .range((id, 0)..=(id, u64::MAX))
            .map(|(_, l)| l)
            .sum();
        let (error, failed_for_ms) = match &c.health {
            Health::Ok => (None, None),
            Health::Failed { since, reason } => (
                Some(reason.clone()),
                Some(since.elapsed().as_millis() as u64),
            ),
        };
        let agents = if matches!(c.health, Health::Ok) {
            self.agents
                .all()
                .into_iter()
                .map(|h| h.name)
                .filter(|n| !c.unreachable_from.contains_key(n))
                .collect()
        } else {
            Vec::new()
        };
        ContainerView {
            name: c.rec.name.clone(),
            id: id.0,
            path: c.rec.path.clone(),
            kind: c
                .file
                .as_ref()
                .map(|f| f.kind().name())
                .unwrap_or_else(|| kind_of(&c.rec.path))
                .to_string(),
            state: c.state_name().to_string(),
            error,
            failed_for_ms,
            agents,
            unreachable_from: c
                .unreachable_from
                .iter()
                .map(|(a, e)| format!("{a}: {e}"))
                .collect(),
            size: c.rec.size_blocks * BLOCK_SIZE,
            used: (c.rec.size_blocks - free - zeroing) * BLOCK_SIZE,
            free: free * BLOCK_SIZE,
            zeroing: zeroing * BLOCK_SIZE,
            low_space: low(free, c.rec.size_blocks, self.cfg.low_space_percent),
            drain: self.drain_view(&c.rec.name),
        }
    }

    pub async fn list_containers(&self) -> Vec<ContainerView> {
        let meta = self.meta.lock().await;
        meta.containers
            .keys()
            .map(|&id| self.container_view(&meta, id))
            .collect()
    }

    pub(super) fn container_id(meta: &Meta, name: &str) -> Result<ContainerId, ControlError> {
        meta.containers
            .iter()
            .find(|(_, c)| c.rec.name == name)
            .map(|(&id, _)| id)
            .ok_or_else(|| {
                ControlError::NotFound(format!(
                    "container '{name}' (tabula container list shows them)"
                ))
            })
    }

    pub async fn container_by_name(&self, name: &str) -> Result<ContainerView, ControlError> {
        let meta = self.meta.lock().await;
        let id = Self::container_id(&meta, name)?;
        Ok(self.container_view(&meta, id))
    }

    /// Whether the allocatable space is below the low-space threshold; logs a warning when
    /// it first crosses it and a note when it recovers.
    pub(super) fn check_low_space(&self, meta: &Meta) -> bool {
        let (free, size) = meta
            .containers
            .iter()
            .filter(|(_, c)| c.allocatable())
            .fold((0, 0), |(f, s), (&id, c)| {
                (
                    f + meta.pool.get(id).map_or(0, FreeMap::free_blocks),
                    s + c.rec.size_blocks,
                )
            });
        let is_low = low(free, size, self.cfg.low_space_percent);
        let was_low = self.low_space.swap(is_low, Ordering::Relaxed);
        if is_low && !was_low {
            warn!(
                free = %format_size(free * BLOCK_SIZE),
                capacity = %format_size(size * BLOCK_SIZE),
                threshold_percent = self.cfg.low_space_percent,
                "the pool is low on space: add a container (tabula container add) or free space"
            );
        } else if was_low && !is_low {
            info!(free = %format_size(free * BLOCK_SIZE), "the pool has room again");
        }
        is_low
    }

    // ---- health ----

    /// A container fault from `agent` (`error` set), or its recovery (`None`).
    pub(super) async fn container_report(
        &self,
        agent: &str,
        id: ContainerId,
        error: Option<String>,
    ) -> Result<(), ControlError> {
        let Some(error) = error else {
            let mut meta = self.meta.lock().await;
            let c = meta
                .containers
                .get_mut(&id)
                .ok_or_else(|| ControlError::NotFound(format!("container {id}")))?;
            if c.unreachable_from.remove(agent).is_some() {
                info!(
                    container = c.rec.name,
                    agent, "agent reaches the container again"
                );
            }
            return Ok(());
        };
        let file = {
            let meta = self.meta.lock().await;
            let c = meta
                .containers
                .get(&id)
                .ok_or_else(|| ControlError::NotFound(format!("container {id}")))?;
            match c.health {
                Health::Failed { .. } => return Ok(()),
                Health::Ok => c.file.clone(),
            }
        };
        let probed = match &file {
            Some(f) => probe_within(f, self.cfg.container_timeout).await,
            None => Err("not open".to_string()),
        };
        match probed {
            Err(reason) => {
                self.mark_failed(id, format!("{reason} (agent {agent} saw: {error})"))
                    .await
            }
            Ok(()) => {
                let mut meta = self.meta.lock().await;
                if let Some(c) = meta.containers.get_mut(&id) {
                    warn!(
                        container = c.rec.name,
                        agent,
                        error,
                        "agent cannot reach the container, but the controller can: the path from that agent is down"
                    );
                    c.unreachable_from.insert(agent.to_string(), error);
                }
            }
        }
        Ok(())
    }

    /// Records `id` as failed (if it was not already), tells every agent, and starts probing
    /// it until it answers.
    pub(super) async fn mark_failed(&self, id: ContainerId, reason: String) {
        {
            let mut meta = self.meta.lock().await;
            let Some(c) = meta.containers.get_mut(&id) else {
                return;
            };
            if matches!(c.health, Health::Failed { .. }) {
                return;
            }
            warn!(
                container = c.rec.name,
                reason, "container failed: its I/O fails until it answers again"
            );
            c.health = Health::Failed {
                since: Instant::now(),
                reason: reason.clone(),
            };
            self.check_low_space(&meta);
        }
        self.broadcast(Command::ContainerHealth {
            container: id,
            failed: true,
            reason,
        });
        self.spawn_recovery(id);
    }

    /// Probes a failed container every second until it answers, then clears its state
    /// everywhere.
    pub(super) fn spawn_recovery(&self, id: ContainerId) {
        let me = self.me.clone();
        tokio::spawn(async move {
            // One probe at a time: a hung one is waited for again, not joined by another.
            let mut prober = Prober::default();
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                let Some(ctl) = me.upgrade() else { return };
                if ctl.try_recover(id, &mut prober).await {
                    return;
                }
            }
        });
    }

    /// One probe of a failed container; true once it is no longer failed.
    async fn try_recover(&self, id: ContainerId, prober: &mut Prober) -> bool {
        let (location, size, file) = {
            let meta = self.meta.lock().await;
            let Some(c) = meta.containers.get(&id) else {
                return true;
            };
            if matches!(c.health, Health::Ok) {
                return true;
            }
            (
                c.rec.path.clone(),
                c.rec.size_blocks * BLOCK_SIZE,
                c.file.clone(),
            )
        };
        let timeout = self.cfg.container_timeout;
        let file = match file {
            Some(f) => f,
            None => match open_location(&location, size, timeout).await {
                Ok(f) => Arc::new(f),
                Err(_) => return false,
            },
        };
        if prober.probe(&file, timeout).await.is_err() {
            return false;
        }
        {
            let mut meta = self.meta.lock().await;
            let Some(c) = meta.containers.get_mut(&id) else {
                return true;
            };
            let down_for = match &c.health {
                Health::Failed { since, .. } => since.elapsed(),
                Health::Ok => Duration::ZERO,
            };
            c.health = Health::Ok;
            c.file = Some(file);
            info!(
                container = c.rec.name,
                down_ms = down_for.as_millis() as u64,
                "container answers again; its I/O resumes"
            );
            self.check_low_space(&meta);
        }
        self.broadcast(Command::ContainerHealth {
            container: id,
            failed: false,
            reason: String::new(),
        });
        true
    }

    /// Sends a command about the whole agent to every connected agent, without waiting:
    /// health news must not wait for a slow agent.
    fn broadcast(&self, cmd: Command) {
        for h in self.agents.all() {
            let cmd = cmd.clone();
            tokio::spawn(async move {
                if let Err(e) = h.port.apply(cmd).await {
                    warn!(agent = h.name, error = e, "agent refused container news");
                }
            });
        }
    }
}

/// Whether `free` of `size` blocks is under `percent`.
fn low(free: u64, size: u64, percent: u64) -> bool {
    size > 0 && free.saturating_mul(100) < size.saturating_mul(percent)
}

/// The kind of a container that is not open, from its location.
fn kind_of(location: &str) -> &'static str {
    match Location::parse(location) {
        Ok(Location::Nbd(_)) => "nbd",
        _ => "file",
    }
}
