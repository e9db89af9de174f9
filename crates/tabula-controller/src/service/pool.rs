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

use super::{Controller, Meta, identity, storage, storage_chain, validate_name};
use crate::label::{self, Found, LABEL_BLOCKS, LABEL_BYTES, Label};
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

/// Runs blocking container I/O on the blocking pool, bounded by `timeout` (a remote
/// container may hang).
pub(super) async fn container_io<T: Send + 'static>(
    file: &Arc<Container>,
    timeout: Duration,
    f: impl FnOnce(&Container) -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    let c = file.clone();
    let task = tokio::task::spawn_blocking(move || f(&c));
    match tokio::time::timeout(timeout + Duration::from_secs(1), task).await {
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(r)) => r.map_err(|e| e.to_string()),
    }
}

impl Controller {
    /// Adds the default container on first start (a sparse file in the data directory).
    pub async fn ensure_default_container(&self, size: u64) -> Result<(), ControlError> {
        if !self.meta.lock().await.containers.is_empty() {
            return Ok(());
        }
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
    ///
    /// A container is identified by what it is, not by its path: the same file or device by
    /// another path, the same export by another spelling, anything in the data directory but
    /// `containers/`, and a container whose label says it is in this or another pool are
    /// refused. A file created here gets `size` bytes of usable space plus its label area.
    /// A failed add leaves nothing behind.
    pub async fn add_container(
        &self,
        name: &str,
        location: &str,
        size: Option<u64>,
    ) -> Result<ContainerView, ControlError> {
        validate_name("container", name)?;
        identity::check_text(location)?;
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
                let abs = std::path::absolute(path).map_err(|e| {
                    ControlError::Invalid(format!("container path {}: {e}", path.display()))
                })?;
                let shown = abs.display().to_string();
                let local = identity::resolve(&abs)?;
                identity::check_data_dir(&local, &shown, &self.cfg.data_dir)?;
                // Bad input, said as such (not a server error from opening it).
                match (&local.ident, size) {
                    (None, None) if !abs.exists() => {
                        return Err(ControlError::Invalid(format!(
                            "{shown} does not exist: give --size to create it as a container file"
                        )));
                    }
                    (None, _) if abs.exists() => {
                        return Err(ControlError::Invalid(format!(
                            "{shown} is neither a regular file nor a block device"
                        )));
                    }
                    _ => {}
                }
                for c in meta.containers.values() {
                    if let Ok(Location::Path(p)) = Location::parse(&c.rec.path) {
                        identity::check_local_against(&local, &shown, &c.rec.name, &p)?;
                    }
                }
                (shown, Some(abs))
            }
            Location::Nbd(uri) => {
                if size.is_some() {
                    return Err(ControlError::Invalid(
                        "--size applies only to a new container file; a remote export has the size its server gives it".into(),
                    ));
                }
                for c in meta.containers.values() {
                    identity::check_nbd_against(uri, &c.rec.name, &c.rec.path)?;
                }
                (loc.to_string(), None)
            }
        };
        // Set once a file was created here: a failure from then on removes it.
        let mut made: Option<std::path::PathBuf> = None;
        let result = self
            .add_opened(
                &mut meta,
                name,
                &stored_loc,
                size,
                created.as_deref(),
                &mut made,
            )
            .await;
        if result.is_err() {
            if let Some(p) = made {
                if let Err(e) = std::fs::remove_file(&p) {
                    warn!(path = %p.display(), error = %e, "removing the file of a failed container add");
                }
            }
        }
        result
    }

    /// The rest of [`Self::add_container`], once the location is known to be new.
    async fn add_opened(
        &self,
        meta: &mut Meta,
        name: &str,
        stored_loc: &str,
        size: Option<u64>,
        created: Option<&std::path::Path>,
        made: &mut Option<std::path::PathBuf>,
    ) -> Result<ContainerView, ControlError> {
        let file = match (size, created) {
            (Some(s), Some(abs)) => {
                // The label area comes on top: MAX_CONTAINER_SIZE leaves room for it in a
                // file's length (an i64).
                tabula_core::check_container_size(s).map_err(super::invalid_size)?;
                if std::fs::symlink_metadata(abs).is_ok() {
                    return Err(ControlError::Exists(format!(
                        "file {stored_loc} already exists: give --size only for a new file, or omit --size to use the existing file as it is"
                    )));
                }
                let r = Container::create(abs, s + LABEL_BYTES);
                if abs.exists() {
                    *made = Some(abs.to_path_buf());
                }
                r.map_err(|e| match &e {
                    // Too big for this file system: the request, not the server, is wrong.
                    tabula_container::ContainerError::Resize { source, .. }
                        if matches!(source.raw_os_error(), Some(libc::EFBIG | libc::EINVAL)) =>
                    {
                        ControlError::Invalid(format!(
                            "the file system cannot hold a container file of {}: {}",
                            format_size(s),
                            tabula_api::error_chain(&e)
                        ))
                    }
                    _ => storage_chain(&e),
                })?
            }
            _ => {
                let c = open_location(stored_loc, 0, self.cfg.container_timeout)
                    .await
                    // The caller named something that cannot be opened (no such file, no
                    // permission, no server there): a bad request, not a fault of ours.
                    .map_err(|e| ControlError::Invalid(format!("opening {stored_loc}: {e}")))?;
                let len = c.len_bytes().map_err(storage)?;
                if len < LABEL_BYTES + BLOCK_SIZE {
                    return Err(ControlError::Invalid(format!(
                        "{stored_loc} has {len} bytes: a container needs more than its {} label area (give --size to create a container file)",
                        format_size(LABEL_BYTES)
                    )));
                }
                c
            }
        };
        let file = Arc::new(file);
        let timeout = self.cfg.container_timeout;
        let found = container_io(&file, timeout, label::read)
            .await
            .map_err(|e| {
                ControlError::Storage(format!("reading the label of {stored_loc}: {e}"))
            })?;
        match found {
            Found::Label(l) if l.pool == self.pool_id => {
                if let Some(c) = meta.containers.get(&ContainerId(l.container)) {
                    return Err(ControlError::Exists(format!(
                        "{stored_loc} is already in this pool as '{}' ({}): its label says so (the same container by another path, or as another host sees it)",
                        c.rec.name, c.rec.path
                    )));
                }
                // A label this pool wrote for a container it no longer has (removed, or an
                // add that did not commit): the container is free.
            }
            Found::Label(l) => {
                return Err(ControlError::Exists(format!(
                    "{stored_loc} belongs to another tabula pool ({:016x}) as container '{}': a container serves one pool only. Remove it there (tabula container remove {}), which wipes its label; if that pool is gone for good, wipe the label by hand: {}",
                    l.pool,
                    l.name,
                    l.name,
                    label::wipe_hint(stored_loc)
                )));
            }
            Found::Damaged(why) => {
                return Err(ControlError::Exists(format!(
                    "{stored_loc} holds a damaged tabula label ({why}): it may belong to a pool. If no pool uses it, wipe the label by hand: {}",
                    label::wipe_hint(stored_loc)
                )));
            }
            Found::None => {}
        }
        let size_blocks = file.len_bytes().map_err(storage)? / BLOCK_SIZE;
        let kind = file.kind().name();
        let id = ContainerId(meta.next_container);
        let lbl = Label {
            pool: self.pool_id,
            container: id.0,
            name: name.to_string(),
            reserved_blocks: LABEL_BLOCKS,
        };
        container_io(&file, timeout, move |c| label::write(c, &lbl))
            .await
            .map_err(|e| {
                ControlError::Storage(format!("writing the label of {stored_loc}: {e}"))
            })?;
        let rec = ContainerRecord {
            name: name.to_string(),
            path: stored_loc.to_string(),
            size_blocks,
            draining: false,
            label_blocks: LABEL_BLOCKS,
        };
        let stored = rec.clone();
        let result = self
            .commit(move |t| {
                t.set_meta("next_container", (id.0 + 1) as u64)?;
                t.put_container(id, &stored)?;
                t.put_free(id, LABEL_BLOCKS, size_blocks - LABEL_BLOCKS)
            })
            .await;
        if let Err(e) = result {
            // Not in the pool after all: its label must not say it is.
            if let Err(w) = container_io(&file, timeout, label::wipe).await {
                warn!(
                    location = stored_loc,
                    error = w,
                    "wiping the label of a failed container add"
                );
            }
            return Err(e);
        }
        meta.next_container += 1;
        let mut free = FreeMap::all_free(size_blocks);
        free.reserve(0, LABEL_BLOCKS);
        meta.pool.insert(id, free);
        meta.containers
            .insert(id, ContainerMeta::new(rec, Some(file)));
        self.check_low_space(meta);
        info!(container = name, kind, size = %format_size((size_blocks - LABEL_BLOCKS) * BLOCK_SIZE), "container added");
        Ok(self.container_view(meta, id))
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
            // Usable space: a label area is neither used nor free.
            size: c.rec.usable_blocks() * BLOCK_SIZE,
            used: c.rec.usable_blocks().saturating_sub(free + zeroing) * BLOCK_SIZE,
            free: free * BLOCK_SIZE,
            zeroing: zeroing * BLOCK_SIZE,
            low_space: low(free, c.rec.usable_blocks(), self.cfg.low_space_percent),
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
                    s + c.rec.usable_blocks(),
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
        let (file, labelled) = {
            let meta = self.meta.lock().await;
            let c = meta
                .containers
                .get(&id)
                .ok_or_else(|| ControlError::NotFound(format!("container {id}")))?;
            match c.health {
                Health::Failed { .. } => return Ok(()),
                Health::Ok => (c.file.clone(), c.rec.label_blocks > 0),
            }
        };
        let probed = match &file {
            Some(f) => match probe_within(f, self.cfg.container_timeout).await {
                // Answering is not enough: it must still be this container (a remote
                // server that came back with another disk).
                Ok(()) if labelled => self.verify_label(id, f).await,
                r => r,
            },
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
        let (location, size, file, labelled) = {
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
                c.rec.label_blocks > 0,
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
        // What answers at its location must be this container: a server restarted with
        // another disk, or another device at the path, stays failed.
        if labelled {
            if let Err(why) = self.verify_label(id, &file).await {
                let mut meta = self.meta.lock().await;
                if let Some(c) = meta.containers.get_mut(&id) {
                    if let Health::Failed { reason, .. } = &mut c.health {
                        if *reason != why {
                            warn!(
                                container = c.rec.name,
                                reason = why,
                                "container answers, but is not the one added; it stays failed"
                            );
                            *reason = why;
                        }
                    }
                }
                return false;
            }
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

    /// Reads container `id`'s label through `file` and checks it names this pool and `id`.
    pub(super) async fn verify_label(
        &self,
        id: ContainerId,
        file: &Arc<Container>,
    ) -> Result<(), String> {
        check_label(file, self.cfg.container_timeout, self.pool_id, id).await
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

/// Reads container `id`'s label through `file` and checks it names pool `pool_id` and `id`.
pub(super) async fn check_label(
    file: &Arc<Container>,
    timeout: Duration,
    pool_id: u64,
    id: ContainerId,
) -> Result<(), String> {
    let found = container_io(file, timeout, label::read)
        .await
        .map_err(|e| format!("its label cannot be read: {e}"))?;
    label::expect(&found, pool_id, id.0).map_err(|why| {
        format!(
            "{} answers, but {why}: it is not the container that was added (another device at its path, or another disk behind its server?)",
            file.describe()
        )
    })
}
