//! The admin API client: JSON over HTTP to the controller.

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tabula_api::admin::{
    AddContainer, ApiError, CheckView, CloneVdisk, ContainerView, CreateSnapshot, CreateVdisk,
    DiffView, MapView, MigrateVdisk, MoveView, ResizeVdisk, Rollback, SnapshotView, StatusView,
    VdiskView,
};

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(url: &str) -> Client {
        let mut base = url.trim_end_matches('/').to_string();
        if !base.contains("://") {
            base = format!("http://{base}");
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(120)))
            // The controller closes connections idle for 10 s: never reuse one near that.
            .max_idle_age(std::time::Duration::from_secs(5))
            .build()
            .into();
        Client { base, agent }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        anyhow!(
            "cannot reach the tabula controller at {}: {e}\n  is `tabula serve` running? point --controller (or TABULA_CONTROLLER) at its --api-listen address",
            self.base
        )
    }

    fn decode<T: DeserializeOwned>(mut resp: ureq::http::Response<ureq::Body>) -> Result<T> {
        if resp.status().is_success() {
            return resp
                .body_mut()
                .read_json::<T>()
                .context("the controller's answer could not be decoded");
        }
        Err(Self::error(resp))
    }

    /// The error an answer carries: the controller's `{"error": ...}` message, or, from
    /// something else answering at that address (a proxy, another service), its status and
    /// the start of its text.
    fn error(mut resp: ureq::http::Response<ureq::Body>) -> anyhow::Error {
        let status = resp.status();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 10)
            .read_to_string()
            .unwrap_or_default();
        if let Ok(e) = serde_json::from_str::<ApiError>(&text) {
            return anyhow!("{}", e.error);
        }
        let text: String = text.trim().chars().take(200).collect();
        if text.is_empty() {
            anyhow!("the controller answered {status}")
        } else {
            anyhow!("the controller answered {status}: {text}")
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = self
            .agent
            .get(&self.url(path))
            .call()
            .map_err(|e| self.unreachable(e))?;
        Self::decode(r)
    }

    fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let r = self
            .agent
            .post(&self.url(path))
            .send_json(body)
            .map_err(|e| self.unreachable(e))?;
        Self::decode(r)
    }

    pub fn status(&self) -> Result<StatusView> {
        self.get("/v1/status")
    }

    pub fn check(&self) -> Result<CheckView> {
        self.get("/v1/check")
    }

    pub fn list_vdisks(&self) -> Result<Vec<VdiskView>> {
        self.get("/v1/vdisks")
    }

    pub fn vdisk(&self, name: &str) -> Result<VdiskView> {
        self.get(&format!("/v1/vdisks/{}", enc(name)))
    }

    pub fn map(&self, name: &str) -> Result<MapView> {
        self.get(&format!("/v1/vdisks/{}/map", enc(name)))
    }

    pub fn create_vdisk(&self, req: &CreateVdisk) -> Result<VdiskView> {
        self.post("/v1/vdisks", req)
    }

    pub fn resize_vdisk(&self, name: &str, req: &ResizeVdisk) -> Result<VdiskView> {
        self.post(&format!("/v1/vdisks/{}/resize", enc(name)), req)
    }

    pub fn delete_vdisk(&self, name: &str, with_snapshots: bool, force: bool) -> Result<()> {
        let q = match (with_snapshots, force) {
            (false, false) => "",
            (true, false) => "?with_snapshots=true",
            (false, true) => "?force=true",
            (true, true) => "?with_snapshots=true&force=true",
        };
        self.delete(&format!("/v1/vdisks/{}{q}", enc(name)))
    }

    fn delete(&self, path: &str) -> Result<()> {
        let r = self
            .agent
            .delete(&self.url(path))
            .call()
            .map_err(|e| self.unreachable(e))?;
        if r.status().is_success() {
            return Ok(());
        }
        Err(Self::error(r))
    }

    pub fn create_snapshot(&self, vdisk: &str, name: &str) -> Result<SnapshotView> {
        self.post(
            &format!("/v1/vdisks/{}/snapshots", enc(vdisk)),
            &CreateSnapshot {
                name: name.to_string(),
            },
        )
    }

    pub fn list_snapshots(&self, vdisk: Option<&str>) -> Result<Vec<SnapshotView>> {
        match vdisk {
            Some(v) => self.get(&format!("/v1/snapshots?vdisk={}", enc(v))),
            None => self.get("/v1/snapshots"),
        }
    }

    pub fn delete_snapshot(&self, full: &str, force: bool) -> Result<()> {
        let q = if force { "?force=true" } else { "" };
        self.delete(&format!("/v1/snapshots/{}{q}", enc(full)))
    }

    pub fn clone_vdisk(&self, req: &CloneVdisk) -> Result<VdiskView> {
        self.post("/v1/clones", req)
    }

    pub fn rollback(&self, vdisk: &str, snapshot: &str) -> Result<VdiskView> {
        self.post(
            &format!("/v1/vdisks/{}/rollback", enc(vdisk)),
            &Rollback {
                snapshot: snapshot.to_string(),
            },
        )
    }

    pub fn diff(&self, from: &str, to: &str) -> Result<DiffView> {
        self.get(&format!("/v1/diff?from={}&to={}", enc(from), enc(to)))
    }

    pub fn list_containers(&self) -> Result<Vec<ContainerView>> {
        self.get("/v1/containers")
    }

    pub fn container(&self, name: &str) -> Result<ContainerView> {
        self.get(&format!("/v1/containers/{}", enc(name)))
    }

    pub fn add_container(&self, req: &AddContainer) -> Result<ContainerView> {
        self.post("/v1/containers", req)
    }

    pub fn remove_container(&self, name: &str) -> Result<()> {
        self.delete(&format!("/v1/containers/{}", enc(name)))
    }

    pub fn drain_container(&self, name: &str) -> Result<MoveView> {
        self.post(&format!("/v1/containers/{}/drain", enc(name)), &())
    }

    pub fn cancel_drain(&self, name: &str) -> Result<ContainerView> {
        let r = self
            .agent
            .delete(&self.url(&format!("/v1/containers/{}/drain", enc(name))))
            .call()
            .map_err(|e| self.unreachable(e))?;
        Self::decode(r)
    }

    pub fn migrate_vdisk(&self, name: &str, to: &str) -> Result<MoveView> {
        self.post(
            &format!("/v1/vdisks/{}/migrate", enc(name)),
            &MigrateVdisk { to: to.to_string() },
        )
    }

    pub fn moves(&self) -> Result<Vec<MoveView>> {
        self.get("/v1/moves")
    }
}

/// Names are restricted to URL-safe characters by the controller; anything else is escaped
/// so a bad name gets the controller's explanation rather than a routing error.
fn enc(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
