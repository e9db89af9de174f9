//! Sans-I/O NBD codec: typed parsers for every byte sequence a client sends,
//! encoders for every message the server sends, the pure request
//! validation logic of the transmission phase, and the client-side
//! encoders and parsers the blocking client (feature `client`) uses.
//!
//! Nothing here performs I/O or needs an async runtime, so the same code is
//! driven by the tokio server, the unit tests and the fuzz targets. Every
//! parser takes a byte slice and returns `Result<_, ProtocolError>`; none of
//! them panics, whatever the input (lengths embedded in payloads are checked
//! against the bytes actually present before anything is allocated).

use bytes::{BufMut, BytesMut};

use crate::consts::*;

/// Why a piece of client input was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message truncated: needed {needed} bytes, had {available}")]
    Truncated { needed: usize, available: usize },
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("bad magic {got:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, got: u64 },
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("string of {0} bytes exceeds the 4096 byte limit")]
    StringTooLong(usize),
    #[error("string is not valid UTF-8")]
    NotUtf8,
    #[error("string contains a NUL byte")]
    ContainsNul,
    #[error("option carries data but must be empty")]
    UnexpectedPayload,
}

type Result<T> = std::result::Result<T, ProtocolError>;

// ---------------------------------------------------------------------------
// Byte cursor
// ---------------------------------------------------------------------------

/// Bounds-checked big-endian reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated {
                needed: n,
                available: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Reads a u32 length followed by that many bytes of string.
    fn prefixed_string(&mut self) -> Result<String> {
        let len = self.u32()? as usize;
        // Check the limit before `take` so a huge length reports the
        // limit rather than truncation.
        if len > MAX_STRING_LEN {
            return Err(ProtocolError::StringTooLong(len));
        }
        let bytes = self.take(len)?;
        parse_string(bytes)
    }

    fn finish(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes(self.buf.len()))
        }
    }
}

/// Validates an NBD string: UTF-8, no NUL, at most 4096 bytes.
pub fn parse_string(bytes: &[u8]) -> Result<String> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(ProtocolError::StringTooLong(bytes.len()));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| ProtocolError::NotUtf8)?;
    if s.contains('\0') {
        return Err(ProtocolError::ContainsNul);
    }
    Ok(s.to_owned())
}

// ---------------------------------------------------------------------------
// Handshake: client flags and option headers
// ---------------------------------------------------------------------------

/// The client's 32-bit flags sent after the server greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

impl ClientFlags {
    pub const LEN: usize = 4;

    pub fn to_wire(self) -> u32 {
        let mut v = 0;
        if self.fixed_newstyle {
            v |= NBD_FLAG_C_FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            v |= NBD_FLAG_C_NO_ZEROES;
        }
        v
    }
}

/// Parses the client flags. Unknown bits are an error: the spec says the
/// server MUST drop the connection in that case.
pub fn parse_client_flags(buf: &[u8]) -> Result<ClientFlags> {
    let mut r = Reader::new(buf);
    let v = r.u32()?;
    r.finish()?;
    if v & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::UnknownClientFlags(v));
    }
    Ok(ClientFlags {
        fixed_newstyle: v & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: v & NBD_FLAG_C_NO_ZEROES != 0,
    })
}

/// `IHAVEOPT`, option number, payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const LEN: usize = OPTION_HEADER_LEN;

    /// Client-side encoder (used by tests and fuzzers).
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u64(IHAVEOPT);
        buf.put_u32(self.option);
        buf.put_u32(self.length);
    }
}

pub fn parse_option_header(buf: &[u8]) -> Result<OptionHeader> {
    let mut r = Reader::new(buf);
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadMagic {
            expected: IHAVEOPT,
            got: magic,
        });
    }
    let option = r.u32()?;
    let length = r.u32()?;
    r.finish()?;
    Ok(OptionHeader { option, length })
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export_name: String,
    pub queries: Vec<String>,
}

/// A fully parsed option request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    ExtendedHeaders,
    /// Any option number this server does not know; its payload is ignored.
    Unknown(u32),
}

impl ClientOption {
    /// The option number on the wire.
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => NBD_OPT_EXPORT_NAME,
            ClientOption::Abort => NBD_OPT_ABORT,
            ClientOption::List => NBD_OPT_LIST,
            ClientOption::StartTls => NBD_OPT_STARTTLS,
            ClientOption::Info(_) => NBD_OPT_INFO,
            ClientOption::Go(_) => NBD_OPT_GO,
            ClientOption::StructuredReply => NBD_OPT_STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => NBD_OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => NBD_OPT_SET_META_CONTEXT,
            ClientOption::ExtendedHeaders => NBD_OPT_EXTENDED_HEADERS,
            ClientOption::Unknown(c) => *c,
        }
    }

    /// Client-side encoder: option header plus payload.
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut payload = BytesMut::new();
        match self {
            ClientOption::ExportName(name) => payload.put_slice(name.as_bytes()),
            ClientOption::Info(req) | ClientOption::Go(req) => {
                put_u32_len(&mut payload, req.name.len());
                payload.put_slice(req.name.as_bytes());
                payload.put_u16(u16::try_from(req.requests.len()).unwrap_or(u16::MAX));
                for r in req.requests.iter().take(u16::MAX as usize) {
                    payload.put_u16(*r);
                }
            }
            ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                put_u32_len(&mut payload, req.export_name.len());
                payload.put_slice(req.export_name.as_bytes());
                put_u32_len(&mut payload, req.queries.len());
                for q in &req.queries {
                    put_u32_len(&mut payload, q.len());
                    payload.put_slice(q.as_bytes());
                }
            }
            _ => {}
        }
        OptionHeader {
            option: self.code(),
            length: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        }
        .encode(buf);
        buf.put_slice(&payload);
    }
}

fn put_u32_len(buf: &mut BytesMut, len: usize) {
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
}

fn expect_empty(payload: &[u8]) -> Result<()> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(ProtocolError::UnexpectedPayload)
    }
}

fn parse_info_request(payload: &[u8]) -> Result<InfoRequest> {
    let mut r = Reader::new(payload);
    let name = r.prefixed_string()?;
    let count = r.u16()? as usize;
    // `take` bounds the allocation by the bytes actually present.
    let raw = r.take(count * 2)?;
    r.finish()?;
    let requests = raw
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, requests })
}

fn parse_meta_context_request(payload: &[u8]) -> Result<MetaContextRequest> {
    let mut r = Reader::new(payload);
    let export_name = r.prefixed_string()?;
    let count = r.u32()? as usize;
    // Each query needs at least its 4-byte length: reject an impossible
    // count before reserving memory for it.
    if count > r.remaining() / 4 {
        return Err(ProtocolError::Truncated {
            needed: count.saturating_mul(4),
            available: r.remaining(),
        });
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(r.prefixed_string()?);
    }
    r.finish()?;
    Ok(MetaContextRequest {
        export_name,
        queries,
    })
}

/// Parses the payload of option `option`. Unknown options parse to
/// [`ClientOption::Unknown`] whatever their payload, so the server can reply
/// `NBD_REP_ERR_UNSUP` and carry on.
pub fn parse_option(option: u32, payload: &[u8]) -> Result<ClientOption> {
    Ok(match option {
        NBD_OPT_EXPORT_NAME => ClientOption::ExportName(parse_string(payload)?),
        NBD_OPT_ABORT => {
            expect_empty(payload)?;
            ClientOption::Abort
        }
        NBD_OPT_LIST => {
            expect_empty(payload)?;
            ClientOption::List
        }
        NBD_OPT_STARTTLS => ClientOption::StartTls,
        NBD_OPT_INFO => ClientOption::Info(parse_info_request(payload)?),
        NBD_OPT_GO => ClientOption::Go(parse_info_request(payload)?),
        NBD_OPT_STRUCTURED_REPLY => {
            expect_empty(payload)?;
            ClientOption::StructuredReply
        }
        NBD_OPT_LIST_META_CONTEXT => {
            ClientOption::ListMetaContext(parse_meta_context_request(payload)?)
        }
        NBD_OPT_SET_META_CONTEXT => {
            ClientOption::SetMetaContext(parse_meta_context_request(payload)?)
        }
        NBD_OPT_EXTENDED_HEADERS => ClientOption::ExtendedHeaders,
        other => ClientOption::Unknown(other),
    })
}

// ---------------------------------------------------------------------------
// Handshake: server encoders
// ---------------------------------------------------------------------------

/// The handshake flags this server advertises.
pub const SERVER_HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

/// `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes).
pub fn encode_greeting(buf: &mut BytesMut) {
    buf.put_u64(NBDMAGIC);
    buf.put_u64(IHAVEOPT);
    buf.put_u16(SERVER_HANDSHAKE_FLAGS);
}

/// Generic fixed-newstyle option reply.
pub fn encode_option_reply(buf: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    buf.put_u64(REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply_type);
    put_u32_len(buf, data.len());
    buf.put_slice(data);
}

pub fn encode_rep_ack(buf: &mut BytesMut, option: u32) {
    encode_option_reply(buf, option, NBD_REP_ACK, &[]);
}

/// `NBD_REP_SERVER`: u32 name length, name, optional description.
pub fn encode_rep_server(buf: &mut BytesMut, option: u32, name: &str, description: Option<&str>) {
    let desc = description.unwrap_or("");
    let mut data = BytesMut::with_capacity(4 + name.len() + desc.len());
    put_u32_len(&mut data, name.len());
    data.put_slice(name.as_bytes());
    data.put_slice(desc.as_bytes());
    encode_option_reply(buf, option, NBD_REP_SERVER, &data);
}

/// `NBD_REP_INFO` / `NBD_INFO_EXPORT`: size and transmission flags.
pub fn encode_info_export(buf: &mut BytesMut, option: u32, size: u64, flags: u16) {
    let mut data = [0u8; 12];
    data[..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size.to_be_bytes());
    data[10..].copy_from_slice(&flags.to_be_bytes());
    encode_option_reply(buf, option, NBD_REP_INFO, &data);
}

fn encode_info_string(buf: &mut BytesMut, option: u32, info: u16, s: &str) {
    let s = truncate_str(s, MAX_STRING_LEN);
    let mut data = BytesMut::with_capacity(2 + s.len());
    data.put_u16(info);
    data.put_slice(s.as_bytes());
    encode_option_reply(buf, option, NBD_REP_INFO, &data);
}

/// `NBD_REP_INFO` / `NBD_INFO_NAME`.
pub fn encode_info_name(buf: &mut BytesMut, option: u32, name: &str) {
    encode_info_string(buf, option, NBD_INFO_NAME, name);
}

/// `NBD_REP_INFO` / `NBD_INFO_DESCRIPTION`.
pub fn encode_info_description(buf: &mut BytesMut, option: u32, description: &str) {
    encode_info_string(buf, option, NBD_INFO_DESCRIPTION, description);
}

/// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum.
pub fn encode_info_block_size(buf: &mut BytesMut, option: u32, min: u32, preferred: u32, max: u32) {
    let mut data = [0u8; 14];
    data[..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&min.to_be_bytes());
    data[6..10].copy_from_slice(&preferred.to_be_bytes());
    data[10..].copy_from_slice(&max.to_be_bytes());
    encode_option_reply(buf, option, NBD_REP_INFO, &data);
}

/// `NBD_REP_META_CONTEXT`: u32 context id then the context name.
pub fn encode_rep_meta_context(buf: &mut BytesMut, option: u32, context_id: u32, name: &str) {
    let mut data = BytesMut::with_capacity(4 + name.len());
    data.put_u32(context_id);
    data.put_slice(name.as_bytes());
    encode_option_reply(buf, option, NBD_REP_META_CONTEXT, &data);
}

/// An error reply (`reply_type` must have bit 31 set) carrying a message
/// for humans, truncated to the 4096-byte string limit.
pub fn encode_rep_error(buf: &mut BytesMut, option: u32, reply_type: u32, message: &str) {
    debug_assert!(reply_type & NBD_REP_FLAG_ERROR != 0);
    let msg = truncate_str(message, MAX_STRING_LEN);
    encode_option_reply(buf, option, reply_type, msg.as_bytes());
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless
/// the client negotiated `NBD_FLAG_C_NO_ZEROES`.
pub fn encode_export_name_reply(buf: &mut BytesMut, size: u64, flags: u16, no_zeroes: bool) {
    buf.put_u64(size);
    buf.put_u16(flags);
    if !no_zeroes {
        buf.put_bytes(0, EXPORT_NAME_ZEROES);
    }
}

/// Longest prefix of `s` within `max` bytes that ends on a char boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Header of an option reply, parsed (client side; used by tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

pub fn parse_option_reply_header(buf: &[u8]) -> Result<OptionReplyHeader> {
    let mut r = Reader::new(buf);
    let magic = r.u64()?;
    if magic != REPLY_MAGIC {
        return Err(ProtocolError::BadMagic {
            expected: REPLY_MAGIC,
            got: magic,
        });
    }
    let h = OptionReplyHeader {
        option: r.u32()?,
        reply_type: r.u32()?,
        length: r.u32()?,
    };
    r.finish()?;
    Ok(h)
}

/// What the server's greeting says (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerGreeting {
    pub handshake_flags: u16,
}

/// Parses the 18-byte newstyle greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
pub fn parse_greeting(buf: &[u8]) -> Result<ServerGreeting> {
    let mut r = Reader::new(buf);
    let magic = r.u64()?;
    if magic != NBDMAGIC {
        return Err(ProtocolError::BadMagic {
            expected: NBDMAGIC,
            got: magic,
        });
    }
    let opt_magic = r.u64()?;
    if opt_magic != IHAVEOPT {
        // Includes oldstyle servers (CLISERV_MAGIC), which we do not speak.
        return Err(ProtocolError::BadMagic {
            expected: IHAVEOPT,
            got: opt_magic,
        });
    }
    let handshake_flags = r.u16()?;
    r.finish()?;
    Ok(ServerGreeting { handshake_flags })
}

/// Whether a greeting's second magic says "oldstyle server" (for a clearer error).
pub fn is_oldstyle_magic(magic: u64) -> bool {
    magic == CLISERV_MAGIC
}

/// Payload of an `NBD_REP_INFO` reply (client side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    Export {
        size: u64,
        flags: u16,
    },
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    Name(String),
    Description(String),
    /// An info type this client does not know; ignored.
    Unknown(u16),
}

pub fn parse_info_reply(payload: &[u8]) -> Result<InfoReply> {
    let mut r = Reader::new(payload);
    let info = r.u16()?;
    let parsed = match info {
        NBD_INFO_EXPORT => InfoReply::Export {
            size: r.u64()?,
            flags: r.u16()?,
        },
        NBD_INFO_BLOCK_SIZE => InfoReply::BlockSize {
            min: r.u32()?,
            preferred: r.u32()?,
            max: r.u32()?,
        },
        NBD_INFO_NAME => return Ok(InfoReply::Name(parse_string(r.buf)?)),
        NBD_INFO_DESCRIPTION => return Ok(InfoReply::Description(parse_string(r.buf)?)),
        other => return Ok(InfoReply::Unknown(other)),
    };
    r.finish()?;
    Ok(parsed)
}

/// Size and transmission flags: the first 10 bytes of the reply to
/// `NBD_OPT_EXPORT_NAME` (the optional 124 zero bytes are the caller's to skip).
pub fn parse_export_name_reply(buf: &[u8]) -> Result<(u64, u16)> {
    let mut r = Reader::new(buf);
    let size = r.u64()?;
    let flags = r.u16()?;
    r.finish()?;
    Ok((size, flags))
}

// ---------------------------------------------------------------------------
// Transmission: request header
// ---------------------------------------------------------------------------

/// The 28-byte transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub const LEN: usize = REQUEST_HEADER_LEN;

    /// Client-side encoder.
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u32(REQUEST_MAGIC);
        buf.put_u16(self.flags);
        buf.put_u16(self.command);
        buf.put_u64(self.cookie);
        buf.put_u64(self.offset);
        buf.put_u32(self.length);
    }
}

pub fn parse_request_header(buf: &[u8]) -> Result<RequestHeader> {
    let mut r = Reader::new(buf);
    let magic = r.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic {
            expected: u64::from(REQUEST_MAGIC),
            got: u64::from(magic),
        });
    }
    let h = RequestHeader {
        flags: r.u16()?,
        command: r.u16()?,
        cookie: r.u64()?,
        offset: r.u64()?,
        length: r.u32()?,
    };
    r.finish()?;
    Ok(h)
}

// ---------------------------------------------------------------------------
// Transmission: request validation
// ---------------------------------------------------------------------------

/// Error numbers the server sends in replies, with their wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Errno {
    Perm,
    Io,
    NoMem,
    Inval,
    NoSpc,
    Overflow,
    NotSup,
    Shutdown,
}

impl Errno {
    pub fn to_wire(self) -> u32 {
        match self {
            Errno::Perm => NBD_EPERM,
            Errno::Io => NBD_EIO,
            Errno::NoMem => NBD_ENOMEM,
            Errno::Inval => NBD_EINVAL,
            Errno::NoSpc => NBD_ENOSPC,
            Errno::Overflow => NBD_EOVERFLOW,
            Errno::NotSup => NBD_ENOTSUP,
            Errno::Shutdown => NBD_ESHUTDOWN,
        }
    }

    /// Inverse of [`Errno::to_wire`]; `None` for 0 and unknown values.
    pub fn from_wire(v: u32) -> Option<Errno> {
        Some(match v {
            NBD_EPERM => Errno::Perm,
            NBD_EIO => Errno::Io,
            NBD_ENOMEM => Errno::NoMem,
            NBD_EINVAL => Errno::Inval,
            NBD_ENOSPC => Errno::NoSpc,
            NBD_EOVERFLOW => Errno::Overflow,
            NBD_ENOTSUP => Errno::NotSup,
            NBD_ESHUTDOWN => Errno::Shutdown,
            _ => return None,
        })
    }
}

/// What was negotiated for this connection; input to [`validate_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionContext {
    pub export_size: u64,
    /// The transmission flags sent to the client.
    pub transmission_flags: u16,
    pub structured_replies: bool,
    /// `base:allocation` was selected for this export.
    pub meta_context: bool,
    /// Advertised minimum block size (reads and writes must be aligned).
    pub min_block: u32,
    /// Advertised maximum block size (payload limit for reads and writes).
    pub max_payload: u32,
}

impl TransmissionContext {
    fn read_only(&self) -> bool {
        self.transmission_flags & NBD_FLAG_READ_ONLY != 0
    }
    fn has(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }
}

/// A request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    /// The caller must now read `length` payload bytes.
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
        fast_zero: bool,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
}

/// A request that must be answered with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub errno: Errno,
    pub message: String,
    /// Payload bytes following the header that must be read and dropped
    /// before the next request header (writes only).
    pub discard: u32,
    /// The stream can no longer be trusted: close the connection instead of
    /// replying (e.g. a write payload larger than the advertised maximum).
    pub fatal: bool,
}

impl Rejection {
    fn new(errno: Errno, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
            discard: 0,
            fatal: false,
        }
    }
}

/// Checks a request header against what was negotiated. Pure: this is the
/// whole policy of which commands, flags and ranges are acceptable.
pub fn validate_request(
    h: &RequestHeader,
    ctx: &TransmissionContext,
) -> std::result::Result<Command, Rejection> {
    let is_write = h.command == NBD_CMD_WRITE;
    // A write's payload follows the header whatever we decide; if it is
    // larger than we advertised we cannot resynchronise safely.
    if is_write && h.length > ctx.max_payload {
        return Err(Rejection {
            fatal: true,
            discard: 0,
            ..Rejection::new(
                Errno::Inval,
                format!(
                    "write of {} bytes exceeds maximum {}",
                    h.length, ctx.max_payload
                ),
            )
        });
    }
    let discard = if is_write { h.length } else { 0 };
    let reject = |errno: Errno, message: String| Rejection {
        discard,
        ..Rejection::new(errno, message)
    };

    // FUA is valid on every command once SEND_FUA is advertised.
    let mut allowed = if ctx.has(NBD_FLAG_SEND_FUA) {
        NBD_CMD_FLAG_FUA
    } else {
        0
    };
    match h.command {
        NBD_CMD_READ if ctx.has(NBD_FLAG_SEND_DF) => allowed |= NBD_CMD_FLAG_DF,
        NBD_CMD_WRITE_ZEROES => {
            allowed |= NBD_CMD_FLAG_NO_HOLE;
            if ctx.has(NBD_FLAG_SEND_FAST_ZERO) {
                allowed |= NBD_CMD_FLAG_FAST_ZERO;
            }
        }
        NBD_CMD_BLOCK_STATUS => allowed |= NBD_CMD_FLAG_REQ_ONE,
        _ => {}
    }
    if h.flags & !allowed != 0 {
        return Err(reject(
            Errno::Inval,
            format!(
                "flags {:#x} not valid for command {}",
                h.flags & !allowed,
                h.command
            ),
        ));
    }
    let fua = h.flags & NBD_CMD_FLAG_FUA != 0;

    let (offset, length) = (h.offset, h.length);
    let end = offset.checked_add(u64::from(length));
    let in_range = matches!(end, Some(e) if e <= ctx.export_size);
    let range_msg = || {
        format!(
            "range {offset}+{length} is beyond the export size {}",
            ctx.export_size
        )
    };
    let aligned = ctx.min_block <= 1
        || (offset % u64::from(ctx.min_block) == 0 && length % ctx.min_block == 0);

    let is_mutation = matches!(
        h.command,
        NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES
    );
    if is_mutation && ctx.read_only() {
        return Err(reject(Errno::Perm, "export is read-only".into()));
    }

    match h.command {
        NBD_CMD_READ => {
            if length > ctx.max_payload {
                return Err(reject(
                    Errno::Inval,
                    format!("read of {length} bytes exceeds maximum {}", ctx.max_payload),
                ));
            }
            if !in_range {
                return Err(reject(Errno::Inval, range_msg()));
            }
            if !aligned {
                return Err(reject(
                    Errno::Inval,
                    "read not aligned to minimum block size".into(),
                ));
            }
            Ok(Command::Read { offset, length })
        }
        NBD_CMD_WRITE => {
            // The spec recommends ENOSPC for writes beyond the end.
            if !in_range {
                return Err(reject(Errno::NoSpc, range_msg()));
            }
            if !aligned {
                return Err(reject(
                    Errno::Inval,
                    "write not aligned to minimum block size".into(),
                ));
            }
            Ok(Command::Write {
                offset,
                length,
                fua,
            })
        }
        NBD_CMD_DISC => Ok(Command::Disconnect),
        NBD_CMD_FLUSH if ctx.has(NBD_FLAG_SEND_FLUSH) => Ok(Command::Flush),
        NBD_CMD_TRIM if ctx.has(NBD_FLAG_SEND_TRIM) => {
            if !in_range {
                return Err(reject(Errno::Inval, range_msg()));
            }
            Ok(Command::Trim {
                offset,
                length,
                fua,
            })
        }
        NBD_CMD_CACHE if ctx.has(NBD_FLAG_SEND_CACHE) => {
            if !in_range {
                return Err(reject(Errno::Inval, range_msg()));
            }
            Ok(Command::Cache { offset, length })
        }
        NBD_CMD_WRITE_ZEROES if ctx.has(NBD_FLAG_SEND_WRITE_ZEROES) => {
            if !in_range {
                return Err(reject(Errno::NoSpc, range_msg()));
            }
            Ok(Command::WriteZeroes {
                offset,
                length,
                fua,
                no_hole: h.flags & NBD_CMD_FLAG_NO_HOLE != 0,
                fast_zero: h.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
            })
        }
        NBD_CMD_BLOCK_STATUS => {
            if !(ctx.structured_replies && ctx.meta_context) {
                return Err(reject(
                    Errno::Inval,
                    "block status requires a negotiated metadata context".into(),
                ));
            }
            if length == 0 {
                return Err(reject(Errno::Inval, "block status of zero length".into()));
            }
            if !in_range {
                return Err(reject(Errno::Inval, range_msg()));
            }
            Ok(Command::BlockStatus {
                offset,
                length,
                req_one: h.flags & NBD_CMD_FLAG_REQ_ONE != 0,
            })
        }
        other => Err(reject(Errno::Inval, format!("unsupported command {other}"))),
    }
}

// ---------------------------------------------------------------------------
// Transmission: reply encoders
// ---------------------------------------------------------------------------

/// Simple reply header (16 bytes); a successful read's data follows it.
pub fn encode_simple_reply(buf: &mut BytesMut, error: u32, cookie: u64) {
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(cookie);
}

/// Structured reply chunk header (20 bytes).
pub fn encode_chunk_header(
    buf: &mut BytesMut,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    length: u32,
) {
    buf.put_u32(STRUCTURED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(chunk_type);
    buf.put_u64(cookie);
    buf.put_u32(length);
}

fn done_flag(done: bool) -> u16 {
    if done { NBD_REPLY_FLAG_DONE } else { 0 }
}

/// Header and offset of an `OFFSET_DATA` chunk carrying `data_len` bytes;
/// the caller writes the data right after (avoids copying large reads).
/// `data_len` must be between 1 and `u32::MAX - 8`.
pub fn encode_offset_data_header(
    buf: &mut BytesMut,
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) {
    encode_chunk_header(
        buf,
        done_flag(done),
        NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len.saturating_add(8),
    );
    buf.put_u64(offset);
}

/// A complete `OFFSET_DATA` chunk.
pub fn encode_offset_data(buf: &mut BytesMut, cookie: u64, offset: u64, data: &[u8], done: bool) {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX - 8);
    encode_offset_data_header(buf, cookie, offset, len, done);
    buf.put_slice(&data[..len as usize]);
}

/// An `OFFSET_HOLE` chunk.
pub fn encode_offset_hole(
    buf: &mut BytesMut,
    cookie: u64,
    offset: u64,
    hole_size: u32,
    done: bool,
) {
    encode_chunk_header(buf, done_flag(done), NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    buf.put_u64(offset);
    buf.put_u32(hole_size);
}

/// A `BLOCK_STATUS` chunk: context id then (length, flags) descriptors.
pub fn encode_block_status(
    buf: &mut BytesMut,
    cookie: u64,
    context_id: u32,
    extents: &[(u32, u32)],
    done: bool,
) {
    let len = 4usize.saturating_add(extents.len().saturating_mul(8));
    encode_chunk_header(
        buf,
        done_flag(done),
        NBD_REPLY_TYPE_BLOCK_STATUS,
        cookie,
        u32::try_from(len).unwrap_or(u32::MAX),
    );
    buf.put_u32(context_id);
    for (length, flags) in extents {
        buf.put_u32(*length);
        buf.put_u32(*flags);
    }
}

/// An `ERROR` chunk (always final here) with a human-readable message.
pub fn encode_error_chunk(buf: &mut BytesMut, cookie: u64, error: u32, message: &str) {
    let msg = truncate_str(message, MAX_STRING_LEN);
    encode_chunk_header(
        buf,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    buf.put_u32(error);
    buf.put_u16(msg.len() as u16);
    buf.put_slice(msg.as_bytes());
}

/// The `NONE` chunk, always with DONE set.
pub fn encode_none_chunk(buf: &mut BytesMut, cookie: u64) {
    encode_chunk_header(buf, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
}

/// Parsed simple reply (client side; used by tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

pub fn parse_simple_reply(buf: &[u8]) -> Result<SimpleReply> {
    let mut r = Reader::new(buf);
    let magic = r.u32()?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ProtocolError::BadMagic {
            expected: u64::from(SIMPLE_REPLY_MAGIC),
            got: u64::from(magic),
        });
    }
    let s = SimpleReply {
        error: r.u32()?,
        cookie: r.u64()?,
    };
    r.finish()?;
    Ok(s)
}

/// Parsed structured chunk header (client side; used by tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub length: u32,
}

pub fn parse_chunk_header(buf: &[u8]) -> Result<ChunkHeader> {
    let mut r = Reader::new(buf);
    let magic = r.u32()?;
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(ProtocolError::BadMagic {
            expected: u64::from(STRUCTURED_REPLY_MAGIC),
            got: u64::from(magic),
        });
    }
    let c = ChunkHeader {
        flags: r.u16()?,
        chunk_type: r.u16()?,
        cookie: r.u64()?,
        length: r.u32()?,
    };
    r.finish()?;
    Ok(c)
}

#[cfg(test)]
mod tests;
