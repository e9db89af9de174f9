//! A blocking NBD client: one request at a time over a TCP or Unix socket, std only.
//!
//! It speaks the fixed-newstyle handshake with `NBD_OPT_GO` (falling back to
//! `NBD_OPT_EXPORT_NAME` for servers that do not know GO) and simple replies only: one
//! request in flight per connection needs nothing more. Callers that want parallelism open
//! several connections (see [`Connection::can_multi_conn`]).
//!
//! Failure model: an NBD error reply is an [`io::Error`] and the connection stays usable;
//! anything else (EOF, reset, timeout, a malformed or mismatched reply) is an `io::Error`
//! too, but leaves the connection unusable ([`Connection::is_broken`]): drop it and connect
//! again. Socket timeouts ([`ClientOptions::timeout`]) bound every wait for the server.
//!
//! The protocol code is generic over any `Read + Write` transport
//! ([`Connection::handshake`]) so tests and fuzzers can play the server.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use bytes::BytesMut;

use crate::codec::{self, ClientFlags, ClientOption, InfoReply, InfoRequest, RequestHeader};
use crate::consts::*;

/// The IANA port of NBD, used when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;
/// Largest request sent when the server states no maximum (the spec's safe default).
pub const DEFAULT_MAX_REQUEST: u32 = 32 << 20;
/// Option replies longer than this end the handshake: no sane reply to GO is that large,
/// and a hostile server must not make us allocate at will.
pub const MAX_OPTION_REPLY_LEN: u32 = 64 << 10;
/// Replies to one option before we give up (a server could otherwise send INFO forever).
const MAX_OPTION_REPLIES: usize = 256;
/// Write payloads up to this size travel in one buffer with their header (one segment on
/// the wire instead of two); larger ones are written straight from the caller's slice.
const COALESCE_WRITE: usize = 64 << 10;

// ---------------------------------------------------------------------------
// URIs
// ---------------------------------------------------------------------------

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdAddr {
    /// `host` without brackets (an IPv6 address is bracketed only in the URI); `port` as
    /// written, `None` meaning [`DEFAULT_PORT`].
    Tcp {
        host: String,
        port: Option<u16>,
    },
    Unix(PathBuf),
}

/// An NBD URI: `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=/path/to.sock`.
///
/// The export name is taken verbatim (no percent-decoding); `nbd://HOST` and
/// `nbd://HOST/` name the default (empty) export.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    pub addr: NbdAddr,
    pub export: String,
}

/// A string that is not an NBD URI we can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid NBD URI {input:?}: {reason}; expected nbd://HOST[:PORT]/EXPORT (e.g. nbd://10.0.0.5:10809/disk0, nbd://[::1]/disk0) or nbd+unix:///EXPORT?socket=/path/to.sock"
)]
pub struct NbdUriError {
    pub input: String,
    pub reason: String,
}

impl NbdUri {
    /// Whether `s` is meant as an NBD URI (by its scheme), valid or not.
    pub fn is_nbd_uri(s: &str) -> bool {
        s.starts_with("nbd://") || s.starts_with("nbd+unix://")
    }

    /// `HOST:PORT` or the socket path, for messages.
    pub fn server(&self) -> String {
        match &self.addr {
            NbdAddr::Tcp { host, port } => {
                format!("{}:{}", bracket(host), port.unwrap_or(DEFAULT_PORT))
            }
            NbdAddr::Unix(p) => p.display().to_string(),
        }
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

fn check_export(export: &str) -> Result<(), &'static str> {
    if export.len() > MAX_STRING_LEN {
        return Err("the export name is longer than 4096 bytes");
    }
    if export.contains('\0') {
        return Err("the export name contains a NUL byte");
    }
    Ok(())
}

impl FromStr for NbdUri {
    type Err = NbdUriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| NbdUriError {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let rest = rest
                .strip_prefix('/')
                .ok_or_else(|| err("an nbd+unix URI has no host (three slashes)"))?;
            let (export, query) = rest
                .split_once('?')
                .ok_or_else(|| err("the socket is missing (?socket=PATH)"))?;
            let mut socket = None;
            for kv in query.split('&') {
                match kv.split_once('=') {
                    Some(("socket", p)) if !p.is_empty() => socket = Some(PathBuf::from(p)),
                    _ => {
                        return Err(err(&format!(
                            "unsupported query {kv:?} (only socket=PATH is understood)"
                        )));
                    }
                }
            }
            let socket = socket.ok_or_else(|| err("the socket is missing (?socket=PATH)"))?;
            check_export(export).map_err(err)?;
            return Ok(NbdUri {
                addr: NbdAddr::Unix(socket),
                export: export.to_owned(),
            });
        }
        let Some(rest) = s.strip_prefix("nbd://") else {
            if s.starts_with("nbds://") || s.starts_with("nbds+unix://") {
                return Err(err("TLS (nbds) is not supported"));
            }
            return Err(err("not an nbd:// or nbd+unix:// URI"));
        };
        let (authority, export) = match rest.split_once('/') {
            Some((a, e)) => (a, e),
            None => (rest, ""),
        };
        if rest.contains('?') || rest.contains('#') {
            return Err(err("nbd:// URIs take no query or fragment"));
        }
        let (host, port) = if let Some(after) = authority.strip_prefix('[') {
            let (host, tail) = after
                .split_once(']')
                .ok_or_else(|| err("unclosed '[' in the host"))?;
            let port = match tail {
                "" => None,
                t => Some(
                    t.strip_prefix(':')
                        .ok_or_else(|| err("expected :PORT after the bracketed host"))?,
                ),
            };
            (host, port)
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(err("the host is missing"));
        }
        if !authority.starts_with('[') && host.contains(':') {
            return Err(err("an IPv6 address must be in brackets"));
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(err(&format!("bad port {p:?}"))),
            },
        };
        check_export(export).map_err(err)?;
        Ok(NbdUri {
            addr: NbdAddr::Tcp {
                host: host.to_owned(),
                port,
            },
            export: export.to_owned(),
        })
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            NbdAddr::Tcp { host, port } => {
                write!(f, "nbd://{}", bracket(host))?;
                if let Some(p) = port {
                    write!(f, ":{p}")?;
                }
                write!(f, "/{}", self.export)
            }
            NbdAddr::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

// ---------------------------------------------------------------------------
// Errors and options
// ---------------------------------------------------------------------------

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the NBD server at {addr} (is it running and reachable?)")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("the NBD handshake failed")]
    Io(#[source] io::Error),
    #[error("the server does not speak NBD as this client expects: {0}")]
    Protocol(String),
    #[error(
        "the NBD server refused export {export:?}: {message} (check the export name; `nbdinfo --list URI` lists them)"
    )]
    ExportRefused { export: String, message: String },
}

impl From<ClientError> for io::Error {
    fn from(e: ClientError) -> io::Error {
        let kind = match &e {
            ClientError::Connect { source, .. } | ClientError::Io(source) => source.kind(),
            ClientError::Protocol(_) => io::ErrorKind::InvalidData,
            ClientError::ExportRefused { .. } => io::ErrorKind::NotFound,
        };
        // Keep the whole chain in the message: io::Error shows only its own.
        let mut msg = e.to_string();
        let mut cur = std::error::Error::source(&e);
        while let Some(c) = cur {
            msg.push_str(": ");
            msg.push_str(&c.to_string());
            cur = c.source();
        }
        io::Error::new(kind, msg)
    }
}

/// Connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Bound on connecting and on every wait for the server (socket read and write
    /// timeouts), so no call blocks much longer than this.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
        }
    }
}

/// NBD transmission errno to the nearest [`io::ErrorKind`].
pub fn errno_kind(errno: u32) -> io::ErrorKind {
    match errno {
        NBD_EPERM => io::ErrorKind::PermissionDenied,
        NBD_ENOMEM => io::ErrorKind::OutOfMemory,
        NBD_EINVAL | NBD_EOVERFLOW => io::ErrorKind::InvalidInput,
        NBD_ENOSPC => io::ErrorKind::StorageFull,
        NBD_ENOTSUP => io::ErrorKind::Unsupported,
        NBD_ESHUTDOWN => io::ErrorKind::ConnectionAborted,
        _ => io::ErrorKind::Other,
    }
}

fn errno_name(errno: u32) -> String {
    match errno {
        NBD_EPERM => "EPERM (not permitted)".into(),
        NBD_EIO => "EIO (input/output error)".into(),
        NBD_ENOMEM => "ENOMEM (out of memory)".into(),
        NBD_EINVAL => "EINVAL (invalid argument)".into(),
        NBD_ENOSPC => "ENOSPC (no space left)".into(),
        NBD_EOVERFLOW => "EOVERFLOW (value too large)".into(),
        NBD_ENOTSUP => "ENOTSUP (not supported)".into(),
        NBD_ESHUTDOWN => "ESHUTDOWN (server shutting down)".into(),
        other => format!("error {other}"),
    }
}

fn command_name(cmd: u16) -> &'static str {
    match cmd {
        NBD_CMD_READ => "READ",
        NBD_CMD_WRITE => "WRITE",
        NBD_CMD_FLUSH => "FLUSH",
        NBD_CMD_TRIM => "TRIM",
        NBD_CMD_WRITE_ZEROES => "WRITE_ZEROES",
        NBD_CMD_DISC => "DISC",
        _ => "command",
    }
}

fn rep_error_name(t: u32) -> &'static str {
    match t {
        NBD_REP_ERR_UNSUP => "unsupported",
        NBD_REP_ERR_POLICY => "refused by policy",
        NBD_REP_ERR_INVALID => "invalid request",
        NBD_REP_ERR_PLATFORM => "not supported on this platform",
        NBD_REP_ERR_TLS_REQD => "TLS required (not supported by this client)",
        NBD_REP_ERR_UNKNOWN => "no such export",
        NBD_REP_ERR_SHUTDOWN => "server shutting down",
        NBD_REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        NBD_REP_ERR_TOO_BIG => "request too big",
        _ => "error",
    }
}

/// A server-supplied message, made printable and bounded.
fn server_message(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_STRING_LEN)]);
    s.chars().filter(|c| !c.is_control()).collect()
}

// ---------------------------------------------------------------------------
// Transport
// ---------------------------------------------------------------------------

/// A connected TCP or Unix socket.
#[derive(Debug)]
pub struct Stream(StreamInner);

#[derive(Debug)]
enum StreamInner {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.0 {
            StreamInner::Tcp(s) => s.read(buf),
            StreamInner::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            StreamInner::Tcp(s) => s.write(buf),
            StreamInner::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.0 {
            StreamInner::Tcp(s) => s.flush(),
            StreamInner::Unix(s) => s.flush(),
        }
    }
}

fn open_stream(uri: &NbdUri, timeout: Duration) -> Result<Stream, ClientError> {
    let addr = uri.server();
    let connect_err = |source| ClientError::Connect {
        addr: addr.clone(),
        source,
    };
    let inner = match &uri.addr {
        NbdAddr::Tcp { host, port } => {
            let port = port.unwrap_or(DEFAULT_PORT);
            let addrs = (host.as_str(), port)
                .to_socket_addrs()
                .map_err(connect_err)?;
            let mut last = io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} resolved to no address"),
            );
            let mut stream = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = stream.ok_or_else(|| connect_err(last))?;
            // One small request at a time: Nagle would only add latency.
            s.set_nodelay(true).map_err(connect_err)?;
            s.set_read_timeout(Some(timeout)).map_err(connect_err)?;
            s.set_write_timeout(Some(timeout)).map_err(connect_err)?;
            StreamInner::Tcp(s)
        }
        NbdAddr::Unix(path) => {
            let s = UnixStream::connect(path).map_err(connect_err)?;
            s.set_read_timeout(Some(timeout)).map_err(connect_err)?;
            s.set_write_timeout(Some(timeout)).map_err(connect_err)?;
            StreamInner::Unix(s)
        }
    };
    Ok(Stream(inner))
}

// ---------------------------------------------------------------------------
// Connection
// ---------------------------------------------------------------------------

/// One negotiated NBD connection in the transmission phase.
pub struct Connection<S: Read + Write = Stream> {
    stream: S,
    export: String,
    size: u64,
    flags: u16,
    min_block: u32,
    max_request: u32,
    cookie: u64,
    broken: bool,
    timeout: Option<Duration>,
}

impl<S: Read + Write> fmt::Debug for Connection<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("export", &self.export)
            .field("size", &self.size)
            .field("flags", &format_args!("{:#x}", self.flags))
            .field("max_request", &self.max_request)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Connection<Stream> {
    /// Connects to `uri` and negotiates its export. `opts.timeout` bounds the connect and
    /// every later wait for the server.
    pub fn connect(uri: &NbdUri, opts: &ClientOptions) -> Result<Connection, ClientError> {
        // A zero timeout means "block forever" to the socket API; never that.
        let timeout = opts.timeout.max(Duration::from_millis(1));
        let stream = open_stream(uri, timeout)?;
        Handshake {
            stream,
            export: &uri.export,
            timeout: Some(timeout),
        }
        .run()
    }
}

/// The fields the handshake learns.
struct Negotiated {
    size: u64,
    flags: u16,
    min_block: u32,
    max_request: u32,
}

struct Handshake<'a, S> {
    stream: S,
    export: &'a str,
    timeout: Option<Duration>,
}

impl<S: Read + Write> Handshake<'_, S> {
    fn io(&self, e: io::Error) -> ClientError {
        ClientError::Io(timeout_error(e, self.timeout, "during the handshake"))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ClientError> {
        self.stream.read_exact(buf).map_err(|e| self.io(e))
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        let r = self
            .stream
            .write_all(bytes)
            .and_then(|_| self.stream.flush());
        r.map_err(|e| self.io(e))
    }

    fn run(mut self) -> Result<Connection<S>, ClientError> {
        let mut g = [0u8; 18];
        self.read_exact(&mut g)?;
        let mut second = [0u8; 8];
        second.copy_from_slice(&g[8..16]);
        if codec::is_oldstyle_magic(u64::from_be_bytes(second)) {
            return Err(ClientError::Protocol(
                "the server uses the oldstyle handshake; serve the export in newstyle mode".into(),
            ));
        }
        let greeting = codec::parse_greeting(&g)
            .map_err(|e| ClientError::Protocol(format!("bad greeting: {e}")))?;
        if greeting.handshake_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol(
                "the server does not support fixed-newstyle negotiation".into(),
            ));
        }
        let no_zeroes = greeting.handshake_flags & NBD_FLAG_NO_ZEROES != 0;
        let flags = ClientFlags {
            fixed_newstyle: true,
            no_zeroes,
        };
        self.send(&flags.to_wire().to_be_bytes())?;
        let negotiated = match self.go()? {
            Some(n) => n,
            None => self.export_name(no_zeroes)?,
        };
        Ok(Connection {
            stream: self.stream,
            export: self.export.to_owned(),
            size: negotiated.size,
            flags: negotiated.flags,
            min_block: negotiated.min_block,
            max_request: negotiated.max_request,
            cookie: 1,
            broken: false,
            timeout: self.timeout,
        })
    }

    /// `NBD_OPT_GO`; `None` if the server does not know it.
    fn go(&mut self) -> Result<Option<Negotiated>, ClientError> {
        let mut buf = BytesMut::new();
        ClientOption::Go(InfoRequest {
            name: self.export.to_owned(),
            requests: vec![NBD_INFO_BLOCK_SIZE],
        })
        .encode(&mut buf);
        self.send(&buf)?;
        let mut export: Option<(u64, u16)> = None;
        let mut block: Option<(u32, u32)> = None;
        for _ in 0..MAX_OPTION_REPLIES {
            let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
            self.read_exact(&mut h)?;
            let h = codec::parse_option_reply_header(&h)
                .map_err(|e| ClientError::Protocol(format!("bad option reply: {e}")))?;
            if h.option != NBD_OPT_GO {
                return Err(ClientError::Protocol(format!(
                    "reply to option {} while waiting for NBD_OPT_GO",
                    h.option
                )));
            }
            if h.length > MAX_OPTION_REPLY_LEN {
                return Err(ClientError::Protocol(format!(
                    "option reply of {} bytes (limit {MAX_OPTION_REPLY_LEN})",
                    h.length
                )));
            }
            let mut payload = vec![0u8; h.length as usize];
            self.read_exact(&mut payload)?;
            match h.reply_type {
                NBD_REP_ACK => {
                    let (size, flags) = export.ok_or_else(|| {
                        ClientError::Protocol(
                            "the server accepted NBD_OPT_GO without giving the export's size"
                                .into(),
                        )
                    })?;
                    let (min, max) = block.unwrap_or((1, DEFAULT_MAX_REQUEST));
                    return Ok(Some(negotiated(size, flags, min, max)));
                }
                NBD_REP_INFO => match codec::parse_info_reply(&payload) {
                    Ok(InfoReply::Export { size, flags }) => export = Some((size, flags)),
                    Ok(InfoReply::BlockSize { min, max, .. }) => block = Some((min, max)),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(ClientError::Protocol(format!("bad NBD_REP_INFO: {e}")));
                    }
                },
                NBD_REP_ERR_UNSUP => return Ok(None),
                t if t & NBD_REP_FLAG_ERROR != 0 => {
                    let detail = server_message(&payload);
                    let message = if detail.is_empty() {
                        rep_error_name(t).to_owned()
                    } else {
                        format!("{}: {detail}", rep_error_name(t))
                    };
                    return Err(ClientError::ExportRefused {
                        export: self.export.to_owned(),
                        message,
                    });
                }
                // Reply types we do not know are to be ignored.
                _ => {}
            }
        }
        Err(ClientError::Protocol(format!(
            "more than {MAX_OPTION_REPLIES} replies to NBD_OPT_GO"
        )))
    }

    /// The old way in: `NBD_OPT_EXPORT_NAME`, whose only error answer is a closed socket.
    fn export_name(&mut self, no_zeroes: bool) -> Result<Negotiated, ClientError> {
        let mut buf = BytesMut::new();
        ClientOption::ExportName(self.export.to_owned()).encode(&mut buf);
        self.send(&buf)?;
        let mut reply = [0u8; 10];
        match self.stream.read_exact(&mut reply) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(ClientError::ExportRefused {
                    export: self.export.to_owned(),
                    message: "the server closed the connection".into(),
                });
            }
            Err(e) => return Err(self.io(e)),
        }
        let (size, flags) = codec::parse_export_name_reply(&reply)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if !no_zeroes {
            let mut zeroes = [0u8; EXPORT_NAME_ZEROES];
            self.read_exact(&mut zeroes)?;
        }
        Ok(negotiated(size, flags, 1, DEFAULT_MAX_REQUEST))
    }
}

/// Sanitises what the server said: a bad minimum counts as 1, a bad maximum as the
/// default, and requests never exceed [`DEFAULT_MAX_REQUEST`] (bounding each request's
/// time on the wire as much as its size).
fn negotiated(size: u64, flags: u16, min: u32, max: u32) -> Negotiated {
    let min = if min.is_power_of_two() && min <= 64 << 10 {
        min
    } else {
        1
    };
    let max = if max >= min { max } else { DEFAULT_MAX_REQUEST };
    let max = max.min(DEFAULT_MAX_REQUEST);
    // Every split piece must stay aligned to the minimum.
    let max = (max / min * min).max(min);
    // Without HAS_FLAGS the other bits mean nothing.
    let flags = if flags & NBD_FLAG_HAS_FLAGS != 0 {
        flags
    } else {
        0
    };
    Negotiated {
        size,
        flags,
        min_block: min,
        max_request: max,
    }
}

/// A socket timeout shows up as `WouldBlock` (EAGAIN); say what it really is.
fn timeout_error(e: io::Error, timeout: Option<Duration>, what: &str) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            let limit = timeout
                .map(|t| format!(" within {t:?}"))
                .unwrap_or_default();
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the NBD server did not answer{limit} {what}"),
            )
        }
        io::ErrorKind::UnexpectedEof => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the NBD server closed the connection {what}"),
        ),
        _ => e,
    }
}

impl<S: Read + Write> Connection<S> {
    /// Runs the client's side of the handshake over an already connected `stream` and
    /// returns the connection in transmission phase. Timeouts are the transport's business.
    pub fn handshake(stream: S, export: &str) -> Result<Connection<S>, ClientError> {
        Handshake {
            stream,
            export,
            timeout: None,
        }
        .run()
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags as the server sent them (`NBD_FLAG_*`).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    pub fn export_name(&self) -> &str {
        &self.export
    }

    pub fn is_read_only(&self) -> bool {
        self.flags & NBD_FLAG_READ_ONLY != 0
    }

    pub fn can_flush(&self) -> bool {
        self.flags & NBD_FLAG_SEND_FLUSH != 0
    }

    pub fn can_fua(&self) -> bool {
        self.flags & NBD_FLAG_SEND_FUA != 0
    }

    pub fn can_trim(&self) -> bool {
        self.flags & NBD_FLAG_SEND_TRIM != 0
    }

    pub fn can_write_zeroes(&self) -> bool {
        self.flags & NBD_FLAG_SEND_WRITE_ZEROES != 0
    }

    /// A flush on any connection to this export covers writes completed on all of them.
    pub fn can_multi_conn(&self) -> bool {
        self.flags & NBD_FLAG_CAN_MULTI_CONN != 0
    }

    /// Minimum block size: offsets and lengths of reads and writes must be multiples.
    pub fn min_block(&self) -> u32 {
        self.min_block
    }

    /// Largest single request sent; larger calls are split.
    pub fn max_request(&self) -> u32 {
        self.max_request
    }

    /// After a transport or protocol failure the connection must be dropped.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(NBD_CMD_READ, offset, buf.len() as u64, true)?;
        let chunk = self.max_request as usize;
        let mut pos = offset;
        for piece in buf.chunks_mut(chunk) {
            let len = piece.len() as u32;
            self.request(NBD_CMD_READ, 0, pos, len, None, Some(piece))?;
            pos += u64::from(len);
        }
        Ok(())
    }

    /// Writes `buf` at `offset`; with `fua`, durable when this returns (emulated with a
    /// flush if the server has no FUA).
    pub fn write(&mut self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        self.check(NBD_CMD_WRITE, offset, buf.len() as u64, true)?;
        let native_fua = fua && self.can_fua();
        let flags = if native_fua { NBD_CMD_FLAG_FUA } else { 0 };
        let mut pos = offset;
        for piece in buf.chunks(self.max_request as usize) {
            let len = piece.len() as u32;
            self.request(NBD_CMD_WRITE, flags, pos, len, Some(piece), None)?;
            pos += u64::from(len);
        }
        if fua && !native_fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every write completed on this connection durable (on every connection if
    /// [`can_multi_conn`](Self::can_multi_conn)). A no-op when the server has no flush.
    pub fn flush(&mut self) -> io::Result<()> {
        if !self.can_flush() {
            self.check_usable()?;
            return Ok(());
        }
        self.request(NBD_CMD_FLUSH, 0, 0, 0, None, None)
    }

    /// Tells the server the range is unused (it may or may not read as zeros after).
    pub fn trim(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if !self.can_trim() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the NBD server does not support TRIM",
            ));
        }
        self.check(NBD_CMD_TRIM, offset, len, false)?;
        self.ranged(NBD_CMD_TRIM, 0, offset, len)
    }

    /// Makes the range read as zeros; `no_hole` asks the server to keep it allocated.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, no_hole: bool) -> io::Result<()> {
        if !self.can_write_zeroes() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the NBD server does not support WRITE_ZEROES",
            ));
        }
        self.check(NBD_CMD_WRITE_ZEROES, offset, len, false)?;
        let flags = if no_hole { NBD_CMD_FLAG_NO_HOLE } else { 0 };
        self.ranged(NBD_CMD_WRITE_ZEROES, flags, offset, len)
    }

    /// A payload-free ranged command, split like reads and writes.
    fn ranged(&mut self, cmd: u16, flags: u16, offset: u64, len: u64) -> io::Result<()> {
        let chunk = u64::from(self.max_request);
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = chunk.min(end - pos);
            self.request(cmd, flags, pos, n as u32, None, None)?;
            pos += n;
        }
        Ok(())
    }

    fn check_usable(&self) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "this NBD connection failed earlier and cannot be used; connect again",
            ));
        }
        Ok(())
    }

    /// Refuses locally what the server would refuse: a broken connection, a write to a
    /// read-only export, a range past the end, a misaligned read or write.
    fn check(&self, cmd: u16, offset: u64, len: u64, aligned: bool) -> io::Result<()> {
        self.check_usable()?;
        let name = command_name(cmd);
        if cmd != NBD_CMD_READ && self.is_read_only() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{name} refused: the NBD export is read-only"),
            ));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{name} of {len} bytes at {offset} is beyond the end of the {}-byte NBD export",
                    self.size
                ),
            ));
        }
        let min = u64::from(self.min_block);
        if aligned && (offset % min != 0 || len % min != 0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{name} of {len} bytes at {offset} is not aligned to the server's {min}-byte minimum block size"
                ),
            ));
        }
        Ok(())
    }

    /// Sends one request and reads its simple reply (and a read's data into `read_into`).
    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
        read_into: Option<&mut [u8]>,
    ) -> io::Result<()> {
        self.check_usable()?;
        let cookie = self.cookie;
        self.cookie = self.cookie.wrapping_add(1);
        let what = format!("to {} of {length} bytes at {offset}", command_name(cmd));
        match self.exchange(cmd, flags, cookie, offset, length, payload, read_into) {
            Ok(0) => Ok(()),
            Ok(errno) => {
                if errno == NBD_ESHUTDOWN {
                    // The server is going away; later requests would fail too.
                    self.broken = true;
                }
                Err(io::Error::new(
                    errno_kind(errno),
                    format!(
                        "the NBD server failed {} of {length} bytes at {offset}: {}",
                        command_name(cmd),
                        errno_name(errno)
                    ),
                ))
            }
            Err(e) => {
                self.broken = true;
                Err(timeout_error(e, self.timeout, &what))
            }
        }
    }

    /// The wire part of [`request`](Self::request): `Ok(errno)` from the reply, `Err` for
    /// anything that breaks the connection.
    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &mut self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
        read_into: Option<&mut [u8]>,
    ) -> io::Result<u32> {
        let small = payload.map_or(0, <[u8]>::len) <= COALESCE_WRITE;
        let mut buf = BytesMut::with_capacity(
            REQUEST_HEADER_LEN
                + if small {
                    payload.map_or(0, <[u8]>::len)
                } else {
                    0
                },
        );
        RequestHeader {
            flags,
            command: cmd,
            cookie,
            offset,
            length,
        }
        .encode(&mut buf);
        match payload {
            Some(p) if small => {
                buf.extend_from_slice(p);
                self.stream.write_all(&buf)?;
            }
            Some(p) => {
                self.stream.write_all(&buf)?;
                self.stream.write_all(p)?;
            }
            None => self.stream.write_all(&buf)?,
        }
        self.stream.flush()?;
        let mut r = [0u8; SIMPLE_REPLY_LEN];
        self.stream.read_exact(&mut r)?;
        let reply = codec::parse_simple_reply(&r).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad reply from the NBD server: {e}"),
            )
        })?;
        if reply.cookie != cookie {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the NBD server answered request {} while request {cookie} was outstanding",
                    reply.cookie
                ),
            ));
        }
        if reply.error != 0 {
            // A failed read carries no data with simple replies.
            return Ok(reply.error);
        }
        if let Some(out) = read_into {
            self.stream.read_exact(out)?;
        }
        Ok(0)
    }
}

impl<S: Read + Write> Drop for Connection<S> {
    fn drop(&mut self) {
        if self.broken {
            return;
        }
        // Best effort: tell the server we are going (a clean disconnect); the socket's write
        // timeout bounds this.
        let mut buf = BytesMut::with_capacity(REQUEST_HEADER_LEN);
        RequestHeader {
            command: NBD_CMD_DISC,
            cookie: self.cookie,
            ..RequestHeader::default()
        }
        .encode(&mut buf);
        let _ = self.stream.write_all(&buf);
        let _ = self.stream.flush();
    }
}

#[cfg(test)]
mod tests;
