//! Requests and views of the admin API (the CLI and operators' scripts speak these as JSON).

use serde::{Deserialize, Serialize};
use tabula_core::Entry;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateVdisk {
    pub name: String,
    pub size: u64,
    pub segment_size: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResizeVdisk {
    pub size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddContainer {
    pub name: String,
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
    pub path: String,
    pub size: u64,
    pub used: u64,
    pub free: u64,
    /// Freed space not yet zeroed (it becomes free once zeroed).
    pub zeroing: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentView {
    pub name: String,
    pub vdisks: Vec<String>,
    /// "in-process" (inside `tabula serve`) or "grpc".
    pub transport: String,
    /// Whether its session is up.
    pub connected: bool,
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
    /// Allocation faults refused with ENOSPC since start.
    pub enospc_faults: u64,
    pub data_dir: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckView {
    pub ok: bool,
    pub problems: Vec<String>,
    pub containers: usize,
    pub vdisks: usize,
    pub entries: usize,
    pub mapped: u64,
    pub free: u64,
    pub zeroing: u64,
}

/// The body of every admin API error.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}
