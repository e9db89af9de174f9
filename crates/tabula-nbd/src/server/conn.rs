//! One NBD connection: handshake, then a reader loop that spawns a task per
//! request and a single writer task that serialises replies.
//!
//! Replies are queued on a bounded channel as whole messages (header plus
//! optional data), so a read's payload can never be interleaved with
//! another reply; the writer batches everything already queued into one
//! buffered write and flushes only when the queue is empty.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, WriteHalf,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use super::{Export, ExportInfo, ExportProvider, OpenError, ServerConfig, ServerError, ZeroFlags};
use crate::codec::{self, ClientOption, Command, Errno, InfoRequest, MetaContextRequest};
use crate::consts::*;

/// Largest read we send as one OFFSET_DATA chunk (chunk length is u32 and
/// includes the 8-byte offset).
const MAX_CHUNK_DATA: u32 = u32::MAX - 15;
const READ_BUF: usize = 64 << 10;
const WRITE_BUF: usize = 256 << 10;
/// Failed requests logged one by one per connection and second; past that they are counted,
/// and the count is logged with the next one that is (a failing container or a careless
/// client would otherwise flood the log).
const FAILURES_LOGGED_PER_SEC: u32 = 10;

/// Serves one client connection until it disconnects.
///
/// Returns `Ok(())` on a clean end (ABORT, DISC, or EOF between requests)
/// and an error describing the violation otherwise; either way the stream
/// is closed and no other connection is affected.
pub async fn serve_connection<S>(
    stream: S,
    provider: Arc<dyn ExportProvider>,
    cfg: Arc<ServerConfig>,
) -> Result<(), ServerError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The BufReader survives into the transmission phase so nothing the
    // client pipelined after the handshake is lost.
    let mut io = BufReader::with_capacity(READ_BUF, stream);
    let negotiated = match handshake(&mut io, &*provider, &cfg).await {
        Ok(Some(n)) => n,
        Ok(None) => {
            let _ = io.shutdown().await;
            return Ok(());
        }
        Err(e) => {
            let _ = io.shutdown().await;
            return Err(e);
        }
    };
    debug!(
        export = %negotiated.name,
        structured = negotiated.structured,
        "entering transmission phase"
    );
    transmission(io, negotiated, &cfg).await
}

/// Result of a successful handshake.
struct Negotiated {
    name: String,
    export: Arc<dyn Export>,
    info: ExportInfo,
    flags: u16,
    structured: bool,
    /// Context id of `base:allocation`, if selected for this export.
    meta_context: Option<u32>,
}

fn transmission_flags(info: &ExportInfo, structured: bool) -> u16 {
    let mut f = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_SEND_CACHE;
    if info.read_only {
        f |= NBD_FLAG_READ_ONLY;
    }
    if info.can_fast_zero {
        f |= NBD_FLAG_SEND_FAST_ZERO;
    }
    // DF only means something with structured replies (spec: MUST be
    // clear otherwise). We always send reads as one chunk, so DF is free.
    if structured {
        f |= NBD_FLAG_SEND_DF;
    }
    if info.can_multi_conn {
        f |= NBD_FLAG_CAN_MULTI_CONN;
    }
    f
}

/// (minimum, preferred, maximum) block sizes as advertised.
fn block_sizes(info: &ExportInfo, cfg: &ServerConfig) -> (u32, u32, u32) {
    let min = info.min_block.max(1);
    let preferred = info.preferred_block.max(min);
    let max = cfg.max_payload.min(MAX_CHUNK_DATA).max(min);
    (min, preferred, max)
}

async fn write_flush<S: AsyncWrite + Unpin>(io: &mut S, buf: &mut BytesMut) -> std::io::Result<()> {
    io.write_all(buf).await?;
    buf.clear();
    io.flush().await
}

/// What one option did to the handshake.
enum Step {
    /// Haggling goes on.
    Next,
    /// The client aborted.
    Abort,
    /// An export was selected: transmission begins.
    Done(Negotiated),
}

/// Handshake state carried from one option to the next.
struct Haggle {
    no_zeroes: bool,
    structured: bool,
    /// (export name the context was selected for, context id)
    meta: Option<(String, u32)>,
    next_context_id: u32,
    /// Options answered so far, and how many this client may send: the configured base plus
    /// a few for each export in the longest list it was sent.
    options: usize,
    allowed: usize,
}

/// Bounds one step of the handshake by the configured inactivity limit.
async fn bounded<T>(
    cfg: &ServerConfig,
    step: impl Future<Output = Result<T, ServerError>>,
) -> Result<T, ServerError> {
    tokio::time::timeout(cfg.option_timeout, step)
        .await
        .map_err(|_| ServerError::OptionTimeout(cfg.option_timeout))?
}

/// Runs option haggling. `Ok(None)` means the client aborted.
///
/// There is no bound on the whole handshake, which a client listing thousands of exports
/// legitimately needs minutes for; instead each step (the greeting and the client's flags,
/// then each option: waiting for it, reading it, answering it) must finish within
/// `option_timeout`, so a silent or stalled client, or one that does not take its replies,
/// is cut off; and the number of options is capped, the cap growing with the exports listed,
/// so an endless stream of options is cut off too.
async fn handshake<S>(
    io: &mut BufReader<S>,
    provider: &dyn ExportProvider,
    cfg: &ServerConfig,
) -> Result<Option<Negotiated>, ServerError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(1024);
    let client_flags = bounded(cfg, async {
        codec::encode_greeting(&mut out);
        write_flush(io, &mut out).await?;
        let mut flag_bytes = [0u8; 4];
        io.read_exact(&mut flag_bytes).await?;
        Ok(codec::parse_client_flags(&flag_bytes)?)
    })
    .await?;
    if !client_flags.fixed_newstyle {
        return Err(ServerError::NotFixedNewstyle);
    }
    let mut st = Haggle {
        no_zeroes: client_flags.no_zeroes,
        structured: false,
        meta: None,
        next_context_id: 1,
        options: 0,
        allowed: cfg.max_options,
    };
    loop {
        if st.options >= st.allowed {
            return Err(ServerError::TooManyOptions(st.options));
        }
        st.options += 1;
        match bounded(cfg, option(io, &mut out, &mut st, provider, cfg)).await? {
            Step::Next => {}
            Step::Abort => return Ok(None),
            Step::Done(n) => return Ok(Some(n)),
        }
    }
}

/// Reads one option and answers it.
async fn option<S>(
    io: &mut BufReader<S>,
    out: &mut BytesMut,
    st: &mut Haggle,
    provider: &dyn ExportProvider,
    cfg: &ServerConfig,
) -> Result<Step, ServerError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hdr = [0u8; OPTION_HEADER_LEN];
    io.read_exact(&mut hdr).await?;
    let hdr = codec::parse_option_header(&hdr)?;
    if hdr.length > cfg.max_option_len {
        // Don't read (or buffer) an attacker-sized payload.
        return Err(ServerError::OptionTooLarge(hdr.length));
    }
    let mut payload = vec![0u8; hdr.length as usize];
    io.read_exact(&mut payload).await?;
    let opt = hdr.option;

    let parsed = match codec::parse_option(opt, &payload) {
        Ok(p) => p,
        Err(e) => {
            debug!(option = opt, error = %e, "malformed option");
            codec::encode_rep_error(out, opt, NBD_REP_ERR_INVALID, &e.to_string());
            write_flush(io, out).await?;
            return Ok(Step::Next);
        }
    };

    match parsed {
        ClientOption::ExportName(name) => {
            let export = provider
                .open(&name)
                .await
                .map_err(|_| ServerError::ExportUnavailable(name.clone()))?;
            let info = export.info();
            let flags = transmission_flags(&info, st.structured);
            codec::encode_export_name_reply(out, info.size, flags, st.no_zeroes);
            write_flush(io, out).await?;
            let meta_context = active_context(&st.meta, &name);
            return Ok(Step::Done(Negotiated {
                name,
                export,
                info,
                flags,
                structured: st.structured,
                meta_context,
            }));
        }
        ClientOption::Abort => {
            codec::encode_rep_ack(out, opt);
            // The client may already have gone; that's fine.
            let _ = write_flush(io, out).await;
            return Ok(Step::Abort);
        }
        ClientOption::List => {
            let names = provider.list().await;
            // A client that lists N exports may then ask about each (INFO,
            // LIST_META_CONTEXT, ...): allow for that, once, whatever it lists again.
            st.allowed = st.allowed.max(
                cfg.max_options
                    .saturating_add(cfg.options_per_export.saturating_mul(names.len())),
            );
            for name in &names {
                codec::encode_rep_server(out, opt, name, None);
                if out.len() >= WRITE_BUF {
                    write_flush(io, out).await?;
                }
            }
            codec::encode_rep_ack(out, opt);
        }
        ClientOption::Info(req) | ClientOption::Go(req) => {
            let go = opt == NBD_OPT_GO;
            // GO returns the opened export; INFO (or an error) goes on haggling.
            if let Some((Some(export), info)) =
                info_replies(out, opt, &req, go, st.structured, provider, cfg).await
            {
                write_flush(io, out).await?;
                let flags = transmission_flags(&info, st.structured);
                let meta_context = active_context(&st.meta, &req.name);
                return Ok(Step::Done(Negotiated {
                    name: req.name,
                    export,
                    info,
                    flags,
                    structured: st.structured,
                    meta_context,
                }));
            }
        }
        ClientOption::StructuredReply => {
            st.structured = true;
            codec::encode_rep_ack(out, opt);
        }
        ClientOption::ListMetaContext(req) => {
            if !st.structured {
                codec::encode_rep_error(
                    out,
                    opt,
                    NBD_REP_ERR_INVALID,
                    "structured replies must be negotiated first",
                );
            } else {
                if lists_base_allocation(&req) {
                    // The id in LIST replies is reserved: send zero.
                    codec::encode_rep_meta_context(out, opt, 0, BASE_ALLOCATION);
                }
                codec::encode_rep_ack(out, opt);
            }
        }
        ClientOption::SetMetaContext(req) => {
            // Replaces the previous selection even if this one fails.
            st.meta = None;
            if !st.structured {
                codec::encode_rep_error(
                    out,
                    opt,
                    NBD_REP_ERR_INVALID,
                    "structured replies must be negotiated first",
                );
            } else {
                if req.queries.iter().any(|q| q == BASE_ALLOCATION) {
                    let id = st.next_context_id;
                    st.next_context_id = st.next_context_id.wrapping_add(1).max(1);
                    codec::encode_rep_meta_context(out, opt, id, BASE_ALLOCATION);
                    st.meta = Some((req.export_name, id));
                }
                codec::encode_rep_ack(out, opt);
            }
        }
        ClientOption::StartTls => {
            codec::encode_rep_error(out, opt, NBD_REP_ERR_UNSUP, "TLS is not supported");
        }
        ClientOption::ExtendedHeaders | ClientOption::Unknown(_) => {
            codec::encode_rep_error(
                out,
                opt,
                NBD_REP_ERR_UNSUP,
                &format!("option {opt} is not supported"),
            );
        }
    }
    write_flush(io, out).await?;
    Ok(Step::Next)
}

fn active_context(meta: &Option<(String, u32)>, export: &str) -> Option<u32> {
    // Spec: the context only counts if it was set for the export finally
    // selected.
    match meta {
        Some((name, id)) if name == export => Some(*id),
        _ => None,
    }
}

/// `NBD_OPT_LIST_META_CONTEXT`: no query lists everything; otherwise
/// `base:allocation` itself or the `base:` wildcard select it, and
/// queries in other namespaces are ignored.
fn lists_base_allocation(req: &MetaContextRequest) -> bool {
    req.queries.is_empty()
        || req
            .queries
            .iter()
            .any(|q| q == BASE_ALLOCATION || q == "base:")
}

/// Encodes the replies to INFO/GO into `out`. Returns the export's info on
/// success (the ACK is already encoded), with the opened export for GO;
/// `None` after an error reply. INFO does not open the export: the provider
/// answers it from what it knows (a client listing thousands of exports asks
/// about each).
async fn info_replies(
    out: &mut BytesMut,
    opt: u32,
    req: &InfoRequest,
    go: bool,
    structured: bool,
    provider: &dyn ExportProvider,
    cfg: &ServerConfig,
) -> Option<(Option<Arc<dyn Export>>, ExportInfo)> {
    let found = if go {
        provider.open(&req.name).await.map(|e| (e.info(), Some(e)))
    } else {
        provider.info(&req.name).await.map(|i| (i, None))
    };
    let (info, export) = match found {
        Ok(found) => found,
        Err(OpenError::NotFound) => {
            let msg = format!("export {:?} not found", req.name);
            codec::encode_rep_error(out, opt, NBD_REP_ERR_UNKNOWN, &msg);
            return None;
        }
        Err(OpenError::Unavailable(msg)) => {
            codec::encode_rep_error(out, opt, NBD_REP_ERR_POLICY, &msg);
            return None;
        }
    };
    codec::encode_info_export(out, opt, info.size, transmission_flags(&info, structured));
    let (min, preferred, max) = block_sizes(&info, cfg);
    let mut sent_block_size = false;
    let mut sent_name = false;
    let mut sent_description = false;
    for &r in &req.requests {
        match r {
            NBD_INFO_NAME if !sent_name => {
                sent_name = true;
                codec::encode_info_name(out, opt, &req.name);
            }
            NBD_INFO_DESCRIPTION if !sent_description => {
                sent_description = true;
                if let Some(d) = &info.description {
                    codec::encode_info_description(out, opt, d);
                }
            }
            NBD_INFO_BLOCK_SIZE if !sent_block_size => {
                sent_block_size = true;
                codec::encode_info_block_size(out, opt, min, preferred, max);
            }
            // Duplicates, NBD_INFO_EXPORT (always sent) and unknown types.
            _ => {}
        }
    }
    if go && !sent_block_size {
        // Always tell a GO client our limits, requested or not.
        codec::encode_info_block_size(out, opt, min, preferred, max);
    }
    codec::encode_rep_ack(out, opt);
    Some((export, info))
}

// ---------------------------------------------------------------------------
// Transmission phase
// ---------------------------------------------------------------------------

/// A complete reply message: encoded header(s), then optional raw data.
struct Reply {
    head: BytesMut,
    data: Option<Vec<u8>>,
}

/// Per-connection facts needed to build replies.
#[derive(Clone, Copy)]
struct ReplyCtx {
    structured: bool,
    context_id: u32,
}

impl ReplyCtx {
    fn error(&self, cookie: u64, errno: Errno, message: &str) -> Reply {
        let mut head = BytesMut::with_capacity(32 + message.len());
        if self.structured {
            codec::encode_error_chunk(&mut head, cookie, errno.to_wire(), message);
        } else {
            codec::encode_simple_reply(&mut head, errno.to_wire(), cookie);
        }
        Reply { head, data: None }
    }

    /// The reply to a request that failed, logged (at WARN, rate-limited) by `log`.
    fn failed(&self, log: &FailureLog, req: &Failed, errno: Errno, message: &str) -> Reply {
        log.failed(req, errno, message);
        self.error(req.cookie, errno, message)
    }

    /// Success without payload: a simple reply is allowed even when
    /// structured replies were negotiated (except for READ).
    fn ok(&self, cookie: u64) -> Reply {
        let mut head = BytesMut::with_capacity(SIMPLE_REPLY_LEN);
        codec::encode_simple_reply(&mut head, 0, cookie);
        Reply { head, data: None }
    }
}

/// What the log says about a failed request.
struct Failed {
    cookie: u64,
    op: &'static str,
    offset: u64,
    length: u32,
}

impl Failed {
    fn of(cmd: &Command, cookie: u64) -> Failed {
        let (op, offset, length) = match *cmd {
            Command::Read { offset, length } => ("read", offset, length),
            Command::Write { offset, length, .. } => ("write", offset, length),
            Command::Disconnect => ("disconnect", 0, 0),
            Command::Flush => ("flush", 0, 0),
            Command::Trim { offset, length, .. } => ("trim", offset, length),
            Command::Cache { offset, length } => ("cache", offset, length),
            Command::WriteZeroes { offset, length, .. } => ("write-zeroes", offset, length),
            Command::BlockStatus { offset, length, .. } => ("block-status", offset, length),
        };
        Failed {
            cookie,
            op,
            offset,
            length,
        }
    }

    /// A request refused before it was understood (its command number as sent).
    fn raw(req: &codec::RequestHeader) -> Failed {
        Failed {
            cookie: req.cookie,
            op: match req.command {
                NBD_CMD_READ => "read",
                NBD_CMD_WRITE => "write",
                NBD_CMD_DISC => "disconnect",
                NBD_CMD_FLUSH => "flush",
                NBD_CMD_TRIM => "trim",
                NBD_CMD_CACHE => "cache",
                NBD_CMD_WRITE_ZEROES => "write-zeroes",
                NBD_CMD_BLOCK_STATUS => "block-status",
                _ => "unknown command",
            },
            offset: req.offset,
            length: req.length,
        }
    }
}

/// Logs every request of a connection that gets an error reply, with its cause: a host that
/// sees an I/O error must find out why from the log. At most [`FAILURES_LOGGED_PER_SEC`]
/// lines a second; the rest are counted and the count logged.
struct FailureLog {
    export: String,
    window: Mutex<(Instant, u32, u64)>,
}

impl FailureLog {
    fn new(export: &str) -> FailureLog {
        FailureLog {
            export: export.to_string(),
            window: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// Whether a failure at `now` is logged one by one, and how many failures went unlogged
    /// in the previous window (reported when a new one begins).
    fn admit(&self, now: Instant) -> (bool, u64) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let (start, logged, suppressed) = &mut *w;
        let mut unlogged = 0;
        if now.saturating_duration_since(*start) >= Duration::from_secs(1) {
            (*start, *logged, unlogged) = (now, 0, std::mem::take(suppressed));
        }
        if *logged < FAILURES_LOGGED_PER_SEC {
            *logged += 1;
            (true, unlogged)
        } else {
            *suppressed += 1;
            (false, unlogged)
        }
    }

    fn failed(&self, req: &Failed, errno: Errno, cause: &str) {
        let (log, unlogged) = self.admit(Instant::now());
        self.report_unlogged(unlogged);
        if log {
            warn!(
                export = %self.export,
                op = req.op,
                offset = req.offset,
                length = req.length,
                cookie = req.cookie,
                errno = ?errno,
                cause,
                "NBD request failed"
            );
        }
    }

    fn report_unlogged(&self, n: u64) {
        if n > 0 {
            warn!(
                export = %self.export,
                failed = n,
                "more NBD requests failed on this connection than are logged one by one"
            );
        }
    }
}

impl Drop for FailureLog {
    fn drop(&mut self) {
        let w = self.window.get_mut().unwrap_or_else(|e| e.into_inner());
        let n = std::mem::take(&mut w.2);
        self.report_unlogged(n);
    }
}

async fn transmission<S>(
    io: BufReader<S>,
    neg: Negotiated,
    cfg: &ServerConfig,
) -> Result<(), ServerError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(io);
    let max_in_flight = cfg.max_in_flight.max(1);
    // Each queued reply carries its share of the byte budget, released once it is written.
    let (tx, rx) = mpsc::channel::<(Reply, Option<OwnedSemaphorePermit>)>(max_in_flight);
    let (dead_tx, mut dead_rx) = watch::channel(false);
    let writer = tokio::spawn(writer_task(wr, rx, dead_tx));
    let permits = Arc::new(Semaphore::new(max_in_flight));
    // Byte budget in KiB units (semaphore permits are u32).
    let budget_kib = (cfg.max_in_flight_bytes >> 10).clamp(1, Semaphore::MAX_PERMITS) as u32;
    let bytes = Arc::new(Semaphore::new(budget_kib as usize));

    let (min_block, _, max_payload) = block_sizes(&neg.info, cfg);
    let tctx = codec::TransmissionContext {
        export_size: neg.info.size,
        transmission_flags: neg.flags,
        structured_replies: neg.structured,
        meta_context: neg.meta_context.is_some(),
        min_block,
        max_payload,
    };
    let rctx = ReplyCtx {
        structured: neg.structured,
        context_id: neg.meta_context.unwrap_or(0),
    };
    let log = Arc::new(FailureLog::new(&neg.name));

    let mut hdr = [0u8; REQUEST_HEADER_LEN];
    let result: Result<(), ServerError> = loop {
        let read = tokio::select! {
            biased;
            // The writer failed (client stopped reading / reset): stop.
            _ = dead_rx.changed() => break Ok(()),
            r = rd.read_exact(&mut hdr) => r,
        };
        match read {
            Ok(_) => {}
            // EOF between requests is a (rude but) clean disconnect.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let req = match codec::parse_request_header(&hdr) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        let cmd = match codec::validate_request(&req, &tctx) {
            Ok(c) => c,
            Err(rej) if rej.fatal => {
                debug!(message = %rej.message, "closing connection");
                break Err(ServerError::PayloadTooLarge(req.length));
            }
            Err(rej) => {
                let reply = rctx.failed(&log, &Failed::raw(&req), rej.errno, &rej.message);
                if rej.discard > 0 {
                    let mut sink = (&mut rd).take(u64::from(rej.discard));
                    match tokio::io::copy(&mut sink, &mut tokio::io::sink()).await {
                        Ok(n) if n == u64::from(rej.discard) => {}
                        Ok(_) => break Ok(()),
                        Err(e) => break Err(e.into()),
                    }
                }
                if tx.send((reply, None)).await.is_err() {
                    break Ok(());
                }
                continue;
            }
        };
        // Reserve the payload's share of the byte budget before reading or producing it.
        let kib = match cmd {
            Command::Read { length, .. } | Command::Write { length, .. } => {
                length.div_ceil(1024).clamp(1, budget_kib)
            }
            _ => 1,
        };
        let Ok(budget) = bytes.clone().acquire_many_owned(kib).await else {
            break Ok(());
        };
        let payload = match cmd {
            Command::Disconnect => break Ok(()),
            Command::Write { length, .. } => match read_payload(&mut rd, length as usize).await {
                Ok(data) => Some(data),
                // Disconnected mid-request: nothing to answer.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e.into()),
            },
            _ => None,
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break Ok(());
        };
        let export = neg.export.clone();
        let tx = tx.clone();
        let cookie = req.cookie;
        let log = log.clone();
        tokio::spawn(async move {
            let reply = execute(cmd, cookie, payload, &*export, rctx, &log).await;
            let _ = tx.send((reply, Some(budget))).await;
            drop(permit);
        });
    };

    // Every request task holds a sender clone, so the writer drains all
    // in-flight replies before it sees the channel close.
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "reply writer failed"),
        Err(e) => debug!(error = %e, "reply writer task failed"),
    }
    info!(export = %neg.name, "connection closed");
    result
}

/// Reads a write's payload into a fresh buffer without zeroing it first (`read_buf` fills
/// the spare capacity), which saves a full pass over every written byte.
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: usize) -> std::io::Result<Vec<u8>> {
    let mut data = crate::bufpool::take(len);
    while data.len() < len {
        let want = (len - data.len()) as u64;
        if (&mut *rd).take(want).read_buf(&mut data).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(data)
}

async fn writer_task<S>(
    wr: WriteHalf<BufReader<S>>,
    mut rx: mpsc::Receiver<(Reply, Option<OwnedSemaphorePermit>)>,
    dead: watch::Sender<bool>,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(WRITE_BUF, wr);
    let res = async {
        while let Some((first, _budget)) = rx.recv().await {
            write_reply(&mut w, first).await?;
            // Batch whatever else is ready into the same flush.
            while let Ok((next, _budget)) = rx.try_recv() {
                write_reply(&mut w, next).await?;
            }
            w.flush().await?;
        }
        w.shutdown().await
    }
    .await;
    if res.is_err() {
        let _ = dead.send(true);
    }
    res
}

async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, r: Reply) -> std::io::Result<()> {
    w.write_all(&r.head).await?;
    if let Some(data) = r.data {
        w.write_all(&data).await?;
        crate::bufpool::give(data);
    }
    Ok(())
}

async fn execute(
    cmd: Command,
    cookie: u64,
    payload: Option<Vec<u8>>,
    export: &dyn Export,
    rctx: ReplyCtx,
    log: &FailureLog,
) -> Reply {
    let req = Failed::of(&cmd, cookie);
    let fast_zero = matches!(
        cmd,
        Command::WriteZeroes {
            fast_zero: true,
            ..
        }
    );
    let result = match cmd {
        Command::Read { offset, length } => {
            return execute_read(offset, length, &req, export, rctx, log).await;
        }
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => {
            return execute_block_status(offset, length, req_one, &req, export, rctx, log).await;
        }
        Command::Write { offset, fua, .. } => match payload {
            Some(data) if !data.is_empty() => export.write(offset, data, fua).await,
            _ => Ok(()),
        },
        Command::Flush => export.flush().await,
        Command::Trim {
            offset,
            length,
            fua,
        } => {
            if length == 0 {
                Ok(())
            } else {
                export.trim(offset, length, fua).await
            }
        }
        Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast_zero,
        } => {
            if length == 0 {
                Ok(())
            } else {
                let flags = ZeroFlags {
                    fua,
                    no_hole,
                    fast_zero,
                };
                export.write_zeroes(offset, length, flags).await
            }
        }
        // A hint only; advertising SEND_CACHE and doing nothing is allowed.
        Command::Cache { .. } | Command::Disconnect => Ok(()),
    };
    match result {
        Ok(()) => rctx.ok(cookie),
        // FAST_ZERO's "not fast" is an answer the client asked for, not a failure.
        Err(e) if e.errno == Errno::NotSup && fast_zero => {
            debug!(cookie, error = %e, "fast zero refused");
            rctx.error(cookie, e.errno, &e.message)
        }
        Err(e) => rctx.failed(log, &req, e.errno, &e.message),
    }
}

async fn execute_read(
    offset: u64,
    length: u32,
    req: &Failed,
    export: &dyn Export,
    rctx: ReplyCtx,
    log: &FailureLog,
) -> Reply {
    let cookie = req.cookie;
    let mut head = BytesMut::with_capacity(32);
    if length == 0 {
        // OFFSET_DATA must carry at least one byte, so a zero-length read
        // is answered with a bare NONE chunk (or an empty simple reply).
        if rctx.structured {
            codec::encode_none_chunk(&mut head, cookie);
        } else {
            codec::encode_simple_reply(&mut head, 0, cookie);
        }
        return Reply { head, data: None };
    }
    match export.read(offset, length).await {
        Ok(data) if data.len() == length as usize => {
            if rctx.structured {
                codec::encode_offset_data_header(&mut head, cookie, offset, length, true);
            } else {
                codec::encode_simple_reply(&mut head, 0, cookie);
            }
            Reply {
                head,
                data: Some(data),
            }
        }
        Ok(data) => {
            let msg = format!("export returned {} bytes, expected {length}", data.len());
            rctx.failed(log, req, Errno::Io, &msg)
        }
        Err(e) => rctx.failed(log, req, e.errno, &e.message),
    }
}

async fn execute_block_status(
    offset: u64,
    length: u32,
    req_one: bool,
    req: &Failed,
    export: &dyn Export,
    rctx: ReplyCtx,
    log: &FailureLog,
) -> Reply {
    let cookie = req.cookie;
    let extents = match export.block_status(offset, length).await {
        Ok(e) => e,
        Err(e) => return rctx.failed(log, req, e.errno, &e.message),
    };
    let clipped = clip_extents(&extents, length, req_one);
    if clipped.is_empty() {
        return rctx.failed(log, req, Errno::Io, "export returned no extents");
    }
    let mut head = BytesMut::with_capacity(CHUNK_HEADER_LEN + 4 + clipped.len() * 8);
    codec::encode_block_status(&mut head, cookie, rctx.context_id, &clipped, true);
    Reply { head, data: None }
}

/// Drops empty extents, stops at the requested length (clipping the last
/// one) and keeps only the first when REQ_ONE was set.
fn clip_extents(extents: &[super::StatusExtent], length: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut remaining = length;
    for e in extents {
        if e.length == 0 {
            continue;
        }
        let l = e.length.min(remaining);
        out.push((l, e.flags));
        remaining -= l;
        if remaining == 0 || req_one {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::StatusExtent;

    fn ext(length: u32, flags: u32) -> StatusExtent {
        StatusExtent { length, flags }
    }

    #[test]
    fn clip_extents_clips_and_honours_req_one() {
        let e = [ext(0, 1), ext(100, 2), ext(100, 0), ext(100, 3)];
        assert_eq!(clip_extents(&e, 150, false), vec![(100, 2), (50, 0)]);
        assert_eq!(clip_extents(&e, 150, true), vec![(100, 2)]);
        assert_eq!(clip_extents(&e, 50, true), vec![(50, 2)]);
        assert!(clip_extents(&[ext(0, 0)], 10, false).is_empty());
    }

    #[test]
    fn failed_requests_are_logged_ten_a_second_and_the_rest_counted() {
        let log = FailureLog::new("vd");
        let t0 = *log.window.lock().unwrap();
        let t0 = t0.0;
        let admitted: Vec<(bool, u64)> = (0..25).map(|_| log.admit(t0)).collect();
        assert!(admitted[..10].iter().all(|&a| a == (true, 0)));
        assert!(admitted[10..].iter().all(|&a| a == (false, 0)));
        // The next second logs again and reports what went unlogged in the last one.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(log.admit(t1), (true, 15));
        assert_eq!(log.admit(t1), (true, 0));
    }

    #[test]
    fn block_sizes_are_sane() {
        let cfg = ServerConfig::default();
        let mut info = ExportInfo::new(1 << 20);
        info.min_block = 0;
        info.preferred_block = 0;
        assert_eq!(block_sizes(&info, &cfg), (1, 1, 32 << 20));
        let cfg = ServerConfig {
            max_payload: u32::MAX,
            ..cfg
        };
        assert_eq!(block_sizes(&info, &cfg).2, MAX_CHUNK_DATA);
    }

    #[test]
    fn flags_depend_on_info_and_structured() {
        let mut info = ExportInfo::new(1);
        let f = transmission_flags(&info, false);
        assert_eq!(f & (NBD_FLAG_SEND_DF | NBD_FLAG_READ_ONLY), 0);
        info.read_only = true;
        info.can_multi_conn = true;
        info.can_fast_zero = true;
        let f = transmission_flags(&info, true);
        for bit in [
            NBD_FLAG_HAS_FLAGS,
            NBD_FLAG_SEND_DF,
            NBD_FLAG_READ_ONLY,
            NBD_FLAG_CAN_MULTI_CONN,
            NBD_FLAG_SEND_FAST_ZERO,
        ] {
            assert_ne!(f & bit, 0);
        }
    }
}
