//! tabula-nbd: the NBD (Network Block Device) protocol for tabula.
//!
//! * [`consts`]: every protocol constant, named as in the NBD spec.
//! * [`bufpool`]: large I/O buffers reused between requests.
//! * [`codec`]: sans-I/O parsers and encoders plus request validation; no
//!   async runtime needed, so it is what the fuzz targets exercise.
//! * [`server`] (feature `server`, on by default): a tokio server speaking
//!   the fixed-newstyle handshake and the transmission phase on top of the
//!   [`server::Export`] / [`server::ExportProvider`] traits.
//! * [`client`] (feature `client`, on by default): a blocking std-only client
//!   (one request at a time per connection), used for remote containers.
//!
//! Everything on the wire is big-endian; the lints below keep host- or
//! little-endian conversions from slipping in.
#![deny(clippy::host_endian_bytes, clippy::little_endian_bytes)]

pub mod bufpool;
#[cfg(feature = "client")]
pub mod client;
pub mod codec;
pub mod consts;
#[cfg(feature = "server")]
pub mod server;

pub use codec::{Errno, ProtocolError};
