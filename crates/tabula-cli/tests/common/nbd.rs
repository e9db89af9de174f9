//! A minimal blocking NBD client (fixed newstyle, NBD_OPT_GO, simple replies, one request at
//! a time), written independently of the server's code so tests can control exactly which
//! writes were acknowledged when a process is killed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42444d41474943;
const IHAVEOPT: u64 = 0x49484156454f5054;
const REPLY_MAGIC: u64 = 0x0003e889045565a9;
const REQUEST_MAGIC: u32 = 0x25609513;
const SIMPLE_REPLY_MAGIC: u32 = 0x67446698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;

pub struct Client {
    s: TcpStream,
    pub size: u64,
    cookie: u64,
}

#[derive(Debug)]
pub enum NbdErr {
    Io(std::io::Error),
    Errno(u32),
    Protocol(String),
}

impl From<std::io::Error> for NbdErr {
    fn from(e: std::io::Error) -> Self {
        NbdErr::Io(e)
    }
}

fn u16b(s: &mut TcpStream) -> std::io::Result<u16> {
    let mut b = [0; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn u32b(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn u64b(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl Client {
    pub fn connect(port: u16, export: &str) -> Result<Client, NbdErr> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.set_nodelay(true)?;
        if u64b(&mut s)? != NBDMAGIC || u64b(&mut s)? != IHAVEOPT {
            return Err(NbdErr::Protocol("bad greeting".into()));
        }
        let _flags = u16b(&mut s)?;
        s.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&((4 + export.len() + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut size = None;
        loop {
            if u64b(&mut s)? != REPLY_MAGIC {
                return Err(NbdErr::Protocol("bad option reply magic".into()));
            }
            let _opt = u32b(&mut s)?;
            let typ = u32b(&mut s)?;
            let len = u32b(&mut s)?;
            let mut data = vec![0; len as usize];
            s.read_exact(&mut data)?;
            if typ & 0x8000_0000 != 0 {
                return Err(NbdErr::Protocol(format!(
                    "option error {typ:#x}: {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            if typ == REP_INFO && data.len() >= 12 && data[0..2] == [0, 0] {
                size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
            }
            if typ == REP_ACK {
                break;
            }
        }
        Ok(Client {
            s,
            size: size.ok_or_else(|| NbdErr::Protocol("no export info".into()))?,
            cookie: 0,
        })
    }

    fn request(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<Vec<u8>, NbdErr> {
        self.cookie += 1;
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&typ.to_be_bytes());
        h.extend_from_slice(&self.cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        self.s.write_all(&h)?;
        if u32b(&mut self.s)? != SIMPLE_REPLY_MAGIC {
            return Err(NbdErr::Protocol("bad reply magic".into()));
        }
        let err = u32b(&mut self.s)?;
        let cookie = u64b(&mut self.s)?;
        if cookie != self.cookie {
            return Err(NbdErr::Protocol("cookie mismatch".into()));
        }
        if err != 0 {
            return Err(NbdErr::Errno(err));
        }
        let mut out = Vec::new();
        if typ == CMD_READ {
            out.resize(len as usize, 0);
            self.s.read_exact(&mut out)?;
        }
        Ok(out)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdErr> {
        self.request(CMD_READ, 0, offset, len, &[])
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdErr> {
        let flags = if fua { FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, data.len() as u32, data)
            .map(|_| ())
    }

    pub fn flush(&mut self) -> Result<(), NbdErr> {
        self.request(CMD_FLUSH, 0, 0, 0, &[]).map(|_| ())
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> Result<(), NbdErr> {
        self.request(CMD_TRIM, 0, offset, len, &[]).map(|_| ())
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), NbdErr> {
        self.write_zeroes_flags(offset, len, false)
    }

    /// WRITE_ZEROES, with NBD_CMD_FLAG_NO_HOLE if `no_hole` (the space must stay allocated).
    pub fn write_zeroes_flags(
        &mut self,
        offset: u64,
        len: u32,
        no_hole: bool,
    ) -> Result<(), NbdErr> {
        let flags = if no_hole { FLAG_NO_HOLE } else { 0 };
        self.request(CMD_WRITE_ZEROES, flags, offset, len, &[])
            .map(|_| ())
    }

    /// The whole export, read in 1 MiB pieces.
    pub fn read_all(&mut self) -> Result<Vec<u8>, NbdErr> {
        let mut out = Vec::with_capacity(self.size as usize);
        while (out.len() as u64) < self.size {
            let n = (self.size - out.len() as u64).min(1 << 20);
            out.extend(self.read(out.len() as u64, n as u32)?);
        }
        Ok(out)
    }

    /// Sends NBD_CMD_DISC and waits for the server to close its side, so the disconnect is
    /// complete when this returns.
    pub fn disconnect(mut self) {
        if self.request_nowait_disc().is_ok() {
            let mut b = [0u8; 1];
            let _ = self.s.read(&mut b);
        }
    }

    fn request_nowait_disc(&mut self) -> std::io::Result<()> {
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&CMD_DISC.to_be_bytes());
        h.extend_from_slice(&0u64.to_be_bytes());
        h.extend_from_slice(&0u64.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes());
        self.s.write_all(&h)
    }
}

/// A deterministic 4 KiB block whose content names the block and a version.
pub fn stamp_block(block: u64, version: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(4096);
    let mut x = block.wrapping_mul(0x9e3779b97f4a7c15) ^ version.wrapping_mul(0xbf58476d1ce4e5b9);
    while v.len() < 4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v[0..8].copy_from_slice(&block.to_le_bytes());
    v[8..16].copy_from_slice(&version.to_le_bytes());
    v
}

/// A small deterministic xorshift generator for seeded random tests.
pub struct Rng(pub u64);

impl Rng {
    /// Never stuck at zero, whatever the seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

/// An offset and length in an export of `size` bytes with segments of `seg` bytes, biased
/// towards segment and block edges, where bugs live.
pub fn edge_range(rng: &mut Rng, seg: u64, size: u64) -> (u64, u64) {
    let off = match rng.below(4) {
        0 => rng.below(size),
        1 => (rng.below(size / seg + 1) * seg)
            .saturating_sub(rng.below(3) * 512)
            .min(size - 1),
        2 => rng.below(size / 4096) * 4096,
        _ => size - 1 - rng.below((2 * seg).min(size)),
    };
    let max = (size - off).min(3 * seg);
    let len = match rng.below(3) {
        0 => 1 + rng.below(max.min(4096)),
        1 => (1 + rng.below(4)) * seg,
        _ => 1 + rng.below(max),
    }
    .min(max)
    .max(1);
    (off, len)
}

/// The seed of a random test: `TABULA_SEED` if set (to reproduce a failure), else the clock.
pub fn seed() -> u64 {
    std::env::var("TABULA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}
