//! End-to-end tests of the NBD server: a small hand-written client drives
//! `serve_connection` over `tokio::io::duplex` and over real TCP / Unix
//! sockets, against the in-memory export. Optionally runs `nbdinfo` and
//! `qemu-io` against the server when they are installed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tabula_nbd::codec::{
    self, ClientFlags, ClientOption, InfoRequest, MetaContextRequest, RequestHeader,
};
use tabula_nbd::consts::*;
use tabula_nbd::server::mem::{MemExport, StaticProvider};
use tabula_nbd::server::{
    self, ExportInfo, ExportProvider, ListenAddr, ServerConfig, ServerError, serve_connection,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

const SIZE: u64 = 1 << 20;
const T: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Test client
// ---------------------------------------------------------------------------

/// One reply message as seen by the client.
#[derive(Debug, Default)]
struct Reply {
    cookie: u64,
    error: u32,
    message: String,
    data: Vec<u8>,
    offset: u64,
    context_id: u32,
    extents: Vec<(u32, u32)>,
    chunk_type: Option<u16>,
}

struct Client<S> {
    s: S,
    /// Lengths of outstanding reads (needed to frame simple replies).
    reads: HashMap<u64, u32>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Reads the greeting and sends the client flags.
    async fn start(mut s: S, flags: ClientFlags) -> Self {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
        );
        s.write_all(&flags.to_wire().to_be_bytes()).await.unwrap();
        Client {
            s,
            reads: HashMap::new(),
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    async fn option(&mut self, opt: &ClientOption) {
        let mut b = BytesMut::new();
        opt.encode(&mut b);
        self.send_raw(&b).await;
    }

    async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).await.unwrap();
        let h = codec::parse_option_reply_header(&h).unwrap();
        let mut data = vec![0u8; h.length as usize];
        self.s.read_exact(&mut data).await.unwrap();
        (h.option, h.reply_type, data)
    }

    /// Sends an option and collects replies up to the final ACK or error.
    async fn option_all(&mut self, opt: &ClientOption) -> Vec<(u32, Vec<u8>)> {
        self.option(opt).await;
        let mut out = Vec::new();
        loop {
            let (o, t, d) = self.option_reply().await;
            assert_eq!(o, opt.code());
            let last = t == NBD_REP_ACK || t & NBD_REP_FLAG_ERROR != 0;
            out.push((t, d));
            if last {
                return out;
            }
        }
    }

    /// STRUCTURED_REPLY + SET_META_CONTEXT + GO; returns (size, flags, ctx id).
    async fn negotiate(
        &mut self,
        name: &str,
        structured: bool,
        meta: bool,
    ) -> (u64, u16, Option<u32>) {
        if structured {
            let r = self.option_all(&ClientOption::StructuredReply).await;
            assert_eq!(r, vec![(NBD_REP_ACK, vec![])]);
        }
        let mut ctx = None;
        if meta {
            let r = self
                .option_all(&ClientOption::SetMetaContext(MetaContextRequest {
                    export_name: name.into(),
                    queries: vec![BASE_ALLOCATION.into()],
                }))
                .await;
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].0, NBD_REP_META_CONTEXT);
            assert_eq!(&r[0].1[4..], BASE_ALLOCATION.as_bytes());
            ctx = Some(u32::from_be_bytes(r[0].1[..4].try_into().unwrap()));
            assert_eq!(r[1].0, NBD_REP_ACK);
        }
        let r = self
            .option_all(&ClientOption::Go(InfoRequest {
                name: name.into(),
                requests: vec![NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
            }))
            .await;
        assert_eq!(r.last().unwrap().0, NBD_REP_ACK, "{r:?}");
        let mut size_flags = None;
        let mut saw_block_size = false;
        for (t, d) in &r[..r.len() - 1] {
            assert_eq!(*t, NBD_REP_INFO);
            match u16::from_be_bytes([d[0], d[1]]) {
                NBD_INFO_EXPORT => {
                    assert_eq!(d.len(), 12);
                    size_flags = Some((
                        u64::from_be_bytes(d[2..10].try_into().unwrap()),
                        u16::from_be_bytes([d[10], d[11]]),
                    ));
                }
                NBD_INFO_NAME => assert_eq!(&d[2..], name.as_bytes()),
                NBD_INFO_BLOCK_SIZE => {
                    assert_eq!(d.len(), 14);
                    saw_block_size = true;
                }
                NBD_INFO_DESCRIPTION => {}
                other => panic!("unexpected info {other}"),
            }
        }
        assert!(saw_block_size);
        let (size, flags) = size_flags.expect("NBD_INFO_EXPORT");
        (size, flags, ctx)
    }

    async fn request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        data: &[u8],
    ) {
        let mut b = BytesMut::new();
        RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(&mut b);
        b.extend_from_slice(data);
        if command == NBD_CMD_READ {
            self.reads.insert(cookie, length);
        }
        self.send_raw(&b).await;
    }

    async fn reply(&mut self) -> Reply {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).await.unwrap();
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; 12];
                self.s.read_exact(&mut rest).await.unwrap();
                let error = u32::from_be_bytes(rest[..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(rest[4..].try_into().unwrap());
                let mut data = Vec::new();
                if let Some(len) = self.reads.remove(&cookie) {
                    if error == 0 {
                        data = vec![0u8; len as usize];
                        self.s.read_exact(&mut data).await.unwrap();
                    }
                }
                Reply {
                    cookie,
                    error,
                    data,
                    ..Default::default()
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut rest = [0u8; 16];
                self.s.read_exact(&mut rest).await.unwrap();
                let mut full = magic.to_vec();
                full.extend_from_slice(&rest);
                let c = codec::parse_chunk_header(&full).unwrap();
                assert_eq!(
                    c.flags, NBD_REPLY_FLAG_DONE,
                    "server sends single-chunk replies"
                );
                let mut p = vec![0u8; c.length as usize];
                self.s.read_exact(&mut p).await.unwrap();
                self.reads.remove(&c.cookie);
                let mut r = Reply {
                    cookie: c.cookie,
                    chunk_type: Some(c.chunk_type),
                    ..Default::default()
                };
                match c.chunk_type {
                    NBD_REPLY_TYPE_OFFSET_DATA => {
                        r.offset = u64::from_be_bytes(p[..8].try_into().unwrap());
                        r.data = p[8..].to_vec();
                    }
                    NBD_REPLY_TYPE_BLOCK_STATUS => {
                        r.context_id = u32::from_be_bytes(p[..4].try_into().unwrap());
                        r.extents = p[4..]
                            .chunks_exact(8)
                            .map(|e| {
                                (
                                    u32::from_be_bytes(e[..4].try_into().unwrap()),
                                    u32::from_be_bytes(e[4..].try_into().unwrap()),
                                )
                            })
                            .collect();
                    }
                    NBD_REPLY_TYPE_ERROR => {
                        r.error = u32::from_be_bytes(p[..4].try_into().unwrap());
                        let ml = u16::from_be_bytes([p[4], p[5]]) as usize;
                        r.message = String::from_utf8(p[6..6 + ml].to_vec()).unwrap();
                    }
                    NBD_REPLY_TYPE_NONE => {}
                    other => panic!("unexpected chunk type {other}"),
                }
                r
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Request, then its reply (only when nothing else is in flight).
    async fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Reply {
        self.request(command, flags, 7, offset, length, data).await;
        let r = self.reply().await;
        assert_eq!(r.cookie, 7);
        r
    }

    /// True if the server has closed the connection (EOF within the timeout).
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(T, self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

fn mem(size: u64, read_only: bool) -> Arc<MemExport> {
    let mut info = ExportInfo::new(size);
    info.read_only = read_only;
    info.description = Some("in-memory test disk".into());
    info.can_multi_conn = true;
    info.can_fast_zero = true;
    Arc::new(MemExport::new(info))
}

fn provider(export: Arc<MemExport>) -> Arc<dyn ExportProvider> {
    Arc::new(
        StaticProvider::new()
            .with("disk", export)
            .with("ro", mem(64 << 10, true)),
    )
}

fn spawn_server(
    provider: Arc<dyn ExportProvider>,
    cfg: ServerConfig,
) -> (DuplexStream, JoinHandle<Result<(), ServerError>>) {
    let (client, server_side) = tokio::io::duplex(4 << 20);
    let h = tokio::spawn(serve_connection(server_side, provider, Arc::new(cfg)));
    (client, h)
}

async fn connect(
    cfg: ServerConfig,
) -> (
    Client<DuplexStream>,
    Arc<MemExport>,
    JoinHandle<Result<(), ServerError>>,
) {
    let export = mem(SIZE, false);
    let (s, h) = spawn_server(provider(export.clone()), cfg);
    let c = Client::start(
        s,
        ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        },
    )
    .await;
    (c, export, h)
}

async fn finished(h: JoinHandle<Result<(), ServerError>>) -> Result<(), ServerError> {
    tokio::time::timeout(T, h)
        .await
        .expect("server task hung")
        .expect("server task panicked")
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn full_session_over_duplex() {
    let (mut c, export, h) = connect(ServerConfig::default()).await;
    let (size, flags, ctx) = c.negotiate("disk", true, true).await;
    assert_eq!(size, SIZE);
    for f in [
        NBD_FLAG_HAS_FLAGS,
        NBD_FLAG_SEND_FLUSH,
        NBD_FLAG_SEND_FUA,
        NBD_FLAG_SEND_TRIM,
        NBD_FLAG_SEND_WRITE_ZEROES,
        NBD_FLAG_SEND_FAST_ZERO,
        NBD_FLAG_SEND_DF,
        NBD_FLAG_CAN_MULTI_CONN,
        NBD_FLAG_SEND_CACHE,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing");
    }
    assert_eq!(flags & NBD_FLAG_READ_ONLY, 0);
    let ctx = ctx.unwrap();

    // write + read back
    let r = c
        .call(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 8192, 4096, &[0xab; 4096])
        .await;
    assert_eq!(r.error, 0);
    assert!(export.snapshot()[8192..12288].iter().all(|&b| b == 0xab));
    let r = c.call(NBD_CMD_READ, NBD_CMD_FLAG_DF, 8192, 4096, &[]).await;
    assert_eq!(
        (r.chunk_type, r.offset, r.data.len()),
        (Some(NBD_REPLY_TYPE_OFFSET_DATA), 8192, 4096)
    );
    assert!(r.data.iter().all(|&b| b == 0xab));
    assert_eq!(c.call(NBD_CMD_FLUSH, 0, 0, 0, &[]).await.error, 0);
    assert_eq!(c.call(NBD_CMD_CACHE, 0, 0, 4096, &[]).await.error, 0);

    // block status sees the data extent between zero extents
    let r = c.call(NBD_CMD_BLOCK_STATUS, 0, 0, SIZE as u32, &[]).await;
    assert_eq!(r.context_id, ctx);
    assert_eq!(
        r.extents,
        vec![
            (8192, NBD_STATE_ZERO),
            (4096, 0),
            (SIZE as u32 - 12288, NBD_STATE_ZERO)
        ]
    );
    let r = c
        .call(
            NBD_CMD_BLOCK_STATUS,
            NBD_CMD_FLAG_REQ_ONE,
            0,
            SIZE as u32,
            &[],
        )
        .await;
    assert_eq!(r.extents, vec![(8192, NBD_STATE_ZERO)]);
    // lengths are clipped to the request
    let r = c.call(NBD_CMD_BLOCK_STATUS, 0, 100, 50, &[]).await;
    assert_eq!(r.extents, vec![(50, NBD_STATE_ZERO)]);

    // write_zeroes and trim
    let r = c
        .call(
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            8192,
            2048,
            &[],
        )
        .await;
    assert_eq!(r.error, 0);
    assert!(export.snapshot()[8192..10240].iter().all(|&b| b == 0));
    assert_eq!(
        c.call(NBD_CMD_TRIM, NBD_CMD_FLAG_FUA, 10240, 2048, &[])
            .await
            .error,
        0
    );
    let r = c.call(NBD_CMD_READ, 0, 8192, 4096, &[]).await;
    assert!(r.data.iter().all(|&b| b == 0));

    // zero-length read: allowed, answered with a NONE chunk
    let r = c.call(NBD_CMD_READ, 0, 0, 0, &[]).await;
    assert_eq!((r.error, r.chunk_type), (0, Some(NBD_REPLY_TYPE_NONE)));

    // errors come back as structured error chunks with a message
    let r = c.call(NBD_CMD_READ, 0, SIZE - 1, 2, &[]).await;
    assert_eq!(r.error, NBD_EINVAL);
    assert!(r.message.contains("beyond"), "{}", r.message);
    let r = c.call(NBD_CMD_WRITE, 0, SIZE, 4, &[1, 2, 3, 4]).await;
    assert_eq!(r.error, NBD_ENOSPC);
    let r = c.call(NBD_CMD_READ, 0, u64::MAX, 1, &[]).await;
    assert_eq!(r.error, NBD_EINVAL);
    let r = c.call(99, 0, 0, 0, &[]).await;
    assert_eq!(r.error, NBD_EINVAL);
    let r = c.call(NBD_CMD_READ, NBD_CMD_FLAG_REQ_ONE, 0, 1, &[]).await;
    assert_eq!(r.error, NBD_EINVAL);
    // a rejected write's payload is skipped, keeping the stream in sync
    let r = c
        .call(NBD_CMD_WRITE, NBD_CMD_FLAG_REQ_ONE, 0, 3, &[9, 9, 9])
        .await;
    assert_eq!(r.error, NBD_EINVAL);
    let r = c.call(NBD_CMD_READ, 0, 0, 3, &[]).await;
    assert_eq!(r.data, vec![0, 0, 0]);

    c.request(NBD_CMD_DISC, 0, 1, 0, 0, &[]).await;
    assert!(c.closed().await);
    finished(h).await.unwrap();
}

#[tokio::test]
async fn many_requests_in_flight() {
    let cfg = ServerConfig {
        max_in_flight: 4,
        ..ServerConfig::default()
    };
    let (mut c, export, h) = connect(cfg).await;
    c.negotiate("disk", true, false).await;
    const N: u64 = 64;
    // Pipeline N writes then N reads before reading any reply.
    for i in 0..N {
        c.request(NBD_CMD_WRITE, 0, i, i * 512, 512, &[i as u8; 512])
            .await;
    }
    let mut seen = HashSet::new();
    for _ in 0..N {
        let r = c.reply().await;
        assert_eq!(r.error, 0);
        assert!(seen.insert(r.cookie));
    }
    for i in 0..N {
        c.request(NBD_CMD_READ, 0, 1000 + i, i * 512, 512, &[])
            .await;
    }
    for _ in 0..N {
        let r = c.reply().await;
        let i = r.cookie - 1000;
        assert!(i < N);
        assert_eq!(r.offset, i * 512);
        assert_eq!(r.data, vec![i as u8; 512]);
        assert!(seen.insert(r.cookie));
    }
    let snap = export.snapshot();
    for i in 0..N as usize {
        assert!(snap[i * 512..(i + 1) * 512].iter().all(|&b| b == i as u8));
    }
    // DISC with requests still in flight: all are answered before close.
    for i in 0..8 {
        c.request(NBD_CMD_READ, 0, 5000 + i, 0, 512, &[]).await;
    }
    c.request(NBD_CMD_DISC, 0, 1, 0, 0, &[]).await;
    for _ in 0..8 {
        assert_eq!(c.reply().await.data.len(), 512);
    }
    assert!(c.closed().await);
    finished(h).await.unwrap();
}

/// A byte budget far smaller than what the client pipelines: requests wait for budget
/// instead of being buffered, and everything still completes.
#[tokio::test]
async fn byte_budget_bounds_buffering_without_deadlock() {
    let cfg = ServerConfig {
        max_in_flight_bytes: 64 << 10,
        ..ServerConfig::default()
    };
    let (mut c, export, h) = connect(cfg).await;
    c.negotiate("disk", true, false).await;
    const N: u64 = 32;
    const LEN: u32 = 32 << 10;
    for i in 0..N {
        c.request(
            NBD_CMD_WRITE,
            0,
            i,
            i * LEN as u64,
            LEN,
            &vec![i as u8; LEN as usize],
        )
        .await;
    }
    for _ in 0..N {
        assert_eq!(c.reply().await.error, 0);
    }
    // A request larger than the whole budget runs alone rather than never.
    c.request(NBD_CMD_READ, 0, 99, 0, 256 << 10, &[]).await;
    assert_eq!(c.reply().await.data.len(), 256 << 10);
    let snap = export.snapshot();
    for i in 0..N as usize {
        let l = LEN as usize;
        assert!(snap[i * l..(i + 1) * l].iter().all(|&b| b == i as u8));
    }
    c.request(NBD_CMD_DISC, 0, 1, 0, 0, &[]).await;
    assert!(c.closed().await);
    finished(h).await.unwrap();
}

#[tokio::test]
async fn read_only_export_gets_eperm_with_simple_replies() {
    let (mut c, _export, h) = connect(ServerConfig::default()).await;
    let (size, flags, _) = c.negotiate("ro", false, false).await;
    assert_eq!(size, 64 << 10);
    assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
    assert_eq!(
        flags & NBD_FLAG_SEND_DF,
        0,
        "DF only with structured replies"
    );
    assert_eq!(
        c.call(NBD_CMD_WRITE, 0, 0, 4, &[1, 2, 3, 4]).await.error,
        NBD_EPERM
    );
    assert_eq!(c.call(NBD_CMD_TRIM, 0, 0, 4, &[]).await.error, NBD_EPERM);
    assert_eq!(
        c.call(NBD_CMD_WRITE_ZEROES, 0, 0, 4, &[]).await.error,
        NBD_EPERM
    );
    // Simple-reply read error: header only, no payload; stream stays in sync.
    let r = c.call(NBD_CMD_READ, 0, 64 << 10, 512, &[]).await;
    assert_eq!((r.error, r.data.len()), (NBD_EINVAL, 0));
    let r = c.call(NBD_CMD_READ, 0, 0, 512, &[]).await;
    assert_eq!((r.error, r.data), (0, vec![0; 512]));
    // Without a metadata context, block status is EINVAL.
    assert_eq!(
        c.call(NBD_CMD_BLOCK_STATUS, 0, 0, 512, &[]).await.error,
        NBD_EINVAL
    );
    // Client hangs up without DISC: clean end.
    drop(c);
    finished(h).await.unwrap();
}

#[tokio::test]
async fn oversized_option_closes_connection() {
    let (mut c, _e, h) = connect(ServerConfig::default()).await;
    let mut b = BytesMut::new();
    codec::OptionHeader {
        option: NBD_OPT_GO,
        length: 1 << 20,
    }
    .encode(&mut b);
    c.send_raw(&b).await;
    assert!(c.closed().await);
    assert!(matches!(
        finished(h).await,
        Err(ServerError::OptionTooLarge(_))
    ));
}

#[tokio::test]
async fn garbage_during_handshake_closes() {
    let (mut c, _e, h) = connect(ServerConfig::default()).await;
    c.send_raw(&[0x42; 64]).await;
    assert!(c.closed().await);
    assert!(matches!(finished(h).await, Err(ServerError::Protocol(_))));
}

#[tokio::test]
async fn garbage_request_closes() {
    let (mut c, _e, h) = connect(ServerConfig::default()).await;
    c.negotiate("disk", true, true).await;
    c.send_raw(&[0xff; 28]).await;
    assert!(c.closed().await);
    assert!(matches!(finished(h).await, Err(ServerError::Protocol(_))));
}

#[tokio::test]
async fn disconnect_mid_request_is_clean() {
    let (mut c, _e, h) = connect(ServerConfig::default()).await;
    c.negotiate("disk", false, false).await;
    let mut b = BytesMut::new();
    RequestHeader {
        command: NBD_CMD_WRITE,
        length: 4096,
        ..Default::default()
    }
    .encode(&mut b);
    c.send_raw(&b).await;
    c.send_raw(&[1; 100]).await; // partial payload
    drop(c);
    finished(h).await.unwrap();
}

#[tokio::test]
async fn oversized_write_closes_connection() {
    let cfg = ServerConfig {
        max_payload: 4096,
        ..ServerConfig::default()
    };
    let (mut c, _e, h) = connect(cfg).await;
    c.negotiate("disk", true, false).await;
    // An oversized read is just an error...
    assert_eq!(
        c.call(NBD_CMD_READ, 0, 0, 8192, &[]).await.error,
        NBD_EINVAL
    );
    // ...but an oversized write cannot be trusted: close.
    c.request(NBD_CMD_WRITE, 0, 1, 0, 8192, &[]).await;
    assert!(c.closed().await);
    assert!(matches!(
        finished(h).await,
        Err(ServerError::PayloadTooLarge(8192))
    ));
}

#[tokio::test]
async fn client_without_fixed_newstyle_is_dropped() {
    let export = mem(SIZE, false);
    let (s, h) = spawn_server(provider(export), ServerConfig::default());
    let mut c = Client::start(s, ClientFlags::default()).await;
    assert!(c.closed().await);
    assert!(matches!(
        finished(h).await,
        Err(ServerError::NotFixedNewstyle)
    ));
}

#[tokio::test]
async fn unknown_client_flags_are_dropped() {
    let export = mem(SIZE, false);
    let (mut s, h) = spawn_server(provider(export), ServerConfig::default());
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    s.write_all(&[0, 0, 0, 7]).await.unwrap();
    assert!(matches!(finished(h).await, Err(ServerError::Protocol(_))));
}

async fn export_name_session(no_zeroes: bool) {
    let export = mem(SIZE, false);
    let (s, h) = spawn_server(provider(export), ServerConfig::default());
    let mut c = Client::start(
        s,
        ClientFlags {
            fixed_newstyle: true,
            no_zeroes,
        },
    )
    .await;
    c.option(&ClientOption::ExportName("disk".into())).await;
    let mut r = vec![0u8; if no_zeroes { 10 } else { 134 }];
    c.s.read_exact(&mut r).await.unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE);
    let flags = u16::from_be_bytes([r[8], r[9]]);
    assert_ne!(flags & NBD_FLAG_HAS_FLAGS, 0);
    assert!(r[10..].iter().all(|&b| b == 0));
    // The stream is in sync: a write/read round trip works.
    assert_eq!(c.call(NBD_CMD_WRITE, 0, 0, 3, b"abc").await.error, 0);
    assert_eq!(c.call(NBD_CMD_READ, 0, 0, 3, &[]).await.data, b"abc");
    c.request(NBD_CMD_DISC, 0, 1, 0, 0, &[]).await;
    assert!(c.closed().await);
    finished(h).await.unwrap();
}

#[tokio::test]
async fn export_name_with_no_zeroes() {
    export_name_session(true).await;
}

#[tokio::test]
async fn export_name_without_no_zeroes() {
    export_name_session(false).await;
}

#[tokio::test]
async fn export_name_unknown_closes() {
    let (mut c, _e, h) = connect(ServerConfig::default()).await;
    c.option(&ClientOption::ExportName("nope".into())).await;
    assert!(c.closed().await);
    assert!(matches!(
        finished(h).await,
        Err(ServerError::ExportUnavailable(_))
    ));
}

#[tokio::test]
async fn list_exports() {
    let (mut c, _e, h) = connect(ServerConfig::default()).await;
    let r = c.option_all(&ClientOption::List).await;
    assert_eq!(r.len(), 3);
    let names: Vec<String> = r[..2]
        .iter()
        .map(|(t, d)| {
            assert_eq!(*t, NBD_REP_SERVER);
            let l = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
            String::from_utf8(d[4..4 + l].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, vec!["disk", "ro"]);
    assert_eq!(r[2].0, NBD_REP_ACK);
    // LIST with a payload is invalid, and negotiation continues.
    let mut b = BytesMut::new();
    codec::OptionHeader {
        option: NBD_OPT_LIST,
        length: 1,
    }
    .encode(&mut b);
    b.extend_from_slice(&[0]);
    c.send_raw(&b).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_INVALID);
    let r = c.option_all(&ClientOption::Abort).await;
    assert_eq!(r, vec![(NBD_REP_ACK, vec![])]);
    finished(h).await.unwrap();
}

#[tokio::test]
async fn abort_acks_then_closes() {
    let (mut c, _e, h) = connect(ServerConfig::default()).await;
    let r = c.option_all(&ClientOption::Abort).await;
    assert_eq!(r, vec![(NBD_REP_ACK, vec![])]);
    assert!(c.closed().await);
    finished(h).await.unwrap();
}

#[tokio::test]
async fn option_errors_and_recovery() {
    let (mut c, _e, h) = connect(ServerConfig::default()).await;
    // unsupported options
    for opt in [
        ClientOption::StartTls,
        ClientOption::ExtendedHeaders,
        ClientOption::Unknown(1234),
    ] {
        let r = c.option_all(&opt).await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, NBD_REP_ERR_UNSUP);
    }
    // meta contexts before structured replies
    let meta = MetaContextRequest {
        export_name: "disk".into(),
        queries: vec![BASE_ALLOCATION.into()],
    };
    let r = c
        .option_all(&ClientOption::SetMetaContext(meta.clone()))
        .await;
    assert_eq!(r[0].0, NBD_REP_ERR_INVALID);
    // malformed GO payload
    let mut b = BytesMut::new();
    codec::OptionHeader {
        option: NBD_OPT_GO,
        length: 4,
    }
    .encode(&mut b);
    b.extend_from_slice(&100u32.to_be_bytes());
    c.send_raw(&b).await;
    let (_, t, msg) = c.option_reply().await;
    assert_eq!(t, NBD_REP_ERR_INVALID);
    assert!(!msg.is_empty());
    // unknown export
    let r = c
        .option_all(&ClientOption::Info(InfoRequest {
            name: "nope".into(),
            requests: vec![],
        }))
        .await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, NBD_REP_ERR_UNKNOWN);
    // INFO on a real export: EXPORT + ACK, no BLOCK_SIZE unless asked
    let r = c
        .option_all(&ClientOption::Info(InfoRequest {
            name: "disk".into(),
            requests: vec![],
        }))
        .await;
    assert_eq!(r.len(), 2);
    assert_eq!(&r[0].1[..2], &NBD_INFO_EXPORT.to_be_bytes());
    // LIST_META_CONTEXT
    c.option_all(&ClientOption::StructuredReply).await;
    for queries in [
        vec![],
        vec!["base:".to_owned()],
        vec![BASE_ALLOCATION.to_owned()],
    ] {
        let r = c
            .option_all(&ClientOption::ListMetaContext(MetaContextRequest {
                export_name: "disk".into(),
                queries,
            }))
            .await;
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, NBD_REP_META_CONTEXT);
        assert_eq!(
            &r[0].1,
            &[&[0u8; 4][..], BASE_ALLOCATION.as_bytes()].concat()
        );
    }
    let r = c
        .option_all(&ClientOption::ListMetaContext(MetaContextRequest {
            export_name: "disk".into(),
            queries: vec!["x-other:thing".into()],
        }))
        .await;
    assert_eq!(r, vec![(NBD_REP_ACK, vec![])]);
    // A context set for another export does not carry over to "disk".
    let r = c
        .option_all(&ClientOption::SetMetaContext(MetaContextRequest {
            export_name: "ro".into(),
            ..meta
        }))
        .await;
    assert_eq!(r.len(), 2);
    let (_, _, ctx) = c.negotiate("disk", false, false).await;
    assert!(ctx.is_none());
    let r = c.call(NBD_CMD_BLOCK_STATUS, 0, 0, 512, &[]).await;
    assert_eq!(r.error, NBD_EINVAL);
    drop(c);
    finished(h).await.unwrap();
}

#[tokio::test]
async fn too_many_options_closes() {
    let (c, _e, h) = connect(ServerConfig::default()).await;
    let mut b = BytesMut::new();
    for _ in 0..1100 {
        ClientOption::Unknown(99).encode(&mut b);
    }
    let (mut rd, mut wr) = tokio::io::split(c.s);
    let w = tokio::spawn(async move {
        let _ = wr.write_all(&b).await;
        wr
    });
    let mut sink = Vec::new();
    tokio::time::timeout(T, rd.read_to_end(&mut sink))
        .await
        .unwrap()
        .unwrap();
    let _ = w.await;
    assert!(matches!(
        finished(h).await,
        Err(ServerError::TooManyOptions(_))
    ));
}

#[tokio::test]
async fn handshake_timeout_closes() {
    let cfg = ServerConfig {
        option_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let (mut c, _e, h) = connect(cfg).await;
    assert!(c.closed().await);
    assert!(matches!(
        finished(h).await,
        Err(ServerError::OptionTimeout(_))
    ));
}

#[tokio::test]
async fn tcp_loopback_session() {
    let export = mem(SIZE, false);
    let listener = server::bind(&"127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(server::serve(
        listener,
        provider(export.clone()),
        Arc::new(ServerConfig::default()),
        async {
            let _ = stop_rx.await;
        },
    ));
    // Two concurrent connections; garbage on one does not affect the other.
    let s1 = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let s2 = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let flags = ClientFlags {
        fixed_newstyle: true,
        no_zeroes: true,
    };
    let mut c1 = Client::start(s1, flags).await;
    let mut c2 = Client::start(s2, flags).await;
    c1.negotiate("disk", true, true).await;
    c2.send_raw(b"this is not an NBD option header at all")
        .await;
    assert!(c2.closed().await);
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(c1.call(NBD_CMD_WRITE, 0, 4096, 65536, &data).await.error, 0);
    assert_eq!(c1.call(NBD_CMD_READ, 0, 4096, 65536, &[]).await.data, data);
    c1.request(NBD_CMD_DISC, 0, 1, 0, 0, &[]).await;
    assert!(c1.closed().await);
    stop_tx.send(()).unwrap();
    tokio::time::timeout(T, srv)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn unix_socket_session_and_stale_socket() {
    let path = std::env::temp_dir().join(format!("tabula-nbd-test-{}.sock", std::process::id()));
    // A stale socket file from a "previous run".
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let addr: ListenAddr = format!("unix:{}", path.display()).parse().unwrap();
    let listener = server::bind(&addr).await.unwrap();
    assert_eq!(listener.local_addr_string(), addr.to_string());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(server::serve(
        listener,
        provider(mem(SIZE, false)),
        Arc::new(ServerConfig::default()),
        async {
            let _ = stop_rx.await;
        },
    ));
    let s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut c = Client::start(
        s,
        ClientFlags {
            fixed_newstyle: true,
            no_zeroes: false,
        },
    )
    .await;
    c.negotiate("disk", false, false).await;
    assert_eq!(c.call(NBD_CMD_READ, 0, 0, 16, &[]).await.data, vec![0; 16]);
    stop_tx.send(()).unwrap();
    tokio::time::timeout(T, srv)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!path.exists(), "socket file removed on shutdown");
}

#[test]
fn listen_addr_parse_and_display() {
    for s in [
        "127.0.0.1:10809",
        "[::1]:10809",
        "unix:/run/tabula/nbd.sock",
    ] {
        let a: ListenAddr = s.parse().unwrap();
        assert_eq!(a.to_string(), s);
    }
    assert!(matches!("unix:/x".parse(), Ok(ListenAddr::Unix(_))));
    assert!("unix:".parse::<ListenAddr>().is_err());
    assert!("not an address".parse::<ListenAddr>().is_err());
}

// ---------------------------------------------------------------------------
// Interop with real clients
// ---------------------------------------------------------------------------

fn have_tool(name: &str) -> bool {
    let found = std::process::Command::new("which")
        .arg(name)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name} is required in CI but not installed");
        }
        eprintln!("note: {name} not installed; skipping interop check");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_nbdinfo_and_qemu_io() {
    let has_nbdinfo = have_tool("nbdinfo");
    let has_qemu_io = have_tool("qemu-io");
    if !has_nbdinfo && !has_qemu_io {
        return;
    }
    let export = mem(SIZE, false);
    let listener = server::bind(&"127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(server::serve(
        listener,
        provider(export.clone()),
        Arc::new(ServerConfig::default()),
        async {
            let _ = stop_rx.await;
        },
    ));
    let url = format!("nbd://{addr}/disk");
    if has_nbdinfo {
        let out = tokio::process::Command::new("nbdinfo")
            .args(["--json", &url])
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "nbdinfo failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("\"export-size\": 1048576"), "{stdout}");
        assert!(stdout.contains("base:allocation"), "{stdout}");
        // Block status through libnbd.
        let out = tokio::process::Command::new("nbdinfo")
            .args(["--map", &url])
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "nbdinfo --map failed: {stdout}");
        assert!(stdout.contains("zero"), "{stdout}");
    }
    if has_qemu_io {
        let out = tokio::process::Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0xab 0 64k",
                "-c",
                "read -P 0xab 0 64k",
                &url,
            ])
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "qemu-io failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
        assert!(export.snapshot()[..65536].iter().all(|&b| b == 0xab));
    }
    stop_tx.send(()).unwrap();
    tokio::time::timeout(T, srv)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

// ---------------------------------------------------------------------------
// Many exports (issue 17, finding 6)
// ---------------------------------------------------------------------------

/// `n` exports named `vd00000`.., all backed by one small in-memory disk; counts how often
/// an export is opened (what an agent pays an attach for).
struct ManyExports {
    n: usize,
    export: Arc<MemExport>,
    opens: std::sync::atomic::AtomicUsize,
}

impl ManyExports {
    fn new(n: usize) -> Arc<ManyExports> {
        Arc::new(ManyExports {
            n,
            export: mem(64 << 10, false),
            opens: Default::default(),
        })
    }

    fn name(i: usize) -> String {
        format!("vd{i:05}")
    }

    fn known(&self, name: &str) -> bool {
        name.strip_prefix("vd")
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i < self.n && Self::name(i) == name)
    }
}

#[async_trait::async_trait]
impl ExportProvider for ManyExports {
    async fn list(&self) -> Vec<String> {
        (0..self.n).map(Self::name).collect()
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn server::Export>, server::OpenError> {
        if !self.known(name) {
            return Err(server::OpenError::NotFound);
        }
        self.opens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.export.clone())
    }

    /// From "metadata": no open.
    async fn info(&self, name: &str) -> Result<ExportInfo, server::OpenError> {
        if !self.known(name) {
            return Err(server::OpenError::NotFound);
        }
        Ok(server::Export::info(&*self.export))
    }
}

async fn connect_to(
    provider: Arc<dyn ExportProvider>,
    cfg: ServerConfig,
) -> (Client<DuplexStream>, JoinHandle<Result<(), ServerError>>) {
    let (s, h) = spawn_server(provider, cfg);
    let c = Client::start(
        s,
        ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        },
    )
    .await;
    (c, h)
}

/// LIST: the names, in order, then the ACK.
async fn list_names<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Client<S>) -> Vec<String> {
    let r = c.option_all(&ClientOption::List).await;
    assert_eq!(r.last().unwrap().0, NBD_REP_ACK);
    r[..r.len() - 1]
        .iter()
        .map(|(t, d)| {
            assert_eq!(*t, NBD_REP_SERVER);
            let len = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
            String::from_utf8(d[4..4 + len].to_vec()).unwrap()
        })
        .collect()
}

/// A client listing 5,000 exports the way `nbdinfo --list` does (LIST, then INFO and
/// LIST_META_CONTEXT for each) takes more options than the old fixed cap of 1,024 and, with
/// pauses between options that are each well inside the bound, longer than a whole-handshake
/// limit would allow. It must get through, and INFO must not open (attach) any export.
#[tokio::test]
async fn a_client_lists_and_describes_5000_exports() {
    const N: usize = 5000;
    let many = ManyExports::new(N);
    let cfg = ServerConfig {
        option_timeout: Duration::from_millis(1000),
        ..ServerConfig::default()
    };
    let (mut c, h) = connect_to(many.clone(), cfg).await;
    let r = c.option_all(&ClientOption::StructuredReply).await;
    assert_eq!(r, vec![(NBD_REP_ACK, vec![])]);
    let names = list_names(&mut c).await;
    assert_eq!(names.len(), N);
    for (i, name) in names.iter().enumerate() {
        if i % 1000 == 999 {
            // A slow client: 1.5 s in all, longer than the 1 s option bound would allow a
            // whole handshake, but never 1 s between two options.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let r = c
            .option_all(&ClientOption::Info(InfoRequest {
                name: name.clone(),
                requests: vec![NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
            }))
            .await;
        assert_eq!(r.last().unwrap().0, NBD_REP_ACK, "{name}: {r:?}");
        let export = r
            .iter()
            .find(|(t, d)| *t == NBD_REP_INFO && d[..2] == NBD_INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        assert_eq!(
            u64::from_be_bytes(export.1[2..10].try_into().unwrap()),
            64 << 10
        );
        let r = c
            .option_all(&ClientOption::ListMetaContext(MetaContextRequest {
                export_name: name.clone(),
                queries: vec![],
            }))
            .await;
        assert_eq!(r.len(), 2, "{name}: {r:?}");
    }
    assert_eq!(
        many.opens.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "INFO opened exports"
    );
    let (size, _, _) = c.negotiate(&names[N - 1], false, false).await;
    assert_eq!(size, 64 << 10);
    let r = c.call(NBD_CMD_READ, 0, 0, 512, &[]).await;
    assert_eq!((r.error, r.data.len()), (0, 512));
    assert_eq!(many.opens.load(std::sync::atomic::Ordering::Relaxed), 1);
    c.request(NBD_CMD_DISC, 0, 8, 0, 0, &[]).await;
    assert!(c.closed().await);
    finished(h).await.unwrap();
}

/// Protections that stay: after listing 5,000 exports, an endless stream of options is still
/// cut off, at a number that follows the listing (a few per export), not never.
#[tokio::test]
async fn endless_options_after_a_list_are_cut_off() {
    const N: usize = 5000;
    let (mut c, h) = connect_to(ManyExports::new(N), ServerConfig::default()).await;
    assert_eq!(list_names(&mut c).await.len(), N);
    let mut b = BytesMut::new();
    for _ in 0..100 {
        ClientOption::Unknown(99).encode(&mut b);
    }
    let (mut rd, mut wr) = tokio::io::split(c.s);
    // Options keep coming (up to 100,000, far more than any listing needs) until the server
    // closes.
    let w = tokio::spawn(async move {
        for _ in 0..1000 {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        wr
    });
    let mut replies = 0usize;
    let mut h_buf = [0u8; OPTION_REPLY_HEADER_LEN];
    loop {
        match tokio::time::timeout(T, rd.read_exact(&mut h_buf)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
            Err(_) => panic!("the server neither answered nor closed"),
        }
        let hdr = codec::parse_option_reply_header(&h_buf).unwrap();
        let mut d = vec![0u8; hdr.length as usize];
        rd.read_exact(&mut d).await.unwrap();
        replies += 1;
    }
    let _ = w.await;
    // The LIST itself was the first option.
    let cfg = ServerConfig::default();
    assert_eq!(replies, cfg.max_options + cfg.options_per_export * N - 1);
    assert!(matches!(
        finished(h).await,
        Err(ServerError::TooManyOptions(_))
    ));
}

/// A client that stops in the middle of an option is cut off by the inactivity bound.
#[tokio::test]
async fn a_client_stalled_inside_an_option_is_cut_off() {
    let cfg = ServerConfig {
        option_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let (mut c, h) = connect_to(ManyExports::new(10), cfg).await;
    assert_eq!(list_names(&mut c).await.len(), 10);
    let mut b = BytesMut::new();
    ClientOption::List.encode(&mut b);
    c.send_raw(&b[..10]).await;
    let t0 = std::time::Instant::now();
    assert!(c.closed().await);
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(finished(h).await.is_err());
}

/// A client that sends options but never reads the replies is cut off once the server cannot
/// write, by the same bound, instead of holding the server's task for ever.
#[tokio::test]
async fn a_client_that_never_reads_replies_is_cut_off() {
    let cfg = ServerConfig {
        option_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let many = ManyExports::new(5000);
    // A small pipe, so unread replies fill it quickly.
    let (client, server_side) = tokio::io::duplex(64 << 10);
    let h = tokio::spawn(serve_connection(server_side, many, Arc::new(cfg)));
    let (mut rd, mut wr) = tokio::io::split(client);
    let mut g = [0u8; 18];
    rd.read_exact(&mut g).await.unwrap();
    let flags = ClientFlags {
        fixed_newstyle: true,
        no_zeroes: true,
    };
    wr.write_all(&flags.to_wire().to_be_bytes()).await.unwrap();
    let mut b = BytesMut::new();
    for _ in 0..50 {
        ClientOption::List.encode(&mut b);
    }
    wr.write_all(&b).await.unwrap();
    let t0 = std::time::Instant::now();
    let r = finished(h).await;
    assert!(r.is_err(), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    drop(rd);
}
