//! `tabula-bench table`: builds a vdisk whose table has many separate entries (4 KiB
//! segments, every other segment written, so no two entries can merge), then measures how
//! long a fresh agent takes to get the whole table (`open_vdisk` over gRPC: the controller's
//! snapshot and encoding, the transfer, the agent's decoding) and to build its
//! `MappingTable` from it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use prost::Message;
use tabula_api::{ControlPlane, Fault, FaultOp};
use tabula_core::{BLOCK_SIZE, MappingTable, State};
use tabula_proto::{pb, snapshot_from_pb, snapshot_to_pb};

use crate::sim::{Admin, Sim, cpu_time};
use crate::stats::{median, ms, report_progress};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The controller's address (admin API and gRPC), e.g. http://127.0.0.1:7700.
    #[arg(long)]
    controller: String,
    /// Entries to build.
    #[arg(long, default_value_t = 1_000_000)]
    entries: u64,
    /// Name of the vdisk to build (and of a small probe vdisk, NAME-probe).
    #[arg(long, default_value = "table")]
    name: String,
    /// Faults in flight while building.
    #[arg(long, default_value_t = 128)]
    inflight: usize,
    /// Stop building after this many seconds and measure what was reached.
    #[arg(long, default_value_t = 180.0)]
    budget: f64,
    /// Fresh agents to time (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Process id of the controller, to report its CPU time.
    #[arg(long)]
    controller_pid: Option<String>,
}

pub async fn run(a: Args) -> Result<()> {
    let admin = Admin::new(&a.controller);
    let probe = format!("{}-probe", a.name);
    let segment = BLOCK_SIZE;
    let size = 2 * a.entries * segment;
    admin.create_vdisk(&a.name, size, segment)?;
    admin.create_vdisk(&probe, 1 << 20, segment)?;

    // Build: one agent (the only holder, so no allocation is pushed anywhere), many faults
    // in flight on its one HTTP/2 connection.
    let builder =
        Arc::new(<Sim>::start(&a.controller, "tb-builder", Duration::from_secs(60)).await?);
    let snap = builder
        .open_when_ready(&a.name, Duration::from_secs(20))
        .await?;
    let vdisk = snap.vdisk;
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(a.budget);
    let cpu0 = a.controller_pid.as_deref().and_then(cpu_time);
    let mut tasks = Vec::new();
    for _ in 0..a.inflight {
        let (b, next, done, failed) = (builder.clone(), next.clone(), done.clone(), failed.clone());
        let entries = a.entries;
        tasks.push(tokio::spawn(async move {
            loop {
                if Instant::now() >= deadline || failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= entries {
                    return Ok(());
                }
                let f = Fault {
                    agent: b.name.clone(),
                    vdisk,
                    op: FaultOp::Write,
                    segments: (2 * i, 2 * i + 1),
                    state: State::Zero,
                    generation: snap.generation,
                    copied: Vec::new(),
                };
                if let Err(e) = b.control.fault(f).await {
                    failed.store(true, Ordering::Relaxed);
                    return Err(anyhow::anyhow!("fault for segment {}: {e}", 2 * i));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let progress = report_progress("table", "entries", done.clone(), started);
    for t in tasks {
        t.await.context("a builder task panicked")??;
    }
    progress.abort();
    let build = started.elapsed();
    let built = done.load(Ordering::Relaxed);
    let cpu1 = a.controller_pid.as_deref().and_then(cpu_time);
    let view = admin.vdisk(&a.name)?;
    eprintln!(
        "table: built {built} faults in {:.1} s; the vdisk has {} entries",
        build.as_secs_f64(),
        view.entries
    );
    if view.entries as u64 != built {
        bail!(
            "expected {built} separate entries, the controller reports {}",
            view.entries
        );
    }

    // Distribution to fresh agents.
    let mut open = Vec::new();
    let mut install = Vec::new();
    let mut wire = 0usize;
    let mut local_decode = Duration::ZERO;
    let mut local_encode = Duration::ZERO;
    for r in 0..a.runs {
        let sim = <Sim>::start(
            &a.controller,
            &format!("tb-fresh-{r}"),
            Duration::from_secs(120),
        )
        .await?;
        sim.open_when_ready(&probe, Duration::from_secs(20)).await?;
        let t0 = Instant::now();
        let snap = sim.control.open_vdisk(&sim.name, &a.name).await?;
        let t1 = Instant::now();
        let table =
            MappingTable::from_entries(snap.size_bytes / BLOCK_SIZE, snap.entries.iter().copied())
                .context("building the table")?;
        let t2 = Instant::now();
        if table.len() != view.entries || snap.entries.len() != view.entries {
            bail!(
                "the agent got {} entries ({} in its table), the controller has {}",
                snap.entries.len(),
                table.len(),
                view.entries
            );
        }
        open.push(t1 - t0);
        install.push(t2 - t1);
        eprintln!(
            "table: fresh agent {r}: open_vdisk {:.0} ms, table build {:.0} ms",
            ms(t1 - t0),
            ms(t2 - t1)
        );
        if r == 0 {
            // The protobuf part of the round trip, redone locally on the same table.
            let e0 = Instant::now();
            let bytes = snapshot_to_pb(&snap).encode_to_vec();
            let e1 = Instant::now();
            let back = snapshot_from_pb(pb::TableSnapshot::decode(&bytes[..])?)?;
            local_decode = e1.elapsed();
            local_encode = e1 - e0;
            wire = bytes.len();
            assert_eq!(back.entries.len(), snap.entries.len());
        }
    }
    let n = view.entries as f64;
    let per_m = |d: Duration| ms(d) * 1e6 / n;
    let open_m = median(&open);
    let install_m = median(&install);
    println!("| measure | value |");
    println!("|---|---:|");
    println!("| entries built | {} |", view.entries);
    println!(
        "| build time (faults, {} in flight) | {:.1} s ({:.0} faults/s) |",
        a.inflight,
        build.as_secs_f64(),
        built as f64 / build.as_secs_f64()
    );
    if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
        println!(
            "| controller CPU per fault while building | {:.0} µs |",
            (c1 - c0).as_secs_f64() * 1e6 / built as f64
        );
    }
    println!(
        "| table on the wire (protobuf) | {:.1} MiB ({:.1} B/entry) |",
        wire as f64 / (1 << 20) as f64,
        wire as f64 / n
    );
    println!(
        "| open_vdisk, fresh agent (median of {}; min-max) | {:.0} ms ({:.0}-{:.0}) |",
        a.runs,
        ms(open_m),
        ms(*open.iter().min().expect("runs")),
        ms(*open.iter().max().expect("runs"))
    );
    println!(
        "| of which protobuf encode + decode, redone locally | {:.0} + {:.0} ms |",
        ms(local_encode),
        ms(local_decode)
    );
    println!(
        "| table build (MappingTable::from_entries), median | {:.0} ms |",
        ms(install_m)
    );
    println!(
        "| total to a usable table, median | {:.0} ms |",
        ms(open_m + install_m)
    );
    if view.entries as u64 != a.entries || a.entries != 1_000_000 {
        println!(
            "| **extrapolated** (linear) to 1,000,000 entries: open + build | {:.0} ms |",
            per_m(open_m + install_m)
        );
    }
    Ok(())
}
