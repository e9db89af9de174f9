//! Fuzzes the controller's metadata log as a start reads it back after a crash: the record
//! framing (a torn or stale tail must end a run, never panic or read past the buffer) and
//! the changes in each record that passes its checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabula_controller::{store, wal};

fuzz_target!(|data: &[u8]| {
    let (first, run) = wal::decode_run(data);
    let mut again = Vec::new();
    for (i, payload) in run.iter().enumerate() {
        assert!(payload.len() <= wal::MAX_RECORD);
        let _ = store::decode_changes(payload);
        wal::encode(first + i as u64, payload, &mut again);
    }
    // What decodes is exactly what was encoded, from the start of the buffer.
    assert_eq!(&data[..again.len()], &again[..]);
});
