//! Requests and views of the admin API (the CLI and operators' scripts speak these as JSON).

use serde::{Deserialize, Serialize};
use tabula_core::Entry;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateVdisk {
    pub name: String,
    pub size: u64,
    pub segment_size: Option<u64>,
    /// How the first write to a segment shared with a snapshot or clone is done.
    #[serde(default)]
    pub cow: Option<CowPolicy>,
    /// Pin: all its space comes from this container.
    #[serde(default)]
    pub container: Option<String>,
}

/// Where the first write to a shared segment lands (seed 004 c8-11). Either way the old
/// contents are first copied into a newly allocated segment, and only that one segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CowPolicy {
    /// The write lands on the new segment, which the vdisk maps from then on; snapshots
    /// and clones keep the original (004 c8).
    #[default]
    Redirect,
    /// The write lands on the original segment, which the vdisk keeps; every snapshot and
    /// clone that shared it is moved to the new segment holding the old data (004 c10).
    CopyOut,
}

impl CowPolicy {
    pub fn name(self) -> &'static str {
        match self {
            CowPolicy::Redirect => "redirect",
            CowPolicy::CopyOut => "copy-out",
        }
    }
}

impl std::fmt::Display for CowPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CowPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<CowPolicy, String> {
        match s {
            "redirect" => Ok(CowPolicy::Redirect),
            "copy-out" => Ok(CowPolicy::CopyOut),
            _ => Err(format!(
                "unknown copy-on-write policy '{s}': use redirect or copy-out"
            )),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateSnapshot {
    pub name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CloneVdisk {
    /// The snapshot to clone, `VDISK@SNAP`.
    pub source: String,
    pub name: String,
    #[serde(default)]
    pub cow: Option<CowPolicy>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rollback {
    pub snapshot: String,
}

/// A read-only, point-in-time copy of a vdisk's table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotView {
    /// `VDISK@SNAP`: also its NBD export name.
    pub name: String,
    pub vdisk: String,
    pub snapshot: String,
    pub id: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub size: u64,
    /// Bytes of container space it maps (shared or not).
    pub allocated: u64,
    /// Bytes that only it maps: what deleting it frees.
    pub unique: u64,
    /// How long I/O to the vdisk was held while the snapshot was taken (create only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_ms: Option<f64>,
}

/// One virtual byte range whose mapping differs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffRange {
    pub offset: u64,
    pub length: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiffView {
    pub from: String,
    pub to: String,
    /// Bytes in all ranges.
    pub changed: u64,
    pub ranges: Vec<DiffRange>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResizeVdisk {
    pub size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddContainer {
    pub name: String,
    /// A file or block device path, or an NBD URI (`nbd://host:port/export`).
    pub path: String,
    /// Size to create or grow the file to; `None` uses the existing file's size.
    pub size: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VdiskView {
    pub name: String,
    pub id: u64,
    pub size: u64,
    pub segment_size: u64,
    /// Bytes of container space mapped by this vdisk.
    pub allocated: u64,
    pub entries: usize,
    pub generation: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub cow: CowPolicy,
    /// The snapshot it was cloned from, if it is a clone (it does not depend on it).
    #[serde(default)]
    pub origin: Option<String>,
    /// Its snapshots, by snapshot name.
    #[serde(default)]
    pub snapshots: Vec<String>,
    /// Bytes of its mapped space shared with snapshots or clones.
    #[serde(default)]
    pub shared: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapEntryView {
    /// Virtual byte range.
    pub offset: u64,
    pub length: u64,
    pub state: String,
    pub container: Option<String>,
    /// Byte offset inside the container.
    pub physical_offset: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapView {
    pub name: String,
    pub size: u64,
    pub generation: u64,
    pub entries: Vec<MapEntryView>,
}

impl MapView {
    pub fn entry_view(e: &Entry, container_name: Option<String>) -> MapEntryView {
        let bs = tabula_core::BLOCK_SIZE;
        MapEntryView {
            offset: e.begin * bs,
            length: e.len() * bs,
            state: e.state.name().to_string(),
            container: container_name,
            physical_offset: e.target.map(|t| t.block * bs),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerView {
    pub name: String,
    pub id: u32,
    /// File or block device path, or NBD URI.
    pub path: String,
    /// "file", "block" or "nbd".
    #[serde(default)]
    pub kind: String,
    /// "ok", "failed" (nobody can reach it: its I/O fails until it answers again) or
    /// "draining".
    #[serde(default)]
    pub state: String,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// For how long it has been failed.
    #[serde(default)]
    pub failed_for_ms: Option<u64>,
    /// Connected agents that reach it.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Agents whose path to it is down while the controller reaches it (`agent: error`).
    #[serde(default)]
    pub unreachable_from: Vec<String>,
    pub size: u64,
    pub used: u64,
    pub free: u64,
    /// Freed space not yet zeroed (it becomes free once zeroed).
    pub zeroing: u64,
    /// Free space under the low-space threshold.
    #[serde(default)]
    pub low_space: bool,
    /// Its drain, running or finished, if one was started since the controller started.
    #[serde(default)]
    pub drain: Option<MoveView>,
}

/// A live move of data: a container's drain or a vdisk's migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MoveView {
    /// "drain" or "migrate".
    pub kind: String,
    /// The container drained or the vdisk migrated.
    pub subject: String,
    /// The container migrated to.
    pub target: Option<String>,
    /// "running", "done", "cancelled" or "failed".
    pub state: String,
    pub error: Option<String>,
    /// Bytes to move (an estimate: hosts keep writing meanwhile).
    pub total: u64,
    pub moved: u64,
    pub elapsed_ms: u64,
    /// Bytes per second so far.
    pub rate: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrateVdisk {
    /// The container to move it into.
    pub to: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentView {
    pub name: String,
    pub vdisks: Vec<String>,
    /// "in-process" (inside `tabula serve`) or "grpc".
    pub transport: String,
    /// Whether its session is up.
    pub connected: bool,
    /// The address its session registered from (`None` for an in-process agent).
    #[serde(default)]
    pub address: Option<String>,
    /// Time left on its lease; `None` for an in-process agent, which needs none.
    pub lease_ms_left: Option<u64>,
    pub tables: Vec<AgentTableView>,
    pub table_mismatches: u64,
    pub gaps_healed: u64,
}

/// One table copy an agent holds, as it last reported it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentTableView {
    pub vdisk: String,
    /// The generation of the agent's copy, as last reported (`None` before its first
    /// report).
    pub generation: Option<u64>,
    /// The generation of the controller's table.
    pub controller_generation: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusView {
    pub capacity: u64,
    pub allocated: u64,
    pub free: u64,
    pub zeroing: u64,
    pub vdisks: usize,
    pub provisioned: u64,
    pub containers: Vec<ContainerView>,
    pub agents: Vec<AgentView>,
    /// Set while allocating writes are failing for lack of space.
    pub out_of_space: bool,
    /// Allocatable free space is under the low-space threshold.
    #[serde(default)]
    pub low_space: bool,
    /// Allocation faults refused with ENOSPC since start.
    pub enospc_faults: u64,
    pub data_dir: String,
    /// With high availability: every controller of the control plane.
    #[serde(default)]
    pub controllers: Vec<ControllerView>,
}

/// One controller of a highly available control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerView {
    pub name: String,
    /// Its admin API and agents' address.
    pub api: String,
    /// `leader` or `standby`.
    pub role: String,
    /// The last metadata record durable in its store.
    pub applied: u64,
    /// The leader's epoch (0 for a standby).
    pub epoch: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckView {
    pub ok: bool,
    pub problems: Vec<String>,
    pub containers: usize,
    pub vdisks: usize,
    pub entries: usize,
    /// Bytes of distinct container space mapped (shared space counted once).
    pub mapped: u64,
    /// Of `mapped`, bytes mapped by more than one table (snapshots, clones).
    #[serde(default)]
    pub shared: u64,
    pub free: u64,
    pub zeroing: u64,
    /// Bytes reserved for copies-on-write in progress.
    #[serde(default)]
    pub copying: u64,
    /// Containers whose label was read and matches the pool and the container.
    #[serde(default)]
    pub labels: usize,
    /// What was not checked and why, but is no error: containers added before labels,
    /// containers not reachable now.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// The body of every admin API error.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}
