//! Unit tests of the sans-I/O codec: round trips, one `rejects_*` test per
//! malformed input class, `accepts_*` tests, and property tests.

use super::*;
use proptest::prelude::*;

fn encode_opt(opt: &ClientOption) -> (OptionHeader, Vec<u8>) {
    let mut buf = BytesMut::new();
    opt.encode(&mut buf);
    let hdr = parse_option_header(&buf[..OptionHeader::LEN]).unwrap();
    (hdr, buf[OptionHeader::LEN..].to_vec())
}

fn roundtrip(opt: ClientOption) {
    let (hdr, payload) = encode_opt(&opt);
    assert_eq!(hdr.length as usize, payload.len());
    assert_eq!(parse_option(hdr.option, &payload).unwrap(), opt);
}

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

// ----- round trips ---------------------------------------------------------

#[test]
fn roundtrip_all_option_variants() {
    let info = InfoRequest {
        name: "vol-1".into(),
        requests: vec![NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE, 999],
    };
    let meta = MetaContextRequest {
        export_name: "vol-1".into(),
        queries: vec!["base:allocation".into(), "x-foo:bar".into()],
    };
    for opt in [
        ClientOption::ExportName("disk".into()),
        ClientOption::ExportName(String::new()),
        ClientOption::Abort,
        ClientOption::List,
        ClientOption::StartTls,
        ClientOption::Info(info.clone()),
        ClientOption::Go(info),
        ClientOption::Go(InfoRequest {
            name: String::new(),
            requests: vec![],
        }),
        ClientOption::StructuredReply,
        ClientOption::ListMetaContext(meta.clone()),
        ClientOption::SetMetaContext(meta),
        ClientOption::SetMetaContext(MetaContextRequest {
            export_name: String::new(),
            queries: vec![],
        }),
        ClientOption::ExtendedHeaders,
        ClientOption::Unknown(0xdead),
    ] {
        roundtrip(opt);
    }
}

#[test]
fn roundtrip_client_flags() {
    for (f, n) in [(false, false), (true, false), (false, true), (true, true)] {
        let flags = ClientFlags {
            fixed_newstyle: f,
            no_zeroes: n,
        };
        assert_eq!(parse_client_flags(&be32(flags.to_wire())).unwrap(), flags);
    }
}

#[test]
fn roundtrip_request_header() {
    let h = RequestHeader {
        flags: NBD_CMD_FLAG_FUA,
        command: NBD_CMD_WRITE,
        cookie: 0x0102_0304_0506_0708,
        offset: 1 << 40,
        length: 65536,
    };
    let mut buf = BytesMut::new();
    h.encode(&mut buf);
    assert_eq!(buf.len(), REQUEST_HEADER_LEN);
    assert_eq!(&buf[..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(parse_request_header(&buf).unwrap(), h);
}

#[test]
fn greeting_layout() {
    let mut buf = BytesMut::new();
    encode_greeting(&mut buf);
    assert_eq!(&buf[..8], b"NBDMAGIC");
    assert_eq!(&buf[8..16], b"IHAVEOPT");
    assert_eq!(&buf[16..], &[0, 3]);
}

fn split_reply(buf: &[u8]) -> (OptionReplyHeader, &[u8]) {
    let h = parse_option_reply_header(&buf[..OPTION_REPLY_HEADER_LEN]).unwrap();
    let data = &buf[OPTION_REPLY_HEADER_LEN..];
    assert_eq!(h.length as usize, data.len());
    (h, data)
}

#[test]
fn roundtrip_option_replies() {
    let mut b = BytesMut::new();
    encode_rep_ack(&mut b, NBD_OPT_ABORT);
    let (h, d) = split_reply(&b);
    assert_eq!(
        (h.option, h.reply_type, d.len()),
        (NBD_OPT_ABORT, NBD_REP_ACK, 0)
    );

    let mut b = BytesMut::new();
    encode_rep_server(&mut b, NBD_OPT_LIST, "vol", Some("desc"));
    let (h, d) = split_reply(&b);
    assert_eq!(h.reply_type, NBD_REP_SERVER);
    assert_eq!(&d[..4], &be32(3));
    assert_eq!(&d[4..], b"voldesc");

    let mut b = BytesMut::new();
    encode_info_export(&mut b, NBD_OPT_GO, 1 << 30, 0x1234);
    let (h, d) = split_reply(&b);
    assert_eq!(h.reply_type, NBD_REP_INFO);
    assert_eq!(d.len(), 12);
    assert_eq!(&d[..2], &[0, 0]);
    assert_eq!(&d[2..10], &(1u64 << 30).to_be_bytes());
    assert_eq!(&d[10..], &[0x12, 0x34]);

    let mut b = BytesMut::new();
    encode_info_name(&mut b, NBD_OPT_INFO, "n");
    let (_, d) = split_reply(&b);
    assert_eq!(d, &[0, 1, b'n']);

    let mut b = BytesMut::new();
    encode_info_description(&mut b, NBD_OPT_INFO, "dd");
    let (_, d) = split_reply(&b);
    assert_eq!(d, &[0, 2, b'd', b'd']);

    let mut b = BytesMut::new();
    encode_info_block_size(&mut b, NBD_OPT_GO, 1, 4096, 1 << 25);
    let (_, d) = split_reply(&b);
    assert_eq!(d.len(), 14);
    assert_eq!(&d[..2], &[0, 3]);
    assert_eq!(&d[2..6], &be32(1));
    assert_eq!(&d[6..10], &be32(4096));
    assert_eq!(&d[10..], &be32(1 << 25));

    let mut b = BytesMut::new();
    encode_rep_meta_context(&mut b, NBD_OPT_SET_META_CONTEXT, 7, BASE_ALLOCATION);
    let (h, d) = split_reply(&b);
    assert_eq!(h.reply_type, NBD_REP_META_CONTEXT);
    assert_eq!(&d[..4], &be32(7));
    assert_eq!(&d[4..], BASE_ALLOCATION.as_bytes());

    let mut b = BytesMut::new();
    encode_rep_error(&mut b, NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, "no such export");
    let (h, d) = split_reply(&b);
    assert_eq!(h.reply_type, 0x8000_0006);
    assert_eq!(d, b"no such export");
}

#[test]
fn error_messages_are_truncated_to_4096_bytes_on_char_boundary() {
    let long = "é".repeat(3000); // 6000 bytes
    let mut b = BytesMut::new();
    encode_rep_error(&mut b, 1, NBD_REP_ERR_INVALID, &long);
    let (_, d) = split_reply(&b);
    assert_eq!(d.len(), 4096);
    assert!(std::str::from_utf8(d).is_ok());

    let mut b = BytesMut::new();
    encode_error_chunk(&mut b, 1, NBD_EIO, &long);
    let c = parse_chunk_header(&b[..CHUNK_HEADER_LEN]).unwrap();
    assert_eq!(c.length, 6 + 4096);
}

#[test]
fn export_name_reply_with_and_without_zeroes() {
    let mut b = BytesMut::new();
    encode_export_name_reply(&mut b, 4096, 0x0101, false);
    assert_eq!(b.len(), 8 + 2 + 124);
    assert!(b[10..].iter().all(|&x| x == 0));
    let mut b = BytesMut::new();
    encode_export_name_reply(&mut b, 4096, 0x0101, true);
    assert_eq!(b.len(), 10);
    assert_eq!(&b[..8], &4096u64.to_be_bytes());
    assert_eq!(&b[8..], &[1, 1]);
}

#[test]
fn roundtrip_simple_reply() {
    let mut b = BytesMut::new();
    encode_simple_reply(&mut b, NBD_EINVAL, 42);
    assert_eq!(b.len(), SIMPLE_REPLY_LEN);
    assert_eq!(
        parse_simple_reply(&b).unwrap(),
        SimpleReply {
            error: 22,
            cookie: 42
        }
    );
}

#[test]
fn roundtrip_structured_chunks() {
    let mut b = BytesMut::new();
    encode_offset_data(&mut b, 9, 512, b"hello", true);
    let c = parse_chunk_header(&b[..20]).unwrap();
    assert_eq!(
        c,
        ChunkHeader {
            flags: NBD_REPLY_FLAG_DONE,
            chunk_type: NBD_REPLY_TYPE_OFFSET_DATA,
            cookie: 9,
            length: 13
        }
    );
    assert_eq!(&b[20..28], &512u64.to_be_bytes());
    assert_eq!(&b[28..], b"hello");

    let mut b = BytesMut::new();
    encode_offset_hole(&mut b, 9, 1024, 4096, false);
    let c = parse_chunk_header(&b[..20]).unwrap();
    assert_eq!(
        (c.flags, c.chunk_type, c.length),
        (0, NBD_REPLY_TYPE_OFFSET_HOLE, 12)
    );
    assert_eq!(&b[28..], &be32(4096));

    let mut b = BytesMut::new();
    encode_block_status(
        &mut b,
        3,
        1,
        &[(4096, NBD_STATE_HOLE | NBD_STATE_ZERO), (512, 0)],
        true,
    );
    let c = parse_chunk_header(&b[..20]).unwrap();
    assert_eq!(
        (c.chunk_type, c.length),
        (NBD_REPLY_TYPE_BLOCK_STATUS, 4 + 16)
    );
    assert_eq!(&b[20..24], &be32(1));
    assert_eq!(&b[24..28], &be32(4096));
    assert_eq!(&b[28..32], &be32(3));
    assert_eq!(&b[32..36], &be32(512));

    let mut b = BytesMut::new();
    encode_error_chunk(&mut b, 5, NBD_EPERM, "ro");
    let c = parse_chunk_header(&b[..20]).unwrap();
    assert_eq!((c.flags, c.chunk_type, c.length), (1, 0x8001, 8));
    assert_eq!(&b[20..24], &be32(1));
    assert_eq!(&b[24..26], &[0, 2]);
    assert_eq!(&b[26..], b"ro");

    let mut b = BytesMut::new();
    encode_none_chunk(&mut b, 77);
    let c = parse_chunk_header(&b).unwrap();
    assert_eq!((c.flags, c.chunk_type, c.cookie, c.length), (1, 0, 77, 0));
}

#[test]
fn errno_wire_values_roundtrip() {
    for (e, v) in [
        (Errno::Perm, 1),
        (Errno::Io, 5),
        (Errno::NoMem, 12),
        (Errno::Inval, 22),
        (Errno::NoSpc, 28),
        (Errno::Overflow, 75),
        (Errno::NotSup, 95),
        (Errno::Shutdown, 108),
    ] {
        assert_eq!(e.to_wire(), v);
        assert_eq!(Errno::from_wire(v), Some(e));
    }
    assert_eq!(Errno::from_wire(0), None);
}

// ----- rejects -------------------------------------------------------------

#[test]
fn rejects_client_flags_unknown_bits() {
    assert_eq!(
        parse_client_flags(&be32(4)),
        Err(ProtocolError::UnknownClientFlags(4))
    );
}

#[test]
fn rejects_client_flags_truncated() {
    assert!(matches!(
        parse_client_flags(&[0, 0, 1]),
        Err(ProtocolError::Truncated { .. })
    ));
}

#[test]
fn rejects_option_header_bad_magic() {
    let mut b = BytesMut::new();
    OptionHeader {
        option: 1,
        length: 0,
    }
    .encode(&mut b);
    b[0] ^= 0xff;
    assert!(matches!(
        parse_option_header(&b),
        Err(ProtocolError::BadMagic { .. })
    ));
}

#[test]
fn rejects_option_header_truncated() {
    let mut b = BytesMut::new();
    OptionHeader {
        option: 1,
        length: 0,
    }
    .encode(&mut b);
    assert!(matches!(
        parse_option_header(&b[..15]),
        Err(ProtocolError::Truncated { .. })
    ));
}

#[test]
fn rejects_export_name_too_long() {
    let name = vec![b'a'; 4097];
    assert_eq!(
        parse_option(NBD_OPT_EXPORT_NAME, &name),
        Err(ProtocolError::StringTooLong(4097))
    );
}

#[test]
fn rejects_export_name_not_utf8() {
    assert_eq!(
        parse_option(NBD_OPT_EXPORT_NAME, &[0xff, 0xfe]),
        Err(ProtocolError::NotUtf8)
    );
}

#[test]
fn rejects_export_name_with_nul() {
    assert_eq!(
        parse_option(NBD_OPT_EXPORT_NAME, b"a\0b"),
        Err(ProtocolError::ContainsNul)
    );
}

#[test]
fn rejects_nonempty_abort_list_structured_reply() {
    for opt in [NBD_OPT_ABORT, NBD_OPT_LIST, NBD_OPT_STRUCTURED_REPLY] {
        assert_eq!(
            parse_option(opt, &[0]),
            Err(ProtocolError::UnexpectedPayload)
        );
    }
}

#[test]
fn rejects_info_name_length_past_end() {
    let mut p = be32(10).to_vec();
    p.extend_from_slice(b"abc");
    assert!(matches!(
        parse_option(NBD_OPT_GO, &p),
        Err(ProtocolError::Truncated { .. })
    ));
}

#[test]
fn rejects_info_name_length_huge() {
    let p = be32(u32::MAX).to_vec();
    assert_eq!(
        parse_option(NBD_OPT_INFO, &p),
        Err(ProtocolError::StringTooLong(u32::MAX as usize))
    );
}

#[test]
fn rejects_info_missing_request_count() {
    let mut p = be32(1).to_vec();
    p.push(b'a');
    assert!(matches!(
        parse_option(NBD_OPT_GO, &p),
        Err(ProtocolError::Truncated { .. })
    ));
}

#[test]
fn rejects_info_request_count_past_end() {
    let mut p = be32(0).to_vec();
    p.extend_from_slice(&[0, 3, 0, 1]); // claims 3 requests, has 1
    assert!(matches!(
        parse_option(NBD_OPT_GO, &p),
        Err(ProtocolError::Truncated { .. })
    ));
}

#[test]
fn rejects_info_trailing_bytes() {
    let mut p = be32(0).to_vec();
    p.extend_from_slice(&[0, 1, 0, 1, 9]);
    assert_eq!(
        parse_option(NBD_OPT_INFO, &p),
        Err(ProtocolError::TrailingBytes(1))
    );
}

#[test]
fn rejects_meta_context_query_count_past_end() {
    let mut p = be32(0).to_vec();
    p.extend_from_slice(&be32(u32::MAX));
    assert!(matches!(
        parse_option(NBD_OPT_SET_META_CONTEXT, &p),
        Err(ProtocolError::Truncated { .. })
    ));
}

#[test]
fn rejects_meta_context_query_length_past_end() {
    let mut p = be32(0).to_vec();
    p.extend_from_slice(&be32(1));
    p.extend_from_slice(&be32(100));
    p.extend_from_slice(b"base:allocation");
    assert!(matches!(
        parse_option(NBD_OPT_LIST_META_CONTEXT, &p),
        Err(ProtocolError::Truncated { .. })
    ));
}

#[test]
fn rejects_meta_context_query_not_utf8() {
    let mut p = be32(0).to_vec();
    p.extend_from_slice(&be32(1));
    p.extend_from_slice(&be32(2));
    p.extend_from_slice(&[0xc3, 0x28]);
    assert_eq!(
        parse_option(NBD_OPT_SET_META_CONTEXT, &p),
        Err(ProtocolError::NotUtf8)
    );
}

#[test]
fn rejects_meta_context_missing_query_count() {
    assert!(matches!(
        parse_option(NBD_OPT_SET_META_CONTEXT, &be32(0)),
        Err(ProtocolError::Truncated { .. })
    ));
}

#[test]
fn rejects_meta_context_trailing_bytes() {
    let mut p = be32(0).to_vec();
    p.extend_from_slice(&be32(0));
    p.push(0);
    assert_eq!(
        parse_option(NBD_OPT_SET_META_CONTEXT, &p),
        Err(ProtocolError::TrailingBytes(1))
    );
}

#[test]
fn rejects_request_header_bad_magic() {
    let mut b = BytesMut::new();
    RequestHeader::default().encode(&mut b);
    b[3] = 0;
    assert!(matches!(
        parse_request_header(&b),
        Err(ProtocolError::BadMagic { .. })
    ));
}

#[test]
fn rejects_request_header_truncated() {
    let mut b = BytesMut::new();
    RequestHeader::default().encode(&mut b);
    assert!(matches!(
        parse_request_header(&b[..27]),
        Err(ProtocolError::Truncated { .. })
    ));
}

#[test]
fn rejects_request_header_too_long() {
    let mut b = BytesMut::new();
    RequestHeader::default().encode(&mut b);
    b.put_u8(0);
    assert_eq!(
        parse_request_header(&b),
        Err(ProtocolError::TrailingBytes(1))
    );
}

// ----- accepts -------------------------------------------------------------

#[test]
fn accepts_name_of_exactly_4096_bytes() {
    let name = "a".repeat(4096);
    assert_eq!(
        parse_option(NBD_OPT_EXPORT_NAME, name.as_bytes()).unwrap(),
        ClientOption::ExportName(name)
    );
}

#[test]
fn accepts_unknown_option_with_any_payload() {
    assert_eq!(
        parse_option(4242, &[1, 2, 3]).unwrap(),
        ClientOption::Unknown(4242)
    );
    assert_eq!(
        parse_option(NBD_OPT_STARTTLS, &[1]).unwrap(),
        ClientOption::StartTls
    );
}

#[test]
fn accepts_unicode_export_name() {
    assert_eq!(
        parse_option(NBD_OPT_EXPORT_NAME, "vólume-✓".as_bytes()).unwrap(),
        ClientOption::ExportName("vólume-✓".into())
    );
}

#[test]
fn accepts_client_flags_zero() {
    assert_eq!(
        parse_client_flags(&be32(0)).unwrap(),
        ClientFlags::default()
    );
}

// ----- validation ----------------------------------------------------------

const FULL_FLAGS: u16 = NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_SEND_DF
    | NBD_FLAG_SEND_CACHE
    | NBD_FLAG_SEND_FAST_ZERO;

fn ctx() -> TransmissionContext {
    TransmissionContext {
        export_size: 1 << 20,
        transmission_flags: FULL_FLAGS,
        structured_replies: true,
        meta_context: true,
        min_block: 1,
        max_payload: 1 << 16,
    }
}

fn req(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie: 1,
        offset,
        length,
    }
}

#[test]
fn accepts_valid_commands() {
    let c = ctx();
    assert_eq!(
        validate_request(&req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512), &c),
        Ok(Command::Read {
            offset: 0,
            length: 512
        })
    );
    assert_eq!(
        validate_request(&req(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 512, 512), &c),
        Ok(Command::Write {
            offset: 512,
            length: 512,
            fua: true
        })
    );
    assert_eq!(
        validate_request(
            &req(
                NBD_CMD_WRITE_ZEROES,
                NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
                0,
                1 << 20
            ),
            &c
        ),
        Ok(Command::WriteZeroes {
            offset: 0,
            length: 1 << 20,
            fua: false,
            no_hole: true,
            fast_zero: true
        })
    );
    assert_eq!(
        validate_request(
            &req(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 1 << 20),
            &c
        ),
        Ok(Command::BlockStatus {
            offset: 0,
            length: 1 << 20,
            req_one: true
        })
    );
    assert_eq!(
        validate_request(&req(NBD_CMD_FLUSH, 0, 0, 0), &c),
        Ok(Command::Flush)
    );
    assert_eq!(
        validate_request(&req(NBD_CMD_DISC, 0, 0, 0), &c),
        Ok(Command::Disconnect)
    );
    assert!(validate_request(&req(NBD_CMD_TRIM, NBD_CMD_FLAG_FUA, 0, 4096), &c).is_ok());
    assert!(validate_request(&req(NBD_CMD_CACHE, 0, 0, 4096), &c).is_ok());
    // Zero-length reads are unspecified but must not disconnect.
    assert!(validate_request(&req(NBD_CMD_READ, 0, 1 << 20, 0), &c).is_ok());
}

#[test]
fn rejects_out_of_range_requests() {
    let c = ctx();
    let e = validate_request(&req(NBD_CMD_READ, 0, (1 << 20) - 1, 2), &c).unwrap_err();
    assert_eq!(e.errno, Errno::Inval);
    let e = validate_request(&req(NBD_CMD_READ, 0, u64::MAX, 2), &c).unwrap_err();
    assert_eq!(e.errno, Errno::Inval);
    let e = validate_request(&req(NBD_CMD_WRITE, 0, 1 << 20, 1), &c).unwrap_err();
    assert_eq!((e.errno, e.discard, e.fatal), (Errno::NoSpc, 1, false));
    let e = validate_request(&req(NBD_CMD_TRIM, 0, 1 << 20, 1), &c).unwrap_err();
    assert_eq!(e.errno, Errno::Inval);
    let e = validate_request(&req(NBD_CMD_BLOCK_STATUS, 0, 1 << 20, 1), &c).unwrap_err();
    assert_eq!(e.errno, Errno::Inval);
}

#[test]
fn rejects_oversized_payloads() {
    let c = ctx();
    let e = validate_request(&req(NBD_CMD_READ, 0, 0, (1 << 16) + 1), &c).unwrap_err();
    assert_eq!((e.errno, e.fatal), (Errno::Inval, false));
    let e = validate_request(&req(NBD_CMD_WRITE, 0, 0, (1 << 16) + 1), &c).unwrap_err();
    assert!(e.fatal);
}

#[test]
fn rejects_invalid_flags() {
    let mut c = ctx();
    let e = validate_request(&req(NBD_CMD_READ, NBD_CMD_FLAG_REQ_ONE, 0, 1), &c).unwrap_err();
    assert_eq!(e.errno, Errno::Inval);
    let e = validate_request(&req(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 7), &c).unwrap_err();
    assert_eq!((e.errno, e.discard), (Errno::Inval, 7));
    let e = validate_request(&req(NBD_CMD_FLUSH, 0x8000, 0, 0), &c).unwrap_err();
    assert_eq!(e.errno, Errno::Inval);
    c.transmission_flags &= !(NBD_FLAG_SEND_DF | NBD_FLAG_SEND_FAST_ZERO);
    assert!(validate_request(&req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1), &c).is_err());
    assert!(
        validate_request(&req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 1), &c).is_err()
    );
}

#[test]
fn rejects_unknown_and_unadvertised_commands() {
    let mut c = ctx();
    assert_eq!(
        validate_request(&req(99, 0, 0, 0), &c).unwrap_err().errno,
        Errno::Inval
    );
    assert!(validate_request(&req(NBD_CMD_RESIZE, 0, 0, 0), &c).is_err());
    c.transmission_flags &= !NBD_FLAG_SEND_CACHE;
    assert!(validate_request(&req(NBD_CMD_CACHE, 0, 0, 1), &c).is_err());
}

#[test]
fn rejects_block_status_without_meta_context() {
    let mut c = ctx();
    c.meta_context = false;
    let e = validate_request(&req(NBD_CMD_BLOCK_STATUS, 0, 0, 1), &c).unwrap_err();
    assert_eq!(e.errno, Errno::Inval);
}

#[test]
fn rejects_writes_on_read_only_export() {
    let mut c = ctx();
    c.transmission_flags |= NBD_FLAG_READ_ONLY;
    for cmd in [NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES] {
        let e = validate_request(&req(cmd, 0, 0, 8), &c).unwrap_err();
        assert_eq!(e.errno, Errno::Perm);
    }
    assert!(validate_request(&req(NBD_CMD_READ, 0, 0, 8), &c).is_ok());
}

#[test]
fn rejects_unaligned_io_with_min_block() {
    let mut c = ctx();
    c.min_block = 512;
    assert!(validate_request(&req(NBD_CMD_READ, 0, 1, 512), &c).is_err());
    assert!(validate_request(&req(NBD_CMD_WRITE, 0, 0, 100), &c).is_err());
    assert!(validate_request(&req(NBD_CMD_READ, 0, 512, 1024), &c).is_ok());
}

// ----- properties ----------------------------------------------------------

proptest! {
    #[test]
    fn request_header_roundtrips(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
        let h = RequestHeader { flags, command, cookie, offset, length };
        let mut b = BytesMut::new();
        h.encode(&mut b);
        prop_assert_eq!(parse_request_header(&b).unwrap(), h);
    }

    #[test]
    fn request_header_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = parse_request_header(&bytes);
    }

    #[test]
    fn validation_never_panics(flags: u16, command: u16, offset: u64, length: u32,
                               size: u64, tflags: u16, structured: bool, meta: bool,
                               min_block in 0u32..8192, max_payload: u32) {
        let c = TransmissionContext {
            export_size: size, transmission_flags: tflags, structured_replies: structured,
            meta_context: meta, min_block, max_payload,
        };
        let _ = validate_request(&req(command, flags, offset, length), &c);
    }

    #[test]
    fn option_parsers_never_panic(option in 0u32..16, payload in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_option(option, &payload);
        let _ = parse_option_header(&payload);
        let _ = parse_client_flags(&payload);
    }

    #[test]
    fn meta_context_roundtrips(name in "[a-z:]{0,20}", queries in proptest::collection::vec("[a-z:]{0,20}", 0..5)) {
        let opt = ClientOption::SetMetaContext(MetaContextRequest { export_name: name, queries });
        let (hdr, payload) = encode_opt(&opt);
        prop_assert_eq!(parse_option(hdr.option, &payload).unwrap(), opt);
    }
}

#[test]
fn client_side_parsers_read_what_the_server_encodes() {
    let mut b = BytesMut::new();
    encode_greeting(&mut b);
    assert_eq!(
        parse_greeting(&b).unwrap().handshake_flags,
        SERVER_HANDSHAKE_FLAGS
    );
    b[9] ^= 1;
    assert!(matches!(
        parse_greeting(&b),
        Err(ProtocolError::BadMagic { .. })
    ));
    assert!(is_oldstyle_magic(CLISERV_MAGIC));

    let info = |f: &dyn Fn(&mut BytesMut)| {
        let mut b = BytesMut::new();
        f(&mut b);
        let (_, payload) = split_reply(&b);
        parse_info_reply(payload).unwrap()
    };
    assert_eq!(
        info(&|b| encode_info_export(b, NBD_OPT_GO, 1 << 40, 0x1ff)),
        InfoReply::Export {
            size: 1 << 40,
            flags: 0x1ff
        }
    );
    assert_eq!(
        info(&|b| encode_info_block_size(b, NBD_OPT_GO, 1, 4096, 1 << 25)),
        InfoReply::BlockSize {
            min: 1,
            preferred: 4096,
            max: 1 << 25
        }
    );
    assert_eq!(
        info(&|b| encode_info_name(b, NBD_OPT_GO, "disk0")),
        InfoReply::Name("disk0".into())
    );
    assert_eq!(parse_info_reply(&[0, 99]).unwrap(), InfoReply::Unknown(99));
    assert!(parse_info_reply(&[0, 0, 1]).is_err());
    assert!(parse_info_reply(&[0, 3, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 9]).is_err());

    let mut b = BytesMut::new();
    encode_export_name_reply(&mut b, 4096, 3, true);
    assert_eq!(parse_export_name_reply(&b).unwrap(), (4096, 3));
    assert!(parse_export_name_reply(&b[..9]).is_err());
}
