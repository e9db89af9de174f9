//! The layout of a control plane's keys in etcd and the framing of log records there. Pure:
//! no I/O; `log.rs` and `node.rs` do the talking.

use serde::{Deserialize, Serialize};

/// Largest piece of a record stored under one key: etcd refuses requests over 1.5 MiB.
pub const PART_BYTES: usize = 1 << 20;

/// The keys of one control plane, under its prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}/{rest}", self.prefix).into_bytes()
    }

    /// JSON [`ClusterInfo`], written once.
    pub fn cluster(&self) -> Vec<u8> {
        self.key("cluster")
    }

    /// JSON [`LeaderInfo`] under the leader's etcd lease; its create revision is the epoch.
    pub fn leader(&self) -> Vec<u8> {
        self.key("leader")
    }

    /// Record `seq`.
    pub fn log(&self, seq: u64) -> Vec<u8> {
        self.key(&format!("log/{seq:016x}"))
    }

    /// The end of the log's key range.
    pub fn log_end(&self) -> Vec<u8> {
        tabula_etcd::prefix_end(&self.key("log/"))
    }

    /// The sequence number of a log key.
    pub fn seq_of(&self, key: &[u8]) -> Option<u64> {
        let rest = key.strip_prefix(self.key("log/").as_slice())?;
        u64::from_str_radix(std::str::from_utf8(rest).ok()?, 16).ok()
    }

    /// Piece `n` of record `seq`.
    pub fn part(&self, seq: u64, n: u32) -> Vec<u8> {
        self.key(&format!("part/{seq:016x}/{n:08x}"))
    }

    /// The key range of record `seq`'s pieces.
    pub fn parts(&self, seq: u64) -> (Vec<u8>, Vec<u8>) {
        let from = self.key(&format!("part/{seq:016x}/"));
        let to = tabula_etcd::prefix_end(&from);
        (from, to)
    }

    /// The key range of the pieces of every record up to `seq`.
    pub fn parts_upto(&self, seq: u64) -> (Vec<u8>, Vec<u8>) {
        (
            self.key("part/"),
            self.key(&format!("part/{:016x}", seq + 1)),
        )
    }

    /// JSON [`MemberInfo`] of controller `name`, under its etcd lease.
    pub fn member(&self, name: &str) -> Vec<u8> {
        self.key(&format!("members/{name}"))
    }

    /// The key range of every member.
    pub fn members(&self) -> (Vec<u8>, Vec<u8>) {
        let from = self.key("members/");
        let to = tabula_etcd::prefix_end(&from);
        (from, to)
    }

    /// Everything of this control plane (what a follower watches).
    pub fn all(&self) -> (Vec<u8>, Vec<u8>) {
        let from = self.key("");
        let to = tabula_etcd::prefix_end(&from);
        (from, to)
    }
}

/// The control plane's identity, fixed by its first controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub id: u64,
    /// The pool id every container label carries.
    pub pool_id: u64,
}

/// Who leads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    pub name: String,
    /// Its admin API and agents' address, `http://host:port`.
    pub api: String,
}

/// What each controller says of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub name: String,
    pub api: String,
    /// `leader` or `standby`.
    pub role: String,
    /// The last record durable in its store.
    pub applied: u64,
    /// Its epoch while it leads, else 0.
    pub epoch: u64,
}

/// A log key's value: the record itself, or how many pieces it was split into.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    Inline(Vec<u8>),
    Parts { count: u32, crc: u32, len: u64 },
}

/// The log key's value for `payload`, and the pieces to store first (none for a record
/// that fits in one key).
pub fn encode_record(payload: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    if payload.len() <= PART_BYTES {
        let mut v = Vec::with_capacity(payload.len() + 1);
        v.push(0);
        v.extend_from_slice(payload);
        return (v, Vec::new());
    }
    let parts: Vec<Vec<u8>> = payload.chunks(PART_BYTES).map(<[u8]>::to_vec).collect();
    let mut v = vec![1];
    v.extend_from_slice(&(parts.len() as u32).to_le_bytes());
    v.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    v.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    (v, parts)
}

/// Reads a log key's value.
pub fn decode_record(value: &[u8]) -> Result<Stored, String> {
    match value.split_first() {
        Some((0, rest)) => Ok(Stored::Inline(rest.to_vec())),
        Some((1, rest)) if rest.len() == 16 => Ok(Stored::Parts {
            count: u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")),
            crc: u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes")),
            len: u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes")),
        }),
        _ => Err(format!(
            "a log record in etcd has an unknown form ({} bytes)",
            value.len()
        )),
    }
}

/// Joins the pieces of a split record, checking them against its header.
pub fn join_parts(stored: &Stored, parts: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let Stored::Parts { count, crc, len } = *stored else {
        return Err("not a split record".into());
    };
    if parts.len() != count as usize {
        return Err(format!(
            "a split log record has {} of its {count} pieces in etcd",
            parts.len()
        ));
    }
    let payload = parts.concat();
    if payload.len() as u64 != len || crc32fast::hash(&payload) != crc {
        return Err("a split log record's pieces do not match its header".into());
    }
    Ok(payload)
}

/// The highest record every live member has applied, when at least two have: records up to
/// it are durable on two controllers' disks and may leave etcd; `keep` newest records stay
/// in any case.
pub fn truncation_point(members: &[MemberInfo], last: u64, keep: u64) -> Option<u64> {
    if members.len() < 2 {
        return None;
    }
    let min = members.iter().map(|m| m.applied).min()?;
    let upto = min.min(last.saturating_sub(keep));
    (upto > 0).then_some(upto)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_inline_and_in_pieces() {
        for len in [0, 1, PART_BYTES, PART_BYTES + 1, 3 * PART_BYTES + 17] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let (head, parts) = encode_record(&payload);
            match decode_record(&head).unwrap() {
                Stored::Inline(p) => {
                    assert!(parts.is_empty());
                    assert_eq!(p, payload);
                }
                s @ Stored::Parts { .. } => {
                    assert!(parts.iter().all(|p| p.len() <= PART_BYTES));
                    assert_eq!(join_parts(&s, &parts).unwrap(), payload);
                    assert!(join_parts(&s, &parts[1..]).is_err(), "a missing piece");
                    let mut bad = parts.clone();
                    bad[0][0] ^= 1;
                    assert!(join_parts(&s, &bad).is_err(), "a damaged piece");
                }
            }
        }
        assert!(decode_record(&[]).is_err());
        assert!(decode_record(&[7, 1, 2]).is_err());
    }

    #[test]
    fn keys_sort_by_sequence_and_parse_back() {
        let k = Keys::new("/tabula/");
        assert_eq!(k.log(1), b"/tabula/log/0000000000000001".to_vec());
        assert!(k.log(9) < k.log(10) && k.log(0xff) < k.log(0x100));
        assert!(k.log(u64::MAX) < k.log_end());
        assert_eq!(k.seq_of(&k.log(12345)), Some(12345));
        assert_eq!(k.seq_of(&k.leader()), None);
        let (from, to) = k.parts_upto(5);
        assert!(from <= k.part(5, 3) && k.part(5, 3) < to && k.part(6, 0) >= to);
        let (from, to) = k.parts(5);
        assert!(from <= k.part(5, 0) && k.part(5, 9) < to && k.part(6, 0) >= to);
    }

    #[test]
    fn truncation_needs_two_members_and_keeps_a_tail() {
        let m = |applied| MemberInfo {
            name: String::new(),
            api: String::new(),
            role: String::new(),
            applied,
            epoch: 0,
        };
        assert_eq!(truncation_point(&[m(5000)], 5000, 10), None);
        assert_eq!(truncation_point(&[m(5000), m(3000)], 5000, 10), Some(3000));
        assert_eq!(truncation_point(&[m(5000), m(4995)], 5000, 10), Some(4990));
        assert_eq!(truncation_point(&[m(5), m(5)], 5, 10), None);
    }
}
