//! Local containers: a regular file, or a block device with an `O_DIRECT` side door.
//!
//! Block devices get a second descriptor opened with `O_DIRECT` when the device accepts it.
//! Reads and writes whose offset and length are multiples of the logical block size use it
//! (no double caching in the page cache); others use the buffered descriptor. The kernel
//! keeps the two coherent (a direct read writes back dirty cached pages of its range first,
//! a direct write invalidates them), and `fdatasync` on the buffered descriptor flushes the
//! device's write cache, which covers direct writes too.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::Mutex;

use rustix::fs::{FallocateFlags, Mode, OFlags, fallocate};

use crate::{ContainerError, write_zeros_with};

/// Memory alignment of direct I/O buffers (a page: enough for every device).
const ALIGN: usize = 4096;
/// Largest bounce buffer; bigger transfers go through it in pieces.
const BOUNCE_MAX: usize = 1 << 20;
/// Bounce buffers kept for reuse.
const BOUNCE_POOL: usize = 16;

pub(crate) struct Local {
    file: File,
    block: Option<BlockDevice>,
}

struct BlockDevice {
    direct: Option<Direct>,
}

struct Direct {
    file: File,
    /// Logical block size: direct I/O offsets and lengths must be multiples of it.
    block: u64,
    bounce: Mutex<Vec<AlignedBuf>>,
}

/// A page-aligned byte buffer without `unsafe`: an over-allocated Vec used from its first
/// aligned address.
struct AlignedBuf {
    v: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new() -> AlignedBuf {
        let v = vec![0u8; BOUNCE_MAX + ALIGN];
        let start = (ALIGN - v.as_ptr() as usize % ALIGN) % ALIGN;
        AlignedBuf { v, start }
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.v[self.start..self.start + len]
    }
}

fn is_aligned(buf: &[u8]) -> bool {
    buf.as_ptr() as usize % ALIGN == 0
}

impl Direct {
    fn fits(&self, offset: u64, len: usize) -> bool {
        len > 0 && offset % self.block == 0 && len as u64 % self.block == 0
    }

    fn take_bounce(&self) -> AlignedBuf {
        let pooled = self.bounce.lock().unwrap_or_else(|e| e.into_inner()).pop();
        pooled.unwrap_or_else(AlignedBuf::new)
    }

    fn give_bounce(&self, b: AlignedBuf) {
        let mut pool = self.bounce.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < BOUNCE_POOL {
            pool.push(b);
        }
    }

    /// Runs `step(bounce, done)` over `len` bytes in bounce-buffer pieces; each step moves
    /// one piece between the caller's buffer and the bounce buffer and does its I/O.
    fn bounced(
        &self,
        len: usize,
        mut step: impl FnMut(&mut [u8], usize) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut bounce = self.take_bounce();
        let mut done = 0;
        let r = loop {
            if done == len {
                break Ok(());
            }
            let n = (len - done).min(BOUNCE_MAX);
            if let Err(e) = step(bounce.get(n), done) {
                break Err(e);
            }
            done += n;
        };
        self.give_bounce(bounce);
        r
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf) {
            return self.file.read_exact_at(buf, offset);
        }
        self.bounced(buf.len(), |b, done| {
            self.file.read_exact_at(b, offset + done as u64)?;
            buf[done..done + b.len()].copy_from_slice(b);
            Ok(())
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf) {
            return self.file.write_all_at(buf, offset);
        }
        self.bounced(buf.len(), |b, done| {
            b.copy_from_slice(&buf[done..done + b.len()]);
            self.file.write_all_at(b, offset + done as u64)
        })
    }
}

impl Local {
    /// Opens `path` read-write (creating a file if `create`), returning it with its length.
    pub(crate) fn open(path: &Path, create: bool) -> Result<(Local, u64), ContainerError> {
        let err = |source| ContainerError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(err)?;
        let ft = file.metadata().map_err(err)?.file_type();
        if ft.is_file() {
            let len = file.metadata().map_err(err)?.len();
            return Ok((Local { file, block: None }, len));
        }
        if !ft.is_block_device() {
            return Err(ContainerError::NotStorage {
                path: path.to_path_buf(),
            });
        }
        // A block device's metadata says 0 bytes; its end is its size.
        let len = (&file).seek(SeekFrom::End(0)).map_err(err)?;
        let direct = open_direct(path, &file, len);
        let local = Local {
            file,
            block: Some(BlockDevice { direct }),
        };
        Ok((local, len))
    }

    pub(crate) fn is_block_device(&self) -> bool {
        self.block.is_some()
    }

    /// Whether aligned I/O bypasses the page cache (for tests and messages).
    #[cfg(test)]
    pub(crate) fn uses_direct_io(&self) -> bool {
        matches!(&self.block, Some(BlockDevice { direct: Some(_) }))
    }

    fn direct_for(&self, offset: u64, len: usize) -> Option<&Direct> {
        match &self.block {
            Some(BlockDevice { direct: Some(d) }) if d.fits(offset, len) => Some(d),
            _ => None,
        }
    }

    pub(crate) fn grow(&self, size: u64) -> io::Result<()> {
        self.file.set_len(size)?;
        self.file.sync_all()
    }

    pub(crate) fn len(&self) -> io::Result<u64> {
        match self.block {
            Some(_) => (&self.file).seek(SeekFrom::End(0)),
            None => Ok(self.file.metadata()?.len()),
        }
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(d) = self.direct_for(offset, buf.len()) {
            match d.read_at(buf, offset) {
                // EINVAL: the device refused this direct I/O after all; the cache path works.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {}
                r => return r,
            }
        }
        self.file.read_exact_at(buf, offset)
    }

    /// Reads exactly `len` bytes at `offset` into a new buffer, without first zeroing it
    /// (zeroing a 1 MiB buffer costs about as much as copying it from the page cache).
    pub(crate) fn read_vec_at(&self, len: usize, offset: u64, path: &Path) -> io::Result<Vec<u8>> {
        if self.direct_for(offset, len).is_some() {
            let mut buf = vec![0u8; len];
            self.read_at(&mut buf, offset)?;
            return Ok(buf);
        }
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        // `spare_capacity` reads into all the spare room; it must be exactly `len` so no byte
        // beyond the requested range is read. `with_capacity` gives exactly that for bytes,
        // but fall back to a zeroed buffer should an allocator ever round up.
        if buf.capacity() != len {
            buf.resize(len, 0);
            self.file.read_exact_at(&mut buf, offset)?;
            return Ok(buf);
        }
        while buf.len() < len {
            let pos = offset + buf.len() as u64;
            let n = rustix::io::pread(&self.file, rustix::buffer::spare_capacity(&mut buf), pos)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("container {} ends before offset {pos}", path.display()),
                ));
            }
        }
        Ok(buf)
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(d) = self.direct_for(offset, buf.len()) {
            match d.write_at(buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {}
                r => return r,
            }
        }
        self.file.write_all_at(buf, offset)
    }

    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub(crate) fn write_at_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.direct_for(offset, buf.len()).is_some() {
            // Direct writes go through their own (maybe bounced) path; flushing the device's
            // cache after them is what makes them durable.
            self.write_at(buf, offset)?;
            return self.sync();
        }
        // RWF_DSYNC: the kernel writes back and flushes just this range (with the metadata
        // needed to read it back), like O_DSYNC for this one write.
        let mut done = 0;
        while done < buf.len() {
            let n = rustix::io::pwritev2(
                &self.file,
                &[io::IoSlice::new(&buf[done..])],
                offset + done as u64,
                rustix::io::ReadWriteFlags::DSYNC,
            )?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += n;
        }
        Ok(())
    }

    pub(crate) fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if fallocate(&self.file, punch, offset, len).is_ok() {
            return Ok(());
        }
        // A block device that cannot discard-and-zero may still zero efficiently (write
        // zeroes offload); files whose file system punches no holes just get zeros written.
        if self.block.is_some() {
            let zero = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
            if fallocate(&self.file, zero, offset, len).is_ok() {
                return Ok(());
            }
        }
        write_zeros_with(offset, len, |buf, pos| self.write_at(buf, pos))
    }
}

/// Opens the `O_DIRECT` descriptor of a block device and checks that it really works (some
/// devices accept the flag and then refuse the I/O); `None` means buffered I/O only.
fn open_direct(path: &Path, buffered: &File, size: u64) -> Option<Direct> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let block = rustix::fs::ioctl_blksszget(buffered)
        .map(u64::from)
        .unwrap_or(ALIGN as u64);
    if block == 0 || !block.is_power_of_two() || block > ALIGN as u64 {
        return None;
    }
    let d = Direct {
        file: File::from(fd),
        block,
        bounce: Mutex::new(Vec::new()),
    };
    if size >= block {
        let mut b = d.take_bounce();
        let ok = d.file.read_exact_at(b.get(block as usize), 0).is_ok();
        d.give_bounce(b);
        if !ok {
            return None;
        }
    }
    Some(d)
}
