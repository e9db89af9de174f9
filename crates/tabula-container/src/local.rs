//! Local containers: a regular file, or a block device, each with an `O_DIRECT` side door.
//!
//! Both get a second descriptor opened with `O_DIRECT` when the file system or device
//! accepts it. On block devices, reads and writes whose offset and length are multiples of
//! the logical block size use it (no double caching in the page cache); others use the
//! buffered descriptor. Regular files keep the page cache for ordinary I/O (hosts read back
//! what they wrote from memory) and use the direct descriptor only for durable writes into
//! space nobody else touches meanwhile (copy-on-write copies): `RWF_DSYNC` on a direct
//! write costs a FUA or one device flush, where on a buffered one it also copies into the
//! page cache and writes it back, about five times slower for 1 MiB here (BENCHMARKS.md).
//! The kernel keeps the two descriptors coherent (a direct read writes back dirty cached
//! pages of its range first, a direct write invalidates them), and `fdatasync` on the
//! buffered descriptor flushes the device's write cache, which covers direct writes too.
//!
//! A direct write into a hole of a sparse file is slow in a way an overwrite is not: ext4
//! takes the inode lock exclusively for it and, with `RWF_DSYNC`, writes the new extent
//! before returning, all under that lock. Copies into fresh space then ran one at a time,
//! and every buffered host write to the file queued behind them. So before its first direct
//! write into a [`RESERVE_CHUNK`], a file reserves the whole chunk with `fallocate` (holes
//! become unwritten extents; data already there is untouched), and later direct writes into
//! it run side by side under the shared lock.

use std::collections::HashSet;
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
/// Largest buffered write in one call (see `Local::write_at`).
const FOLIO_MAX: u64 = 64 << 10;
/// Unit in which a file reserves space ahead of direct writes (see the module comment).
const RESERVE_CHUNK: u64 = 64 << 20;
/// Bounce buffers kept for reuse.
const BOUNCE_POOL: usize = 16;

pub(crate) struct Local {
    file: File,
    /// Whether this is a block device (its size is its end, not its metadata length).
    block_device: bool,
    direct: Option<Direct>,
    /// Chunks of a file already reserved for direct writes (indexes in `RESERVE_CHUNK`s).
    reserved: Mutex<HashSet<u64>>,
}

struct Direct {
    file: File,
    /// Logical block size: direct I/O offsets and lengths must be multiples of it.
    block: u64,
    bounce: Mutex<Vec<AlignedBuf>>,
}

/// A page-aligned byte buffer without `unsafe`: an over-allocated Vec used from its first
/// aligned address. Direct I/O takes it without a bounce copy.
pub struct AlignedBuf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes whose first byte is page-aligned.
    pub fn new(len: usize) -> AlignedBuf {
        let v = vec![0u8; len + ALIGN];
        let start = (ALIGN - v.as_ptr() as usize % ALIGN) % ALIGN;
        AlignedBuf { v, start, len }
    }

    /// The first `len` bytes (at most the buffer's length).
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        assert!(
            len <= self.len,
            "{len} bytes asked of a {}-byte buffer",
            self.len
        );
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
        pooled.unwrap_or_else(|| AlignedBuf::new(BOUNCE_MAX))
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

    /// A direct write with `RWF_DSYNC`: durable when it returns (with the metadata needed
    /// to read it back, for a write into a hole).
    fn write_durable_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if is_aligned(buf) {
            return pwrite_dsync(&self.file, buf, offset);
        }
        self.bounced(buf.len(), |b, done| {
            b.copy_from_slice(&buf[done..done + b.len()]);
            pwrite_dsync(&self.file, b, offset + done as u64)
        })
    }
}

/// `pwritev2(RWF_DSYNC)` of all of `buf`, like an `O_DSYNC` write.
fn pwrite_dsync(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = rustix::io::pwritev2(
            file,
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
        let block_device = if ft.is_file() {
            false
        } else if ft.is_block_device() {
            true
        } else {
            return Err(ContainerError::NotStorage {
                path: path.to_path_buf(),
            });
        };
        let len = if block_device {
            // A block device's metadata says 0 bytes; its end is its size.
            (&file).seek(SeekFrom::End(0)).map_err(err)?
        } else {
            file.metadata().map_err(err)?.len()
        };
        let direct = open_direct(path, &file, len, block_device);
        let local = Local {
            file,
            block_device,
            direct,
            reserved: Mutex::new(HashSet::new()),
        };
        Ok((local, len))
    }

    pub(crate) fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Whether aligned I/O bypasses the page cache (for tests and messages).
    #[cfg(test)]
    pub(crate) fn uses_direct_io(&self) -> bool {
        self.block_device && self.direct.is_some()
    }

    /// Whether durable writes go through the direct descriptor (for tests).
    #[cfg(test)]
    pub(crate) fn has_direct_side_door(&self) -> bool {
        self.direct.is_some()
    }

    /// The direct descriptor for ordinary aligned I/O: block devices only.
    fn direct_for(&self, offset: u64, len: usize) -> Option<&Direct> {
        self.direct
            .as_ref()
            .filter(|d| self.block_device && d.fits(offset, len))
    }

    pub(crate) fn grow(&self, size: u64) -> io::Result<()> {
        self.file.set_len(size)?;
        self.file.sync_all()
    }

    pub(crate) fn len(&self) -> io::Result<u64> {
        if self.block_device {
            (&self.file).seek(SeekFrom::End(0))
        } else {
            Ok(self.file.metadata()?.len())
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
        let mut buf: Vec<u8> = tabula_nbd::bufpool::take(len);
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
        // In pieces that end on FOLIO_MAX boundaries: the page cache makes a folio as large
        // as the write that creates it, and a later 4 KiB write into a 1 MiB folio walks
        // all 256 of its buffer heads (ext4_block_write_begin: a third of the CPU of random
        // 4K writes after a sequential fill, in the profile in BENCHMARKS.md).
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((FOLIO_MAX - pos % FOLIO_MAX) as usize).min(buf.len() - done);
            self.file.write_all_at(&buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Writes `buf` and makes it durable before returning, without flushing the rest of
    /// the container's cached writes. Files: a buffered `RWF_DSYNC` write (the kernel
    /// writes back and flushes just this range), so that it never races the page cache
    /// with a host's buffered writes to the same blocks; block devices: direct where
    /// aligned, like all their I/O.
    pub(crate) fn write_at_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.block_device {
            return self.write_fresh_durable(buf, offset);
        }
        pwrite_dsync(&self.file, buf, offset)
    }

    /// `write_at_durable` for a range that nothing else reads or writes until this
    /// returns (a copy into space just allocated for it): a direct `RWF_DSYNC` write where
    /// the side door takes it, about five times faster than a buffered one for 1 MiB.
    pub(crate) fn write_fresh_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(d) = self.direct.as_ref().filter(|d| d.fits(offset, buf.len())) {
            self.reserve(offset, buf.len() as u64);
            match d.write_durable_at(buf, offset) {
                // EINVAL: the file system refused this direct I/O after all.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {}
                r => return r,
            }
        }
        pwrite_dsync(&self.file, buf, offset)
    }

    /// Reserves the chunks under `[offset, offset+len)` of a file, once each (see the module
    /// comment). Best effort: a file system without `fallocate`, or without the space, just
    /// takes the direct write the slow way (and reports a lack of space then).
    fn reserve(&self, offset: u64, len: u64) {
        if self.block_device || len == 0 {
            return;
        }
        let chunks = offset / RESERVE_CHUNK..=(offset + len - 1) / RESERVE_CHUNK;
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        for c in chunks {
            if reserved.insert(c) {
                // Not past the end: blocks there would be space nobody can use.
                let end = self.file.metadata().map_or(0, |m| m.len());
                let (b, e) = (c * RESERVE_CHUNK, ((c + 1) * RESERVE_CHUNK).min(end));
                if b < e {
                    let _ = fallocate(&self.file, FallocateFlags::KEEP_SIZE, b, e - b);
                }
            }
        }
    }

    /// Whether the chunk holding `offset` has been reserved (for tests).
    #[cfg(test)]
    pub(crate) fn is_reserved(&self, offset: u64) -> bool {
        let reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        reserved.contains(&(offset / RESERVE_CHUNK))
    }

    pub(crate) fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if fallocate(&self.file, punch, offset, len).is_ok() {
            if !self.block_device && len > 0 {
                // Holes again: the next direct write there reserves its chunk afresh. (Only
                // in this process: another one that opened the file, an agent while the
                // controller zeroes, writes there the slow way; slower, not wrong.)
                let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
                for c in offset / RESERVE_CHUNK..=(offset + len - 1) / RESERVE_CHUNK {
                    reserved.remove(&c);
                }
            }
            return Ok(());
        }
        // A block device that cannot discard-and-zero may still zero efficiently (write
        // zeroes offload); files whose file system punches no holes just get zeros written.
        if self.block_device {
            let zero = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
            if fallocate(&self.file, zero, offset, len).is_ok() {
                return Ok(());
            }
        }
        write_zeros_with(offset, len, |buf, pos| self.write_at(buf, pos))
    }
}

/// Opens the `O_DIRECT` descriptor of a block device or file and checks that it really
/// works (some devices accept the flag and then refuse the I/O; tmpfs refuses the flag);
/// `None` means buffered I/O only.
fn open_direct(path: &Path, buffered: &File, size: u64, block_device: bool) -> Option<Direct> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    // Files: a page is a multiple of every file system's direct I/O alignment here.
    let block = if block_device {
        rustix::fs::ioctl_blksszget(buffered)
            .map(u64::from)
            .unwrap_or(ALIGN as u64)
    } else {
        ALIGN as u64
    };
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
