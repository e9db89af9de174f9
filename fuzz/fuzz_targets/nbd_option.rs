//! Fuzzes the handshake parsers: client flags, the option header and every
//! option payload parser. None of them may panic; whatever parses must
//! re-encode to a payload that parses to the same value.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tabula_nbd::codec::{self, OptionHeader};

fuzz_target!(|data: &[u8]| {
    let _ = codec::parse_client_flags(data);
    let _ = codec::parse_option_header(data);
    if data.len() < 4 {
        return;
    }
    // First 4 bytes choose the option (folded onto the interesting range
    // most of the time), the rest is its payload.
    let raw = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let option = if raw & 0x8000_0000 == 0 {
        raw % 16
    } else {
        raw
    };
    let payload = &data[4..];
    if let Ok(parsed) = codec::parse_option(option, payload) {
        let mut buf = BytesMut::new();
        parsed.encode(&mut buf);
        let hdr = codec::parse_option_header(&buf[..OptionHeader::LEN]).expect("own header");
        let again =
            codec::parse_option(hdr.option, &buf[OptionHeader::LEN..]).expect("own payload");
        assert_eq!(again, parsed);
    }
});
