//! The client against the crate's own tokio server (in-memory exports) on real sockets, and
//! against scripted servers over an in-memory transport.

use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::server::mem::{MemExport, StaticProvider};
use crate::server::{
    self, Errno, Export, ExportInfo, ExportProvider, IoError, ListenAddr, ServerConfig,
    StatusExtent, ZeroFlags,
};

const MIB: usize = 1 << 20;

/// A server on a loopback port, running until the runtime is dropped.
struct TestServer {
    _rt: tokio::runtime::Runtime,
    uri: NbdUri,
}

fn serve_on(addr: ListenAddr, provider: Arc<dyn ExportProvider>, cfg: ServerConfig) -> TestServer {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(server::bind(&addr)).unwrap();
    let bound = listener.local_addr_string();
    rt.spawn(server::serve(
        listener,
        provider,
        Arc::new(cfg),
        std::future::pending(),
    ));
    let uri = match addr {
        ListenAddr::Tcp(_) => format!("nbd://{bound}/disk"),
        ListenAddr::Unix(p) => format!("nbd+unix:///disk?socket={}", p.display()),
    };
    TestServer {
        _rt: rt,
        uri: uri.parse().unwrap(),
    }
}

fn serve_export(export: Arc<dyn Export>, cfg: ServerConfig) -> TestServer {
    let provider = Arc::new(StaticProvider::new().with("disk", export));
    serve_on(
        ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        provider,
        cfg,
    )
}

fn mem(size: u64, multi_conn: bool) -> Arc<MemExport> {
    let mut info = ExportInfo::new(size);
    info.can_multi_conn = multi_conn;
    Arc::new(MemExport::new(info))
}

fn opts(ms: u64) -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_millis(ms),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn uri_parse_and_display_round_trip() {
    for s in [
        "nbd://127.0.0.1:10809/disk0",
        "nbd://example.com/disk0",
        "nbd://[::1]:7000/vd@snap",
        "nbd://[::1]/x",
        "nbd://host:1/",
        "nbd+unix:///disk0?socket=/run/nbd.sock",
        "nbd+unix:///?socket=/tmp/s",
    ] {
        let u: NbdUri = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(u.to_string(), s);
    }
    let u: NbdUri = "nbd://[::1]/disk0".parse().unwrap();
    assert_eq!(
        u.addr,
        NbdAddr::Tcp {
            host: "::1".into(),
            port: None
        }
    );
    assert_eq!(u.server(), "[::1]:10809");
    let u: NbdUri = "nbd://h".parse().unwrap();
    assert_eq!(u.export, "");
    assert_eq!(u.to_string(), "nbd://h/");
    let u: NbdUri = "nbd+unix:///d?socket=/a/b.sock".parse().unwrap();
    assert_eq!(u.addr, NbdAddr::Unix("/a/b.sock".into()));
    assert_eq!(u.export, "d");
}

#[test]
fn uri_errors_show_the_expected_forms() {
    for s in [
        "http://x/y",
        "nbd://",
        "nbd:///disk",
        "nbd://h:0/d",
        "nbd://h:99999/d",
        "nbd://h:p/d",
        "nbd://::1/d",
        "nbd://[::1/d",
        "nbd://h/d?tls=on",
        "nbd+unix://host/d?socket=/s",
        "nbd+unix:///d",
        "nbd+unix:///d?socket=",
        "nbd+unix:///d?sock=/s",
        "nbds://h/d",
    ] {
        let e = s.parse::<NbdUri>().expect_err(s).to_string();
        assert!(
            e.contains("nbd://HOST[:PORT]/EXPORT") && e.contains("nbd+unix:///EXPORT?socket="),
            "{s}: {e}"
        );
    }
    assert!(NbdUri::is_nbd_uri("nbd+unix:///x?socket=/s"));
    assert!(!NbdUri::is_nbd_uri("/dev/sdb"));
}

#[test]
fn read_write_trim_zeroes_flush_round_trip() {
    let export = mem(4 * MIB as u64, true);
    let srv = serve_export(export.clone(), ServerConfig::default());
    let mut c = Connection::connect(&srv.uri, &opts(5000)).unwrap();
    assert_eq!(c.size(), 4 * MIB as u64);
    assert!(!c.is_read_only());
    assert!(c.can_flush() && c.can_fua() && c.can_trim() && c.can_write_zeroes());
    assert!(c.can_multi_conn());
    assert_eq!(c.max_request(), 32 << 20);

    let data = pattern(100_000, 7);
    c.write(12_345, &data, false).unwrap();
    c.write(0, b"fua!", true).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(12_345, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(&export.snapshot()[12_345..12_345 + data.len()], &data[..]);
    assert_eq!(&export.snapshot()[..4], b"fua!");

    c.write_zeroes(20_000, 1000, false).unwrap();
    c.trim(50_000, 4096).unwrap();
    c.write_zeroes(60_000, 100, true).unwrap();
    let snap = export.snapshot();
    assert!(snap[20_000..21_000].iter().all(|&b| b == 0));
    assert!(snap[50_000..54_096].iter().all(|&b| b == 0));
    assert!(snap[60_000..60_100].iter().all(|&b| b == 0));
    assert_eq!(snap[21_000], data[21_000 - 12_345]);

    // Zero-length requests are fine; reads past the end are refused locally.
    c.read(0, &mut []).unwrap();
    c.write(0, &[], false).unwrap();
    let e = c.read(4 * MIB as u64 - 10, &mut [0u8; 20]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert!(!c.is_broken());
    c.read(0, &mut [0u8; 4]).unwrap();
}

#[test]
fn large_requests_are_split_to_the_server_maximum() {
    let export = mem(8 * MIB as u64, false);
    let cfg = ServerConfig {
        // The server closes the connection on a write above its maximum, so a successful
        // 3 MiB write proves the client split it.
        max_payload: 64 << 10,
        ..ServerConfig::default()
    };
    let srv = serve_export(export.clone(), cfg);
    let mut c = Connection::connect(&srv.uri, &opts(5000)).unwrap();
    assert_eq!(c.max_request(), 64 << 10);
    let data = pattern(3 * MIB + 123, 3);
    c.write(4096, &data, true).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(4096, &mut back).unwrap();
    assert_eq!(back, data);
    c.write_zeroes(4096, 2 * MIB as u64, false).unwrap();
    c.trim(0, 8 * MIB as u64).unwrap();
    let snap = export.snapshot();
    assert!(snap[..8 * MIB].iter().all(|&b| b == 0));
}

/// An export whose reads fail with EIO at offset 0 and writes with ENOSPC, and whose
/// reads at offset 4096 never finish.
struct Faulty;

#[async_trait::async_trait]
impl Export for Faulty {
    fn info(&self) -> ExportInfo {
        ExportInfo::new(1 << 20)
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        match offset {
            0 => Err(IoError::new(Errno::Io, "medium error")),
            4096 => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(vec![0; len as usize])
            }
            _ => Ok(vec![9; len as usize]),
        }
    }
    async fn write(&self, _: u64, _: Vec<u8>, _: bool) -> Result<(), IoError> {
        Err(IoError::new(Errno::NoSpc, "full"))
    }
    async fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
    async fn trim(&self, _: u64, _: u32, _: bool) -> Result<(), IoError> {
        Err(IoError::new(Errno::NotSup, "no"))
    }
    async fn write_zeroes(&self, _: u64, _: u32, _: ZeroFlags) -> Result<(), IoError> {
        Ok(())
    }
    async fn block_status(&self, _: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        Ok(vec![StatusExtent {
            length: len,
            flags: 0,
        }])
    }
}

#[test]
fn error_replies_map_to_io_errors_and_keep_the_connection() {
    let srv = serve_export(Arc::new(Faulty), ServerConfig::default());
    let mut c = Connection::connect(&srv.uri, &opts(5000)).unwrap();
    let e = c.read(0, &mut [0u8; 512]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Other);
    assert!(e.to_string().contains("EIO"), "{e}");
    assert!(!c.is_broken());
    let e = c.write(8192, &[1; 512], false).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
    let e = c.trim(0, 512).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
    let mut buf = [0u8; 512];
    c.read(8192, &mut buf).unwrap();
    assert_eq!(buf, [9; 512]);
}

#[test]
fn a_server_that_stops_answering_times_out_within_the_bound() {
    let srv = serve_export(Arc::new(Faulty), ServerConfig::default());
    let mut c = Connection::connect(&srv.uri, &opts(300)).unwrap();
    let t = Instant::now();
    let e = c.read(4096, &mut [0u8; 512]).unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(c.is_broken());
    let e = c.read(8192, &mut [0u8; 512]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotConnected);
}

#[test]
fn a_silent_server_times_out_the_handshake() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri: NbdUri = format!("nbd://{}/disk", l.local_addr().unwrap())
        .parse()
        .unwrap();
    let t = Instant::now();
    let e = Connection::connect(&uri, &opts(300)).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2));
    let e = io::Error::from(e);
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    drop(l);
}

#[test]
fn connect_errors_say_what_failed() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let uri: NbdUri = format!("nbd://127.0.0.1:{port}/disk").parse().unwrap();
    let e = Connection::connect(&uri, &opts(1000)).unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")));

    let srv = serve_export(mem(1 << 20, false), ServerConfig::default());
    let mut other = srv.uri.clone();
    other.export = "nope".into();
    let e = Connection::connect(&other, &opts(1000)).unwrap_err();
    assert!(matches!(e, ClientError::ExportRefused { .. }), "{e}");
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn read_only_exports_refuse_writes_locally() {
    let mut info = ExportInfo::new(1 << 20);
    info.read_only = true;
    let srv = serve_export(Arc::new(MemExport::new(info)), ServerConfig::default());
    let mut c = Connection::connect(&srv.uri, &opts(1000)).unwrap();
    assert!(c.is_read_only());
    let e = c.write(0, &[1], false).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    c.read(0, &mut [0u8; 16]).unwrap();
}

#[test]
fn unix_sockets_work() {
    let dir = std::env::temp_dir().join(format!("tabula-nbd-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("s.sock");
    let export = mem(1 << 20, false);
    let provider = Arc::new(StaticProvider::new().with("disk", export.clone() as Arc<dyn Export>));
    let srv = serve_on(
        ListenAddr::Unix(sock.clone()),
        provider,
        ServerConfig::default(),
    );
    let mut c = Connection::connect(&srv.uri, &opts(1000)).unwrap();
    c.write(100, b"unix", false).unwrap();
    let mut b = [0u8; 4];
    c.read(100, &mut b).unwrap();
    assert_eq!(&b, b"unix");
    drop(c);
    drop(srv);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Scripted servers over an in-memory transport
// ---------------------------------------------------------------------------

/// Reads come from a script of server bytes; writes are collected.
struct Script {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn greeting(flags: u16) -> BytesMut {
    let mut b = BytesMut::new();
    b.extend_from_slice(&NBDMAGIC.to_be_bytes());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

fn script(bytes: &[u8]) -> Script {
    Script {
        input: Cursor::new(bytes.to_vec()),
        output: Vec::new(),
    }
}

#[test]
fn falls_back_to_export_name_when_go_is_unsupported() {
    let mut s = greeting(NBD_FLAG_FIXED_NEWSTYLE);
    codec::encode_rep_error(&mut s, NBD_OPT_GO, NBD_REP_ERR_UNSUP, "old server");
    // Without NO_ZEROES the 124 zero bytes follow.
    codec::encode_export_name_reply(
        &mut s,
        1 << 30,
        NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH,
        false,
    );
    codec::encode_simple_reply(&mut s, 0, 1);
    let mut c = Connection::handshake(script(&s), "old").unwrap();
    assert_eq!(c.size(), 1 << 30);
    assert!(c.can_flush() && !c.can_trim());
    assert_eq!(c.max_request(), DEFAULT_MAX_REQUEST);
    c.flush().unwrap();
    // The client asked for GO first, then EXPORT_NAME, then sent one FLUSH.
    let out = &c.stream.output;
    assert_eq!(&out[..4], &NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    let hdr = codec::parse_option_header(&out[4..20]).unwrap();
    assert_eq!(hdr.option, NBD_OPT_GO);
    let next = 20 + hdr.length as usize;
    let hdr2 = codec::parse_option_header(&out[next..next + 16]).unwrap();
    assert_eq!(hdr2.option, NBD_OPT_EXPORT_NAME);
    assert_eq!(&out[next + 16..next + 19], b"old");
    let req = codec::parse_request_header(&out[next + 19..next + 19 + 28]).unwrap();
    assert_eq!(req.command, NBD_CMD_FLUSH);
}

#[test]
fn scripted_protocol_violations_are_errors_not_panics() {
    let ok_go = |s: &mut BytesMut, max: u32| {
        codec::encode_info_export(s, NBD_OPT_GO, 1 << 20, NBD_FLAG_HAS_FLAGS);
        codec::encode_info_block_size(s, NBD_OPT_GO, 512, 4096, max);
        codec::encode_rep_ack(s, NBD_OPT_GO);
    };
    // Not fixed newstyle.
    let s = greeting(0);
    assert!(matches!(
        Connection::handshake(script(&s), "x"),
        Err(ClientError::Protocol(_))
    ));
    // Oversized option reply.
    let mut s = greeting(NBD_FLAG_FIXED_NEWSTYLE);
    codec::encode_option_reply(&mut s, NBD_OPT_GO, NBD_REP_INFO, &[]);
    let len_at = s.len() - 4;
    s[len_at..].copy_from_slice(&(1u32 << 30).to_be_bytes());
    assert!(matches!(
        Connection::handshake(script(&s), "x"),
        Err(ClientError::Protocol(_))
    ));
    // ACK without the export info.
    let mut s = greeting(NBD_FLAG_FIXED_NEWSTYLE);
    codec::encode_rep_ack(&mut s, NBD_OPT_GO);
    assert!(matches!(
        Connection::handshake(script(&s), "x"),
        Err(ClientError::Protocol(_))
    ));
    // Truncated greeting.
    assert!(matches!(
        Connection::handshake(script(&greeting(1)[..10]), "x"),
        Err(ClientError::Io(_))
    ));
    // A reply with the wrong cookie breaks the connection.
    let mut s = greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    ok_go(&mut s, 1 << 20);
    codec::encode_simple_reply(&mut s, 0, 99);
    let mut c = Connection::handshake(script(&s), "x").unwrap();
    assert_eq!((c.min_block(), c.max_request()), (512, 1 << 20));
    let e = c.read(0, &mut [0u8; 512]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(c.is_broken());
    // A misaligned read is refused before it is sent.
    let mut s = greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    ok_go(&mut s, 1 << 20);
    let mut c = Connection::handshake(script(&s), "x").unwrap();
    let e = c.read(1, &mut [0u8; 512]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert!(!c.is_broken());
    // A short read payload (EOF) breaks it.
    codec::encode_simple_reply(&mut s, 0, 1);
    s.extend_from_slice(&[0u8; 100]);
    let mut c = Connection::handshake(script(&s), "x").unwrap();
    let e = c.read(0, &mut [0u8; 512]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    assert!(c.is_broken());
}
