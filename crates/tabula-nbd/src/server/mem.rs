//! In-memory reference implementations of [`Export`] and
//! [`ExportProvider`], used by this crate's tests, the fuzz targets and any
//! caller that needs a throwaway export.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{
    Errno, Export, ExportInfo, ExportProvider, IoError, OpenError, StatusExtent, ZeroFlags,
};
use crate::consts::NBD_STATE_ZERO;

/// Granularity at which [`MemExport::block_status`] reports zero ranges.
const STATUS_GRANULE: usize = 512;

/// A `Vec<u8>` behind a mutex. Block status reports all-zero 512-byte
/// granules as `NBD_STATE_ZERO`.
pub struct MemExport {
    info: ExportInfo,
    data: Mutex<Vec<u8>>,
}

impl MemExport {
    /// A zero-filled export described by `info` (`info.size` bytes are
    /// allocated, so keep it small).
    pub fn new(info: ExportInfo) -> Self {
        let size = usize::try_from(info.size).unwrap_or(usize::MAX);
        Self {
            data: Mutex::new(vec![0; size]),
            info,
        }
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panicking writer cannot leave the Vec structurally broken.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, IoError> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.info.size)
            .ok_or_else(|| IoError::new(Errno::Inval, "range beyond end of export"))?;
        Ok(offset as usize..end as usize)
    }
}

#[async_trait::async_trait]
impl Export for MemExport {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        let r = self.range(offset, u64::from(len))?;
        Ok(self.lock()[r].to_vec())
    }

    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> Result<(), IoError> {
        if self.info.read_only {
            return Err(IoError::new(Errno::Perm, "read-only"));
        }
        let r = self.range(offset, data.len() as u64)?;
        self.lock()[r].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> Result<(), IoError> {
        // Trimmed data reads back as zeroes here (allowed: any content is).
        self.write_zeroes(offset, len, ZeroFlags::default()).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, _flags: ZeroFlags) -> Result<(), IoError> {
        if self.info.read_only {
            return Err(IoError::new(Errno::Perm, "read-only"));
        }
        let r = self.range(offset, u64::from(len))?;
        self.lock()[r].fill(0);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        let r = self.range(offset, u64::from(len))?;
        let data = self.lock();
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut pos = r.start;
        while pos < r.end {
            // Granules are aligned to absolute offsets.
            let next = ((pos / STATUS_GRANULE) + 1) * STATUS_GRANULE;
            let end = next.min(r.end);
            let flags = if data[pos..end].iter().all(|&b| b == 0) {
                NBD_STATE_ZERO
            } else {
                0
            };
            let l = (end - pos) as u32;
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += l,
                _ => out.push(StatusExtent { length: l, flags }),
            }
            pos = end;
        }
        Ok(out)
    }
}

/// A fixed set of named exports.
#[derive(Default)]
pub struct StaticProvider {
    exports: BTreeMap<String, Arc<dyn Export>>,
}

impl StaticProvider {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) export `name`.
    pub fn with(mut self, name: impl Into<String>, export: Arc<dyn Export>) -> Self {
        self.exports.insert(name.into(), export);
        self
    }
}

#[async_trait::async_trait]
impl ExportProvider for StaticProvider {
    async fn list(&self) -> Vec<String> {
        self.exports.keys().cloned().collect()
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn Export>, OpenError> {
        self.exports.get(name).cloned().ok_or(OpenError::NotFound)
    }
}
