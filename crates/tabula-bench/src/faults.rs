//! `tabula-bench faults`: N simulated agents, each issuing write faults one at a time on
//! segments in a shuffled order, every other segment only (so a fault never follows a
//! mapped segment and the controller's read-ahead never allocates for it). Reports the
//! fault round trip (call to answer, over gRPC, including the controller's durable commit)
//! and the aggregate allocation rate.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tabula_api::{ControlPlane, Fault, FaultOp};
use tabula_core::{BLOCK_SIZE, Generation, State, format_size, parse_size};

use crate::sim::{Admin, Sim, cpu_time};
use crate::stats::{Rng, quantile};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The controller's address (admin API and gRPC), e.g. http://127.0.0.1:7700, or every
    /// HA controller's, comma-separated (requests go to the leader).
    #[arg(long)]
    controller: String,
    /// Simulated agents, each with its own gRPC connection and session.
    #[arg(long, default_value_t = 1)]
    agents: usize,
    /// Measured time.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Unmeasured time before it (faults run, samples are dropped).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Segment size of the vdisks (the allocation unit): 4K, 1M, ...
    #[arg(long, default_value = "1M", value_parser = size_arg)]
    segment_size: u64,
    /// Segments per vdisk (half of them are faulted at most).
    #[arg(long, default_value_t = 1 << 20)]
    segments: u64,
    /// All agents hold one vdisk: each allocation is pushed to the other holders before the
    /// fault is answered.
    #[arg(long)]
    shared: bool,
    /// Prefix of the vdisk and agent names (must be new on this controller).
    #[arg(long, default_value = "fb")]
    prefix: String,
    /// Process id of the controller, to report its CPU time per fault.
    #[arg(long)]
    controller_pid: Option<String>,
    /// Print the markdown header row first.
    #[arg(long)]
    header: bool,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// What one agent measured.
#[derive(Default)]
struct Outcome {
    /// Round trips (ns) of faults started and answered inside the measured window.
    latencies: Vec<u64>,
    /// Answers that allocated nothing (the segment was mapped already).
    not_new: u64,
    /// Every answered fault, measured window or not.
    answered: u64,
    errors: u64,
    first_error: Option<String>,
    exhausted: bool,
}

pub async fn run(a: Args) -> Result<()> {
    if a.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let admin = Admin::new(&a.controller);
    let size = a.segments * a.segment_size;
    let vdisks: Vec<String> = if a.shared {
        vec![format!("{}-shared", a.prefix)]
    } else {
        (0..a.agents)
            .map(|i| format!("{}-v{i}", a.prefix))
            .collect()
    };
    for v in &vdisks {
        admin.create_vdisk(v, size, a.segment_size)?;
    }
    // Sessions and attachment (unmeasured).
    let mut sims = Vec::new();
    for i in 0..a.agents {
        let sim = <Sim>::start(
            &a.controller,
            &format!("{}-a{i}", a.prefix),
            Duration::from_secs(30),
        )
        .await?;
        let vdisk = &vdisks[if a.shared { 0 } else { i }];
        let snap = sim.open_when_ready(vdisk, Duration::from_secs(20)).await?;
        sims.push((Arc::new(sim), snap));
    }
    let seg_blocks = a.segment_size / BLOCK_SIZE;
    let nsegs = size / BLOCK_SIZE / seg_blocks;
    // Every other segment, shuffled; shared: one order dealt out to the agents.
    let mut evens: Vec<u64> = (0..nsegs).step_by(2).collect();
    let orders: Vec<Vec<u64>> = if a.shared {
        Rng::new(1).shuffle(&mut evens);
        (0..a.agents)
            .map(|i| evens.iter().skip(i).step_by(a.agents).copied().collect())
            .collect()
    } else {
        (0..a.agents)
            .map(|i| {
                let mut v = evens.clone();
                Rng::new(i as u64 + 1).shuffle(&mut v);
                v
            })
            .collect()
    };
    let commands_before: u64 = sims
        .iter()
        .map(|(s, _)| s.port.commands.load(Ordering::Relaxed))
        .sum();
    let start = Instant::now() + Duration::from_millis(200);
    let from = start + Duration::from_secs_f64(a.warmup);
    let end = from + Duration::from_secs_f64(a.seconds);
    let ctl_cpu = Arc::new(cpu::Window::default());
    {
        let pid = a.controller_pid.clone();
        let cell = ctl_cpu.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(from.into()).await;
            cell.set(0, pid.as_deref().and_then(cpu_time), cpu_time("self"));
            tokio::time::sleep_until(end.into()).await;
            cell.set(1, pid.as_deref().and_then(cpu_time), cpu_time("self"));
        });
    }
    let mut tasks = Vec::new();
    for ((sim, snap), order) in sims.iter().zip(orders) {
        let sim = sim.clone();
        let vdisk = snap.vdisk;
        let mut generation = snap.generation;
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            tokio::time::sleep_until(start.into()).await;
            let mut it = order.into_iter();
            while Instant::now() < end {
                let Some(s) = it.next() else {
                    out.exhausted = true;
                    break;
                };
                let f = Fault {
                    agent: sim.name.clone(),
                    vdisk,
                    op: FaultOp::Write,
                    segments: (s, s + 1),
                    state: State::Zero,
                    generation,
                    copied: Vec::new(),
                };
                let t0 = Instant::now();
                let r = sim.control.fault(f).await;
                let t1 = Instant::now();
                match r {
                    Ok(u) => {
                        out.answered += 1;
                        generation = Generation(generation.0.max(u.generation.0));
                        if t0 >= from && t1 <= end {
                            out.latencies.push((t1 - t0).as_nanos() as u64);
                            if !u.change || u.entries.is_empty() {
                                out.not_new += 1;
                            }
                        }
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| e.to_string());
                        if out.errors >= 10 {
                            break;
                        }
                    }
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    let mut not_new = 0;
    let mut errors = 0;
    let mut answered = 0;
    let mut exhausted = 0;
    let mut first_error = None;
    for t in tasks {
        let o = t.await.context("a simulated agent panicked")?;
        all.extend(o.latencies);
        not_new += o.not_new;
        errors += o.errors;
        answered += o.answered;
        exhausted += o.exhausted as usize;
        if first_error.is_none() {
            first_error = o.first_error;
        }
    }
    // Let the sampler take its last reading (and pushes in flight arrive).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let commands: u64 = sims
        .iter()
        .map(|(s, _)| s.port.commands.load(Ordering::Relaxed))
        .sum::<u64>()
        - commands_before;
    if let Some(e) = &first_error {
        eprintln!("faults: {errors} faults failed; first: {e}");
    }
    if exhausted > 0 {
        eprintln!("faults: {exhausted} agents ran out of segments before the end");
    }
    all.sort_unstable();
    let n = all.len() as u64;
    let rate = n as f64 / a.seconds;
    let us = |q: f64| quantile(&all, q) as f64 / 1e3;
    let (ctl_us, bench_us) = ctl_cpu.per_fault(n);
    let mode = if a.shared {
        "shared vdisk"
    } else {
        "own vdisk"
    };
    if a.header {
        println!(
            "| mode | segment | agents | faults | alloc segments/s | p50 µs | p99 µs | p999 µs | max µs | controller CPU µs/fault | bench CPU µs/fault | commands pushed per fault | errors |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    println!(
        "| {mode} | {} | {} | {n} | {rate:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {:.2} | {} |",
        format_size(a.segment_size),
        a.agents,
        us(0.5),
        us(0.99),
        us(0.999),
        us(1.0),
        ctl_us.map_or("-".into(), |v| format!("{v:.0}")),
        bench_us.map_or("-".into(), |v| format!("{v:.0}")),
        commands as f64 / answered.max(1) as f64,
        errors + not_new,
    );
    if not_new > 0 {
        eprintln!("faults: {not_new} answers allocated nothing (segment already mapped)");
    }
    Ok(())
}

/// CPU readings at the start and end of the measured window.
mod cpu {
    use std::sync::Mutex;
    use std::time::Duration;

    type Reading = (Option<Duration>, Option<Duration>);

    #[derive(Default)]
    pub struct Window(Mutex<[Reading; 2]>);

    impl Window {
        pub fn set(&self, i: usize, controller: Option<Duration>, me: Option<Duration>) {
            self.0.lock().expect("not poisoned")[i] = (controller, me);
        }

        /// Controller and bench CPU µs per fault over the window.
        pub fn per_fault(&self, faults: u64) -> (Option<f64>, Option<f64>) {
            let r = *self.0.lock().expect("not poisoned");
            let per = |a: Option<Duration>, b: Option<Duration>| {
                let d = b?.checked_sub(a?)?;
                (faults > 0).then(|| d.as_secs_f64() * 1e6 / faults as f64)
            };
            (per(r[0].0, r[1].0), per(r[0].1, r[1].1))
        }
    }
}
