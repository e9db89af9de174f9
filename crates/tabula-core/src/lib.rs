//! Pure types and logic of tabula: sizes, identifiers, mapping tables, entry states,
//! space allocation, sharing of blocks between tables (snapshots, clones) and the metadata
//! invariant checker.
//!
//! **Architecture invariant:** this crate does no I/O, spawns nothing and uses no async
//! runtime, so every rule about tables and space can be tested exhaustively and fuzzed in
//! isolation. The controller and the agent wrap it with storage and sockets.
#![forbid(unsafe_code)]

pub mod alloc;
pub mod check;
pub mod ids;
pub mod refs;
pub mod segtable;
pub mod table;
pub mod units;

pub use alloc::{FreeMap, Pool};
pub use ids::{ContainerId, Generation, VdiskId};
pub use refs::{SharedBlocks, SharedRun};
pub use segtable::SegmentTable;
pub use table::{Entry, MappingTable, Phys, Piece, State};
pub use units::{
    BLOCK_SIZE, DEFAULT_SEGMENT_SIZE, LimitError, MAX_CONTAINER_SIZE, MAX_SEGMENT_SIZE,
    MAX_VDISK_SIZE, MIN_SEGMENT_SIZE, Quantity, check_container_size, check_segment_size,
    check_vdisk_geometry, check_vdisk_size, format_size, format_size_exact, parse_size,
};
