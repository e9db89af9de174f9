//! Microbenchmarks of the NBD codec on the transmission path: decoding one request header
//! (parse, validate against the negotiated context, both), encoding one reply header (simple
//! and structured), and a client's request header.
//!
//!   cargo bench -p tabula-nbd --bench codec            # ~10 s
//!   cargo bench -p tabula-nbd --bench codec -- --quick # a few seconds

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tabula_nbd::codec::{
    RequestHeader, TransmissionContext, encode_offset_data_header, encode_simple_reply,
    parse_request_header, validate_request,
};
use tabula_nbd::consts::{
    NBD_CMD_FLAG_FUA, NBD_CMD_READ, NBD_CMD_WRITE, NBD_FLAG_HAS_FLAGS, NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
};

fn ctx() -> TransmissionContext {
    TransmissionContext {
        export_size: 1 << 40,
        transmission_flags: NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES,
        structured_replies: true,
        meta_context: true,
        min_block: 1,
        max_payload: 32 << 20,
    }
}

/// The wire form of a request header.
fn wire(h: RequestHeader) -> Vec<u8> {
    let mut b = BytesMut::new();
    h.encode(&mut b);
    b.to_vec()
}

fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd/request");
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(1));
    let ctx = ctx();
    let read = wire(RequestHeader {
        flags: 0,
        command: NBD_CMD_READ,
        cookie: 42,
        offset: 123 << 12,
        length: 4096,
    });
    let write = wire(RequestHeader {
        flags: NBD_CMD_FLAG_FUA,
        command: NBD_CMD_WRITE,
        cookie: 43,
        offset: 456 << 20,
        length: 1 << 20,
    });
    g.bench_function("parse_header", |b| {
        b.iter(|| parse_request_header(black_box(&read)))
    });
    let parsed = parse_request_header(&write).expect("a valid header");
    g.bench_function("validate_write", |b| {
        b.iter(|| validate_request(black_box(&parsed), black_box(&ctx)))
    });
    // What the server does for every request it reads.
    for (name, bytes) in [("decode_read_4k", &read), ("decode_write_1m_fua", &write)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let h = parse_request_header(black_box(bytes)).expect("a valid header");
                validate_request(&h, &ctx).expect("a valid request")
            })
        });
    }
    let h = RequestHeader {
        flags: 0,
        command: NBD_CMD_READ,
        cookie: 7,
        offset: 1 << 30,
        length: 4096,
    };
    let mut buf = BytesMut::with_capacity(64);
    g.bench_function("encode_header_client", |b| {
        b.iter(|| {
            buf.clear();
            black_box(&h).encode(&mut buf);
            black_box(buf.len())
        })
    });
    g.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd/reply");
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(1));
    let mut buf = BytesMut::with_capacity(8192);
    g.bench_function("encode_simple_reply", |b| {
        b.iter(|| {
            buf.clear();
            encode_simple_reply(&mut buf, 0, black_box(42));
            black_box(buf.len())
        })
    });
    // Structured read reply: the header only (the server writes the data after it, uncopied).
    g.bench_function("encode_offset_data_header", |b| {
        b.iter(|| {
            buf.clear();
            encode_offset_data_header(&mut buf, black_box(42), 1 << 30, 4096, true);
            black_box(buf.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench_decode, bench_encode);
criterion_main!(benches);
