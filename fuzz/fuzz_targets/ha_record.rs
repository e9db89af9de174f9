//! Fuzzes what a controller reads back from etcd's log (any process with access to etcd
//! could have written it): a log key's value, a split record's pieces, the changes inside,
//! and an image as a leader sends it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabula_controller::ha::records::{Stored, decode_record, encode_record, join_parts};
use tabula_controller::store;

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into a head and pieces of a split record.
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let (head, tail) = rest.split_at((cut as usize).min(rest.len()));
    match decode_record(head) {
        Ok(Stored::Inline(payload)) => {
            let _ = store::decode_changes(&payload);
            // What an inline record holds encodes back to the same value.
            if payload.len() <= tabula_controller::ha::records::PART_BYTES {
                assert_eq!(encode_record(&payload).0, head);
            }
        }
        Ok(s @ Stored::Parts { .. }) => {
            let parts: Vec<Vec<u8>> = tail.chunks(7).map(<[u8]>::to_vec).collect();
            if let Ok(payload) = join_parts(&s, &parts) {
                let _ = store::decode_changes(&payload);
            }
        }
        Err(_) => {}
    }
    let _ = serde_json::from_slice::<store::Image>(tail);
});
