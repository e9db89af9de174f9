//! The tabula controller: sole owner of the authoritative mapping tables.
//!
//! - [`store`]: persistence in redb (what is durable and when);
//! - [`journal`]: group commit: one ordered queue of changes, one fsync per batch;
//! - [`wal`]: the redo log that makes a batch durable without a database commit;
//! - [`service`]: vdisks, containers, allocation and fault resolution, agent commands;
//! - [`agents`]: agent sessions, leases, and the push of table commands;
//! - [`grpc`]: the agents' channel (tonic), served on the admin API's port;
//! - [`http`]: the admin API (JSON over HTTP) used by the CLI;
//! - [`ha`]: several controllers on etcd: election, the replicated log, standbys;
//! - [`check`]: the offline metadata check behind `tabula check`;
//! - [`label`]: the label in every container naming its pool and itself.
//!
//! **Architecture invariant:** the controller is never in the data path. It answers faults
//! and commands agents; bytes flow between hosts and containers through agents only.
#![forbid(unsafe_code)]

pub mod agents;
pub mod check;
pub mod grpc;
pub mod ha;
pub mod http;
pub mod journal;
pub use tabula_container::label;
pub mod service;
pub mod store;
pub mod wal;

pub use service::{Controller, ControllerConfig, ControllerError, TestPauses};
