//! `tabula-bench failover`: control-plane scale through a leader failover (issue 18). N
//! simulated agents, each a real `RemoteControl` session given every controller's address,
//! register, open a vdisk of their own, allocate a few segments in it and hold its table.
//! Then the bench writes `--ready-file` and waits for the driver (`bench/ha-failover.sh`
//! or a person) to kill the leader and write the kill's wall-clock time into
//! `--killed-file`. It measures, per agent, the time from the kill until the agent had a
//! session with the new leader and had fetched its table again (what a real agent does in
//! `session_started`), and checks that the table it got is the one it held before.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use tabula_agent::remote::{RemoteControl, follow};
use tabula_api::{AgentPort, Command, ControlError, ControlPlane, Fault, FaultOp, TableSnapshot};
use tabula_core::{Entry, Generation, State, VdiskId, parse_size};

use crate::sim::Admin;
use crate::stats::quantile;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Every controller's address, comma-separated (as agents are given it).
    #[arg(long)]
    controller: String,
    /// Simulated agents, each with its own gRPC connection, session and vdisk.
    #[arg(long, default_value_t = 500)]
    agents: usize,
    /// Segments each agent allocates in its vdisk before the failover (its table's entries).
    #[arg(long, default_value_t = 4)]
    segments: u64,
    /// Segment size of the vdisks.
    #[arg(long, default_value = "1M", value_parser = size_arg)]
    segment_size: u64,
    /// Prefix of the vdisk and agent names (must be new on this control plane).
    #[arg(long, default_value = "fo")]
    prefix: String,
    /// Written (with the newest leader epoch the agents have seen) once every agent holds
    /// its table: the signal to kill the leader.
    #[arg(long)]
    ready_file: PathBuf,
    /// The driver writes the time of the kill here (seconds since the Unix epoch, fraction
    /// allowed, e.g. `date +%s.%N`) right after sending it.
    #[arg(long)]
    killed_file: PathBuf,
    /// How long to wait for the kill after writing the ready file (seconds).
    #[arg(long, default_value_t = 120.0)]
    wait_kill: f64,
    /// How long every agent gets to resync after the kill (seconds).
    #[arg(long, default_value_t = 60.0)]
    limit: f64,
    /// Agents set up at once (registration, vdisk open, faults).
    #[arg(long, default_value_t = 50)]
    parallel: usize,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// One completed resync: when, at which newest epoch, and the table fetched.
struct Synced {
    at: SystemTime,
    epoch: u64,
    entries: Vec<Entry>,
}

/// An agent port that holds one vdisk and, like a real agent, fetches its table again
/// whenever a new session starts; commands are acknowledged.
#[derive(Default)]
struct ResyncPort {
    agent: String,
    vdisk_name: String,
    vdisk: OnceLock<VdiskId>,
    control: OnceLock<Weak<RemoteControl>>,
    /// Sessions started (registrations answered).
    sessions: AtomicU64,
    /// When the latest session started (its `session_started`).
    session_at: Mutex<Option<SystemTime>>,
    synced: Mutex<Option<Synced>>,
    last_error: Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl AgentPort for ResyncPort {
    async fn apply(&self, _command: Command) -> Result<(), String> {
        Ok(())
    }

    fn held_vdisks(&self) -> Vec<VdiskId> {
        self.vdisk.get().copied().into_iter().collect()
    }

    async fn session_started(&self) {
        self.sessions.fetch_add(1, Ordering::AcqRel);
        *self.session_at.lock().expect("not poisoned") = Some(SystemTime::now());
        // Nothing held yet (the first session): nothing to resync.
        if self.vdisk.get().is_none() {
            return;
        }
        let Some(control) = self.control.get().and_then(Weak::upgrade) else {
            return;
        };
        // Retried like a real agent's resync (its I/O retries it): until it succeeds or the
        // session ends (the task is aborted then).
        loop {
            match control.open_vdisk(&self.agent, &self.vdisk_name).await {
                Ok(snap) => {
                    *self.synced.lock().expect("not poisoned") = Some(Synced {
                        at: SystemTime::now(),
                        epoch: control.epoch(),
                        entries: snap.entries,
                    });
                    return;
                }
                Err(e) => {
                    *self.last_error.lock().expect("not poisoned") = Some(e.to_string());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

struct SimAgent {
    control: Arc<RemoteControl>,
    port: Arc<ResyncPort>,
    /// The table it held before the kill.
    held: Vec<Entry>,
}

async fn open_when_ready(
    control: &RemoteControl,
    agent: &str,
    vdisk: &str,
    limit: Duration,
) -> Result<TableSnapshot> {
    let deadline = Instant::now() + limit;
    loop {
        match control.open_vdisk(agent, vdisk).await {
            Ok(s) => return Ok(s),
            Err(ControlError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => bail!("agent {agent} could not open vdisk {vdisk} within {limit:?}: {e}"),
        }
    }
}

/// Registers one simulated agent, opens its vdisk, allocates `segments` segments in it and
/// reads its table back.
async fn set_up(
    urls: Vec<String>,
    agent: String,
    vdisk: String,
    segments: u64,
) -> Result<SimAgent> {
    let control = RemoteControl::new(&urls, Duration::from_secs(10)).map_err(|e| anyhow!(e))?;
    let port = Arc::new(ResyncPort {
        agent: agent.clone(),
        vdisk_name: vdisk.clone(),
        ..ResyncPort::default()
    });
    port.control
        .set(Arc::downgrade(&control))
        .map_err(|_| anyhow!("port already bound"))?;
    control
        .register_agent(&agent, port.clone(), Vec::new())
        .await
        .with_context(|| format!("registering simulated agent {agent}"))?;
    let snap = open_when_ready(&control, &agent, &vdisk, Duration::from_secs(60)).await?;
    let _ = port.vdisk.set(snap.vdisk);
    let mut generation = snap.generation;
    // Every other segment, so each allocation is an entry of its own.
    for i in 0..segments {
        let s = 2 * i;
        let f = Fault {
            agent: agent.clone(),
            vdisk: snap.vdisk,
            op: FaultOp::Write,
            segments: (s, s + 1),
            state: State::Zero,
            generation,
            copied: Vec::new(),
        };
        let u = control
            .fault(f)
            .await
            .with_context(|| format!("agent {agent}: write fault on segment {s}"))?;
        generation = Generation(generation.0.max(u.generation.0));
    }
    let held = control
        .open_vdisk(&agent, &vdisk)
        .await
        .with_context(|| format!("agent {agent}: reading its table back"))?
        .entries;
    let mapped = held.iter().filter(|e| e.target.is_some()).count() as u64;
    if mapped < segments {
        bail!("agent {agent}: {mapped} mapped entries after {segments} faults");
    }
    Ok(SimAgent {
        control,
        port,
        held,
    })
}

fn secs_since_epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

pub async fn run(a: Args) -> Result<()> {
    if a.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let urls = follow::parse_list(&a.controller).map_err(|e| anyhow!(e))?;
    let admin = Admin::new(&a.controller);
    let size = (2 * a.segments + 2) * a.segment_size;
    let t_setup = Instant::now();
    for i in 0..a.agents {
        admin.create_vdisk(&format!("{}-v{i}", a.prefix), size, a.segment_size)?;
    }
    let mut agents: Vec<SimAgent> = Vec::with_capacity(a.agents);
    for chunk in (0..a.agents).collect::<Vec<_>>().chunks(a.parallel.max(1)) {
        let mut tasks = Vec::new();
        for &i in chunk {
            tasks.push(tokio::spawn(set_up(
                urls.clone(),
                format!("{}-a{i}", a.prefix),
                format!("{}-v{i}", a.prefix),
                a.segments,
            )));
        }
        for t in tasks {
            agents.push(t.await.context("setting up an agent panicked")??);
        }
    }
    let epoch_before = agents.iter().map(|s| s.control.epoch()).max().unwrap_or(0);
    let entries: usize = agents.iter().map(|s| s.held.len()).sum();
    eprintln!(
        "failover: {} agents hold their tables ({entries} entries in all, leader epoch {epoch_before}), set up in {:.1} s; waiting for the kill",
        a.agents,
        t_setup.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_file(&a.killed_file);
    std::fs::write(&a.ready_file, format!("{epoch_before}\n"))
        .with_context(|| format!("writing {}", a.ready_file.display()))?;

    // The kill's time, from the driver.
    let wait_until = Instant::now() + Duration::from_secs_f64(a.wait_kill);
    let killed_at = loop {
        if let Ok(text) = std::fs::read_to_string(&a.killed_file)
            && let Ok(t) = text.trim().parse::<f64>()
        {
            break UNIX_EPOCH + Duration::from_secs_f64(t);
        }
        if Instant::now() > wait_until {
            bail!(
                "nobody killed the leader within {} s (no time in {})",
                a.wait_kill,
                a.killed_file.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let sessions_before: Vec<u64> = agents
        .iter()
        .map(|s| s.port.sessions.load(Ordering::Acquire))
        .collect();

    // Every agent done: a session started after the kill, a table fetched under a newer
    // epoch after it.
    let limit = Instant::now() + Duration::from_secs_f64(a.limit);
    let done = |s: &SimAgent| {
        s.port
            .synced
            .lock()
            .expect("not poisoned")
            .as_ref()
            .is_some_and(|y| y.at > killed_at && y.epoch > epoch_before)
    };
    loop {
        let pending = agents.iter().filter(|s| !done(s)).count();
        if pending == 0 {
            break;
        }
        if Instant::now() > limit {
            let example = agents.iter().find(|s| !done(s)).and_then(|s| {
                s.port
                    .last_error
                    .lock()
                    .expect("not poisoned")
                    .clone()
                    .map(|e| format!("{}: {e}", s.port.agent))
            });
            bail!(
                "{pending} of {} agents had not resynced with a new leader {} s after the kill (last error: {})",
                a.agents,
                a.limit,
                example.unwrap_or_else(|| "none".into())
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut session_ms = Vec::new();
    let mut synced_ms = Vec::new();
    let mut mismatches = 0;
    let mut epoch_after = 0;
    let mut extra_sessions = 0;
    for (s, before) in agents.iter().zip(&sessions_before) {
        let after =
            |t: SystemTime| t.duration_since(killed_at).unwrap_or_default().as_nanos() as u64;
        if let Some(t) = *s.port.session_at.lock().expect("not poisoned") {
            session_ms.push(after(t));
        }
        let y = s.port.synced.lock().expect("not poisoned");
        let y = y.as_ref().expect("done above");
        synced_ms.push(after(y.at));
        epoch_after = epoch_after.max(y.epoch);
        if y.entries != s.held {
            mismatches += 1;
        }
        extra_sessions += s.port.sessions.load(Ordering::Acquire) - before;
    }
    session_ms.sort_unstable();
    synced_ms.sort_unstable();
    let ms = |v: &[u64], q: f64| quantile(v, q) as f64 / 1e6;
    println!(
        "| agents | entries held | new sessions | session with new leader p50 / p99 / max ms | table resynced p50 / p99 / max ms | **all resynced** | tables differing |"
    );
    println!("|---:|---:|---:|---|---|---:|---:|");
    println!(
        "| {} | {entries} | {extra_sessions} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | **{:.2} s** | {mismatches} |",
        a.agents,
        ms(&session_ms, 0.5),
        ms(&session_ms, 0.99),
        ms(&session_ms, 1.0),
        ms(&synced_ms, 0.5),
        ms(&synced_ms, 0.99),
        ms(&synced_ms, 1.0),
        ms(&synced_ms, 1.0) / 1e3,
    );
    eprintln!(
        "failover: kill at {:.3}, leader epoch {epoch_before} -> {epoch_after}",
        secs_since_epoch(killed_at)
    );
    if mismatches > 0 {
        bail!(
            "{mismatches} agents got a table different from the one they held before the failover"
        );
    }
    Ok(())
}
