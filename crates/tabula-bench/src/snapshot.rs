//! `tabula-bench snapshot`: the cost of snapshots on a large table, against a real
//! `tabula controller` over the real gRPC channel.
//!
//! 1. Build: a vdisk (default 1 TiB, 1 MiB segments) gets `--segments` segments allocated
//!    through write faults in random order, by one simulated agent that holds the vdisk
//!    (so a snapshot's `Block` / `SetState` / `Unblock` really go down its session). The
//!    segments are a random subset; each run of adjacent chosen segments is faulted from
//!    its end backwards (runs in random order, `--inflight` faults at a time), so a fault
//!    never follows a mapped segment, the controller's sequential read-ahead never
//!    allocates extra, and first-fit placement never makes two entries mergeable: one
//!    entry per segment.
//! 2. Snapshots `s1..sN`: each timed end to end (`POST /v1/vdisks/{name}/snapshots`), with
//!    the controller's `hold_ms`, the hold as the agent saw it (`Block` to `Unblock`
//!    arrival) and two probes that fault serially around the call: one writing to
//!    unmapped segments of the same vdisk, one of another simulated agent on another
//!    vdisk. Their longest round trip is how long a write fault waited meanwhile.
//! 3. Copy-on-write on the big table: `--cow-samples` random mapped segments get the two
//!    round trips of a first write after a snapshot (the write fault that starts the copy,
//!    then the `Copied` report that switches the table). The simulated agent copies
//!    nothing: the space was never written, so both places read as zeros. Controller and
//!    channel cost only; the data path is measured by `bench/snapshot.sh` with fio.
//! 4. Deletes of the snapshots, timed and probed the same way.
//!
//! The controller's RSS is read from /proc after each step (`--controller-pid`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tabula_api::admin::{ApiError, CreateSnapshot, SnapshotView};
use tabula_api::{AgentPort, Command, ControlError, ControlPlane, Fault, FaultOp, RangeUpdate};
use tabula_core::{BLOCK_SIZE, Generation, State, VdiskId, format_size, parse_size};

use crate::sim::{Admin, Sim, cpu_time};
use crate::stats::{Rng, ms, quantile, report_progress};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The controller's address (admin API and gRPC), e.g. http://127.0.0.1:7700.
    #[arg(long)]
    controller: String,
    /// Process id of the controller, to report its memory (VmRSS) and CPU time.
    #[arg(long)]
    controller_pid: Option<String>,
    /// Name of the big vdisk (NAME-other is a small second vdisk for the other probe).
    #[arg(long, default_value = "big")]
    name: String,
    /// Size of the big vdisk.
    #[arg(long, default_value = "1T", value_parser = size_arg)]
    size: u64,
    /// Its segment size (the allocation unit).
    #[arg(long, default_value = "1M", value_parser = size_arg)]
    segment_size: u64,
    /// Segments to allocate, in random order (one entry each).
    #[arg(long, default_value_t = 1_000_000)]
    segments: u64,
    /// Faults in flight while building.
    #[arg(long, default_value_t = 128)]
    inflight: usize,
    /// Stop building after this many seconds and measure what was reached.
    #[arg(long, default_value_t = 300.0)]
    budget: f64,
    /// Snapshots to take one after the other (s1, s2, ...), then delete.
    #[arg(long, default_value_t = 3)]
    snapshots: usize,
    /// Probing time before and after each timed call, in milliseconds.
    #[arg(long, default_value_t = 300)]
    probe_ms: u64,
    /// Copy-on-write round trips to time on the big table.
    #[arg(long, default_value_t = 1000)]
    cow_samples: usize,
    /// Seed of the random order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// Segments reserved at the end of the big vdisk for the same-vdisk probe (every other one
/// of the last 2 * PROBES, so a probe never follows a mapped segment either).
const PROBES: u64 = 16384;

/// Pause between two probe faults (so a probe's wait is known to within about this).
const PROBE_GAP: Duration = Duration::from_millis(1);

/// An agent port that acknowledges every command at once and records when the
/// hold-related ones arrived.
#[derive(Default)]
struct LogPort {
    log: Mutex<Vec<(Instant, &'static str)>>,
}

#[async_trait::async_trait]
impl AgentPort for LogPort {
    async fn apply(&self, command: Command) -> Result<(), String> {
        let kind = match command {
            Command::Block { .. } => "block",
            Command::Unblock { .. } => "unblock",
            Command::SetState { .. } => "set-state",
            Command::Replace(_) => "replace",
            Command::Update(_) => "update",
            Command::Allocated(_) => "allocated",
            Command::Detach { .. } => "detach",
            Command::ContainerHealth { .. } => "container-health",
        };
        self.log
            .lock()
            .expect("not poisoned")
            .push((Instant::now(), kind));
        Ok(())
    }
}

impl LogPort {
    /// The first `block` and the last `unblock` that arrived inside `[from, to]`.
    fn hold_between(&self, from: Instant, to: Instant) -> Option<Duration> {
        let log = self.log.lock().expect("not poisoned");
        let inside = || log.iter().filter(|(t, _)| *t >= from && *t <= to);
        let b = inside().find(|(_, k)| *k == "block")?.0;
        let u = inside().rfind(|(_, k)| *k == "unblock")?.0;
        Some(u.saturating_duration_since(b))
    }
}

/// A simulated agent whose port logs the hold-related commands.
type Agent = Sim<LogPort>;

impl Agent {
    /// Opens a vdisk, retrying while the session is not established yet.
    async fn open(&self, vdisk: &str) -> Result<(VdiskId, Generation)> {
        let s = self.open_when_ready(vdisk, Duration::from_secs(20)).await?;
        Ok((s.vdisk, s.generation))
    }

    /// A fault, repeated while the controller asks to retry (as a real agent does).
    async fn fault(
        &self,
        vdisk: VdiskId,
        op: FaultOp,
        segment: u64,
        state: State,
        copied: Vec<tabula_api::CowCopy>,
    ) -> Result<RangeUpdate> {
        let f = Fault {
            agent: self.name.clone(),
            vdisk,
            op,
            segments: (segment, segment + 1),
            state,
            generation: Generation(0),
            copied,
        };
        loop {
            match self.control.fault(f.clone()).await {
                Ok(u) => return Ok(u),
                Err(ControlError::Retry { after_ms, .. }) => {
                    tokio::time::sleep(Duration::from_millis(after_ms)).await;
                }
                Err(e) => bail!("{op:?} fault for segment {segment}: {e}"),
            }
        }
    }
}

/// Admin calls this benchmark needs beyond `sim::Admin`.
struct Http {
    base: String,
    http: ureq::Agent,
}

impl Http {
    fn new(url: &str) -> Http {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into();
        Http {
            base: url.trim_end_matches('/').to_string(),
            http,
        }
    }

    fn check(what: &str, resp: &mut ureq::http::Response<ureq::Body>) -> Result<()> {
        if resp.status().is_success() {
            return Ok(());
        }
        let status = resp.status();
        let msg = resp
            .body_mut()
            .read_json::<ApiError>()
            .map(|e| e.error)
            .unwrap_or_else(|_| status.to_string());
        bail!("{what}: {msg}")
    }

    fn create_snapshot(&self, vdisk: &str, snap: &str) -> Result<SnapshotView> {
        let what = format!("creating snapshot {vdisk}@{snap}");
        let body = CreateSnapshot {
            name: snap.to_string(),
        };
        let mut resp = tokio::task::block_in_place(|| {
            self.http
                .post(format!("{}/v1/vdisks/{vdisk}/snapshots", self.base))
                .send_json(&body)
        })
        .with_context(|| what.clone())?;
        Self::check(&what, &mut resp)?;
        resp.body_mut()
            .read_json::<SnapshotView>()
            .with_context(|| format!("{what}: decoding the answer"))
    }

    fn delete_snapshot(&self, full: &str) -> Result<()> {
        let what = format!("deleting snapshot {full}");
        let mut resp = tokio::task::block_in_place(|| {
            self.http
                .delete(format!("{}/v1/snapshots/{full}", self.base))
                .call()
        })
        .with_context(|| what.clone())?;
        Self::check(&what, &mut resp)
    }
}

/// VmRSS of a process, in MiB.
fn rss_mib(pid: Option<&str>) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

fn fmt_mib(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

/// A serial stream of write faults on fresh segments, each one's start and end recorded.
struct Probe {
    agent: Arc<Agent>,
    vdisk: VdiskId,
    segments: Arc<Vec<u64>>,
    next: Arc<AtomicUsize>,
}

impl Probe {
    fn spawn(
        &self,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<Result<Vec<(Instant, Instant)>>> {
        let (agent, vdisk, segs, next) = (
            self.agent.clone(),
            self.vdisk,
            self.segments.clone(),
            self.next.clone(),
        );
        tokio::spawn(async move {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&s) = segs.get(i) else {
                    eprintln!("snapshot: a probe ran out of segments");
                    break;
                };
                let t0 = Instant::now();
                agent
                    .fault(vdisk, FaultOp::Write, s, State::Zero, Vec::new())
                    .await?;
                out.push((t0, Instant::now()));
                tokio::time::sleep(PROBE_GAP).await;
            }
            Ok(out)
        })
    }
}

/// What the probes saw around one timed call.
struct Probed {
    wall: Duration,
    /// Longest fault round trip of each probe that overlapped the call.
    same_max: Duration,
    other_max: Duration,
    /// Median round trip of each probe outside the call.
    same_idle: Duration,
    other_idle: Duration,
    agent_hold: Option<Duration>,
}

fn summarize(samples: &[(Instant, Instant)], t0: Instant, t1: Instant) -> (Duration, Duration) {
    let overlapping = samples
        .iter()
        .filter(|(a, b)| *a <= t1 && *b >= t0)
        .map(|(a, b)| *b - *a)
        .max()
        .unwrap_or_default();
    let mut idle: Vec<u64> = samples
        .iter()
        .filter(|(a, b)| *b < t0 || *a > t1)
        .map(|(a, b)| (*b - *a).as_nanos() as u64)
        .collect();
    idle.sort_unstable();
    (overlapping, Duration::from_nanos(quantile(&idle, 0.5)))
}

struct Bench {
    holder: Arc<Agent>,
    same: Probe,
    other: Probe,
    probe: Duration,
}

impl Bench {
    /// Runs `call` between two probing windows; returns its result and what the probes saw.
    async fn probed<T>(&self, call: impl FnOnce() -> Result<T>) -> Result<(T, Probed)> {
        let stop = Arc::new(AtomicBool::new(false));
        let a = self.same.spawn(stop.clone());
        let b = self.other.spawn(stop.clone());
        tokio::time::sleep(self.probe).await;
        let t0 = Instant::now();
        let r = call();
        let t1 = Instant::now();
        tokio::time::sleep(self.probe).await;
        stop.store(true, Ordering::Relaxed);
        let sa = a.await.context("probe panicked")??;
        let sb = b.await.context("probe panicked")??;
        let r = r?;
        let (same_max, same_idle) = summarize(&sa, t0, t1);
        let (other_max, other_idle) = summarize(&sb, t0, t1);
        Ok((
            r,
            Probed {
                wall: t1 - t0,
                same_max,
                other_max,
                same_idle,
                other_idle,
                agent_hold: self.holder.port.hold_between(t0, t1),
            },
        ))
    }
}

pub async fn run(a: Args) -> Result<()> {
    let seg_blocks = a.segment_size / BLOCK_SIZE;
    if seg_blocks == 0 || a.size % a.segment_size != 0 {
        bail!("--size must be a multiple of --segment-size (at least 4K)");
    }
    let nsegs = a.size / a.segment_size;
    if nsegs < 2 * PROBES + a.segments {
        bail!(
            "{} segments do not fit {} chosen plus {} reserved for probes",
            nsegs,
            a.segments,
            2 * PROBES
        );
    }
    let pid = a.controller_pid.as_deref();
    let admin = Admin::new(&a.controller);
    let http = Http::new(&a.controller);
    let other_name = format!("{}-other", a.name);
    admin.create_vdisk(&a.name, a.size, a.segment_size)?;
    admin.create_vdisk(&other_name, 2 * PROBES * BLOCK_SIZE, BLOCK_SIZE)?;
    let holder =
        Arc::new(Agent::start(&a.controller, "snap-holder", Duration::from_secs(300)).await?);
    let (vdisk, _) = holder.open(&a.name).await?;
    let prober =
        Arc::new(Agent::start(&a.controller, "snap-other", Duration::from_secs(300)).await?);
    let (other_vdisk, _) = prober.open(&other_name).await?;

    // The random subset, as runs of adjacent segments in random order.
    let eligible = nsegs - 2 * PROBES;
    let mut chosen: Vec<u64> = (0..eligible).collect();
    let mut rng = Rng::new(a.seed);
    rng.shuffle(&mut chosen);
    chosen.truncate(a.segments as usize);
    chosen.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &s in &chosen {
        match runs.last_mut() {
            Some((_, e)) if *e == s => *e += 1,
            _ => runs.push((s, s + 1)),
        }
    }
    rng.shuffle(&mut runs);
    let runs = Arc::new(runs);
    eprintln!(
        "snapshot: allocating {} of {} segments ({} runs of adjacent ones) of {} in random order",
        a.segments,
        nsegs,
        runs.len(),
        a.name
    );

    // Build.
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(a.budget);
    let cpu0 = pid.and_then(cpu_time);
    let mut tasks = Vec::new();
    for _ in 0..a.inflight {
        let (h, runs, next, done, failed) = (
            holder.clone(),
            runs.clone(),
            next.clone(),
            done.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(&(b, e)) = runs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return Ok::<(), anyhow::Error>(());
                };
                for s in (b..e).rev() {
                    if Instant::now() >= deadline || failed.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    if let Err(e) = h
                        .fault(vdisk, FaultOp::Write, s, State::Zero, Vec::new())
                        .await
                    {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let progress = report_progress("snapshot", "segments", done.clone(), started);
    for t in tasks {
        t.await.context("a builder task panicked")??;
    }
    progress.abort();
    let build = started.elapsed();
    let built = done.load(Ordering::Relaxed);
    let cpu1 = pid.and_then(cpu_time);
    let view = admin.vdisk(&a.name)?;
    eprintln!(
        "snapshot: built {built} segments in {:.1} s; {} entries, {} allocated",
        build.as_secs_f64(),
        view.entries,
        format_size(view.allocated)
    );
    if view.allocated != built * a.segment_size {
        bail!(
            "expected {} allocated, the controller reports {}",
            format_size(built * a.segment_size),
            format_size(view.allocated)
        );
    }
    let rss_built = rss_mib(pid);

    let probe_segs: Vec<u64> = (0..PROBES).map(|j| eligible + 1 + 2 * j).collect();
    let other_segs: Vec<u64> = (0..PROBES).map(|j| 2 * j + 1).collect();
    let bench = Bench {
        holder: holder.clone(),
        same: Probe {
            agent: holder.clone(),
            vdisk,
            segments: Arc::new(probe_segs),
            next: Arc::new(AtomicUsize::new(0)),
        },
        other: Probe {
            agent: prober.clone(),
            vdisk: other_vdisk,
            segments: Arc::new(other_segs),
            next: Arc::new(AtomicUsize::new(0)),
        },
        probe: Duration::from_millis(a.probe_ms),
    };

    println!(
        "Table: {} vdisk `{}`, {} segments, {} segments allocated in random order -> {} entries; built in {:.1} s ({:.0} faults/s, {} in flight{}).",
        format_size(a.size),
        a.name,
        format_size(a.segment_size),
        built,
        view.entries,
        build.as_secs_f64(),
        built as f64 / build.as_secs_f64(),
        a.inflight,
        match (cpu0, cpu1) {
            (Some(c0), Some(c1)) => format!(
                ", controller CPU {:.0} µs/fault",
                (c1 - c0).as_secs_f64() * 1e6 / built.max(1) as f64
            ),
            _ => String::new(),
        }
    );
    println!(
        "Controller VmRSS after the build: {} MiB.",
        fmt_mib(rss_built)
    );
    println!();
    println!(
        "| operation | wall ms | hold_ms (controller) | hold seen by the agent, ms | longest write fault, same vdisk, ms | longest write fault, other vdisk, ms | controller VmRSS after, MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut idle_same = Vec::new();
    let mut idle_other = Vec::new();
    let mut names = Vec::new();
    for i in 1..=a.snapshots {
        let snap = format!("s{i}");
        let (view, p) = bench
            .probed(|| http.create_snapshot(&a.name, &snap))
            .await?;
        idle_same.push(p.same_idle);
        idle_other.push(p.other_idle);
        println!(
            "| snapshot create {}@{snap} | {:.0} | {} | {} | {:.0} | {:.0} | {} |",
            a.name,
            ms(p.wall),
            view.hold_ms.map_or("-".into(), |h| format!("{h:.1}")),
            p.agent_hold.map_or("-".into(), |h| format!("{:.1}", ms(h))),
            ms(p.same_max),
            ms(p.other_max),
            fmt_mib(rss_mib(pid))
        );
        names.push(view.name);
    }

    // Copy-on-write round trips on the big table, while the snapshots exist.
    let mut cow_order = chosen.clone();
    Rng::new(a.seed + 1).shuffle(&mut cow_order);
    let mut first = Vec::new();
    let mut second = Vec::new();
    for &s in cow_order.iter().take(a.cow_samples) {
        let t0 = Instant::now();
        let u = holder
            .fault(vdisk, FaultOp::Write, s, State::New, Vec::new())
            .await?;
        let t1 = Instant::now();
        if u.copies.len() != 1 {
            bail!(
                "segment {s}: expected one copy to do, the controller asked for {}",
                u.copies.len()
            );
        }
        let u = holder
            .fault(vdisk, FaultOp::Copied, s, State::New, u.copies)
            .await?;
        let t2 = Instant::now();
        if !u
            .entries
            .iter()
            .all(|e| e.state == State::Normal && e.target.is_some())
        {
            bail!("segment {s}: not writable after its copy: {:?}", u.entries);
        }
        first.push((t1 - t0).as_nanos() as u64);
        second.push((t2 - t1).as_nanos() as u64);
    }

    for full in &names {
        let ((), p) = bench.probed(|| http.delete_snapshot(full)).await?;
        idle_same.push(p.same_idle);
        idle_other.push(p.other_idle);
        println!(
            "| snapshot delete {full} | {:.0} | - | - | {:.0} | {:.0} | {} |",
            ms(p.wall),
            ms(p.same_max),
            ms(p.other_max),
            fmt_mib(rss_mib(pid))
        );
    }
    let med = |v: &[Duration]| {
        let mut s = v.to_vec();
        s.sort();
        s.get(s.len().saturating_sub(1) / 2)
            .copied()
            .unwrap_or_default()
    };
    println!();
    println!(
        "Write fault round trip outside these calls (median of the probes' medians): same vdisk {:.2} ms, other vdisk {:.2} ms.",
        ms(med(&idle_same)),
        ms(med(&idle_other))
    );
    if !first.is_empty() {
        first.sort_unstable();
        second.sort_unstable();
        let total: Vec<u64> = {
            let mut t: Vec<u64> = first.iter().zip(&second).map(|(a, b)| a + b).collect();
            t.sort_unstable();
            t
        };
        let us = |v: &[u64], q: f64| quantile(v, q) as f64 / 1e3;
        println!();
        println!(
            "Copy-on-write on this table ({} random segments, one at a time, while the snapshots existed; no data copied):",
            first.len()
        );
        println!();
        println!("| round trip | p50 µs | p99 µs | max µs |");
        println!("|---|---:|---:|---:|");
        for (what, v) in [
            ("write fault -> copy to do", &first),
            ("copied report -> table switched", &second),
            ("both", &total),
        ] {
            println!(
                "| {what} | {:.0} | {:.0} | {:.0} |",
                us(v, 0.5),
                us(v, 0.99),
                us(v, 1.0)
            );
        }
    }
    Ok(())
}
