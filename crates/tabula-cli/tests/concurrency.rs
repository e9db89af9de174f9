//! Concurrent writers through NBD: many connections hitting the same unallocated segments
//! at once must get one allocation per segment and lose no write.

mod common;

use common::Server;
use common::nbd::{Client, stamp_block};

#[test]
fn concurrent_first_writes_to_shared_segments_allocate_once_and_lose_nothing() {
    const THREADS: u64 = 8;
    const SEGMENTS: u64 = 32;
    const BLOCKS_PER_SEG: u64 = 256;
    let mut srv = Server::start("512M");
    srv.cli(&["vdisk", "create", "cc", "--size", "256M"]);
    let port = srv.nbd_port;
    // Segments spread over the disk (every 4th), so read-ahead allocation cannot cover
    // them in advance: every segment's first touch is a real race between the threads.
    let seg_of = |i: u64| i * 4 + 1;
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::connect(port, "cc").unwrap();
                // Thread t writes blocks t, t+8, ... of every segment, walking the segments
                // in a thread-specific order.
                for k in 0..SEGMENTS {
                    let s = seg_of((k * 7 + t * 5) % SEGMENTS);
                    for b in (t..BLOCKS_PER_SEG).step_by(THREADS as usize) {
                        let block = s * BLOCKS_PER_SEG + b;
                        c.write(block * 4096, &stamp_block(block, 1), false)
                            .unwrap();
                    }
                }
                c.flush().unwrap();
                c.disconnect();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let show = srv.json(&["vdisk", "show", "cc"]);
    assert_eq!(
        show["allocated"].as_u64().unwrap(),
        SEGMENTS << 20,
        "each touched segment allocated exactly once: {show}"
    );
    let mut c = Client::connect(port, "cc").unwrap();
    for i in 0..SEGMENTS {
        let s = seg_of(i);
        let data = c.read((s * BLOCKS_PER_SEG) * 4096, 1 << 20).unwrap();
        for b in 0..BLOCKS_PER_SEG {
            let block = s * BLOCKS_PER_SEG + b;
            let got = &data[(b * 4096) as usize..((b + 1) * 4096) as usize];
            assert!(got == stamp_block(block, 1), "block {block} lost its write");
        }
    }
    c.disconnect();
    srv.stop_and_check();
}
