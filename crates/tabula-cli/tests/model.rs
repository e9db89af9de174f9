//! Model-based random test in the spirit of fsx: thousands of random reads, writes, trims,
//! write-zeroes and flushes through NBD at awkward offsets, every read checked against an
//! in-memory model of the vdisk, with restarts in between and `tabula check` at the end.
//! The pool is smaller than the vdisk, so space is freed, zeroed and reused all along, and
//! some writes meet ENOSPC (which must leave the vdisk unchanged).
//!
//! Reproduce a failure with `TABULA_SEED=<seed printed> cargo test --test model`.

mod common;

use common::Server;
use common::nbd::{Client, NbdErr, Rng, edge_range, seed};

const SIZE: u64 = 32 << 20;
const SEG: u64 = 64 << 10;
const ENOSPC: u32 = 28;

/// The whole segments `[off, off+len)` covers; the last segment counts when the range
/// reaches the end of the vdisk (tabula's documented TRIM behaviour).
fn whole_segments(off: u64, len: u64) -> (u64, u64) {
    let end = off + len;
    let b = off.div_ceil(SEG) * SEG;
    let e = if end >= SIZE { SIZE } else { end / SEG * SEG };
    (b, e.max(b))
}

#[test]
fn random_io_matches_model() {
    let seed = seed();
    eprintln!("model test seed: {seed} (rerun with TABULA_SEED={seed})");
    let mut rng = Rng(seed);
    let mut srv = Server::start("24M");
    srv.cli(&[
        "vdisk",
        "create",
        "m",
        "--size",
        "32M",
        "--segment-size",
        "64K",
    ]);
    let mut model = vec![0u8; SIZE as usize];
    let mut c = Client::connect(srv.nbd_port, "m").unwrap();
    let mut counts = [0usize; 6];
    for step in 0..10000 {
        let (off, len) = edge_range(&mut rng, SEG, SIZE);
        let (o, l) = (off as usize, len as usize);
        let what = rng.below(20);
        let ctx = || format!("seed {seed} step {step}: off {off} len {len}");
        match what {
            0..=7 => {
                let byte = (rng.below(255) + 1) as u8;
                let mut data = vec![byte; l];
                // Vary the content so misplaced bytes are caught.
                for (i, d) in data.iter_mut().enumerate().step_by(511) {
                    *d = (i as u8) ^ byte;
                }
                match c.write(off, &data, rng.below(8) == 0) {
                    Ok(()) => {
                        model[o..o + l].copy_from_slice(&data);
                        counts[0] += 1;
                    }
                    Err(NbdErr::Errno(ENOSPC)) => counts[5] += 1,
                    Err(e) => panic!("{}: write failed: {e:?}", ctx()),
                }
            }
            8..=13 => {
                let got = c
                    .read(off, len as u32)
                    .unwrap_or_else(|e| panic!("{}: read: {e:?}", ctx()));
                if got != model[o..o + l] {
                    let at = got
                        .iter()
                        .zip(&model[o..o + l])
                        .position(|(a, b)| a != b)
                        .unwrap();
                    panic!(
                        "{}: byte {} differs: read {:#x}, model {:#x}",
                        ctx(),
                        off + at as u64,
                        got[at],
                        model[o + at]
                    );
                }
                counts[1] += 1;
            }
            14..=15 => {
                c.trim(off, len as u32)
                    .unwrap_or_else(|e| panic!("{}: trim: {e:?}", ctx()));
                let (b, e) = whole_segments(off, len);
                model[b as usize..e as usize].fill(0);
                counts[2] += 1;
            }
            16..=17 => match c.write_zeroes(off, len as u32) {
                Ok(()) => {
                    model[o..o + l].fill(0);
                    counts[3] += 1;
                }
                Err(e) => panic!("{}: write zeroes: {e:?}", ctx()),
            },
            18 => {
                c.flush().unwrap();
                counts[4] += 1;
            }
            _ => {
                if step % 500 == 19 || rng.below(40) == 0 {
                    // Clean restart: everything must come back.
                    c.flush().unwrap();
                    c.disconnect();
                    srv.stop();
                    srv.spawn();
                    c = Client::connect(srv.nbd_port, "m").unwrap();
                }
            }
        }
    }
    // A final full comparison, then the metadata invariants.
    for chunk in 0..SIZE / (1 << 20) {
        let got = c.read(chunk << 20, 1 << 20).unwrap();
        let want = &model[(chunk << 20) as usize..((chunk + 1) << 20) as usize];
        assert!(
            got == want,
            "seed {seed}: final compare differs in MiB {chunk}"
        );
    }
    eprintln!(
        "writes {} reads {} trims {} zeroes {} flushes {} enospc {}",
        counts[0], counts[1], counts[2], counts[3], counts[4], counts[5]
    );
    assert!(
        counts[0] > 2000 && counts[1] > 2000 && counts[2] > 200,
        "too few operations ran"
    );
    c.disconnect();
    srv.stop_and_check();
}
