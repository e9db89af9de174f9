//! Command-line grammar (clap) and dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tabula_api::admin::{AddContainer, CloneVdisk, CowPolicy, CreateVdisk, ResizeVdisk};
use tabula_core::parse_size;

use crate::client::Client;
use crate::output;

pub const DEFAULT_API: &str = "127.0.0.1:7700";
pub const DEFAULT_NBD: &str = "127.0.0.1:10809";

#[derive(Parser, Debug)]
#[command(
    name = "tabula",
    version,
    about = "Distributed, table-driven virtual block storage: thin vdisks served over NBD",
    long_about = "tabula pools storage containers into thin-provisioned virtual disks (vdisks) \
and serves them to any NBD client (qemu, nbd-client, libnbd tools, fio).\n\n\
Start everything on one host with `tabula serve`, then create vdisks with \
`tabula vdisk create NAME --size 10G` and connect to nbd://127.0.0.1:10809/NAME.\n\n\
Sizes are a number of bytes with an optional binary unit K, M, G, T, P or E, each 1024 \
times the one before; Ki, KiB and KB all mean the same (1G = 1GiB = 1GB = 2^30 bytes), \
case does not matter, and there are no fractions (write 1536M, not 1.5G). A vdisk's size is \
a multiple of 4K from 4K to 4E; its segment size a power of two from 4K to 1G."
)]
pub struct Cli {
    /// The controller to talk to: its admin API address (agents use the same one, for gRPC).
    /// With several controllers (HA), a comma-separated list URL[,URL...] of any or all of
    /// them: admin commands go to the first that answers and follow a standby's redirect to
    /// the leader; `tabula agent` follows the leader as it changes.
    #[arg(
        long,
        global = true,
        env = "TABULA_CONTROLLER",
        value_name = "URL[,URL...]",
        default_value = "http://127.0.0.1:7700"
    )]
    pub controller: String,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run controller, agent and a default file container in one process.
    Serve(ServeArgs),
    /// Run the controller alone: tables, allocation and the admin API; agents connect to it
    /// (gRPC on the same port as the admin API).
    Controller(ControllerArgs),
    /// Run an agent: serves this host's NBD clients from table copies it gets from the
    /// controller given by --controller, doing I/O directly against the containers.
    ///
    /// With several controllers (HA), list them (--controller URL,URL,URL): the agent talks
    /// to the leader, moves to the new one when it changes, and refuses anything from a
    /// deposed leader.
    ///
    /// It starts (and keeps serving what its tables allow) even while the controller is
    /// unreachable, and reconnects and resynchronises by itself.
    Agent(AgentArgs),
    /// Create, inspect, resize and delete virtual disks.
    #[command(subcommand)]
    Vdisk(VdiskCmd),
    /// Take, list, compare and delete snapshots: read-only point-in-time copies of a vdisk,
    /// exported over NBD as VDISK@SNAP.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Add and inspect storage containers.
    #[command(subcommand)]
    Container(ContainerCmd),
    /// Show capacity, allocation, containers and agents.
    Status(JsonFlag),
    /// Verify stored metadata against tabula's invariants; exits 1 if any is violated.
    ///
    /// With --data-dir, checks a stopped installation's database directly; otherwise asks the
    /// running controller to check its store.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Directory for metadata and the default container.
    #[arg(long, default_value = "./tabula-data")]
    pub data_dir: PathBuf,
    /// NBD address: HOST:PORT, [::1]:PORT or unix:/path/to/socket.
    #[arg(long, default_value = DEFAULT_NBD)]
    pub nbd_listen: String,
    /// Admin API address (HOST:PORT).
    #[arg(long, default_value = DEFAULT_API)]
    pub api_listen: String,
    /// Size of the default container created on first start (a sparse file,
    /// DATA_DIR/containers/default.img). A file already there that no store knows (left by
    /// a first start that was killed, or put there by hand, e.g. preallocated) is used as it
    /// is.
    /// A multiple of 4K, at most 4E.
    #[arg(long, default_value = "64G", value_parser = container_size_arg)]
    pub container_size: u64,
    /// Agent name, shown in `tabula status`.
    #[arg(long, default_value = "local")]
    pub name: String,
    /// The longest a snapshot or rollback may hold a vdisk's I/O while in-flight I/O
    /// drains; past it the operation is cancelled and I/O resumes.
    #[arg(long, default_value = "5s", value_parser = duration_arg)]
    pub snapshot_hold: std::time::Duration,
    /// The longest one I/O waits for what it needs before it fails with an I/O error: the
    /// controller's answer (an allocating write, a trim, a copy-on-write; an unreachable
    /// controller), the end of a snapshot's or rollback's hold, or a table that keeps
    /// changing under it (a drain or migration, snapshots). Counted from when the I/O
    /// begins.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    pub fault_wait: std::time::Duration,
    #[command(flatten)]
    pub pool: PoolArgs,
}

/// How the pool's containers are watched.
#[derive(Args, Debug)]
pub struct PoolArgs {
    /// The longest container I/O (or a probe of a container) may take: past it the I/O
    /// fails with EIO to the host and the container is reported as not answering.
    #[arg(long, default_value = "5s", value_parser = duration_arg)]
    pub container_timeout: std::time::Duration,
    /// Warn (log, `tabula status`, metrics) when free allocatable space falls under this
    /// percentage of the pool.
    #[arg(long, default_value = "10", value_parser = clap::value_parser!(u64).range(0..=100))]
    pub low_space_percent: u64,
}

#[derive(Args, Debug)]
pub struct ControllerArgs {
    /// Directory for metadata and the default container. Agents open containers by the
    /// paths the controller gives, so on several hosts this must be shared storage.
    #[arg(long, default_value = "./tabula-data")]
    pub data_dir: PathBuf,
    /// Address for the admin API and the agents' channel (HOST:PORT).
    #[arg(long, default_value = DEFAULT_API)]
    pub api_listen: String,
    /// Size of the default container created on first start (a sparse file,
    /// DATA_DIR/containers/default.img). A file already there that no store knows (left by
    /// a first start that was killed, or put there by hand, e.g. preallocated) is used as it
    /// is.
    /// A multiple of 4K, at most 4E.
    #[arg(long, default_value = "64G", value_parser = container_size_arg)]
    pub container_size: u64,
    /// Agents' lease: an agent that has not renewed it for this long stops I/O, and the
    /// controller proceeds without it. After a restart, freed space is reused only once
    /// this much time has passed.
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    pub lease: std::time::Duration,
    /// How often every agent's table copies are replaced wholesale, healing any divergence
    /// (a mismatch is logged and counted in `tabula status`). 0 turns it off.
    #[arg(long, default_value = "60s", value_parser = duration_arg)]
    pub refresh_interval: std::time::Duration,
    /// The longest a snapshot or rollback may hold a vdisk's I/O on every agent exporting
    /// it while in-flight I/O drains; past it the operation is cancelled and I/O resumes.
    #[arg(long, default_value = "5s", value_parser = duration_arg)]
    pub snapshot_hold: std::time::Duration,
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub ha: HaArgs,
}

/// High availability: several controllers on etcd (README, "High availability").
#[derive(Args, Debug)]
pub struct HaArgs {
    /// Join a control plane of several controllers on etcd (URL[,URL...] of its members,
    /// e.g. http://10.0.0.1:2379,http://10.0.0.2:2379). One leads, the others stand by and
    /// follow every metadata change; any of them takes over within --election-ttl of the
    /// leader's loss. Without it this controller is the whole control plane (its data dir
    /// holds the only copy of the metadata). No default container is made with it: add
    /// containers explicitly.
    #[arg(long, value_delimiter = ',', env = "TABULA_ETCD")]
    pub etcd: Vec<String>,
    /// This controller's name in the control plane (unique). Default: the host name.
    #[arg(long, requires = "etcd")]
    pub name: Option<String>,
    /// Every key of the control plane in etcd starts with this, so several control planes
    /// can share one etcd.
    #[arg(long, default_value = "/tabula", requires = "etcd")]
    pub etcd_prefix: String,
    /// How long a dead leader keeps its leadership before a standby takes over (the TTL of
    /// its etcd lease; whole seconds, at least 1).
    #[arg(long, default_value = "2s", value_parser = duration_arg, requires = "etcd")]
    pub election_ttl: std::time::Duration,
    /// The address other controllers, agents and the CLI reach this controller at
    /// (http://HOST:PORT). Default: http:// and the --api-listen address, which must then
    /// not be a wildcard (0.0.0.0, [::]).
    #[arg(long, requires = "etcd")]
    pub advertise_url: Option<String>,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// NBD address: HOST:PORT, [::1]:PORT or unix:/path/to/socket.
    #[arg(long, default_value = DEFAULT_NBD)]
    pub nbd_listen: String,
    /// This agent's name, unique among the controller's agents (shown in `tabula status`).
    /// Default: the host name. A name in use by a live agent is refused.
    #[arg(long)]
    pub name: Option<String>,
    /// The longest one I/O waits for what it needs before it fails with an I/O error: the
    /// controller's answer (an allocating write, a trim, a copy-on-write; an unreachable
    /// controller), the end of a snapshot's or rollback's hold, or a table that keeps
    /// changing under it (a drain or migration, snapshots). Counted from when the I/O
    /// begins.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    pub fault_wait: std::time::Duration,
    /// The longest container I/O may take: past it the I/O fails with EIO to the host and
    /// the container is reported to the controller.
    #[arg(long, default_value = "5s", value_parser = duration_arg)]
    pub container_timeout: std::time::Duration,
}

fn duration_arg(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 2m)"))
}

#[derive(Args, Debug)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Check the database in this (stopped) data directory instead of asking the controller.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum VdiskCmd {
    /// Create a thin vdisk: it reads as zeros and owns no space until written.
    Create {
        name: String,
        /// Size, e.g. 10G: a multiple of 4K from 4K to 4E (units are binary: K, M, G, T,
        /// P, E; KiB and KB mean the same).
        #[arg(long, value_parser = size_arg)]
        size: u64,
        /// Allocation unit: a power of two from 4K to 1G (default 1M), no larger than a
        /// container the vdisk may use.
        #[arg(long, value_parser = size_arg)]
        segment_size: Option<u64>,
        /// First write to a segment shared with a snapshot or clone: `redirect` writes to a
        /// new copy of the segment (the vdisk moves), `copy-out` writes in place after
        /// moving the old data out for the snapshots and clones.
        #[arg(long, default_value = "redirect")]
        cow: CowPolicy,
        /// Pin the vdisk to one container: all its space (and its snapshots' and clones')
        /// comes from there. Without it, space comes from any container, by free space.
        #[arg(long)]
        container: Option<String>,
    },
    /// List vdisks.
    List(JsonFlag),
    /// Show one vdisk.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a vdisk's mapping table: each entry's virtual range, state and location.
    Map {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a vdisk; space no snapshot or clone maps is zeroed and returned to the pool.
    Delete {
        name: String,
        /// Delete its snapshots too (without it, a vdisk with snapshots is not deleted).
        #[arg(long)]
        with_snapshots: bool,
        /// Delete it even while NBD clients are connected to it (or to its snapshots); their
        /// I/O fails from then on. Without it, such a vdisk is not deleted.
        #[arg(long)]
        force: bool,
    },
    /// Create a writable vdisk from a snapshot, sharing all its space (copied on write).
    /// The clone depends on nothing: the snapshot and its vdisk can be deleted.
    Clone {
        /// The snapshot to clone: VDISK@SNAP.
        source: String,
        /// Name of the new vdisk.
        name: String,
        /// Copy-on-write policy of the clone (default: that of the snapshot's vdisk).
        #[arg(long)]
        cow: Option<CowPolicy>,
    },
    /// Make a vdisk's contents (and size) those of one of its snapshots again. I/O is held
    /// while agents switch; space only the vdisk held is freed.
    Rollback {
        name: String,
        /// Snapshot name (without the VDISK@ prefix).
        snapshot: String,
    },
    /// Move all of a vdisk's data into one container, live, and pin it there (new space
    /// comes from there too). Space it shares with its snapshots and clones moves with it.
    Migrate {
        name: String,
        /// The container to move it into.
        #[arg(long)]
        to: String,
        /// Start it and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Grow or shrink a vdisk (shrinking frees the space beyond the new end).
    Resize {
        name: String,
        /// New size, e.g. 20G: a multiple of 4K from 4K to 4E.
        #[arg(long, value_parser = size_arg)]
        size: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot. No data is copied: the vdisk's table is. I/O to the vdisk is held
    /// (it waits, it does not fail) only while agents drain in-flight I/O and mark the
    /// vdisk's segments shared: about a millisecond for a table of a few thousand entries,
    /// some 0.1-0.3 s at a million (a 1 TiB vdisk fully allocated in 1 MiB segments), up to
    /// 1 s under heavy I/O. The command returns once the copy of the table is durable
    /// (about 1 s at a million entries); meanwhile first writes that need the controller
    /// wait. The snapshot holds every write acknowledged before the command began and none
    /// issued after it returned.
    Create {
        /// The vdisk to snapshot.
        vdisk: String,
        /// The snapshot's name; it is exported read-only as VDISK@NAME.
        name: String,
        /// Print the snapshot as JSON (with `hold_ms`, how long I/O was held).
        #[arg(long)]
        json: bool,
    },
    /// List snapshots (of one vdisk, or all) with the space unique to each: what deleting
    /// it would free.
    List {
        /// Only the snapshots of this vdisk.
        vdisk: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot; the space only it maps is zeroed and freed.
    Delete {
        /// VDISK@SNAP
        name: String,
        /// Delete it even while NBD clients are connected to its export; their I/O fails
        /// from then on.
        #[arg(long)]
        force: bool,
    },
    /// List the byte ranges whose contents may differ between two tables of one lineage
    /// (a vdisk, its snapshots and clones), without reading data: for incremental backup.
    Diff {
        /// VDISK@SNAP or VDISK
        from: String,
        /// VDISK@SNAP or VDISK
        to: String,
        /// Print JSON ({from, to, changed, ranges: [{offset, length}]}).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ContainerCmd {
    /// Add a container to the pool; its space is usable by every agent at once.
    ///
    /// --path: a file or a block device on the agents' hosts (the same path on each). With
    /// --size, creates a new sparse file of that size; without, uses the existing file or
    /// device at its current size.
    /// --uri: an NBD export on a storage host (qemu-nbd, nbdkit, nbd-server or
    /// `tabula container serve`), which agents reach directly:
    /// nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH.
    #[command(group(clap::ArgGroup::new("location").required(true).args(["path", "uri"])))]
    Add {
        name: String,
        /// A relative path is taken from the directory this command runs in (and sent to
        /// the controller as an absolute path).
        #[arg(long)]
        path: Option<PathBuf>,
        #[arg(long)]
        uri: Option<String>,
        #[arg(long, value_parser = size_arg, conflicts_with = "uri")]
        size: Option<u64>,
    },
    /// List containers: kind, state (ok, failed, draining), size, used and free space, and
    /// which agents reach each one.
    List(JsonFlag),
    /// Move everything a container holds to the rest of the pool, live: vdisks stay online
    /// and hosts keep reading and writing. Nothing new is allocated in it meanwhile. Shows
    /// progress until done (Ctrl-C stops watching; the drain goes on).
    Drain {
        name: String,
        /// Stop the drain: what was moved stays moved, and the container takes new space
        /// again.
        #[arg(long)]
        cancel: bool,
        /// Start it and return at once (follow with `tabula container list`).
        #[arg(long)]
        no_wait: bool,
    },
    /// Remove an empty container from the pool (drain it first).
    Remove { name: String },
    /// Show one container.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Serve a file or block device as an NBD export, to be a remote container elsewhere.
    #[command(long_about = crate::container_serve::LONG_ABOUT)]
    Serve(crate::container_serve::ContainerServeArgs),
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// A container file's size (the default container of `serve` and `controller`, `container
/// serve --size`): a multiple of 4K up to 4E.
pub(crate) fn container_size_arg(s: &str) -> Result<u64, String> {
    let size = size_arg(s)?;
    tabula_core::check_container_size(size).map_err(|e| e.to_string())?;
    Ok(size)
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let client = || Client::new(&cli.controller);
    match cli.command {
        Cmd::Controller(args) => {
            crate::serve::run_controller(args)?;
        }
        Cmd::Agent(args) => {
            crate::serve::run_agent(args, &cli.controller)?;
        }
        Cmd::Serve(args) => {
            crate::serve::run(args)?;
        }
        Cmd::Vdisk(cmd) => match cmd {
            VdiskCmd::Create {
                name,
                size,
                segment_size,
                cow,
                container,
            } => {
                let v = client().create_vdisk(&CreateVdisk {
                    name,
                    size,
                    segment_size,
                    cow: Some(cow),
                    container,
                })?;
                println!(
                    "created vdisk {} ({}); NBD export name: {}",
                    v.name,
                    tabula_core::format_size(v.size),
                    v.name
                );
            }
            VdiskCmd::List(j) => {
                let list = client().list_vdisks()?;
                output::print(&list, j.json, output::vdisk_table)?;
            }
            VdiskCmd::Show { name, json } => {
                let v = client().vdisk(&name)?;
                output::print(&v, json, output::vdisk_detail)?;
            }
            VdiskCmd::Map { name, json } => {
                let m = client().map(&name)?;
                output::print(&m, json, output::map_table)?;
            }
            VdiskCmd::Delete {
                name,
                with_snapshots,
                force,
            } => {
                client().delete_vdisk(&name, with_snapshots, force)?;
                println!("deleted vdisk {name}");
            }
            VdiskCmd::Clone { source, name, cow } => {
                let v = client().clone_vdisk(&CloneVdisk {
                    source: source.clone(),
                    name,
                    cow,
                })?;
                println!(
                    "created vdisk {} as a clone of {source} ({}, copy-on-write: {}); NBD export name: {}",
                    v.name,
                    tabula_core::format_size(v.size),
                    v.cow,
                    v.name
                );
            }
            VdiskCmd::Rollback { name, snapshot } => {
                let v = client().rollback(&name, &snapshot)?;
                println!(
                    "rolled vdisk {} back to {name}@{snapshot} ({})",
                    v.name,
                    tabula_core::format_size(v.size)
                );
            }
            VdiskCmd::Migrate { name, to, no_wait } => {
                let m = client().migrate_vdisk(&name, &to)?;
                if no_wait {
                    println!(
                        "migrating vdisk {name} to container {to} ({} to move)",
                        tabula_core::format_size(m.total)
                    );
                } else {
                    output::follow_move(&client(), "migrate", &name)?;
                    println!("vdisk {name} is in container {to}, and pinned there");
                }
            }
            VdiskCmd::Resize { name, size } => {
                let v = client().resize_vdisk(&name, &ResizeVdisk { size })?;
                println!(
                    "resized vdisk {} to {} (connected clients see the new size when they reconnect)",
                    v.name,
                    tabula_core::format_size(v.size)
                );
            }
        },
        Cmd::Snapshot(cmd) => match cmd {
            SnapshotCmd::Create { vdisk, name, json } => {
                let s = client().create_snapshot(&vdisk, &name)?;
                if json {
                    output::print(&s, true, output::snapshot_detail)?;
                } else {
                    println!(
                        "created snapshot {} (I/O held {:.1} ms); NBD export name (read-only): {}",
                        s.name,
                        s.hold_ms.unwrap_or(0.0),
                        s.name
                    );
                }
            }
            SnapshotCmd::List { vdisk, json } => {
                let list = client().list_snapshots(vdisk.as_deref())?;
                output::print(&list, json, output::snapshot_table)?;
            }
            SnapshotCmd::Delete { name, force } => {
                if !name.contains('@') {
                    bail!("give the snapshot as VDISK@SNAP (tabula snapshot list shows them)");
                }
                client().delete_snapshot(&name, force)?;
                println!("deleted snapshot {name}");
            }
            SnapshotCmd::Diff { from, to, json } => {
                let d = client().diff(&from, &to)?;
                output::print(&d, json, output::diff)?;
            }
        },
        Cmd::Container(cmd) => match cmd {
            ContainerCmd::Add {
                name,
                path,
                uri,
                size,
            } => {
                let location = match (path, uri) {
                    // A relative path means one relative to where the command runs, not to
                    // wherever the controller was started.
                    (Some(p), _) => std::path::absolute(&p)
                        .with_context(|| format!("resolving --path {}", p.display()))?
                        .to_string_lossy()
                        .to_string(),
                    (None, Some(u)) => u,
                    (None, None) => unreachable!("clap requires --path or --uri"),
                };
                let c = client().add_container(&AddContainer {
                    name,
                    path: location,
                    size,
                })?;
                println!(
                    "added container {} ({} {}, {})",
                    c.name,
                    c.kind,
                    c.path,
                    tabula_core::format_size(c.size)
                );
            }
            ContainerCmd::Drain {
                name,
                cancel,
                no_wait,
            } => {
                if cancel {
                    let c = client().cancel_drain(&name)?;
                    println!(
                        "drain of container {} cancelled; it holds {} and takes new space again",
                        c.name,
                        tabula_core::format_size(c.used)
                    );
                } else {
                    let m = client().drain_container(&name)?;
                    if no_wait {
                        println!(
                            "draining container {name} ({} to move); follow with `tabula container list`",
                            tabula_core::format_size(m.total)
                        );
                    } else {
                        output::follow_move(&client(), "drain", &name)?;
                        println!(
                            "container {name} is drained; remove it with `tabula container remove {name}`"
                        );
                    }
                }
            }
            ContainerCmd::Remove { name } => {
                client().remove_container(&name)?;
                println!("removed container {name}");
            }
            ContainerCmd::List(j) => {
                let list = client().list_containers()?;
                output::print(&list, j.json, output::container_table)?;
            }
            ContainerCmd::Show { name, json } => {
                let c = client().container(&name)?;
                output::print(&c, json, output::container_detail)?;
            }
            ContainerCmd::Serve(args) => crate::container_serve::run(args)?,
        },
        Cmd::Status(j) => {
            let s = client().status()?;
            output::print(&s, j.json, output::status)?;
        }
        Cmd::Check(args) => {
            let view = match &args.data_dir {
                Some(dir) => {
                    if !dir.is_dir() {
                        bail!("{} is not a directory", dir.display());
                    }
                    tabula_controller::check::check_data_dir(dir).with_context(|| {
                        format!(
                            "checking {} (to check a running tabula, run `tabula check` without --data-dir)",
                            dir.display()
                        )
                    })?
                }
                None => client().check()?,
            };
            output::print(&view, args.json, output::check)?;
            if !view.ok {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
