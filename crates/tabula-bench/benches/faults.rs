//! Microbenchmarks of write-fault handling, in one process (no gRPC, no NBD socket), through
//! the public APIs of the controller and the agent:
//!
//! - `controller_write_fault`: `ControlPlane::fault` for a write to an unallocated 4 KiB
//!   segment, answered by a real `Controller` (allocation, table change, the durable redb
//!   commit) for a registered agent that acknowledges every command at once;
//! - `agent_first_write_4k`: a 4 KiB write through a real `Agent`'s export to a segment it
//!   does not have yet (the agent's fault, the controller's answer, installing it, the
//!   container write);
//! - `agent_overwrite_4k`: the same write to a segment already allocated (no fault), for
//!   comparison.
//!
//! The data directory is a temporary directory (TMPDIR, else /tmp; the commits fsync, so its
//! file system matters). Read-ahead allocation is off, so every fault allocates one segment.
//!
//!   cargo bench -p tabula-bench --bench faults            # ~10 s
//!   cargo bench -p tabula-bench --bench faults -- --quick # a few seconds

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use tabula_agent::{Agent, AgentConfig};
use tabula_api::{AgentPort, Command, ControlPlane, Fault, FaultOp};
use tabula_controller::{Controller, ControllerConfig};
use tabula_core::{Generation, State};
use tabula_nbd::server::ExportProvider;

/// An agent port that acknowledges every command at once.
struct AckPort;

#[async_trait::async_trait]
impl AgentPort for AckPort {
    async fn apply(&self, _command: Command) -> Result<(), String> {
        Ok(())
    }
}

const MIB: u64 = 1 << 20;

fn bench_faults(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let dir = tempfile::Builder::new()
        .prefix("tabula-fault-bench")
        .tempdir()
        .expect("a temporary directory");
    let mut cfg = ControllerConfig::new(dir.path());
    cfg.readahead_segments = 0;
    let ctl: Arc<Controller> = rt.block_on(async {
        let ctl = Controller::open(cfg).await.expect("the controller opens");
        ctl.ensure_default_container(4 << 40)
            .await
            .expect("a sparse default container");
        ctl
    });

    let mut g = c.benchmark_group("faults");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Elements(1));

    // ---- the controller alone ----
    let (vdisk, mut generation) = rt.block_on(async {
        ctl.create_vdisk("ctl", 4 << 30, Some(4096), None, None)
            .await
            .expect("vdisk created");
        ctl.register_agent("sim", Arc::new(AckPort), Vec::new())
            .await
            .expect("agent registered");
        let snap = ctl.open_vdisk("sim", "ctl").await.expect("vdisk opened");
        (snap.vdisk, snap.generation)
    });
    // Every other segment, in order: no fault continues a mapped one.
    let mut next = 0u64;
    g.bench_function("controller_write_fault", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t0 = Instant::now();
                for _ in 0..iters {
                    let s = next;
                    next += 2;
                    let u = ctl
                        .fault(Fault {
                            agent: "sim".into(),
                            vdisk,
                            op: FaultOp::Write,
                            segments: (s, s + 1),
                            state: State::Zero,
                            generation,
                            copied: Vec::new(),
                        })
                        .await
                        .expect("the fault is answered");
                    generation = Generation(generation.0.max(u.generation.0));
                }
                t0.elapsed()
            })
        })
    });

    // ---- through an agent's export ----
    let export = rt.block_on(async {
        ctl.create_vdisk("agent", 4 << 40, None, None, None)
            .await
            .expect("vdisk created");
        let control: Arc<dyn ControlPlane> = ctl.clone();
        let agent = Agent::start(AgentConfig::new("bench-agent"), control)
            .await
            .expect("agent started");
        let export = agent.open("agent").await.expect("export opened");
        // The segment the overwrites go to.
        export
            .write(0, vec![1; 4096], false)
            .await
            .expect("first write");
        export
    });
    // 1 MiB segments; every other one, from the third on.
    let mut seg = 2u64;
    g.bench_function("agent_first_write_4k", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t0 = Instant::now();
                for _ in 0..iters {
                    let off = seg * MIB;
                    seg += 2;
                    export
                        .write(off, vec![7; 4096], false)
                        .await
                        .expect("a first write");
                }
                t0.elapsed()
            })
        })
    });
    let mut i = 0u64;
    g.bench_function("agent_overwrite_4k", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t0 = Instant::now();
                for _ in 0..iters {
                    let off = (i % 256) * 4096;
                    i += 1;
                    export
                        .write(off, vec![7; 4096], false)
                        .await
                        .expect("an overwrite");
                }
                t0.elapsed()
            })
        })
    });
    g.finish();
    drop(export);
    drop(ctl);
    rt.shutdown_timeout(Duration::from_secs(5));
}

criterion_group!(benches, bench_faults);
criterion_main!(benches);
