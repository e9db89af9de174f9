//! Tokio NBD server: the fixed-newstyle handshake and the transmission
//! phase for one connection ([`serve_connection`]), plus listening on TCP or
//! Unix sockets ([`bind`], [`serve`]).
//!
//! Block storage is reached through the [`ExportProvider`] and [`Export`]
//! traits, implemented by the agent crate (and by [`mem`] for tests).
//! All wire formats come from [`crate::codec`]; this module only sequences
//! them, so malformed client input can end a connection but never panic.

mod conn;
mod listen;
pub mod mem;

use std::sync::Arc;
use std::time::Duration;

pub use crate::codec::Errno;
use crate::codec::ProtocolError;
pub use conn::serve_connection;
pub use listen::{ListenAddr, ListenAddrError, Listener, bind, serve};

/// Limits and advertised sizes of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Advertised maximum block size (largest READ/WRITE payload).
    pub max_payload: u32,
    /// Concurrent requests per connection.
    pub max_in_flight: usize,
    /// Payload bytes (write data and read results) in flight per connection. A request
    /// waits for budget before its payload is read or its data produced, so a client
    /// pipelining maximum-size requests cannot make the server buffer
    /// `max_in_flight * max_payload` bytes. Requests larger than the budget run alone.
    pub max_in_flight_bytes: usize,
    /// Option payloads above this close the connection unread.
    pub max_option_len: u32,
    /// Bound on each step of the handshake: sending the greeting and reading the client's
    /// flags, then each option (waiting for it, reading it, answering it). A silent or
    /// stalled client, or one that does not read its replies, is cut off after this. There
    /// is no bound on the whole handshake: a client listing thousands of exports needs long.
    pub option_timeout: Duration,
    /// Options a client may send before it is cut off...
    pub max_options: usize,
    /// ...plus this many for each export in the longest list it was sent (a client that
    /// lists N exports asks about each: INFO, LIST_META_CONTEXT, ...).
    pub options_per_export: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_payload: 32 << 20,
            max_in_flight: 128,
            max_in_flight_bytes: 64 << 20,
            max_option_len: 64 << 10,
            option_timeout: Duration::from_secs(30),
            max_options: 1024,
            options_per_export: 4,
        }
    }
}

/// An errno the server sends to the client, plus a human message (used in
/// structured error chunks and logs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{errno:?}: {message}")]
pub struct IoError {
    pub errno: Errno,
    pub message: String,
}

impl IoError {
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

/// What the handshake tells the client about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub read_only: bool,
    pub description: Option<String>,
    /// Minimum block size (power of two, 1..=64 KiB); reads and writes
    /// must be aligned to it.
    pub min_block: u32,
    /// Preferred block size (power of two, >= max(512, min_block)).
    pub preferred_block: u32,
    pub can_multi_conn: bool,
    pub can_fast_zero: bool,
}

impl ExportInfo {
    /// A writable export of `size` bytes with byte granularity and a 4 KiB
    /// preferred block size.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            read_only: false,
            description: None,
            min_block: 1,
            preferred_block: 4096,
            can_multi_conn: false,
            can_fast_zero: false,
        }
    }
}

/// Flags of `NBD_CMD_WRITE_ZEROES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    pub fua: bool,
    /// The range must end up allocated (no hole).
    pub no_hole: bool,
    /// Fail fast with [`Errno::NotSup`] unless zeroing is cheaper than writing.
    pub fast_zero: bool,
}

/// One `base:allocation` extent: flags 1 = HOLE, 2 = ZERO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub length: u32,
    pub flags: u32,
}

/// One block device served over NBD.
#[async_trait::async_trait]
pub trait Export: Send + Sync + 'static {
    fn info(&self) -> ExportInfo;
    /// Must return exactly `len` bytes.
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError>;
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), IoError>;
    async fn flush(&self) -> Result<(), IoError>;
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError>;
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError>;
    /// Extents covering a prefix (at least one byte) of [offset, offset+len).
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError>;
}

/// Why an export could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// Answered with `NBD_REP_ERR_UNKNOWN`.
    NotFound,
    /// Answered with `NBD_REP_ERR_POLICY` carrying the message.
    Unavailable(String),
}

/// The set of exports a server offers.
#[async_trait::async_trait]
pub trait ExportProvider: Send + Sync + 'static {
    async fn list(&self) -> Vec<String>;
    /// Called for `NBD_OPT_GO` and `NBD_OPT_EXPORT_NAME`; the name may be
    /// empty (the "default" export).
    async fn open(&self, name: &str) -> Result<Arc<dyn Export>, OpenError>;
    /// Called for `NBD_OPT_INFO`: what the export would be, without opening
    /// it for I/O. A provider whose `open` is expensive (an agent attaches
    /// the vdisk) answers from metadata: a client listing exports asks this
    /// of every one. The default opens the export.
    async fn info(&self, name: &str) -> Result<ExportInfo, OpenError> {
        Ok(self.open(name).await?.info())
    }
}

/// Why a connection ended other than by a clean client disconnect.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the client sent no complete option, or did not read the replies, within {0:?}")]
    OptionTimeout(Duration),
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE")]
    NotFixedNewstyle,
    #[error("option payload of {0} bytes exceeds the configured limit")]
    OptionTooLarge(u32),
    #[error("the client sent {0} options without choosing an export")]
    TooManyOptions(usize),
    #[error("NBD_OPT_EXPORT_NAME for unavailable export {0:?}")]
    ExportUnavailable(String),
    #[error("write payload of {0} bytes exceeds the advertised maximum")]
    PayloadTooLarge(u32),
}
