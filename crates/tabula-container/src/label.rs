//! Container labels: what a container is, written into the container itself.
//!
//! As LVM, ZFS and BlueStore do, every container added to a pool gets a small label at a
//! reserved place, its first block: the pool's id, the container's id and name, and a
//! checksum. A path says only how a container is reached from one host; the label says what
//! it is, so the same container can never be added twice or to two pools, whatever path
//! (or host) it is reached by, and `tabula check` finds a container whose path now leads to
//! something else.
//!
//! The first [`LABEL_BLOCKS`] blocks (1 MiB, so 1 MiB segments stay aligned) of a labelled
//! container are never allocated. Containers added before labels have no such area (their
//! first blocks may hold data); they keep working unlabelled (the controller records
//! `label_blocks == 0` for them).
//!
//! The controller writes, wipes and checks labels; an agent checks the label of every
//! container it opens, since on its host the path may lead to another device.
//!
//! Layout of the label block (little-endian; the rest is zeros):
//!
//! | offset | size | field                                  |
//! |--------|------|----------------------------------------|
//! | 0      | 8    | magic `TABULALB`                       |
//! | 8      | 4    | version (1)                            |
//! | 12     | 4    | zero                                   |
//! | 16     | 8    | pool id                                |
//! | 24     | 4    | container id                           |
//! | 28     | 2    | name length (at most 255)              |
//! | 30     | 2    | zero                                   |
//! | 32     | 8    | reserved blocks (the label area)       |
//! | 40     | 255  | container name                         |
//! | 4092   | 4    | CRC-32 of bytes 0..4092                |

use crate::Container;

/// The block size labels are laid out in (tabula's block).
const BLOCK_SIZE: u64 = 4096;

/// Blocks reserved at the start of a labelled container (the label is in the first).
pub const LABEL_BLOCKS: u64 = 256;
/// Bytes reserved at the start of a labelled container.
pub const LABEL_BYTES: u64 = LABEL_BLOCKS * BLOCK_SIZE;

const MAGIC: &[u8; 8] = b"TABULALB";
const VERSION: u32 = 1;
const LEN: usize = BLOCK_SIZE as usize;
const CRC_AT: usize = LEN - 4;
const NAME_AT: usize = 40;
const NAME_MAX: usize = 255;

/// What a container's label says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub pool: u64,
    pub container: u32,
    pub name: String,
    pub reserved_blocks: u64,
}

/// What the label block of a container holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// A valid tabula label.
    Label(Label),
    /// No tabula label (zeros, or anything else).
    None,
    /// Tabula's magic with a bad checksum, version or length: a damaged label.
    Damaged(String),
}

impl Label {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.pool.to_le_bytes());
        b[24..28].copy_from_slice(&self.container.to_le_bytes());
        let name = &self.name.as_bytes()[..self.name.len().min(NAME_MAX)];
        b[28..30].copy_from_slice(&(name.len() as u16).to_le_bytes());
        b[32..40].copy_from_slice(&self.reserved_blocks.to_le_bytes());
        b[NAME_AT..NAME_AT + name.len()].copy_from_slice(name);
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Found {
        if b.len() < LEN || &b[0..8] != MAGIC {
            return Found::None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if crc32fast::hash(&b[..CRC_AT]) != u32_at(CRC_AT) {
            return Found::Damaged("its checksum does not match".into());
        }
        let version = u32_at(8);
        if version != VERSION {
            return Found::Damaged(format!(
                "label version {version}, this tabula knows {VERSION}"
            ));
        }
        let len = u16::from_le_bytes([b[28], b[29]]) as usize;
        if len > NAME_MAX {
            return Found::Damaged(format!("name length {len}"));
        }
        Found::Label(Label {
            pool: u64_at(16),
            container: u32_at(24),
            name: String::from_utf8_lossy(&b[NAME_AT..NAME_AT + len]).into_owned(),
            reserved_blocks: u64_at(32),
        })
    }
}

/// Whether `found` is the label of container `container` of pool `pool`; if not, what it is
/// instead, in words.
pub fn expect(found: &Found, pool: u64, container: u32) -> Result<(), String> {
    match found {
        Found::Label(l) if l.pool == pool && l.container == container => Ok(()),
        Found::Label(l) if l.pool == pool => Err(format!(
            "its label says it is container '{}' (c{}) of this pool",
            l.name, l.container
        )),
        Found::Label(l) => Err(format!(
            "its label names another pool ({:016x}, container '{}'); this pool is {pool:016x}",
            l.pool, l.name
        )),
        Found::Damaged(why) => Err(format!("its label is damaged: {why}")),
        Found::None => Err("it holds no tabula label".to_string()),
    }
}

/// Reads a container's label block (blocking I/O).
pub fn read(c: &Container) -> std::io::Result<Found> {
    let b = c.read_vec_at(LEN, 0)?;
    Ok(Label::decode(&b))
}

/// Writes `label` durably (blocking I/O).
pub fn write(c: &Container, label: &Label) -> std::io::Result<()> {
    c.write_at(&label.encode(), 0)?;
    c.sync()
}

/// Overwrites the label block with zeros, durably (blocking I/O).
pub fn wipe(c: &Container) -> std::io::Result<()> {
    c.write_at(&[0u8; LEN], 0)?;
    c.sync()
}

/// How a user wipes the label of a container at `location` that no pool uses any more.
pub fn wipe_hint(location: &str) -> String {
    if crate::NbdUri::is_nbd_uri(location) {
        format!(
            "write zeros over its first 4 KiB (e.g. nbdsh -u '{location}' -c 'h.zero(4096, 0)')"
        )
    } else {
        format!("dd if=/dev/zero of='{location}' bs=4096 count=1 conv=notrunc")
    }
}

/// A new random pool id.
pub fn random_pool_id() -> std::io::Result<u64> {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    // Zero means "no pool id yet" in messages; never hand it out.
    Ok(u64::from_le_bytes(b).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_damage_is_seen() {
        let l = Label {
            pool: 0x1234_5678_9abc_def0,
            container: 7,
            name: "fast-ssd".into(),
            reserved_blocks: LABEL_BLOCKS,
        };
        let b = l.encode();
        assert_eq!(Label::decode(&b), Found::Label(l));
        assert_eq!(Label::decode(&[0u8; LEN]), Found::None);
        for i in [9, 17, 25, 41, 4093] {
            let mut d = b.clone();
            d[i] ^= 1;
            assert!(matches!(Label::decode(&d), Found::Damaged(_)), "byte {i}");
        }
    }
}
