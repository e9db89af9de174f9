//! Storage containers: the stores that physical segments live in, addressed by byte offset.
//!
//! A container is a local file (sparse, grown on demand) for now; block devices and remote
//! NBD exports join later behind the same type. Both the agent (data I/O) and the controller
//! (zeroing freed space) use it, so the rules for durable I/O live in one place:
//! - a write is durable after [`Container::sync`] (fdatasync) returns;
//! - [`Container::zero`] deallocates (punches a hole) where the file system can, so freed
//!   space reads as zeros and costs nothing, and writes zeros where it cannot.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FallocateFlags, fallocate};

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
}

/// An open container file.
#[derive(Debug)]
pub struct Container {
    file: File,
    path: PathBuf,
}

impl Container {
    /// Opens `path` read-write (creating it if `create`), returning it with its length.
    fn open_file(path: &Path, create: bool) -> Result<(Container, u64), ContainerError> {
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
        let len = file.metadata().map_err(err)?.len();
        let c = Container {
            file,
            path: path.to_path_buf(),
        };
        Ok((c, len))
    }

    /// Creates `path` as a sparse file of `size` bytes, or grows an existing smaller file.
    /// Never shrinks: that would destroy mapped data.
    pub fn create(path: &Path, size: u64) -> Result<Container, ContainerError> {
        let (c, len) = Self::open_file(path, true)?;
        if len < size {
            c.file
                .set_len(size)
                .and_then(|_| c.file.sync_all())
                .map_err(|source| ContainerError::Resize {
                    path: path.to_path_buf(),
                    size,
                    source,
                })?;
        }
        Ok(c)
    }

    /// Opens an existing container and checks it still has the recorded size.
    pub fn open(path: &Path, expected_size: u64) -> Result<Container, ContainerError> {
        let (c, actual) = Self::open_file(path, false)?;
        if actual < expected_size {
            return Err(ContainerError::TooSmall {
                path: path.to_path_buf(),
                actual,
                expected: expected_size,
            });
        }
        Ok(c)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Reads exactly `len` bytes at `offset` into a new buffer, without first zeroing it
    /// (zeroing a 1 MiB buffer costs about as much as copying it from the page cache).
    pub fn read_vec_at(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
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
                    format!("container {} ends before offset {pos}", self.path.display()),
                ));
            }
        }
        Ok(buf)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Makes every completed write durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Makes `[offset, offset+len)` read as zeros and durable.
    pub fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len)?;
        self.file.sync_data()
    }

    /// Makes `[offset, offset+len)` read as zeros; durable after the next [`sync`](Self::sync).
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let punched = fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        );
        if punched.is_err() {
            // No hole punching (e.g. some file systems): write zeros instead.
            const CHUNK: u64 = 1 << 20;
            let zeros = vec![0u8; CHUNK as usize];
            let mut pos = offset;
            while pos < offset + len {
                let n = CHUNK.min(offset + len - pos);
                self.file.write_all_at(&zeros[..n as usize], pos)?;
                pos += n;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_makes_data_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.img");
        let c = Container::create(&p, 8 << 20).unwrap();
        c.write_at(&[0xab; 8192], 1 << 20).unwrap();
        c.zero(1 << 20, 1 << 20).unwrap();
        let mut buf = vec![1u8; 8192];
        c.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(c.len_bytes().unwrap(), 8 << 20);
    }

    #[test]
    fn read_vec_at_reads_exactly_and_reports_eof() {
        let dir = tempfile::tempdir().unwrap();
        let c = Container::create(&dir.path().join("c.img"), 1 << 20).unwrap();
        let data: Vec<u8> = (0..10000u32).map(|i| i as u8).collect();
        c.write_at(&data, 4096).unwrap();
        assert_eq!(c.read_vec_at(10000, 4096).unwrap(), data);
        assert_eq!(c.read_vec_at(3, 4097).unwrap(), data[1..4]);
        assert!(c.read_vec_at(8192, (1 << 20) - 4096).is_err());
    }

    #[test]
    fn create_never_shrinks_and_open_detects_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.img");
        Container::create(&p, 4 << 20).unwrap();
        assert_eq!(
            Container::create(&p, 1 << 20).unwrap().len_bytes().unwrap(),
            4 << 20
        );
        assert!(matches!(
            Container::open(&p, 8 << 20),
            Err(ContainerError::TooSmall { .. })
        ));
    }
}
