//! Storage containers: the stores that physical segments live in, addressed by byte offset.
//!
//! A container is one of three kinds behind the one blocking type [`Container`]:
//! - a local **file** (sparse, grown on demand);
//! - a local **block device** (reads and writes that are aligned to its logical block size go
//!   through a second descriptor opened with `O_DIRECT`, so they bypass the page cache);
//! - a remote **NBD export** (any NBD server), reached through a small pool of blocking
//!   client connections that reconnect by themselves after a failure.
//!
//! Both the agent (data I/O) and the controller (zeroing freed space) use it, so the rules for
//! durable I/O live in one place:
//! - a write is durable after [`Container::sync`] returns (fdatasync, or NBD flush);
//! - [`Container::zero`] deallocates (punches a hole, or NBD write-zeroes) where it can, so
//!   freed space reads as zeros and costs nothing, and writes zeros where it cannot;
//! - a container answers if [`Container::probe`] (first block read, then flush) succeeds;
//!   `Prober` (feature `tokio`) runs it on tokio's blocking pool under a timeout.
//!
//! Remote I/O blocks for up to [`ContainerOptions::io_timeout`] (more when a failed request
//! is retried on a new connection); [`Container::is_remote`] tells callers to keep it off
//! async worker threads.
#![forbid(unsafe_code)]

pub mod label;
mod local;
mod nbd;

#[cfg(feature = "export")]
pub mod export;
// Tests use it too (tokio is a dev-dependency).
#[cfg(any(test, feature = "tokio"))]
mod probe;
#[cfg(any(test, feature = "tokio"))]
pub use probe::{Prober, probe_within};

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub use tabula_nbd::client::{
    ClientError, DEFAULT_PORT as NBD_DEFAULT_PORT, NbdAddr, NbdUri, NbdUriError,
};

pub use local::AlignedBuf;
use local::Local;
use nbd::Remote;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("cannot open container {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot size container {path} to {size} bytes")]
    Resize {
        path: PathBuf,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "container {path} is {actual} bytes, smaller than the {expected} bytes recorded; was it truncated?"
    )]
    TooSmall {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error(
        "container {path} is neither a regular file nor a block device; give a file, a block device or an NBD URI"
    )]
    NotStorage { path: PathBuf },
    #[error("cannot open NBD container {uri}")]
    Remote {
        uri: String,
        #[source]
        source: ClientError,
    },
    #[error(
        "NBD container {uri} is a read-only export, but tabula writes to its containers; serve it writable"
    )]
    ReadOnly { uri: String },
}

/// A container location that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    #[error(
        "empty container location; give a file or block device path, or an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
    )]
    Empty,
    #[error(transparent)]
    Nbd(#[from] NbdUriError),
}

/// Where a container lives: a local path (file or block device) or a remote NBD export.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    Path(PathBuf),
    Nbd(NbdUri),
}

impl Location {
    /// `nbd://...` and `nbd+unix://...` are NBD URIs; anything else is a path.
    pub fn parse(s: &str) -> Result<Location, LocationError> {
        if s.is_empty() {
            return Err(LocationError::Empty);
        }
        if NbdUri::is_nbd_uri(s) {
            return Ok(Location::Nbd(s.parse()?));
        }
        Ok(Location::Path(PathBuf::from(s)))
    }
}

impl FromStr for Location {
    type Err = LocationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Location::parse(s)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Path(p) => write!(f, "{}", p.display()),
            Location::Nbd(u) => write!(f, "{u}"),
        }
    }
}

/// How containers are opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerOptions {
    /// Remote containers: bound on connecting and on each wait for the server. Local I/O is
    /// not bounded by it.
    pub io_timeout: Duration,
}

impl Default for ContainerOptions {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_secs(5),
        }
    }
}

/// What a container is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContainerKind {
    File,
    BlockDevice,
    Nbd,
}

impl ContainerKind {
    /// "file", "block" or "nbd".
    pub fn name(self) -> &'static str {
        match self {
            ContainerKind::File => "file",
            ContainerKind::BlockDevice => "block",
            ContainerKind::Nbd => "nbd",
        }
    }
}

impl fmt::Display for ContainerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An open container of any kind. `Send + Sync`: share it behind an `Arc`.
pub struct Container {
    location: Location,
    /// The location as a path, for callers that print `path()` (an NBD URI as a path).
    path: PathBuf,
    backend: Backend,
}

enum Backend {
    Local(Local),
    Nbd(Remote),
}

impl fmt::Debug for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Container")
            .field("kind", &self.kind())
            .field("location", &self.location.to_string())
            .finish()
    }
}

/// Lets helpers such as the probes take a container or anything that holds one.
impl AsRef<Container> for Container {
    fn as_ref(&self) -> &Container {
        self
    }
}

impl Container {
    fn local(path: &Path, local: Local) -> Container {
        Container {
            location: Location::Path(path.to_path_buf()),
            path: path.to_path_buf(),
            backend: Backend::Local(local),
        }
    }

    /// Creates `path` as a sparse file of `size` bytes, or grows an existing smaller file.
    /// Never shrinks: that would destroy mapped data. (An existing block device is opened
    /// and must already be at least `size` bytes.)
    /// A file this call created is removed again if it cannot get its size: a failed create
    /// leaves nothing behind.
    pub fn create(path: &Path, size: u64) -> Result<Container, ContainerError> {
        let existed = std::fs::symlink_metadata(path).is_ok();
        let (local, len) = Local::open(path, true)?;
        if len < size {
            if local.is_block_device() {
                return Err(ContainerError::TooSmall {
                    path: path.to_path_buf(),
                    actual: len,
                    expected: size,
                });
            }
            if let Err(source) = local.grow(size) {
                if !existed {
                    drop(local);
                    let _ = std::fs::remove_file(path);
                }
                return Err(ContainerError::Resize {
                    path: path.to_path_buf(),
                    size,
                    source,
                });
            }
        }
        Ok(Self::local(path, local))
    }

    /// Opens an existing file or block device and checks it still has the recorded size.
    pub fn open(path: &Path, expected_size: u64) -> Result<Container, ContainerError> {
        let (local, actual) = Local::open(path, false)?;
        if actual < expected_size {
            return Err(ContainerError::TooSmall {
                path: path.to_path_buf(),
                actual,
                expected: expected_size,
            });
        }
        Ok(Self::local(path, local))
    }

    /// Opens a container of any kind and checks it has at least `expected_size` bytes.
    /// Remote containers are connected to (within `opts.io_timeout`) and must be writable.
    pub fn open_location(
        location: &Location,
        expected_size: u64,
        opts: &ContainerOptions,
    ) -> Result<Container, ContainerError> {
        match location {
            Location::Path(p) => Self::open(p, expected_size),
            Location::Nbd(uri) => {
                let remote = Remote::open(uri, expected_size, opts)?;
                Ok(Container {
                    location: location.clone(),
                    path: PathBuf::from(uri.to_string()),
                    backend: Backend::Nbd(remote),
                })
            }
        }
    }

    pub fn kind(&self) -> ContainerKind {
        match &self.backend {
            Backend::Local(l) if l.is_block_device() => ContainerKind::BlockDevice,
            Backend::Local(_) => ContainerKind::File,
            Backend::Nbd(_) => ContainerKind::Nbd,
        }
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Whether I/O crosses the network (and so may block up to the I/O timeout): never run
    /// it inline on an async worker.
    pub fn is_remote(&self) -> bool {
        matches!(self.backend, Backend::Nbd(_))
    }

    /// The path of a local container; for an NBD container, its URI as a path (kept for
    /// messages; prefer [`describe`](Self::describe) or [`location`](Self::location)).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Kind and location, for messages: "file /data/c.img", "block device /dev/sdb",
    /// "NBD export nbd://10.0.0.5:10809/disk0".
    pub fn describe(&self) -> String {
        let what = match self.kind() {
            ContainerKind::File => "file",
            ContainerKind::BlockDevice => "block device",
            ContainerKind::Nbd => "NBD export",
        };
        format!("{what} {}", self.location)
    }

    pub fn len_bytes(&self) -> io::Result<u64> {
        match &self.backend {
            Backend::Local(l) => l.len(),
            Backend::Nbd(r) => Ok(r.size()),
        }
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.backend {
            Backend::Local(l) => l.read_at(buf, offset),
            Backend::Nbd(r) => r.read_at(buf, offset),
        }
    }

    /// Reads exactly `len` bytes at `offset` into a new buffer.
    pub fn read_vec_at(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        match &self.backend {
            Backend::Local(l) => l.read_vec_at(len, offset, &self.path),
            Backend::Nbd(r) => {
                let mut buf = vec![0u8; len];
                r.read_at(&mut buf, offset)?;
                Ok(buf)
            }
        }
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.backend {
            Backend::Local(l) => l.write_at(buf, offset),
            Backend::Nbd(r) => r.write_at(buf, offset),
        }
    }

    /// Writes `buf` at `offset` and makes just that write durable (`RWF_DSYNC` locally, FUA
    /// remotely) without flushing the rest of the container's cached writes, as a full
    /// `sync` would.
    pub fn write_at_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.backend {
            Backend::Local(l) => l.write_at_durable(buf, offset),
            Backend::Nbd(r) => r.write_at_durable(buf, offset),
        }
    }

    /// `write_at_durable` for a range nothing else reads or writes until it returns (a
    /// copy into space just allocated for it): local files may bypass the page cache.
    pub fn write_fresh_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.backend {
            Backend::Local(l) => l.write_fresh_durable(buf, offset),
            Backend::Nbd(r) => r.write_at_durable(buf, offset),
        }
    }

    /// Makes every completed write durable.
    pub fn sync(&self) -> io::Result<()> {
        match &self.backend {
            Backend::Local(l) => l.sync(),
            Backend::Nbd(r) => r.sync(),
        }
    }

    /// Checks that the container answers: reads its first block, then flushes, so a device
    /// that fails writes or flushes is not taken for healthy because reads still work.
    ///
    /// The flush consumes a pending write-back error (and an NBD container's note of lost
    /// writes): a caller that probes the handle it writes through must itself make sure its
    /// next flush fails if the probe did.
    pub fn probe(&self) -> io::Result<()> {
        // Every container holds at least one 4 KiB block; one that no longer does (a file
        // truncated under it) is not healthy either.
        const FIRST_BLOCK: usize = 4096;
        self.read_vec_at(FIRST_BLOCK, 0)
            .map_err(|e| io::Error::new(e.kind(), format!("reading the first block: {e}")))?;
        self.sync()
            .map_err(|e| io::Error::new(e.kind(), format!("flushing: {e}")))
    }

    /// Makes `[offset, offset+len)` read as zeros and durable.
    pub fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len)?;
        self.sync()
    }

    /// Makes `[offset, offset+len)` read as zeros; durable after the next [`sync`](Self::sync).
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match &self.backend {
            Backend::Local(l) => l.zero_range(offset, len),
            Backend::Nbd(r) => r.zero_range(offset, len),
        }
    }

    /// Writes real zeros (the range stays allocated), in 1 MiB pieces.
    pub fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros_with(offset, len, |buf, pos| self.write_at(buf, pos))
    }
}

/// Writes `len` zero bytes at `offset` through `write`, in pieces of at most 1 MiB.
fn write_zeros_with(
    offset: u64,
    len: u64,
    mut write: impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
    let mut pos = offset;
    while pos < end {
        let n = CHUNK.min(end - pos);
        write(&zeros[..n as usize], pos)?;
        pos += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
