//! Fuzzes the transmission request header parser and the request
//! validation logic against arbitrary negotiated contexts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tabula_nbd::codec::{self, Command, TransmissionContext};

fuzz_target!(|data: &[u8]| {
    let _ = codec::parse_request_header(data);
    if data.len() < 28 + 8 + 2 + 1 + 4 + 4 {
        return;
    }
    let (hdr_bytes, rest) = data.split_at(28);
    // Force the magic so validation is reached on most inputs.
    let mut hdr_bytes = hdr_bytes.to_vec();
    hdr_bytes[..4].copy_from_slice(&tabula_nbd::consts::REQUEST_MAGIC.to_be_bytes());
    let Ok(req) = codec::parse_request_header(&hdr_bytes) else {
        panic!("header with valid magic must parse");
    };
    let u64_at = |i: usize| u64::from_be_bytes(rest[i..i + 8].try_into().unwrap());
    let u32_at = |i: usize| u32::from_be_bytes(rest[i..i + 4].try_into().unwrap());
    let ctx = TransmissionContext {
        export_size: u64_at(0),
        transmission_flags: u16::from_be_bytes([rest[8], rest[9]]),
        structured_replies: rest[10] & 1 != 0,
        meta_context: rest[10] & 2 != 0,
        min_block: u32_at(11) % 65537,
        max_payload: u32_at(15),
    };
    match codec::validate_request(&req, &ctx) {
        Ok(cmd) => {
            // Accepted ranges never extend past the export.
            let range = match cmd {
                Command::Read { offset, length }
                | Command::Write { offset, length, .. }
                | Command::Trim { offset, length, .. }
                | Command::Cache { offset, length }
                | Command::WriteZeroes { offset, length, .. }
                | Command::BlockStatus { offset, length, .. } => Some((offset, length)),
                Command::Disconnect | Command::Flush => None,
            };
            if let Some((offset, length)) = range {
                let end = offset.checked_add(u64::from(length)).expect("no overflow");
                assert!(end <= ctx.export_size);
            }
        }
        Err(rej) => {
            assert!(rej.discard == 0 || req.command == tabula_nbd::consts::NBD_CMD_WRITE);
        }
    }
});
