//! The replicated log in etcd: the leader's fenced commits, and reading records back.
//!
//! Fencing: every write of a record is a transaction that requires the `leader` key to be
//! the one this controller created (its create revision is the epoch). A controller that
//! lost the key, however briefly paused, can add nothing; it finds out from the refused
//! transaction, poisons its journal and steps down.

use std::sync::Arc;
use std::time::Instant;

use tabula_etcd::{Compare, Etcd, EtcdError, Op};
use tracing::{error, warn};

use super::Leadership;
use super::records::{Keys, Stored, decode_record, encode_record, join_parts};
use crate::store::{Replicator, StoreError};

/// The leader's side of the log: the store's [`Replicator`].
pub struct EtcdLog {
    pub etcd: Etcd,
    pub keys: Keys,
    pub epoch: i64,
    pub leadership: Arc<Leadership>,
    pub rt: tokio::runtime::Handle,
}

impl EtcdLog {
    fn fence(&self) -> Compare {
        Compare::CreateRevision(self.keys.leader(), self.epoch)
    }

    async fn write(&self, seq: u64, payload: &[u8]) -> Result<(), String> {
        let (head, parts) = encode_record(payload);
        for (n, part) in parts.into_iter().enumerate() {
            let put = Op::Put {
                key: self.keys.part(seq, n as u32),
                value: part,
                lease: 0,
            };
            // Pieces may be written twice (a retried call): they are the same bytes.
            let r = self
                .etcd
                .txn(vec![self.fence()], vec![put], vec![])
                .await
                .map_err(|e| e.to_string())?;
            if !r.succeeded {
                return Err("this controller is no longer the leader".into());
            }
        }
        let put = Op::Put {
            key: self.keys.log(seq),
            value: head.clone(),
            lease: 0,
        };
        let r = self
            .etcd
            .txn(
                vec![self.fence(), Compare::CreateRevision(self.keys.log(seq), 0)],
                vec![put],
                vec![Op::Get(self.keys.leader()), Op::Get(self.keys.log(seq))],
            )
            .await
            .map_err(|e| e.to_string())?;
        if r.succeeded {
            return Ok(());
        }
        // A call retried on another member after its first attempt was applied finds its
        // own record there: that is success.
        let leader = r.gets.first().cloned().flatten();
        let record = r.gets.get(1).cloned().flatten();
        match (leader, record) {
            (Some(l), Some(rec)) if l.create_revision == self.epoch && rec.value == head => Ok(()),
            (Some(l), Some(_)) if l.create_revision == self.epoch => Err(format!(
                "record {seq} in etcd is not the one this leader wrote; the log has diverged"
            )),
            _ => Err("this controller is no longer the leader".into()),
        }
    }
}

impl Replicator for EtcdLog {
    fn replicate(&self, seq: u64, payload: &[u8]) -> Result<(), StoreError> {
        // No check of the local lease clock here: the transaction's compare is the fence.
        // A leader whose clock lapsed but whose etcd lease lives is still the only one
        // that can commit; one whose lease is gone is refused by etcd.
        let started = Instant::now();
        let fut = self.write(seq, payload);
        // The journal's committer is a plain thread; the controller's start commits from
        // the runtime, where blocking must be announced.
        let r = match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(|| self.rt.block_on(fut)),
            Err(_) => self.rt.block_on(fut),
        };
        match r {
            Ok(()) => {
                let ms = started.elapsed().as_millis() as u64;
                if ms > 1000 {
                    warn!(seq, ms, "a metadata commit to etcd was slow");
                }
                Ok(())
            }
            Err(e) => {
                // Whether or not etcd took it, this controller must stop: what it holds in
                // memory may now differ from the log. The standby it becomes applies the
                // record if etcd has it.
                error!(
                    seq,
                    error = e,
                    "a metadata commit to etcd failed; stepping down"
                );
                self.leadership.lose();
                Err(StoreError::Log(format!(
                    "committing record {seq} to etcd: {e}"
                )))
            }
        }
    }
}

/// What the log holds after a given record.
pub enum Read {
    /// The next records in order (possibly none), and the etcd revision read at.
    Records(Vec<(u64, Vec<u8>)>, i64),
    /// The record wanted is gone (truncated): the oldest one there is.
    Gap { first: u64 },
}

/// Reads up to `limit` records after `after`.
pub async fn read_after(
    etcd: &Etcd,
    keys: &Keys,
    after: u64,
    limit: i64,
) -> Result<Read, EtcdError> {
    let (kvs, rev) = etcd
        .range(&keys.log(after + 1), &keys.log_end(), limit)
        .await?;
    let mut out = Vec::with_capacity(kvs.len());
    let mut want = after + 1;
    for kv in kvs {
        let Some(seq) = keys.seq_of(&kv.key) else {
            continue;
        };
        if seq != want {
            if out.is_empty() {
                return Ok(Read::Gap { first: seq });
            }
            break;
        }
        let payload = match decode_record(&kv.value).map_err(EtcdError::Failed)? {
            Stored::Inline(p) => p,
            s @ Stored::Parts { .. } => {
                join_parts(&s, &read_parts(etcd, keys, seq).await?).map_err(EtcdError::Failed)?
            }
        };
        out.push((seq, payload));
        want += 1;
    }
    Ok(Read::Records(out, rev))
}

/// Pieces of a record per read: a reply stays far below the client's 64 MiB limit however
/// big the record (a snapshot of a large table is tens of pieces).
const PARTS_PER_READ: i64 = 16;

/// The pieces of split record `seq`, in order, a few per request.
async fn read_parts(etcd: &Etcd, keys: &Keys, seq: u64) -> Result<Vec<Vec<u8>>, EtcdError> {
    let (mut next, to) = keys.parts(seq);
    let mut parts = Vec::new();
    loop {
        let (batch, _) = etcd.range(&next, &to, PARTS_PER_READ).await?;
        let n = batch.len() as i64;
        if let Some(last) = batch.last() {
            // The smallest key after the last one read.
            next = last.key.clone();
            next.push(0);
        }
        parts.extend(batch.into_iter().map(|kv| kv.value));
        if n < PARTS_PER_READ {
            return Ok(parts);
        }
    }
}

/// Removes records up to `upto` (and their pieces) from etcd, and compacts etcd's history
/// up to then (etcd 3.4 keeps every old revision otherwise, and its database fills).
pub async fn truncate(etcd: &Etcd, keys: &Keys, upto: u64) -> Result<(), EtcdError> {
    let (from, to) = keys.parts_upto(upto);
    etcd.delete_range(&from, &to).await?;
    let rev = etcd.delete_range(&keys.log(0), &keys.log(upto + 1)).await?;
    etcd.compact(rev).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tabula_etcd::testing::EtcdCluster;

    /// Against a real etcd: a record bigger than many pieces (and than one read of them)
    /// comes back whole; a record written under another epoch is refused and leaves
    /// nothing readable; a second writer of the same sequence number is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_round_trip_through_etcd_and_are_fenced() {
        let Some(cluster) = EtcdCluster::try_start(1) else {
            return;
        };
        let etcd = cluster.client(Duration::from_secs(5)).await;
        let keys = Keys::new("/t");
        let leader = etcd
            .txn(
                vec![Compare::CreateRevision(keys.leader(), 0)],
                vec![Op::Put {
                    key: keys.leader(),
                    value: b"me".to_vec(),
                    lease: 0,
                }],
                vec![],
            )
            .await
            .unwrap();
        let leadership = Arc::new(Leadership::default());
        let log = |epoch| EtcdLog {
            etcd: etcd.clone(),
            keys: keys.clone(),
            epoch,
            leadership: leadership.clone(),
            rt: tokio::runtime::Handle::current(),
        };
        let mine = log(leader.revision);
        // 20 pieces: more than one read of them.
        let big: Vec<u8> = (0..20 * super::super::records::PART_BYTES + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        let small = b"[]".to_vec();
        tokio::task::block_in_place(|| {
            mine.replicate(1, &big).unwrap();
            mine.replicate(2, &small).unwrap();
            assert!(
                mine.replicate(2, b"x").is_err(),
                "a second record 2 is refused"
            );
            assert!(
                log(leader.revision + 1000).replicate(3, &small).is_err(),
                "another epoch is fenced"
            );
        });
        let Read::Records(got, _) = read_after(&etcd, &keys, 0, 10).await.unwrap() else {
            panic!("no gap expected");
        };
        assert_eq!(got.len(), 2, "record 3 was never written");
        assert!(got[0] == (1, big), "the split record comes back whole");
        assert_eq!(got[1], (2, small));
        truncate(&etcd, &keys, 1).await.unwrap();
        assert!(matches!(
            read_after(&etcd, &keys, 0, 10).await.unwrap(),
            Read::Gap { first: 2 }
        ));
    }
}
