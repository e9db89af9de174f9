use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tabula_nbd::server::mem::{MemExport, StaticProvider};
use tabula_nbd::server::{
    self, Errno, ExportInfo, IoError, ListenAddr, ServerConfig, StatusExtent, ZeroFlags,
};

use super::*;

/// A create that cannot size its new file removes it (a retry is not told it exists); an
/// existing file is left as it was.
#[test]
fn a_failed_create_leaves_no_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.img");
    for size in [1u64 << 63, u64::MAX - 4095] {
        assert!(Container::create(&p, size).is_err(), "{size}");
        assert!(
            !p.exists(),
            "a failed create of {size} bytes left {}",
            p.display()
        );
    }
    std::fs::write(&p, [7u8; 4096]).unwrap();
    assert!(Container::create(&p, 1 << 63).is_err());
    assert_eq!(std::fs::read(&p).unwrap(), [7u8; 4096]);
}

#[test]
fn zero_makes_data_read_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.img");
    let c = Container::create(&p, 8 << 20).unwrap();
    c.write_at(&[0xab; 8192], 1 << 20).unwrap();
    c.zero(1 << 20, 1 << 20).unwrap();
    let mut buf = vec![1u8; 8192];
    c.read_at(&mut buf, 1 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(c.len_bytes().unwrap(), 8 << 20);
}

#[test]
fn read_vec_at_reads_exactly_and_reports_eof() {
    let dir = tempfile::tempdir().unwrap();
    let c = Container::create(&dir.path().join("c.img"), 1 << 20).unwrap();
    let data: Vec<u8> = (0..10000u32).map(|i| i as u8).collect();
    c.write_at(&data, 4096).unwrap();
    assert_eq!(c.read_vec_at(10000, 4096).unwrap(), data);
    assert_eq!(c.read_vec_at(3, 4097).unwrap(), data[1..4]);
    assert!(c.read_vec_at(8192, (1 << 20) - 4096).is_err());
    // Buffered writes go in pieces ending on 64 KiB boundaries: one starting and ending
    // off them.
    let long: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    c.write_at(&long, 70_001).unwrap();
    assert!(c.read_vec_at(long.len(), 70_001).unwrap() == long);
}

#[test]
fn create_never_shrinks_and_open_detects_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.img");
    Container::create(&p, 4 << 20).unwrap();
    assert_eq!(
        Container::create(&p, 1 << 20).unwrap().len_bytes().unwrap(),
        4 << 20
    );
    assert!(matches!(
        Container::open(&p, 8 << 20),
        Err(ContainerError::TooSmall { .. })
    ));
}

#[test]
fn locations_parse_and_print_back() {
    for s in [
        "/data/c.img",
        "relative/c.img",
        "/dev/sdb",
        "nbd://10.0.0.5:10809/disk0",
        "nbd://[::1]/disk0",
        "nbd+unix:///disk0?socket=/run/c.sock",
    ] {
        let l = Location::parse(s).unwrap();
        assert_eq!(l.to_string(), s);
        assert_eq!(matches!(l, Location::Nbd(_)), s.starts_with("nbd"));
    }
    assert_eq!(Location::parse(""), Err(LocationError::Empty));
    let e = Location::parse("nbd://host:x/d").unwrap_err().to_string();
    assert!(e.contains("nbd://HOST[:PORT]/EXPORT"), "{e}");
    // Not an NBD scheme: a (strange) relative path.
    assert!(matches!(Location::parse("nbd:/x"), Ok(Location::Path(_))));
}

#[test]
fn file_containers_say_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.img");
    Container::create(&p, 1 << 20).unwrap();
    let c = Container::open_location(
        &Location::Path(p.clone()),
        1 << 20,
        &ContainerOptions::default(),
    )
    .unwrap();
    assert_eq!(c.kind(), ContainerKind::File);
    assert_eq!(c.kind().name(), "file");
    assert!(!c.is_remote());
    assert_eq!(c.path(), p);
    assert_eq!(c.location(), &Location::Path(p.clone()));
    assert_eq!(c.describe(), format!("file {}", p.display()));
    c.write_zeros(0, 4096).unwrap();
    assert!(matches!(
        Container::open(dir.path(), 0),
        Err(ContainerError::Open { .. } | ContainerError::NotStorage { .. })
    ));
}

// ---------------------------------------------------------------------------
// Block devices (loop devices, when this machine lets us make one)
// ---------------------------------------------------------------------------

/// An attached loop device, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path) -> Option<LoopDevice> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(LoopDevice(
                String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            )),
            Ok(o) => {
                eprintln!(
                    "note: skipping the block device test: losetup failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("note: skipping the block device test: cannot run losetup: {e}");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A new file container of `size` bytes in `dir`, and whether it has the direct side door
/// (tmpfs refuses `O_DIRECT`; a note says so).
fn file_container(dir: &tempfile::TempDir, size: u64) -> (PathBuf, Container, bool) {
    let p = dir.path().join("c.img");
    let c = Container::create(&p, size).unwrap();
    let Backend::Local(local) = &c.backend else {
        unreachable!()
    };
    // Ordinary I/O on files keeps the page cache; only durable writes into fresh space
    // take the side door.
    assert!(!local.uses_direct_io());
    let direct = local.has_direct_side_door();
    if !direct {
        // CI's temporary directory is on ext4: there the side door must be tested, not
        // skipped.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{} refused O_DIRECT under CI=true",
            p.display()
        );
        eprintln!("note: {} refused O_DIRECT", p.display());
    }
    (p, c, direct)
}

#[test]
fn a_direct_write_into_a_sparse_file_reserves_its_chunk_first() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (p, c, direct) = file_container(&dir, 200 << 20);
    if !direct {
        return; // nothing to reserve
    }
    let Backend::Local(local) = &c.backend else {
        unreachable!()
    };
    let allocated = || std::fs::metadata(&p).unwrap().blocks() * 512;
    assert!(allocated() < 1 << 20, "a new container is sparse");
    // A copy into the middle of the second chunk reserves all of it, and no more.
    let mut buf = AlignedBuf::new(1 << 20);
    buf.get(1 << 20).fill(9);
    c.write_fresh_durable(buf.get(1 << 20), 100 << 20).unwrap();
    assert!(local.is_reserved(64 << 20) && !local.is_reserved(0));
    let after = allocated();
    assert!(
        (64 << 20..=65 << 20).contains(&after),
        "{after} bytes allocated after one copy"
    );
    // Reserving wrote nothing: the rest of the chunk still reads as zeros.
    let back = c.read_vec_at(64 << 20, 64 << 20).unwrap();
    assert!(back[..36 << 20].iter().all(|&b| b == 0));
    assert!(back[36 << 20..37 << 20].iter().all(|&b| b == 9));
    assert!(back[37 << 20..].iter().all(|&b| b == 0));
    // Freed space is a hole again, and reserved afresh by the next copy into it. The last
    // chunk stops at the end of the file.
    c.zero_range(64 << 20, 64 << 20).unwrap();
    assert!(!local.is_reserved(64 << 20));
    c.write_fresh_durable(buf.get(1 << 20), 199 << 20).unwrap();
    assert!(local.is_reserved(199 << 20));
    let tail = allocated();
    assert!(
        (8 << 20..=(9 << 20)).contains(&tail),
        "{tail} bytes allocated: the last chunk, 192-256 MiB, reserved only up to the end of the file at 200 MiB"
    );
}

#[test]
fn durable_writes_to_a_file_stay_coherent_with_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    // Without the side door durable writes stay buffered, and this checks that path.
    let (p, c, _) = file_container(&dir, 8 << 20);
    // Cached data under the range of a direct write: the direct write wins, reads see it.
    c.write_at(&[1u8; 3 << 20], 1 << 20).unwrap();
    let mut aligned = AlignedBuf::new(1 << 20);
    aligned.get(1 << 20).fill(7);
    c.write_fresh_durable(aligned.get(1 << 20), 2 << 20)
        .unwrap();
    // Unaligned memory (bounced), unaligned offset and length (buffered).
    let odd: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8).collect();
    c.write_fresh_durable(&odd[1..4097], 4 << 20).unwrap();
    c.write_at_durable(&odd[..4096], (4 << 20) + 4096).unwrap();
    c.write_at_durable(b"tail", (4 << 20) + 8190).unwrap();
    let back = c.read_vec_at((3 << 20) + 8194, 1 << 20).unwrap();
    assert!(back[..1 << 20].iter().all(|&b| b == 1));
    assert!(back[1 << 20..2 << 20].iter().all(|&b| b == 7));
    assert!(back[2 << 20..3 << 20].iter().all(|&b| b == 1));
    assert!(back[3 << 20..(3 << 20) + 4096] == odd[1..4097]);
    assert!(back[(3 << 20) + 4096..(3 << 20) + 8190] == odd[..4094]);
    assert!(&back[(3 << 20) + 8190..] == b"tail");
    drop(c);
    // Durable without any sync: the bytes are in the file as another reader sees it.
    let f = std::fs::read(&p).unwrap();
    assert!(f[2 << 20..3 << 20].iter().all(|&b| b == 7));
}

#[test]
fn block_device_io_direct_and_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("loop.img");
    const SIZE: u64 = 16 << 20;
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let Some(dev) = LoopDevice::attach(&backing) else {
        return;
    };
    let path = Path::new(&dev.0);
    let c = Container::open(path, SIZE).unwrap();
    assert_eq!(c.kind(), ContainerKind::BlockDevice);
    assert_eq!(c.kind().name(), "block");
    assert_eq!(c.len_bytes().unwrap(), SIZE);
    assert!(c.describe().starts_with("block device /dev/"));
    let Backend::Local(local) = &c.backend else {
        unreachable!()
    };
    if !local.uses_direct_io() {
        eprintln!(
            "note: {} refused O_DIRECT; testing buffered I/O only",
            dev.0
        );
    }
    assert!(matches!(
        Container::open(path, SIZE + 4096),
        Err(ContainerError::TooSmall { .. })
    ));

    // Aligned (direct, through a bounce buffer: a Vec is rarely page-aligned), larger than
    // one bounce buffer; and unaligned (buffered) at both ends of a block.
    let big: Vec<u8> = (0..(3 << 20) + 8192).map(|i: u32| (i * 7) as u8).collect();
    c.write_at(&big, 1 << 20).unwrap();
    c.write_at(b"unaligned", 4096 - 4).unwrap();
    c.sync().unwrap();
    assert_eq!(c.read_vec_at(big.len(), 1 << 20).unwrap(), big);
    let mut small = [0u8; 9];
    c.read_at(&mut small, 4096 - 4).unwrap();
    assert_eq!(&small, b"unaligned");
    // A buffered read of directly written data, and the other way round.
    let mut b = vec![0u8; 100];
    c.read_at(&mut b, (1 << 20) + 3).unwrap();
    assert_eq!(&b[..], &big[3..103]);
    let mut block = vec![0u8; 4096];
    c.read_at(&mut block, 0).unwrap();
    assert_eq!(&block[4092..], b"unal");

    c.zero_range((1 << 20) + 4096, 1 << 20).unwrap();
    c.zero_range((2 << 20) + 4096 + 10, 100).unwrap();
    c.sync().unwrap();
    let back = c.read_vec_at(big.len(), 1 << 20).unwrap();
    assert_eq!(&back[..4096], &big[..4096]);
    assert!(back[4096..(1 << 20) + 4096].iter().all(|&x| x == 0));
    assert_eq!(back[(1 << 20) + 4096], big[(1 << 20) + 4096]);
    assert!(
        back[(1 << 20) + 4106..(1 << 20) + 4206]
            .iter()
            .all(|&x| x == 0)
    );
    assert_eq!(&back[(1 << 20) + 4206..], &big[(1 << 20) + 4206..]);
    drop(c);
    drop(dev);
    // Synced data reached the loop device's backing file.
    let f = std::fs::read(&backing).unwrap();
    assert_eq!(
        &f[(3 << 20) + 8192..(4 << 20) + 8192],
        &big[(2 << 20) + 8192..]
    );
}

// ---------------------------------------------------------------------------
// NBD containers, against the tabula-nbd server's in-memory export
// ---------------------------------------------------------------------------

/// An NBD server on 127.0.0.1:`port` until dropped (dropping it is a crash: every
/// connection closes at once).
struct MemServer {
    _rt: tokio::runtime::Runtime,
    port: u16,
}

impl MemServer {
    fn start(port: u16, export: Arc<dyn server::Export>) -> MemServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let addr = ListenAddr::Tcp(format!("127.0.0.1:{port}").parse().unwrap());
        let listener = rt.block_on(server::bind(&addr)).unwrap();
        let port = listener
            .local_addr_string()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let provider = Arc::new(StaticProvider::new().with("disk0", export));
        rt.spawn(server::serve(
            listener,
            provider,
            Arc::new(ServerConfig::default()),
            std::future::pending(),
        ));
        MemServer { _rt: rt, port }
    }

    fn location(&self) -> Location {
        Location::parse(&format!("nbd://127.0.0.1:{}/disk0", self.port)).unwrap()
    }
}

fn mem_export(size: u64, multi_conn: bool, read_only: bool) -> Arc<MemExport> {
    let mut info = ExportInfo::new(size);
    info.can_multi_conn = multi_conn;
    info.read_only = read_only;
    Arc::new(MemExport::new(info))
}

fn timeout_opts(ms: u64) -> ContainerOptions {
    ContainerOptions {
        io_timeout: Duration::from_millis(ms),
    }
}

#[test]
fn nbd_container_round_trip_and_checks_on_open() {
    let export = mem_export(4 << 20, true, false);
    let srv = MemServer::start(0, export.clone());
    let loc = srv.location();
    let c = Container::open_location(&loc, 4 << 20, &timeout_opts(2000)).unwrap();
    assert_eq!(c.kind(), ContainerKind::Nbd);
    assert_eq!(c.kind().name(), "nbd");
    assert!(c.is_remote());
    assert_eq!(c.location(), &loc);
    assert_eq!(c.path(), Path::new(&loc.to_string()));
    assert_eq!(c.describe(), format!("NBD export {loc}"));
    assert_eq!(c.len_bytes().unwrap(), 4 << 20);

    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    c.write_at(&data, 777).unwrap();
    assert_eq!(c.read_vec_at(data.len(), 777).unwrap(), data);
    c.zero(1000, 5000).unwrap();
    let back = c.read_vec_at(10_000, 0).unwrap();
    assert!(back[1000..6000].iter().all(|&b| b == 0));
    assert_eq!(back[6000], data[6000 - 777]);
    assert_eq!(&export.snapshot()[6000..10_000], &back[6000..]);

    // Too small, read-only, unknown export, nobody listening: clear errors.
    let e = Container::open_location(&loc, 8 << 20, &timeout_opts(2000)).unwrap_err();
    assert!(matches!(e, ContainerError::TooSmall { .. }), "{e}");
    let ro = MemServer::start(0, mem_export(1 << 20, true, true));
    let e = Container::open_location(&ro.location(), 0, &timeout_opts(2000)).unwrap_err();
    assert!(matches!(e, ContainerError::ReadOnly { .. }), "{e}");
    assert!(e.to_string().contains("read-only"), "{e}");
    let other = Location::parse(&format!("nbd://127.0.0.1:{}/nope", srv.port)).unwrap();
    let e = Container::open_location(&other, 0, &timeout_opts(2000)).unwrap_err();
    assert!(matches!(e, ContainerError::Remote { .. }), "{e}");
}

#[test]
fn nbd_container_parallel_io_with_and_without_multi_conn() {
    for multi_conn in [true, false] {
        let export = mem_export(8 << 20, multi_conn, false);
        let srv = MemServer::start(0, export.clone());
        let c =
            Arc::new(Container::open_location(&srv.location(), 0, &timeout_opts(5000)).unwrap());
        let threads: Vec<_> = (0..12u8)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for round in 0..20u8 {
                        let buf = vec![t ^ round; 64 << 10];
                        let off = u64::from(t) * (512 << 10);
                        c.write_at(&buf, off).unwrap();
                        assert_eq!(c.read_vec_at(buf.len(), off).unwrap(), buf);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        c.sync().unwrap();
        let Backend::Nbd(r) = &c.backend else {
            unreachable!()
        };
        let open = r.open_connections();
        if multi_conn {
            assert!((1..=nbd::MAX_CONNECTIONS).contains(&open), "{open}");
        } else {
            assert_eq!(open, 1);
        }
    }
}

#[test]
fn nbd_container_reconnects_after_the_server_restarts() {
    // The export outlives the server processes: a server that kept its data.
    let export = mem_export(4 << 20, true, false);
    let srv = MemServer::start(0, export.clone());
    let port = srv.port;
    let loc = srv.location();
    let c = Container::open_location(&loc, 0, &timeout_opts(1000)).unwrap();
    c.write_at(b"flushed", 0).unwrap();
    c.sync().unwrap();
    c.write_at(b"unflushed", 4096).unwrap();

    drop(srv);
    let t = Instant::now();
    let e = c.read_vec_at(7, 0).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    eprintln!("while down: {e}");
    let e = c.write_at(b"x", 8192).unwrap_err();
    assert!(e.to_string().contains(&loc.to_string()), "{e}");

    let _srv = MemServer::start(port, export.clone());
    assert_eq!(c.read_vec_at(7, 0).unwrap(), b"flushed");
    c.write_at(b"again", 8192).unwrap();
    // The connection that carried the unflushed write died: the next sync says so, once.
    let e = c.sync().unwrap_err();
    assert!(e.to_string().contains("not yet flushed"), "{e}");
    c.sync().unwrap();
    assert_eq!(&export.snapshot()[8192..8197], b"again");
}

#[test]
fn nbd_container_survives_a_restart_between_calls() {
    let export = mem_export(1 << 20, true, false);
    let srv = MemServer::start(0, export.clone());
    let port = srv.port;
    let c = Container::open_location(&srv.location(), 0, &timeout_opts(1000)).unwrap();
    c.write_at(b"one", 0).unwrap();
    c.sync().unwrap();
    drop(srv);
    let _srv = MemServer::start(port, export);
    // The pooled connection is stale; the call retries on a new one and succeeds.
    assert_eq!(c.read_vec_at(3, 0).unwrap(), b"one");
    c.sync().unwrap();
}

// ---------------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------------

/// An in-memory export that can fail every flush and hold every read until released.
struct Faulty {
    inner: MemExport,
    fail_flush: bool,
    /// Reads wait for a permit: none until `release`.
    open: tokio::sync::Semaphore,
    reads: std::sync::atomic::AtomicU32,
}

impl Faulty {
    fn new(fail_flush: bool, hold_reads: bool) -> Arc<Faulty> {
        Arc::new(Faulty {
            inner: MemExport::new(ExportInfo::new(1 << 20)),
            fail_flush,
            open: tokio::sync::Semaphore::new(if hold_reads { 0 } else { 1 }),
            reads: Default::default(),
        })
    }

    fn release(&self) {
        self.open.add_permits(1);
    }
}

#[async_trait::async_trait]
impl server::Export for Faulty {
    fn info(&self) -> ExportInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        drop(self.open.acquire().await);
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), IoError> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), IoError> {
        if self.fail_flush {
            return Err(IoError::new(Errno::Io, "injected flush failure"));
        }
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> Result<(), IoError> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, IoError> {
        self.inner.block_status(offset, len).await
    }
}

#[test]
fn a_container_that_fails_flushes_is_not_healthy() {
    let srv = MemServer::start(0, Faulty::new(true, false));
    let c = Container::open_location(&srv.location(), 0, &timeout_opts(2000)).unwrap();
    // Reads alone would call it healthy.
    c.read_vec_at(4096, 0).unwrap();
    let e = c.probe().unwrap_err();
    assert!(e.to_string().contains("flushing"), "{e}");

    let ok = MemServer::start(0, Faulty::new(false, false));
    let c = Container::open_location(&ok.location(), 0, &timeout_opts(2000)).unwrap();
    c.probe().unwrap();
}

#[test]
fn a_file_truncated_under_its_container_is_not_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.img");
    let c = Container::create(&p, 1 << 20).unwrap();
    c.probe().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(0)
        .unwrap();
    let e = c.probe().unwrap_err();
    assert!(e.to_string().contains("reading the first block"), "{e}");
}

#[test]
fn a_hung_probe_is_waited_for_not_started_again() {
    let export = Faulty::new(false, true);
    let srv = MemServer::start(0, export.clone());
    let c = Arc::new(Container::open_location(&srv.location(), 0, &timeout_opts(10_000)).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut prober = Prober::default();
        let t = Duration::from_millis(100);
        for _ in 0..3 {
            let e = prober.probe(&c, t).await.unwrap_err();
            assert!(e.contains("no answer"), "{e}");
            assert!(prober.is_pending());
        }
        assert_eq!(
            export.reads.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one probe at a time"
        );
        export.release();
        prober.probe(&c, Duration::from_secs(5)).await.unwrap();
        assert!(!prober.is_pending());
        // The next probe is a new one.
        prober.probe(&c, Duration::from_secs(5)).await.unwrap();
        assert_eq!(export.reads.load(std::sync::atomic::Ordering::SeqCst), 2);
    });
}
