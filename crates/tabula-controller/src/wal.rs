//! The metadata redo log: what makes a journal batch durable without a database commit.
//!
//! Why: a redb commit rewrites every B-tree page a batch touched and syncs them. First
//! writes to a thin vdisk each change a different table chunk, so a batch of them cost
//! a page write per fault plus the sync (measured: the journal thread was a third of all
//! CPU). The log appends the batch's changes instead, as one record, and syncs that; the
//! changes reach redb later, many records per durable transaction (a *checkpoint*).
//!
//! Rules:
//! - The journal acknowledges a batch only after its record is appended and synced.
//! - Every durable redb commit stores the sequence number of the last record it includes
//!   (`journal_seq` in `meta`); records up to it are no longer needed.
//! - On open, records after `journal_seq` are replayed in order, then checkpointed.
//!
//! Format: the file is two halves; records go back to back from the start of one half,
//! each a 20-byte header (magic, payload length, sequence number, CRC-32 of length,
//! sequence number and payload; little-endian) and the payload. Appends move to the other
//! half only once every record there is checkpointed, so checkpoints can catch up a piece
//! at a time while appends go on. The records after `journal_seq` are found by starting
//! in the half whose first record is the one after it, and going on in the other half.
//! The first record that does not check (wrong magic, length, sequence or CRC) ends a
//! half: a torn append, or what an earlier pass left behind the new end. Sequence numbers
//! never restart, so an old record can never pass for the next one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes of each half of the file: a batch that does not fit in one is committed to the
/// database directly.
pub const HALF_BYTES: u64 = 32 << 20;
/// Appends move to the other half once this much of the current one is used (if the
/// other is free), leaving the rest of the half as slack while checkpoints catch up.
pub const SWITCH_AT: u64 = 8 << 20;
/// Largest record: bigger batches (a snapshot's whole table) go straight to the database,
/// where one commit costs about what the record would.
pub const MAX_RECORD: usize = 4 << 20;
/// The file grows in steps of zeros, synced once, so that appends overwrite allocated
/// blocks and their sync writes no file system metadata.
const GROW_STEP: u64 = 4 << 20;
/// Not ASCII: a JSON payload can never contain it.
const MAGIC: u32 = 0xB7AB_1A0F;
pub const HEADER: usize = 20;

/// Frames `payload` as record `seq`, appending it to `out`.
pub fn encode(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("records are bounded by MAX_RECORD");
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&crc(len, seq, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn crc(len: u32, seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The payloads of the records at the start of `buf`, numbered `first_seq` on, up to the
/// first one that does not check. Never fails: a damaged log simply ends there.
pub fn decode(buf: &[u8], first_seq: u64) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut want = first_seq;
    while let Some(h) = buf.get(pos..pos + HEADER) {
        let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let len = word(4);
        if word(0) != MAGIC || seq != want || len as usize > MAX_RECORD {
            break;
        }
        let start = pos + HEADER;
        let Some(payload) = buf.get(start..start + len as usize) else {
            break;
        };
        if crc(len, seq, payload) != word(16) {
            break;
        }
        out.push(payload);
        pos = start + len as usize;
        let Some(next) = want.checked_add(1) else {
            break;
        };
        want = next;
    }
    out
}

/// The run of records at the start of `buf`, numbered on from whatever the first says:
/// its first sequence number and payloads.
pub fn decode_run(buf: &[u8]) -> (u64, Vec<&[u8]>) {
    let Some(seq) = buf.get(8..16) else {
        return (0, Vec::new());
    };
    let first = u64::from_le_bytes(seq.try_into().expect("8 bytes"));
    (first, decode(buf, first))
}

/// The open log of one store.
pub struct Wal {
    file: File,
    /// The half appends go to.
    half: usize,
    /// Where in that half the next record goes.
    at: u64,
    /// Sequence number of the first record in the current half since appends started
    /// there (0: none yet). Records before it are all in the other half.
    first: u64,
    /// Bytes of each half written (zeros or records): appends below this write no metadata.
    grown: [u64; 2],
    /// Sequence number of the last record appended (or included in the database).
    last: u64,
    buf: Vec<u8>,
}

impl Wal {
    /// Opens (creating if needed) the log at `path`, whose records up to `after` are in
    /// the database already. Returns it with the payloads of the records to replay; the
    /// caller replays them, checkpoints, and calls [`Wal::restart`].
    pub fn open(path: &Path, after: u64) -> io::Result<(Wal, Vec<Vec<u8>>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        let mut halves = [Vec::new(), Vec::new()];
        let mut grown = [0u64; 2];
        for (h, bytes) in halves.iter_mut().enumerate() {
            let start = h as u64 * HALF_BYTES;
            grown[h] = len.saturating_sub(start).min(HALF_BYTES);
            *bytes = vec![0u8; grown[h] as usize];
            file.read_exact_at(bytes, start)?;
        }
        // Each half holds one run of records from its start (a checkpoint step may have
        // taken part of one); the records after `after` continue from one run into the
        // other. Records of earlier passes have numbers up to `after` at most.
        let mut found: Vec<(u64, &[u8])> = Vec::new();
        for bytes in &halves {
            let (first, run) = decode_run(bytes);
            let numbered = run.into_iter().enumerate();
            found.extend(
                numbered
                    .map(|(i, p)| (first + i as u64, p))
                    .filter(|(seq, _)| *seq > after),
            );
        }
        found.sort_by_key(|(seq, _)| *seq);
        let records: Vec<Vec<u8>> = found
            .into_iter()
            .zip(after + 1..)
            .take_while(|((seq, _), want)| seq == want)
            .map(|((_, payload), _)| payload.to_vec())
            .collect();
        let wal = Wal {
            file,
            half: 0,
            at: 0,
            first: 0,
            grown,
            last: after,
            buf: Vec::new(),
        };
        Ok((wal, records))
    }

    /// The sequence number of the last record appended.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Bytes used in the current half.
    pub fn used(&self) -> u64 {
        self.at
    }

    /// The sequence number of the first record in the half appends go to (0 if none yet):
    /// the other half is free once the database includes every record before it.
    pub fn current_first(&self) -> u64 {
        self.first
    }

    /// Whether a payload of `len` bytes may be appended to the current half.
    pub fn fits(&self, len: usize) -> bool {
        Self::fits_at_all(len) && self.at + (HEADER + len) as u64 <= HALF_BYTES
    }

    /// Whether a payload of `len` bytes can be logged at all (in an empty half).
    pub fn fits_at_all(len: usize) -> bool {
        const { assert!((HEADER + MAX_RECORD) as u64 <= HALF_BYTES) };
        len <= MAX_RECORD
    }

    /// Appends `payload` as the next record and syncs it. Returns its sequence number.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<u64> {
        debug_assert!(self.fits(payload.len()));
        let seq = self.last + 1;
        self.buf.clear();
        encode(seq, payload, &mut self.buf);
        let end = self.at + self.buf.len() as u64;
        let base = self.half as u64 * HALF_BYTES;
        if self.grown[self.half] < end {
            // Zeros up to the step after `end` (within the half), synced with the record.
            let to = (end.div_ceil(GROW_STEP) * GROW_STEP).min(HALF_BYTES);
            let from = self.grown[self.half];
            self.file
                .write_all_at(&vec![0u8; (to - from) as usize], base + from)?;
            self.grown[self.half] = to;
        }
        self.file.write_all_at(&self.buf, base + self.at)?;
        self.file.sync_data()?;
        if self.at == 0 {
            self.first = seq;
        }
        self.at = end;
        self.last = seq;
        Ok(seq)
    }

    /// Moves appends to the start of the other half. The caller makes sure the database
    /// includes every record there first.
    pub fn switch(&mut self) {
        self.half ^= 1;
        self.at = 0;
        self.first = 0;
    }

    /// Starts the log again from the start of the current half, once a durable database
    /// commit includes every record up to `last` (the last appended, or the last replayed
    /// after an open).
    pub fn restart(&mut self, last: u64) {
        self.at = 0;
        self.first = 0;
        self.last = last;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(records: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (s, p) in records {
            encode(*s, p, &mut out);
        }
        out
    }

    #[test]
    fn decode_stops_at_the_first_record_that_does_not_check() {
        let buf = framed(&[(5, b"a"), (6, b"bb"), (7, b"")]);
        assert_eq!(decode(&buf, 5), vec![&b"a"[..], b"bb", b""]);
        // Another starting number: nothing matches.
        assert!(decode(&buf, 4).is_empty());
        assert!(decode(&buf, 6).is_empty());
        // A torn last record, a flipped payload bit, a gap in the numbers.
        assert_eq!(decode(&buf[..buf.len() - 1], 5).len(), 2);
        let mut bad = buf.clone();
        bad[HEADER] ^= 1;
        assert!(decode(&bad, 5).is_empty());
        let gap = framed(&[(5, b"a"), (7, b"c")]);
        assert_eq!(decode(&gap, 5), vec![&b"a"[..]]);
    }

    #[test]
    fn a_restarted_log_ends_where_its_new_records_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.wal");
        let (mut wal, old) = Wal::open(&path, 0).unwrap();
        assert!(old.is_empty());
        for p in [&b"one, a long first record"[..], b"two", b"three"] {
            wal.append(p).unwrap();
        }
        assert_eq!(wal.last(), 3);
        // A checkpoint included 1..=3; one short record follows over the old ones.
        wal.restart(3);
        assert_eq!(wal.append(b"four").unwrap(), 4);
        drop(wal);
        let (wal, replay) = Wal::open(&path, 3).unwrap();
        assert_eq!(replay, vec![b"four".to_vec()]);
        assert_eq!(wal.last(), 3, "the caller numbers on after replaying");
        // What the restart overwrote is gone: the old first record no longer checks.
        let (_, replay) = Wal::open(&path, 0).unwrap();
        assert!(replay.is_empty());
    }
}
