//! Crash tests: `kill -9` of `tabula serve` while a client writes with flushes and FUA, then
//! restart: every write acknowledged with FUA or before a completed FLUSH must read back,
//! and `tabula check` must find the metadata consistent (no segment owned twice or leaked).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nbd::{Client, stamp_block};
use common::{Server, check_data_dir};

const BLOCKS: u64 = 64 * 256; // 64 MiB vdisk in 4 KiB blocks, 64 segments

/// Per block: every version written, in order, with whether it is known durable.
#[derive(Default)]
struct History {
    /// block -> [(version, durable)]
    writes: HashMap<u64, Vec<(u64, bool)>>,
    /// Versions written since the last completed flush, by block.
    pending: Vec<(u64, usize)>,
}

impl History {
    /// Records a write before it is sent: once sent, it may land even if its
    /// acknowledgement is lost in the crash.
    fn sending(&mut self, block: u64, version: u64) -> usize {
        let list = self.writes.entry(block).or_default();
        list.push((version, false));
        self.pending.push((block, list.len() - 1));
        list.len() - 1
    }

    /// A FUA write was acknowledged: it is durable.
    fn fua_acked(&mut self, block: u64, index: usize) {
        self.writes.get_mut(&block).unwrap()[index].1 = true;
    }

    fn flushed(&mut self, sent: usize) {
        for (b, i) in self.pending.drain(..sent) {
            self.writes.get_mut(&b).unwrap()[i].1 = true;
        }
    }

    /// Versions a block may hold after a crash: the last durable one, or any written after it.
    fn allowed(&self, block: u64) -> Vec<Option<u64>> {
        let Some(list) = self.writes.get(&block) else {
            return vec![None];
        };
        let last_durable = list.iter().rposition(|w| w.1);
        let mut out: Vec<Option<u64>> = match last_durable {
            Some(i) => vec![version(list[i].0)],
            None => vec![None],
        };
        let from = last_durable.map_or(0, |i| i + 1);
        out.extend(list[from..].iter().map(|w| version(w.0)));
        out
    }
}

/// Version 0 stands for "zeroed by WRITE_ZEROES", which reads like never written.
fn version(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Writes random blocks (some allocating, some overwriting, some FUA), flushing every few
/// writes, until the connection breaks.
fn writer(port: u16, history: Arc<Mutex<History>>, mut seed: u64, first_version: u64) {
    let Ok(mut c) = Client::connect(port, "crashy") else {
        return;
    };
    // Writes left unflushed by the previous connection stay undecided for ever: a flush on
    // this connection says nothing about them.
    history.lock().unwrap().pending.clear();
    let mut version = first_version;
    loop {
        for _ in 0..8 {
            if xorshift(&mut seed) % 16 == 0 {
                // Zero a whole segment: it is unmapped and its space freed and reused.
                let seg = xorshift(&mut seed) % (BLOCKS / 256);
                let mut h = history.lock().unwrap();
                for b in seg * 256..(seg + 1) * 256 {
                    h.sending(b, 0);
                }
                drop(h);
                if c.write_zeroes(seg << 20, 1 << 20).is_err() {
                    return;
                }
                continue;
            }
            let block = xorshift(&mut seed) % BLOCKS;
            let fua = xorshift(&mut seed) % 5 == 0;
            version += 1;
            let index = history.lock().unwrap().sending(block, version);
            if c.write(block * 4096, &stamp_block(block, version), fua)
                .is_err()
            {
                return;
            }
            if fua {
                history.lock().unwrap().fua_acked(block, index);
            }
        }
        // Writes sent before the flush and acknowledged are durable once it completes.
        let sent = history.lock().unwrap().pending.len();
        if c.flush().is_err() {
            return;
        }
        history.lock().unwrap().flushed(sent);
    }
}

fn verify(port: u16, history: &History) {
    let mut c = Client::connect(port, "crashy").expect("connect after restart");
    for block in 0..BLOCKS {
        let allowed = history.allowed(block);
        if allowed == [None] {
            continue;
        }
        let data = c.read(block * 4096, 4096).expect("read after restart");
        let found = if data.iter().all(|&b| b == 0) {
            None
        } else {
            let v = u64::from_le_bytes(data[8..16].try_into().unwrap());
            assert_eq!(
                data,
                stamp_block(block, v),
                "block {block} is torn or foreign"
            );
            Some(v)
        };
        assert!(
            allowed.contains(&found),
            "block {block}: found version {found:?}, but after the crash it may only hold {allowed:?}"
        );
    }
    c.disconnect();
}

#[test]
fn kill9_during_flushed_writes_loses_nothing_acknowledged() {
    let mut srv = Server::start("256M");
    srv.cli(&["vdisk", "create", "crashy", "--size", "64M"]);
    let history = Arc::new(Mutex::new(History::default()));
    let mut seed = 0x1234_5678_9abc_def1u64;
    for round in 0..4u64 {
        let h = history.clone();
        let port = srv.nbd_port;
        let s = xorshift(&mut seed);
        let t = std::thread::spawn(move || writer(port, h, s, round * 1_000_000));
        // Kill at a varying moment while writes and flushes are in flight.
        std::thread::sleep(Duration::from_millis(300 + xorshift(&mut seed) % 700));
        srv.kill9();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "writer did not notice the crash");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().unwrap();
        // Metadata is consistent straight after the crash.
        check_data_dir(&srv.data_dir);
        srv.spawn();
        let h = history.lock().unwrap();
        let written: usize = h.writes.values().map(Vec::len).sum();
        assert!(
            written > 0,
            "round {round}: the writer wrote nothing before the kill"
        );
        verify(srv.nbd_port, &h);
    }
    srv.stop_and_check();
}
