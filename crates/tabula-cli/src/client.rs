//! The admin API client: JSON over HTTP to the controller; with several controllers (HA),
//! to the leader among them.

use std::cell::RefCell;

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tabula_agent::remote::follow::{normalize, parse_list};
use tabula_api::admin::{
    AddContainer, ApiError, CheckView, CloneVdisk, ContainerView, CreateSnapshot, CreateVdisk,
    DiffView, MapView, MigrateVdisk, MoveView, ResizeVdisk, Rollback, SnapshotView, StatusView,
    VdiskView,
};

pub struct Client {
    /// The controllers' addresses, as given (`--controller URL[,URL...]`).
    urls: Vec<String>,
    /// The address that answered last (the leader, after a redirect): asked first.
    answered: RefCell<Option<String>>,
    agent: ureq::Agent,
}

/// A standby's answer (421 Misdirected Request): why, and where the leader is if it knows.
#[derive(serde::Deserialize)]
struct Misdirected {
    error: String,
    #[serde(default)]
    leader: Option<String>,
}

/// Which controller to ask next for one request: the leader a standby named (once), else
/// the addresses in order, each once. Pure, for tests.
struct Route {
    order: Vec<String>,
    hint: Option<String>,
    /// Each address asked, and why it did not do.
    tried: Vec<(String, String)>,
}

impl Route {
    fn new(first: Option<String>, urls: &[String]) -> Route {
        let mut order: Vec<String> = first.into_iter().collect();
        order.extend(
            urls.iter()
                .filter(|u| !order.contains(u))
                .cloned()
                .collect::<Vec<_>>(),
        );
        Route {
            order,
            hint: None,
            tried: Vec::new(),
        }
    }

    fn was_tried(&self, url: &str) -> bool {
        self.tried.iter().any(|(u, _)| u == url)
    }

    fn next(&mut self) -> Option<String> {
        if let Some(h) = self.hint.take() {
            if !self.was_tried(&h) {
                return Some(h);
            }
        }
        self.order.iter().find(|u| !self.was_tried(u)).cloned()
    }

    /// `url` did not do (`why`); `leader` is where a standby says the leader is.
    fn failed(&mut self, url: &str, why: String, leader: Option<&str>) {
        self.tried.push((url.to_string(), why));
        self.hint = leader.map(normalize);
    }

    /// The error when no address did: every one asked, and why.
    fn error(&self) -> anyhow::Error {
        if let [(url, why)] = self.tried.as_slice() {
            return anyhow!(
                "cannot reach the tabula controller at {url}: {why}\n  is `tabula serve` running? point --controller (or TABULA_CONTROLLER) at its --api-listen address"
            );
        }
        let mut msg = String::from("no tabula controller answered as the leader; tried:");
        for (url, why) in &self.tried {
            msg.push_str(&format!("\n  {url}: {why}"));
        }
        msg.push_str(
            "\n  are the controllers running, and does one lead? point --controller (or TABULA_CONTROLLER) at their --api-listen addresses, comma-separated",
        );
        anyhow!(msg)
    }
}

/// The start of an answer's body (64 KiB at most: enough for any error), as text.
fn body_text(resp: &mut ureq::http::Response<ureq::Body>) -> String {
    resp.body_mut()
        .with_config()
        .limit(64 << 10)
        .read_to_string()
        .unwrap_or_default()
}

/// The leader a 421 answer names (its JSON `leader`, else its `Location` less `path`), and
/// why the address did not do.
fn misdirected(mut resp: ureq::http::Response<ureq::Body>, path: &str) -> (Option<String>, String) {
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(|l| l.strip_suffix(path).unwrap_or(l).to_string());
    let text = body_text(&mut resp);
    match serde_json::from_str::<Misdirected>(&text) {
        Ok(m) => {
            let leader = m.leader.filter(|l| !l.is_empty()).or(location);
            let why = match &leader {
                Some(_) => m.error,
                None => format!(
                    "{} (no leader is known: an election may be under way)",
                    m.error
                ),
            };
            (leader, why)
        }
        Err(_) => (
            location,
            format!("answered 421 Misdirected Request: {}", text.trim()),
        ),
    }
}

impl Client {
    /// A client for `--controller URL[,URL...]`. Nothing is dialled yet.
    pub fn new(list: &str) -> Client {
        // An empty list is used as it is and fails with the address in the message.
        let urls = parse_list(list).unwrap_or_else(|_| vec![normalize(list)]);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(120)))
            // A controller host that is down must not hold the request until the global
            // timeout: the next address is tried.
            .timeout_connect(Some(std::time::Duration::from_secs(5)))
            // The controller closes connections idle for 10 s: never reuse one near that.
            .max_idle_age(std::time::Duration::from_secs(5))
            .build()
            .into();
        Client {
            urls,
            answered: RefCell::new(None),
            agent,
        }
    }

    /// Sends a request for `path` with `go` (given the full URL) to the first controller
    /// that answers as the leader: a standby's 421 leads to the leader it names, no answer
    /// (refused, timed out) to the next address.
    fn send(
        &self,
        path: &str,
        go: impl Fn(&str) -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let mut route = Route::new(self.answered.borrow().clone(), &self.urls);
        while let Some(base) = route.next() {
            match go(&format!("{base}{path}")) {
                Ok(resp) if resp.status() == ureq::http::StatusCode::MISDIRECTED_REQUEST => {
                    let (leader, why) = misdirected(resp, path);
                    route.failed(&base, why, leader.as_deref());
                }
                Ok(resp) => {
                    *self.answered.borrow_mut() = Some(base);
                    return Ok(resp);
                }
                Err(e) => route.failed(&base, e.to_string(), None),
            }
        }
        Err(route.error())
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
        let text = body_text(&mut resp);
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
        Self::decode(self.send(path, |url| self.agent.get(url).call())?)
    }

    fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        Self::decode(self.send(path, |url| self.agent.post(url).send_json(body))?)
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
        let r = self.send(path, |url| self.agent.delete(url).call())?;
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
        let path = format!("/v1/containers/{}/drain", enc(name));
        Self::decode(self.send(&path, |url| self.agent.delete(url).call())?)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_request_tries_each_address_once_in_order() {
        let mut r = Route::new(None, &urls(&["http://a:1", "http://b:2", "http://c:3"]));
        assert_eq!(r.next().as_deref(), Some("http://a:1"));
        r.failed("http://a:1", "connection refused".into(), None);
        assert_eq!(r.next().as_deref(), Some("http://b:2"));
        r.failed("http://b:2", "timed out".into(), None);
        assert_eq!(r.next().as_deref(), Some("http://c:3"));
        r.failed("http://c:3", "standby".into(), None);
        assert_eq!(r.next(), None);
        let e = r.error().to_string();
        for part in [
            "http://a:1: connection refused",
            "http://b:2: timed out",
            "http://c:3: standby",
        ] {
            assert!(e.contains(part), "{e}");
        }
    }

    #[test]
    fn a_standby_redirect_goes_to_the_leader_once() {
        let mut r = Route::new(
            Some("http://b:2".into()),
            &urls(&["http://a:1", "http://b:2"]),
        );
        // The address that answered last comes first.
        assert_eq!(r.next().as_deref(), Some("http://b:2"));
        // A leader outside the list, written without a scheme.
        r.failed("http://b:2", "standby".into(), Some("d:4/"));
        assert_eq!(r.next().as_deref(), Some("http://d:4"));
        // That one is a standby now too, and names b again: b was asked already.
        r.failed("http://d:4", "standby".into(), Some("http://b:2"));
        assert_eq!(r.next().as_deref(), Some("http://a:1"));
        r.failed("http://a:1", "refused".into(), None);
        assert_eq!(r.next(), None);
    }

    #[test]
    fn one_address_keeps_the_single_controller_message() {
        let mut r = Route::new(None, &urls(&["http://a:1"]));
        let a = r.next().unwrap();
        r.failed(&a, "connection refused".into(), None);
        assert_eq!(r.next(), None);
        let e = r.error().to_string();
        assert!(
            e.starts_with("cannot reach the tabula controller at http://a:1: connection refused"),
            "{e}"
        );
    }
}
