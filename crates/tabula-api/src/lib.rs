//! The interfaces between tabula's parts, and the messages they exchange.
//!
//! ```text
//!            admin (CLI, HTTP JSON)
//!                     |
//!               +-----v------+   ControlPlane: open, fault, container   +---------+
//!               | controller | <--------------------------------------- |  agent  | <-- NBD hosts
//!               +------------+ ---------------------------------------> +---------+
//!                                AgentPort: update, replace, detach          |
//!                                                                   direct I/O to containers
//! ```
//!
//! `tabula serve` connects the two with in-process implementations of these traits; the
//! distributed daemons carry the same messages over the network. Agents never see the
//! controller's store, and the controller is never in the data path.
#![forbid(unsafe_code)]

pub mod admin;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tabula_core::{ContainerId, Entry, Generation, State, VdiskId};

/// An error and its causes as one line (`outer: cause: root cause`), for errors that cross
/// to another part as text.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How an agent reaches a container's bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerLocation {
    pub id: ContainerId,
    pub name: String,
    /// A local file (or block device) path.
    pub path: String,
    pub size_bytes: u64,
}

/// A full copy of one vdisk's table, as sent when an agent attaches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSnapshot {
    pub vdisk: VdiskId,
    pub name: String,
    pub size_bytes: u64,
    pub segment_blocks: u64,
    pub generation: Generation,
    pub read_only: bool,
    pub entries: Vec<Entry>,
}

/// The operation an inhibited I/O was attempting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultOp {
    Read,
    Write,
    Trim,
    /// Write zeroes that may deallocate (NBD WRITE_ZEROES without NO_HOLE).
    WriteZeroes,
}

/// An I/O the agent's table does not allow: it names the operation, the vdisk, the segment
/// range and the state that inhibited it (seed 002 c28-33).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub agent: String,
    pub vdisk: VdiskId,
    pub op: FaultOp,
    /// Segment indexes `[begin, end)`.
    pub segments: (u64, u64),
    pub state: State,
    /// The generation of the agent's copy when it faulted.
    pub generation: Generation,
}

/// The controller's answer to a fault: the authoritative entries of the block range covered by
/// the faulted segments (and any extra segments allocated ahead), to install in place of
/// whatever the agent had there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeUpdate {
    pub vdisk: VdiskId,
    pub generation: Generation,
    /// Block range `[begin, end)` that `entries` describe completely (gaps are unmapped).
    pub range: (u64, u64),
    pub entries: Vec<Entry>,
}

/// Commands from the controller to an agent. The agent acknowledges only after no I/O that
/// could still use a superseded entry is in flight, which is what makes freeing safe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Update(RangeUpdate),
    Replace(TableSnapshot),
    /// Stop exporting the vdisk: it was deleted.
    Detach {
        vdisk: VdiskId,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ControlError {
    #[error(
        "no free space left in the pool: add a container (tabula container add) or free space (delete vdisks, trim)"
    )]
    NoSpace,
    #[error("{0} not found")]
    NotFound(String),
    /// Something with that name or path already exists; the message says what and what to do.
    #[error("{0}")]
    Exists(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("controller unavailable: {0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Storage(String),
}

/// What an agent asks of the controller.
#[async_trait::async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    /// Registers an agent and the port the controller commands it through.
    async fn register_agent(
        &self,
        name: &str,
        port: Arc<dyn AgentPort>,
    ) -> Result<(), ControlError>;
    /// Attaches `agent` to a vdisk by name and returns its full table.
    async fn open_vdisk(&self, agent: &str, name: &str) -> Result<TableSnapshot, ControlError>;
    /// Names of the vdisks an agent may export.
    async fn list_vdisks(&self) -> Result<Vec<String>, ControlError>;
    /// Where a container's bytes are.
    async fn container(&self, id: ContainerId) -> Result<ContainerLocation, ControlError>;
    /// Resolves an inhibited I/O.
    async fn fault(&self, fault: Fault) -> Result<RangeUpdate, ControlError>;
}

/// What the controller asks of an agent.
#[async_trait::async_trait]
pub trait AgentPort: Send + Sync + 'static {
    /// Applies a command; returns once no in-flight I/O can use what it superseded.
    async fn apply(&self, command: Command) -> Result<(), String>;
}
