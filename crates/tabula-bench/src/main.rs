//! Distributed-mode benchmarks (issue 3, item 6): simulated agents that talk to a real
//! `tabula controller` over the real gRPC channel (`tabula_agent::remote::RemoteControl`).
//!
//! - `faults`: fault round trip p50/p99/p999 and allocation rate with N agents, each on its
//!   own vdisk or (`--shared`) all on one;
//! - `table`: builds a vdisk with ~1,000,000 separate entries, then times a fresh agent
//!   getting the whole table (`open_vdisk`: distribution, decode) and building it;
//! - `snapshot`: builds a 1 TiB vdisk with 1,000,000 segments allocated in random order,
//!   then times snapshot create (and the I/O hold), copy-on-write round trips and delete;
//! - `failover`: N agents, each holding its own vdisk's table, through a leader kill on an
//!   HA control plane: time until every one has a session with the new leader and its
//!   table again (`bench/ha-failover.sh` drives it).
//!
//! `--controller` takes one address or every HA controller's, comma-separated.
//!
//! `bench/distributed.sh` starts the controller and runs the first two; agent memory per
//! million entries is measured there, on a real `tabula agent` process. `bench/snapshot.sh`
//! runs `snapshot`, and the data path and qcow2 comparisons around it.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod failover;
mod faults;
mod sim;
mod snapshot;
mod stats;
mod table;

#[derive(Parser, Debug)]
#[command(
    name = "tabula-bench",
    about = "Benchmarks of tabula's distributed mode: simulated agents against a running `tabula controller`"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write-fault round trip latency and allocation rate with N simulated agents.
    Faults(faults::Args),
    /// Build a vdisk with many separate entries; time handing its whole table to a new agent.
    Table(table::Args),
    /// Snapshot create/delete time, I/O hold and copy-on-write cost on a large table.
    Snapshot(snapshot::Args),
    /// N agents, each holding its vdisk's table, through a leader kill (HA): time until all
    /// have a session with the new leader and their tables again.
    Failover(failover::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tabula-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Cmd::Faults(a) => faults::run(a).await,
            Cmd::Table(a) => table::run(a).await,
            Cmd::Snapshot(a) => snapshot::run(a).await,
            Cmd::Failover(a) => failover::run(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tabula-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
