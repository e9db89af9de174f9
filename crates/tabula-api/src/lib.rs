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
use tabula_core::{ContainerId, Entry, Generation, Phys, State, VdiskId};

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
    /// Where the bytes are: a local file or block device path, or an NBD URI
    /// (`nbd://host:port/export`, `nbd+unix:///export?socket=PATH`); see
    /// `tabula_container::Location`.
    pub path: String,
    pub size_bytes: u64,
    /// Why nobody can reach it, while it is failed (`None`: it answers). An agent that was
    /// away when `Command::ContainerHealth` went out learns the state from here.
    #[serde(default)]
    pub failed: Option<String>,
    /// The pool id its label must name (with `id`): an agent checks it on opening the
    /// container and refuses I/O to anything else at that path. 0 for a container added
    /// before labels, which has none.
    #[serde(default)]
    pub pool_id: u64,
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

/// What a vdisk is, without its table: enough to describe it to an NBD client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiskSummary {
    pub vdisk: VdiskId,
    pub name: String,
    pub size_bytes: u64,
    pub read_only: bool,
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
    /// Not an inhibited I/O: the agent has done the copies a write fault's answer asked
    /// for (`Fault::copied`) and made them durable; the controller may now switch tables.
    Copied,
}

/// Copy-on-write of one segment (seed 004 c8-11): copy the data of `from` (the segment's
/// current entries; unmapped parts are zeros and need no copy) into the newly allocated run
/// at `to`, make it durable, and report it back (`FaultOp::Copied`). Until the controller
/// answers that report, nothing may write to `to` but the copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CowCopy {
    /// Segment index.
    pub segment: u64,
    pub from: Vec<Entry>,
    /// First block of the new run; it covers the segment's blocks in order.
    pub to: Phys,
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
    /// With `FaultOp::Copied`: the copies done.
    #[serde(default)]
    pub copied: Vec<CowCopy>,
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
    /// Whether this carries the whole of the change that produced `generation` (rather than
    /// a view of a range at that generation): agents count these to detect gaps.
    pub change: bool,
    /// Copies to do before the write may proceed (copy-on-write); then report them with a
    /// `FaultOp::Copied` fault and install its answer.
    #[serde(default)]
    pub copies: Vec<CowCopy>,
}

/// Commands from the controller to an agent. The agent acknowledges only after no I/O that
/// could still use a superseded entry is in flight, which is what makes freeing safe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Install these entries for the range; they may remove or downgrade mappings.
    Update(RangeUpdate),
    /// Mappings another agent's write fault allocated: they only fill gaps, so they may be
    /// merged out of order (like fault answers) and need no drain.
    Allocated(RangeUpdate),
    /// Set the state of every mapped entry in a block range (mappings stay as they are).
    SetState {
        vdisk: VdiskId,
        generation: Generation,
        range: (u64, u64),
        state: State,
    },
    /// Replace the whole table: on resize, and periodically to heal any divergence.
    Replace(TableSnapshot),
    /// Hold new I/O to the vdisk and acknowledge once in-flight I/O has drained. If no
    /// `Unblock` comes within `timeout_ms`, the agent drops its copy and resynchronises
    /// before serving again (the controller may have died mid-change).
    Block { vdisk: VdiskId, timeout_ms: u64 },
    /// Release I/O held by `Block`.
    Unblock { vdisk: VdiskId },
    /// Stop exporting the vdisk: it was deleted.
    Detach { vdisk: VdiskId },
    /// A container failed (nobody, the controller included, can reach it) or recovered.
    /// While failed, I/O to it fails at once instead of waiting for a timeout.
    ContainerHealth {
        container: ContainerId,
        failed: bool,
        reason: String,
    },
}

impl Command {
    /// The vdisk the command is for (`None` for commands about the whole agent).
    pub fn vdisk(&self) -> Option<VdiskId> {
        match self {
            Command::Update(u) | Command::Allocated(u) => Some(u.vdisk),
            Command::Replace(s) => Some(s.vdisk),
            Command::SetState { vdisk, .. }
            | Command::Block { vdisk, .. }
            | Command::Unblock { vdisk }
            | Command::Detach { vdisk } => Some(*vdisk),
            Command::ContainerHealth { .. } => None,
        }
    }
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
    /// Refused while something uses it (NBD clients connected to a vdisk being deleted); the
    /// message names the users and how to proceed anyway.
    #[error("{0}")]
    InUse(String),
    #[error("controller unavailable: {0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Storage(String),
    /// Not now: try the same request again after the delay (the controller is finishing a
    /// change it cannot yet complete safely, such as its restart grace period).
    #[error("busy, retry in {after_ms} ms: {reason}")]
    Retry { after_ms: u64, reason: String },
}

/// What an agent reports of the table copies it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    /// Each held vdisk and the generation of the agent's copy.
    pub tables: Vec<(VdiskId, Generation)>,
    /// Periodic replacements that found the copy different from the controller's table at
    /// the same generation (each is logged by the agent).
    pub table_mismatches: u64,
    /// Gaps in the received generations that were healed by fetching the whole table.
    pub gaps_healed: u64,
    /// NBD connections open to each vdisk (and snapshot) it exports; only non-zero counts.
    #[serde(default)]
    pub connections: Vec<(VdiskId, u32)>,
}

/// What an agent asks of the controller.
#[async_trait::async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    /// Registers an agent and the port the controller commands it through. `held` lists the
    /// vdisks it still has table copies of (from a previous session): the controller counts
    /// them as held from this moment, and the agent re-opens each before using it again.
    async fn register_agent(
        &self,
        name: &str,
        port: Arc<dyn AgentPort>,
        held: Vec<VdiskId>,
    ) -> Result<(), ControlError>;
    /// Attaches `agent` to a vdisk by name and returns its full table.
    async fn open_vdisk(&self, agent: &str, name: &str) -> Result<TableSnapshot, ControlError>;
    /// Names of the vdisks an agent may export.
    async fn list_vdisks(&self) -> Result<Vec<String>, ControlError>;
    /// Describes a vdisk by name without attaching to it: no table is sent and the agent
    /// does not become one of its holders.
    async fn describe_vdisk(&self, name: &str) -> Result<VdiskSummary, ControlError>;
    /// Where a container's bytes are.
    async fn container(&self, id: ContainerId) -> Result<ContainerLocation, ControlError>;
    /// Resolves an inhibited I/O.
    async fn fault(&self, fault: Fault) -> Result<RangeUpdate, ControlError>;
    /// A container fault: I/O from `agent` to `container` failed or timed out (`error`), or
    /// works again after such a report (`None`). The controller probes the container itself
    /// to tell a failed container from a path that failed only from this agent.
    async fn report_container(
        &self,
        agent: &str,
        container: ContainerId,
        error: Option<String>,
    ) -> Result<(), ControlError>;
}

/// What the controller asks of an agent.
#[async_trait::async_trait]
pub trait AgentPort: Send + Sync + 'static {
    /// Applies a command; returns once no in-flight I/O can use what it superseded.
    async fn apply(&self, command: Command) -> Result<(), String>;
    /// What the agent holds, for `status` (a networked agent reports through heartbeats
    /// instead).
    fn report(&self) -> Option<AgentReport> {
        None
    }
    /// The vdisks the agent holds table copies of (declared when it registers again).
    fn held_vdisks(&self) -> Vec<VdiskId> {
        Vec::new()
    }
    /// A new session with the controller has begun: resynchronise every table copy.
    async fn session_started(&self) {}
    /// Resolves when the report changed in a way the controller should hear of before the
    /// next heartbeat (a client connected or disconnected); never, by default.
    async fn report_changed(&self) {
        std::future::pending::<()>().await
    }
}
