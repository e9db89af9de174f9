//! A simulated agent (a real `RemoteControl` session with a port that acknowledges every
//! command at once), the admin API calls the benchmarks need, and process CPU time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tabula_agent::remote::{RemoteControl, follow};
use tabula_api::admin::{ApiError, CreateVdisk, VdiskView};
use tabula_api::{AgentPort, Command, ControlError, ControlPlane, TableSnapshot};

/// An agent port that installs nothing and acknowledges every command immediately, so the
/// benchmarks measure the controller and the channel, not an agent's table.
#[derive(Default)]
pub struct AckPort {
    pub commands: AtomicU64,
}

#[async_trait::async_trait]
impl AgentPort for AckPort {
    async fn apply(&self, _command: Command) -> Result<(), String> {
        self.commands.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A simulated agent with its own connection and session; `P` answers the commands the
/// controller pushes.
pub struct Sim<P = AckPort> {
    pub name: String,
    pub control: Arc<RemoteControl>,
    pub port: Arc<P>,
}

impl<P: AgentPort + Default + 'static> Sim<P> {
    /// Dials the controller (each simulated agent has its own HTTP/2 connection) and starts
    /// its session; registration completes in the background. `urls` is one address or a
    /// comma-separated list of controllers (HA), as a real agent's `--controller`.
    pub async fn start(urls: &str, name: &str, call_timeout: Duration) -> Result<Sim<P>> {
        let list = follow::parse_list(urls).map_err(|e| anyhow!(e))?;
        let control = RemoteControl::new(&list, call_timeout).map_err(|e| anyhow!(e))?;
        let port = Arc::new(P::default());
        control
            .register_agent(name, port.clone(), Vec::new())
            .await
            .with_context(|| format!("registering simulated agent {name}"))?;
        Ok(Sim {
            name: name.to_string(),
            control,
            port,
        })
    }

    /// Opens a vdisk, retrying while the session is not established yet.
    pub async fn open_when_ready(&self, vdisk: &str, limit: Duration) -> Result<TableSnapshot> {
        let deadline = Instant::now() + limit;
        loop {
            match self.control.open_vdisk(&self.name, vdisk).await {
                Ok(s) => return Ok(s),
                Err(ControlError::Unavailable(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => bail!(
                    "agent {} could not open vdisk {vdisk} within {limit:?}: {e}",
                    self.name
                ),
            }
        }
    }
}

/// The controller's admin API (JSON over HTTP), blocking. Given several controllers (HA),
/// requests go to the leader: a standby's 421 names it, an address that does not answer is
/// skipped.
pub struct Admin {
    urls: Vec<String>,
    current: std::sync::Mutex<String>,
    http: ureq::Agent,
}

impl Admin {
    /// `urls`: one address or a comma-separated list.
    pub fn new(urls: &str) -> Admin {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let urls: Vec<String> = urls
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect();
        Admin {
            current: std::sync::Mutex::new(urls.first().cloned().unwrap_or_default()),
            urls,
            http,
        }
    }

    /// Sends `req(base)` to the leader: follows a standby's 421 to the leader it names,
    /// moves to the next address when one does not answer, for up to 30 s (an election).
    fn send(
        &self,
        what: &str,
        req: impl Fn(&str) -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut next = 0;
        loop {
            let base = self.current.lock().expect("not poisoned").clone();
            let moved_to = match tokio::task::block_in_place(|| req(&base)) {
                Ok(mut resp) if resp.status() == ureq::http::StatusCode::MISDIRECTED_REQUEST => {
                    let leader = resp
                        .body_mut()
                        .read_json::<serde_json::Value>()
                        .ok()
                        .and_then(|v| v["leader"].as_str().map(str::to_string));
                    leader.map(|l| l.trim_end_matches('/').to_string())
                }
                Ok(resp) => return Ok(resp),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| format!("{what} (controller {base})"));
                }
                Err(_) => None,
            };
            if Instant::now() >= deadline {
                bail!(
                    "{what}: no controller in {:?} answered as the leader within 30 s",
                    self.urls
                );
            }
            let to = moved_to.unwrap_or_else(|| {
                next = (next + 1) % self.urls.len().max(1);
                self.urls.get(next).cloned().unwrap_or_default()
            });
            if to == base {
                std::thread::sleep(Duration::from_millis(100));
            }
            *self.current.lock().expect("not poisoned") = to;
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        what: &str,
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> Result<T> {
        if resp.status().is_success() {
            return resp
                .body_mut()
                .read_json::<T>()
                .with_context(|| format!("{what}: decoding the answer"));
        }
        let status = resp.status();
        let msg = resp
            .body_mut()
            .read_json::<ApiError>()
            .map(|e| e.error)
            .unwrap_or_else(|_| status.to_string());
        bail!("{what}: {msg}")
    }

    pub fn create_vdisk(&self, name: &str, size: u64, segment_size: u64) -> Result<VdiskView> {
        let what = format!("creating vdisk {name}");
        let body = CreateVdisk {
            name: name.to_string(),
            size,
            segment_size: Some(segment_size),
            cow: None,
            container: None,
        };
        let resp = self.send(&what, |base| {
            self.http.post(format!("{base}/v1/vdisks")).send_json(&body)
        })?;
        Self::decode(&what, resp)
    }

    pub fn vdisk(&self, name: &str) -> Result<VdiskView> {
        let what = format!("looking up vdisk {name}");
        let resp = self.send(&what, |base| {
            self.http.get(format!("{base}/v1/vdisks/{name}")).call()
        })?;
        Self::decode(&what, resp)
    }
}

/// User + system CPU time of a process so far (from /proc/PID/stat; 100 ticks per second,
/// the Linux default `USER_HZ`).
pub fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}
