//! A [`Container`] served as an NBD export (feature `export`): what
//! `tabula container serve` runs, so a file or block device on one host can be a remote
//! container for agents on others.
//!
//! Every request runs on tokio's blocking pool (container I/O blocks). All connections share
//! the one container, so a flush on any of them covers writes completed on all: the export
//! advertises multi-conn.

use std::io;
use std::sync::Arc;

use tabula_nbd::server::{Errno, Export, ExportInfo, IoError, StatusExtent, ZeroFlags};

use crate::Container;

/// One container as an NBD export.
pub struct ContainerExport {
    container: Arc<Container>,
    info: ExportInfo,
}

impl ContainerExport {
    /// Exports all of `container` (its current size), read-write unless `read_only`.
    pub fn new(container: Arc<Container>, read_only: bool) -> io::Result<ContainerExport> {
        let mut info = ExportInfo::new(container.len_bytes()?);
        info.read_only = read_only;
        info.description = Some(container.describe());
        info.can_multi_conn = true;
        Ok(ContainerExport { container, info })
    }

    pub fn container(&self) -> &Arc<Container> {
        &self.container
    }

    /// Runs blocking container I/O off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Container) -> io::Result<T> + Send + 'static,
    ) -> Result<T, IoError> {
        let c = self.container.clone();
        match tokio::task::spawn_blocking(move || f(&c)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(to_nbd(what, &e)),
            Err(e) => Err(IoError::new(Errno::Io, format!("{what}: {e}"))),
        }
    }
}

/// The nearest NBD errno for an I/O error.
fn to_nbd(what: &str, e: &io::Error) -> IoError {
    let errno = match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => Errno::Perm,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Errno::NoSpc,
        io::ErrorKind::InvalidInput => Errno::Inval,
        io::ErrorKind::Unsupported => Errno::NotSup,
        io::ErrorKind::OutOfMemory => Errno::NoMem,
        _ => Errno::Io,
    };
    IoError::new(errno, format!("{what}: {e}"))
}

#[async_trait::async_trait]
impl Export for ContainerExport {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        self.blocking("read", move |c| c.read_vec_at(len as usize, offset))
            .await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), IoError> {
        self.blocking("write", move |c| {
            c.write_at(&data, offset)?;
            if fua { c.sync() } else { Ok(()) }
        })
        .await
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.blocking("flush", |c| c.sync()).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        // Trimmed space reads as zeros here (punched holes), which the spec allows.
        self.blocking("trim", move |c| {
            c.zero_range(offset, u64::from(len))?;
            if fua { c.sync() } else { Ok(()) }
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.blocking("write zeroes", move |c| {
            if flags.no_hole {
                c.write_zeros(offset, u64::from(len))?;
            } else {
                c.zero_range(offset, u64::from(len))?;
            }
            if flags.fua { c.sync() } else { Ok(()) }
        })
        .await
    }

    async fn block_status(&self, _offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        // No allocation map is tracked: report the range as plain data (always correct).
        Ok(vec![StatusExtent {
            length: len,
            flags: 0,
        }])
    }
}
