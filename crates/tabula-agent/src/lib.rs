//! The tabula agent: serves its host's I/O over NBD from volatile copies of the controller's
//! tables, doing the I/O itself, directly against the containers.
//!
//! - [`volume`]: one exported vdisk: its table copy, its I/O gate, and the data path;
//! - [`agent`]: the set of volumes and containers, the export provider for the NBD server,
//!   and the command port the controller drives.
//!
//! **Architecture invariant:** the data path never waits for the controller unless the table
//! forbids the I/O (a fault); a fault never holds the I/O gate, so the controller can always
//! drain an agent while it resolves other faults.
#![forbid(unsafe_code)]

pub mod agent;
pub mod lease;
pub mod remote;
pub mod volume;

pub use agent::{Agent, AgentConfig};
