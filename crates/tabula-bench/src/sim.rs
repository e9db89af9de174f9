//! A simulated agent (a real `RemoteControl` session with a port that acknowledges every
//! command at once), the admin API calls the benchmarks need, and process CPU time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tabula_agent::remote::RemoteControl;
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
    /// its session; registration completes in the background.
    pub async fn start(url: &str, name: &str, call_timeout: Duration) -> Result<Sim<P>> {
        let control =
            RemoteControl::new(&[url.to_string()], call_timeout).map_err(|e| anyhow!(e))?;
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

/// The controller's admin API (JSON over HTTP), blocking.
pub struct Admin {
    base: String,
    http: ureq::Agent,
}

impl Admin {
    pub fn new(url: &str) -> Admin {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Admin {
            base: url.trim_end_matches('/').to_string(),
            http,
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
        let resp = tokio::task::block_in_place(|| {
            self.http
                .post(format!("{}/v1/vdisks", self.base))
                .send_json(&body)
        })
        .with_context(|| what.clone())?;
        Self::decode(&what, resp)
    }

    pub fn vdisk(&self, name: &str) -> Result<VdiskView> {
        let what = format!("looking up vdisk {name}");
        let resp = tokio::task::block_in_place(|| {
            self.http
                .get(format!("{}/v1/vdisks/{name}", self.base))
                .call()
        })
        .with_context(|| what.clone())?;
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
