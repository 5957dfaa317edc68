//! HTTP/1.x decoder: one connection's ordered capture chunks in, request/response
//! exchanges out.
//!
//! `httparse` is used for what it is good at: validating and splitting one
//! complete message *head* held in a contiguous buffer. Everything else a
//! passive observer needs is hand-written here, because httparse (like every
//! server-side parser) assumes it owns the socket and can simply close it on
//! trouble, which a tap cannot do:
//! - heads arrive split over many syscalls, so we buffer (bounded) until the
//!   head is complete;
//! - body framing (Content-Length, chunked with extensions and trailers,
//!   close-delimited, and the HEAD/1xx/204/304/CONNECT rules) is not parsed by
//!   httparse at all, and pipelined responses need the FIFO of requests to know
//!   how to frame them;
//! - the capture drops bytes beyond a per-syscall cap ("holes"); inside a body
//!   of known length we can skip them by count, elsewhere framing is lost and we
//!   must resynchronise on the next plausible message head;
//! - garbage, non-HTTP and HTTP/2 connections must be dropped cheaply and
//!   without ever pairing a response with the wrong request.

use std::collections::{BTreeMap, VecDeque};

use crate::capture::{Chunk, ChunkKind, ConnId, ConnMap, Direction, Role};

use super::{moment_ns, Headers, HttpExchange, Outcome, Protocol, RequestStart};

/// Resource bounds. Every buffer and queue the decoder keeps is capped by one
/// of these, so a hostile or broken peer cannot make the agent grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message head (and chunked trailer section) we buffer.
    pub max_head_bytes: usize,
    /// Connections tracked at once; the least recently used is evicted beyond it.
    pub max_connections: usize,
    /// Requests awaiting a response on one connection (pipelining).
    pub max_pending_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: 64 * 1024,
            max_connections: 65536,
            max_pending_requests: 64,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeCounters {
    /// Exchanges emitted.
    pub exchanges: u64,
    /// First bytes were not HTTP/1 (connection ignored from then on).
    pub non_http_connections: u64,
    /// Prior-knowledge preface "PRI * HTTP/2.0" seen (ignored; a later stage decodes).
    pub http2_connections: u64,
    /// Malformed head (or chunked framing): bytes skipped until the next message head.
    pub parse_errors: u64,
    /// Times we recovered on a new message head after losing framing.
    pub resyncs: u64,
    /// Uncaptured BYTES skipped inside bodies by framing.
    pub holes_skipped: u64,
    /// Head larger than max_head_bytes, or a hole inside a head.
    pub oversized_heads: u64,
    /// Connections evicted over max_connections, or dropped on pending-request overflow.
    pub dropped_connections: u64,
    /// Response with no pending request.
    pub orphan_responses: u64,
    /// Added: a hole hit chunked framing (size line, CRLF or trailers), so the
    /// message was dropped and the stream resynchronised.
    pub lost_framing: u64,
    /// Exchanges not emitted because bytes of their response were never
    /// captured (a gap in the kernel's byte positions).
    pub lost_to_gaps: u64,
    /// Requests with both Content-Length and Transfer-Encoding: traced, and
    /// the last ones of their connection's request stream.
    pub ambiguous_lengths: u64,
    /// Request bytes after such a request: no server reads them as requests.
    pub after_ambiguous_bytes: u64,
}

/// httparse needs a fixed header slot array; more headers than this is treated
/// as a malformed head rather than a reason to allocate without bound.
const MAX_HEADERS: usize = 128;
/// Chunk-size lines are tiny in practice; a long one means we are not looking
/// at chunked framing any more.
const MAX_CHUNK_SIZE_LINE: usize = 1024;
/// Longest method token we consider plausible (PROPPATCH, MKCALENDAR, ...).
const MAX_METHOD_LEN: usize = 20;
/// A connection that was already open when capture started may begin mid-body;
/// give it this many chunks to show a message head before calling it non-HTTP.
const LATE_CONN_PROBES: u32 = 32;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Req,
    Resp,
}

fn side_of(role: Role, dir: Direction) -> Option<Side> {
    match (role, dir) {
        (Role::Client, Direction::Egress) | (Role::Server, Direction::Ingress) => Some(Side::Req),
        (Role::Client, Direction::Ingress) | (Role::Server, Direction::Egress) => Some(Side::Resp),
        (Role::Unknown, _) => None,
    }
}

fn role_for(side: Side, dir: Direction) -> Role {
    match (side, dir) {
        (Side::Req, Direction::Egress) | (Side::Resp, Direction::Ingress) => Role::Client,
        (Side::Req, Direction::Ingress) | (Side::Resp, Direction::Egress) => Role::Server,
    }
}

// ---------------------------------------------------------------------------
// Plausibility of a message head start. Stricter than httparse on purpose:
// resynchronising on something that merely tokenises (e.g. "xyzGET") would
// produce a wrong exchange, which is worse than producing none.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plausible {
    No,
    /// Consistent so far, but the first line is not complete yet.
    Maybe,
    Yes,
}

fn is_method_byte(c: u8) -> bool {
    c.is_ascii_uppercase() || c == b'-' || c == b'_'
}

fn is_target_byte(c: u8) -> bool {
    (0x21..=0x7e).contains(&c) || c >= 0x80
}

/// `METHOD SP target SP HTTP/1.[01] (CR)LF`
fn plausible_request_line(b: &[u8]) -> Plausible {
    let mut i = 0;
    while i < b.len() && is_method_byte(b[i]) {
        i += 1;
        if i > MAX_METHOD_LEN {
            return Plausible::No;
        }
    }
    if i == b.len() {
        return Plausible::Maybe;
    }
    if i == 0 || b[i] != b' ' {
        return Plausible::No;
    }
    i += 1;
    let target_start = i;
    while i < b.len() && is_target_byte(b[i]) {
        i += 1;
    }
    if i == b.len() {
        return Plausible::Maybe;
    }
    if i == target_start || b[i] != b' ' {
        return Plausible::No;
    }
    let v = &b[i + 1..];
    for k in 0..10 {
        let Some(&c) = v.get(k) else {
            return Plausible::Maybe;
        };
        let ok = match k {
            0..=6 => c == b"HTTP/1."[k],
            7 => c == b'0' || c == b'1',
            8 if c == b'\n' => return Plausible::Yes,
            8 => c == b'\r',
            _ => c == b'\n',
        };
        if !ok {
            return Plausible::No;
        }
    }
    Plausible::Yes
}

/// `HTTP/1.[01] SP DIGIT DIGIT DIGIT (SP | CR | LF)`
fn plausible_status_line(b: &[u8]) -> Plausible {
    for k in 0..13 {
        let Some(&c) = b.get(k) else {
            return Plausible::Maybe;
        };
        let ok = match k {
            0..=6 => c == b"HTTP/1."[k],
            7 => c == b'0' || c == b'1',
            8 => c == b' ',
            9..=11 => c.is_ascii_digit(),
            _ => matches!(c, b' ' | b'\r' | b'\n'),
        };
        if !ok {
            return Plausible::No;
        }
    }
    Plausible::Yes
}

fn plausible(b: &[u8], side: Side) -> Plausible {
    match side {
        Side::Req => plausible_request_line(b),
        Side::Resp => plausible_status_line(b),
    }
}

/// Next line start at or after `from` that begins a plausible head. Only line
/// starts are considered so that text inside a body is less likely to match.
fn find_head(b: &[u8], from: usize, side: Side, need_full_line: bool) -> Option<usize> {
    (from.max(1)..b.len()).find(|&p| {
        b[p - 1] == b'\n'
            && match plausible(&b[p..], side) {
                Plausible::Yes => true,
                Plausible::Maybe => !need_full_line,
                Plausible::No => false,
            }
    })
}

fn has_head_end(b: &[u8]) -> bool {
    b.windows(2).any(|w| w == b"\n\n") || b.windows(3).any(|w| w == b"\n\r\n")
}

/// Stray CR/LF between messages is legal noise (RFC 9112 §2.2).
fn skip_crlf(b: &[u8], mut pos: usize) -> usize {
    while pos < b.len() && (b[pos] == b'\r' || b[pos] == b'\n') {
        pos += 1;
    }
    pos
}

// ---------------------------------------------------------------------------
// Head parsing (httparse) and the framing facts we need from the headers.

#[derive(Debug)]
struct ParsedHead {
    /// Bytes of the head including the final empty line.
    len: usize,
    method: String,
    target: String,
    status: u16,
    minor: u8,
    headers: Headers,
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
    upgrade: Option<String>,
}

impl ParsedHead {
    /// A request framed both by Content-Length and Transfer-Encoding: servers
    /// reject it or go by Transfer-Encoding, and close the connection after
    /// answering either way (RFC 9112 §6.1).
    fn ambiguous_length(&self) -> bool {
        self.content_length.is_some() && self.transfer_encoding
    }
}

#[derive(Debug)]
enum HeadParse {
    Partial,
    /// Does not even start like a message head.
    Garbage,
    /// Starts like a head but is not valid: a real message we cannot read.
    Malformed,
    /// A request header value holds a control byte (NUL, ESC, ...).
    BadValue,
    Done(ParsedHead),
}

fn parse_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(0u64, |acc, &c| {
        if c.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(c - b'0'))
        } else {
            None
        }
    })
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

/// Header fields dropped entirely from stored headers: credentials and
/// session tokens never leave the host inside spans (see [`crate::redact`]).
pub(crate) fn is_sensitive(name: &[u8]) -> bool {
    crate::redact::active().sensitive(name)
}

fn parse_head(buf: &[u8], side: Side) -> HeadParse {
    match parse_head_once(buf, side) {
        HeadParse::BadValue => {
            // Servers skip such a line, or answer 400: a response comes either
            // way, so the request is read with those bytes blanked (a copy,
            // made only for such heads).
            let blanked: Vec<u8> = buf
                .iter()
                .map(|&c| {
                    if (c < 0x20 && c != b'\t' && c != b'\r' && c != b'\n') || c == 0x7f {
                        b' '
                    } else {
                        c
                    }
                })
                .collect();
            match parse_head_once(&blanked, side) {
                HeadParse::BadValue => HeadParse::Malformed,
                other => other,
            }
        }
        HeadParse::Malformed if side == Side::Req => {
            // A request-target with bytes beyond ASCII (a non-UTF-8 path) is
            // served by most servers; it is read percent-encoded, as a URL
            // carries such bytes.
            let line_end = buf.iter().position(|&c| c == b'\n').unwrap_or(buf.len());
            let wide = buf[..line_end].iter().filter(|&&c| c >= 0x80).count();
            if wide == 0 {
                return HeadParse::Malformed;
            }
            let mut encoded = Vec::with_capacity(buf.len() + 2 * wide);
            for &c in &buf[..line_end] {
                if c >= 0x80 {
                    let hex = b"0123456789ABCDEF";
                    encoded.extend_from_slice(&[
                        b'%',
                        hex[usize::from(c >> 4)],
                        hex[usize::from(c & 15)],
                    ]);
                } else {
                    encoded.push(c);
                }
            }
            encoded.extend_from_slice(&buf[line_end..]);
            match parse_head(&encoded, side) {
                HeadParse::Done(mut h) => {
                    h.len -= 2 * wide;
                    HeadParse::Done(h)
                }
                // Still incomplete: wait for more bytes of the original.
                HeadParse::Partial => HeadParse::Partial,
                _ => HeadParse::Malformed,
            }
        }
        other => other,
    }
}

fn parse_head_once(buf: &[u8], side: Side) -> HeadParse {
    if plausible(buf, side) == Plausible::No {
        return HeadParse::Garbage;
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = ParsedHead {
        len: 0,
        method: String::new(),
        target: String::new(),
        status: 0,
        minor: 1,
        headers: Headers::default(),
        content_length: None,
        transfer_encoding: false,
        chunked: false,
        upgrade: None,
    };
    let raw: &[httparse::Header<'_>] = match side {
        Side::Req => {
            let mut req = httparse::Request::new(&mut slots);
            // Servers skip a header line they cannot read (no colon, a NUL or
            // a control byte in it) or answer 400 for it; either way there is
            // a response, so the request must give a span.
            let parsed = httparse::ParserConfig::default()
                .ignore_invalid_headers_in_requests(true)
                .parse_request(&mut req, buf);
            match parsed {
                Ok(httparse::Status::Partial) => return HeadParse::Partial,
                Err(httparse::Error::HeaderValue) => return HeadParse::BadValue,
                Err(_) => return HeadParse::Malformed,
                Ok(httparse::Status::Complete(n)) => {
                    head.len = n;
                    head.method = req.method.unwrap_or_default().to_string();
                    head.target = req.path.unwrap_or_default().to_string();
                    head.minor = req.version.unwrap_or(1);
                    req.headers
                }
            }
        }
        Side::Resp => {
            let mut resp = httparse::Response::new(&mut slots);
            match resp.parse(buf) {
                Ok(httparse::Status::Partial) => return HeadParse::Partial,
                Err(_) => return HeadParse::Malformed,
                Ok(httparse::Status::Complete(n)) => {
                    head.len = n;
                    head.status = resp.code.unwrap_or_default();
                    head.minor = resp.version.unwrap_or(1);
                    resp.headers
                }
            }
        }
    };
    // Names and values are at most the head's bytes.
    head.headers.reserve(head.len, raw.len());
    for h in raw {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            // "5, 5" and repeated equal headers are tolerated (RFC 9112 §6.3);
            // disagreeing lengths mean request smuggling or garbage.
            for part in h.value.split(|&c| c == b',') {
                let Some(v) = parse_decimal(trim_ascii(part)) else {
                    return HeadParse::Malformed;
                };
                if head.content_length.is_some_and(|x| x != v) {
                    return HeadParse::Malformed;
                }
                head.content_length = Some(v);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only the final coding decides whether the body is chunked.
            head.transfer_encoding = true;
            let last = h.value.rsplit(|&c| c == b',').next().unwrap_or_default();
            head.chunked = trim_ascii(last).eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            let v = String::from_utf8_lossy(trim_ascii(h.value)).to_ascii_lowercase();
            head.upgrade = Some(v);
        }
        if !is_sensitive(name) {
            head.headers.push(name, h.value);
        }
    }
    // A request body whose length cannot be determined is a 400 for a server;
    // for us it means framing is unknowable.
    if side == Side::Req && head.transfer_encoding && !head.chunked {
        return HeadParse::Malformed;
    }
    HeadParse::Done(head)
}

// ---------------------------------------------------------------------------
// Body framing.

#[derive(Debug)]
enum Chunked {
    Size {
        value: u64,
        digits: u8,
        in_ext: bool,
        line: usize,
    },
    Data(u64),
    /// The CRLF that ends every chunk's data.
    DataEnd {
        cr: bool,
    },
    Trailer {
        line: usize,
        total: usize,
    },
}

impl Chunked {
    fn size_line() -> Self {
        Chunked::Size {
            value: 0,
            digits: 0,
            in_ext: false,
            line: 0,
        }
    }
}

#[derive(Debug)]
enum Body {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyStatus {
    More,
    Done,
    Bad,
}

struct BodyStep {
    used: usize,
    payload: u64,
    status: BodyStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoleStatus {
    /// Hole entirely inside the body; framing intact.
    Inside,
    /// Hole reached exactly or past the end of the body.
    Done,
    /// Hole covers framing bytes we would have had to read.
    Lost,
}

fn hex_val(c: u8) -> Option<u64> {
    (c as char).to_digit(16).map(u64::from)
}

impl Body {
    fn consume(&mut self, data: &[u8], max_trailer: usize) -> BodyStep {
        match self {
            Body::Length(rem) => {
                let n = (*rem).min(data.len() as u64);
                *rem -= n;
                let status = if *rem == 0 {
                    BodyStatus::Done
                } else {
                    BodyStatus::More
                };
                BodyStep {
                    used: n as usize,
                    payload: n,
                    status,
                }
            }
            Body::UntilClose => BodyStep {
                used: data.len(),
                payload: data.len() as u64,
                status: BodyStatus::More,
            },
            Body::Chunked(c) => c.consume(data, max_trailer),
        }
    }

    fn skip_hole(&mut self, hole: u64) -> (u64, HoleStatus) {
        match self {
            Body::Length(rem) => {
                let n = (*rem).min(hole);
                *rem -= n;
                (
                    n,
                    if *rem == 0 {
                        HoleStatus::Done
                    } else {
                        HoleStatus::Inside
                    },
                )
            }
            Body::UntilClose => (hole, HoleStatus::Inside),
            Body::Chunked(Chunked::Data(rem)) => {
                let n = (*rem).min(hole);
                *rem -= n;
                if *rem > 0 {
                    (n, HoleStatus::Inside)
                } else if n < hole {
                    (n, HoleStatus::Lost)
                } else {
                    *self = Body::Chunked(Chunked::DataEnd { cr: false });
                    (n, HoleStatus::Inside)
                }
            }
            Body::Chunked(_) => (0, HoleStatus::Lost),
        }
    }
}

impl Chunked {
    fn consume(&mut self, data: &[u8], max_trailer: usize) -> BodyStep {
        let mut i = 0;
        let mut payload = 0u64;
        let bad = |used| BodyStep {
            used,
            payload: 0,
            status: BodyStatus::Bad,
        };
        while i < data.len() {
            match self {
                Chunked::Data(rem) => {
                    let n = (*rem).min((data.len() - i) as u64);
                    *rem -= n;
                    i += n as usize;
                    payload += n;
                    if *rem == 0 {
                        *self = Chunked::DataEnd { cr: false };
                    }
                }
                Chunked::DataEnd { cr } => {
                    let c = data[i];
                    i += 1;
                    match c {
                        b'\r' if !*cr => *cr = true,
                        b'\n' => *self = Chunked::size_line(),
                        _ => return bad(i),
                    }
                }
                Chunked::Size {
                    value,
                    digits,
                    in_ext,
                    line,
                } => {
                    let c = data[i];
                    i += 1;
                    *line += 1;
                    if *line > MAX_CHUNK_SIZE_LINE {
                        return bad(i);
                    }
                    if c == b'\n' {
                        if *digits == 0 {
                            return bad(i);
                        }
                        let v = *value;
                        *self = if v == 0 {
                            Chunked::Trailer { line: 0, total: 0 }
                        } else {
                            Chunked::Data(v)
                        };
                    } else if *in_ext {
                        // extensions (";name=value") carry nothing we report
                    } else if let Some(d) = hex_val(c) {
                        if *digits >= 16 {
                            return bad(i);
                        }
                        *value = (*value << 4) | d;
                        *digits += 1;
                    } else if matches!(c, b';' | b' ' | b'\t' | b'\r') {
                        *in_ext = true;
                    } else {
                        return bad(i);
                    }
                }
                Chunked::Trailer { line, total } => {
                    let c = data[i];
                    i += 1;
                    *total += 1;
                    if *total > max_trailer {
                        return bad(i);
                    }
                    match c {
                        b'\n' if *line == 0 => {
                            return BodyStep {
                                used: i,
                                payload,
                                status: BodyStatus::Done,
                            };
                        }
                        b'\n' => *line = 0,
                        b'\r' => {}
                        _ => *line += 1,
                    }
                }
            }
        }
        BodyStep {
            used: i,
            payload,
            status: BodyStatus::More,
        }
    }
}

fn response_body(head: &ParsedHead, request_was_head: bool) -> Option<Body> {
    let s = head.status;
    if request_was_head || s < 200 || s == 204 || s == 304 {
        return None;
    }
    if head.transfer_encoding {
        // A response with a non-chunked coding runs until close (RFC 9112 §6.3).
        return Some(if head.chunked {
            Body::Chunked(Chunked::size_line())
        } else {
            Body::UntilClose
        });
    }
    match head.content_length {
        Some(0) => None,
        Some(n) => Some(Body::Length(n)),
        None => Some(Body::UntilClose),
    }
}

// ---------------------------------------------------------------------------
// Per-connection state.

#[derive(Debug, Default)]
enum State {
    #[default]
    Head,
    Body(Body),
    /// Framing lost: ignore bytes until a chunk starts with a plausible head.
    Resync,
    /// No further message in this direction is one the peer reads: after a
    /// request framed by both Content-Length and Transfer-Encoding, a server
    /// must close the connection (RFC 9112 §6.1), so what follows is never
    /// served (request smuggling).
    Ended,
}

/// One direction of a connection.
#[derive(Debug, Default)]
struct Stream {
    state: State,
    /// Partial head; never longer than max_head_bytes.
    buf: Vec<u8>,
    head_first_ns: u64,
    head_tid: u32,
    /// Pending exchange whose body this stream is reading (None: orphan).
    cur: Option<u64>,
    /// Position of the buffered head's first byte in this direction, when the
    /// kernel gave positions.
    head_pos: Option<u64>,
    /// The message being read is the last one of this direction (`Ended`).
    last: bool,
}

impl Stream {
    /// State after a message's body ended.
    fn next_message(&self) -> State {
        if self.last {
            State::Ended
        } else {
            State::Head
        }
    }
}

#[derive(Debug)]
struct Pending {
    id: u64,
    /// Stands in for a request whose head we could not read (hole, oversized,
    /// malformed). Its response still arrives and must be consumed in its FIFO
    /// slot, or every later response would be paired with the wrong request.
    lost: bool,
    ex: HttpExchange,
    is_head: bool,
    is_connect: bool,
    upgrade: Option<String>,
    req_done: bool,
    resp_done: bool,
    /// How many bytes the other direction had carried when the request was
    /// seen: its response cannot start before that position.
    resp_floor: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No payload seen yet; `probes` counts non-HTTP chunks of a late connection.
    Fresh {
        probes: u32,
    },
    Http,
    /// Not (or no longer) HTTP/1: chunks are dropped until Close.
    Ignored,
}

struct Ctx {
    limits: Limits,
    c: DecodeCounters,
    /// Request heads read since the dispatcher last took them.
    starts: Vec<RequestStart>,
}

fn emit(ctx: &mut Ctx, out: &mut Vec<HttpExchange>, p: Pending, outcome: Outcome) {
    if p.lost {
        return;
    }
    let mut ex = p.ex;
    ex.outcome = outcome;
    ctx.c.exchanges += 1;
    out.push(ex);
}

/// End of the line for an exchange: it counts as complete only if its final
/// response was fully read.
fn finalize(ctx: &mut Ctx, out: &mut Vec<HttpExchange>, p: Pending) {
    let outcome = if p.resp_done {
        Outcome::Complete
    } else {
        Outcome::Aborted
    };
    emit(ctx, out, p, outcome);
}

fn blank_exchange(chunk: &Chunk, role: Role) -> HttpExchange {
    HttpExchange {
        conn: chunk.conn,
        pid: chunk.pid,
        tid: chunk.tid,
        comm: chunk.comm,
        role,
        local: chunk.local,
        remote: chunk.remote,
        method: String::new(),
        target: String::new(),
        protocol: Protocol::Http1 { minor: 1 },
        request_headers: Headers::default(),
        status: None,
        response_headers: Headers::default(),
        trailers: Headers::default(),
        request_body_bytes: 0,
        response_body_bytes: 0,
        request_first_ns: 0,
        request_last_ns: 0,
        response_first_ns: None,
        response_last_ns: None,
        outcome: Outcome::Aborted,
        incomplete: false,
    }
}

struct Conn {
    role: Role,
    mode: Mode,
    req: Stream,
    resp: Stream,
    pending: VecDeque<Pending>,
    /// A request was seen while another one awaited its response.
    pipelined: bool,
    /// End of the response-direction bytes seen so far (kernel positions).
    resp_seen_end: Option<u64>,
    next_id: u64,
    last_ns: u64,
    /// Position in the decoder's LRU index.
    tick: u64,
}

impl Conn {
    fn new(role: Role, tick: u64) -> Self {
        Self {
            role,
            mode: Mode::Fresh { probes: 0 },
            req: Stream::default(),
            resp: Stream::default(),
            pending: VecDeque::new(),
            pipelined: false,
            resp_seen_end: None,
            next_id: 0,
            last_ns: 0,
            tick,
        }
    }

    fn stream_mut(&mut self, side: Side) -> &mut Stream {
        match side {
            Side::Req => &mut self.req,
            Side::Resp => &mut self.resp,
        }
    }

    fn find_mut(&mut self, id: u64) -> Option<&mut Pending> {
        self.pending.iter_mut().find(|p| p.id == id)
    }

    fn on_data(&mut self, ctx: &mut Ctx, chunk: &Chunk, out: &mut Vec<HttpExchange>) {
        self.last_ns = self.last_ns.max(chunk.ts_exit_ns);
        if chunk.has_pos && side_of(self.role, chunk.direction) == Some(Side::Resp) {
            self.resp_seen_end = Some(chunk.pos + chunk.len);
        }
        match self.mode {
            Mode::Ignored => {}
            Mode::Fresh { probes } => self.on_fresh(probes, ctx, chunk, out),
            Mode::Http => {
                if let Some(side) = side_of(self.role, chunk.direction) {
                    self.feed(side, ctx, chunk, 0, out);
                }
            }
        }
    }

    /// First payload of the connection decides whether we decode it at all,
    /// and for Role::Unknown which end is the client.
    fn on_fresh(&mut self, probes: u32, ctx: &mut Ctx, chunk: &Chunk, out: &mut Vec<HttpExchange>) {
        let data = &chunk.payload[..];
        let start = skip_crlf(data, 0);
        if start >= data.len() {
            // Nothing to classify (empty, CRLF only or all hole).
            return;
        }
        let d = &data[start..];
        let preface_prefix =
            d.len() < H2_PREFACE.len() && d.len() >= 4 && H2_PREFACE.starts_with(d);
        if d.starts_with(H2_PREFACE) || preface_prefix {
            ctx.c.http2_connections += 1;
            self.mode = Mode::Ignored;
            return;
        }
        let candidates: &[Side] = match side_of(self.role, chunk.direction) {
            Some(Side::Req) => &[Side::Req],
            Some(Side::Resp) => &[Side::Resp],
            None => &[Side::Req, Side::Resp],
        };
        let at_start = candidates
            .iter()
            .find(|&&s| plausible(d, s) != Plausible::No)
            .map(|&s| (s, start, false));
        // Garbage before a head in the very first chunk: only trust a complete
        // request/status line, otherwise random binary would "become" HTTP.
        let pick = at_start.or_else(|| {
            candidates
                .iter()
                .find_map(|&s| find_head(data, start + 1, s, true).map(|p| (s, p, true)))
        });
        let Some((side, pos, after_garbage)) = pick else {
            let probes = probes + 1;
            if !chunk.late_conn || probes >= LATE_CONN_PROBES {
                ctx.c.non_http_connections += 1;
                self.mode = Mode::Ignored;
            } else {
                self.mode = Mode::Fresh { probes };
            }
            return;
        };
        if after_garbage {
            ctx.c.parse_errors += 1;
            ctx.c.resyncs += 1;
        }
        if self.role == Role::Unknown {
            self.role = role_for(side, chunk.direction);
        }
        if chunk.late_conn {
            // The other direction may be mid-message too.
            let other = if side == Side::Req {
                Side::Resp
            } else {
                Side::Req
            };
            self.stream_mut(other).state = State::Resync;
        }
        self.mode = Mode::Http;
        self.feed(side, ctx, chunk, pos, out);
    }

    fn feed(
        &mut self,
        side: Side,
        ctx: &mut Ctx,
        chunk: &Chunk,
        start: usize,
        out: &mut Vec<HttpExchange>,
    ) {
        // Taken out so the stream and the pending queue can be borrowed apart.
        let mut st = std::mem::take(self.stream_mut(side));
        self.feed_stream(&mut st, side, ctx, chunk, start, out);
        if self.mode == Mode::Http {
            *self.stream_mut(side) = st;
        }
    }

    fn feed_stream(
        &mut self,
        st: &mut Stream,
        side: Side,
        ctx: &mut Ctx,
        chunk: &Chunk,
        start: usize,
        out: &mut Vec<HttpExchange>,
    ) {
        let data = &chunk.payload[..];
        let mut pos = start;
        if matches!(st.state, State::Ended) {
            ctx.c.after_ambiguous_bytes += chunk.len.saturating_sub(start as u64);
            return;
        }
        if matches!(st.state, State::Resync) {
            let p = skip_crlf(data, pos);
            if p < data.len() && plausible(&data[p..], side) != Plausible::No {
                ctx.c.resyncs += 1;
                st.state = State::Head;
                pos = p;
            } else {
                return;
            }
        }
        while pos < data.len() {
            if self.mode != Mode::Http {
                return;
            }
            match &mut st.state {
                State::Resync => return,
                State::Ended => {
                    ctx.c.after_ambiguous_bytes += chunk.len.saturating_sub(pos as u64);
                    return;
                }
                State::Head => pos = self.head_step(st, side, ctx, chunk, pos, out),
                State::Body(body) => {
                    let step = body.consume(&data[pos..], ctx.limits.max_head_bytes);
                    pos += step.used;
                    self.account(side, st.cur, step.payload, moment_ns(chunk));
                    match step.status {
                        BodyStatus::More => {}
                        BodyStatus::Done => {
                            st.state = st.next_message();
                            self.finish(side, st.cur.take(), ctx, out);
                        }
                        BodyStatus::Bad => {
                            ctx.c.parse_errors += 1;
                            st.state = State::Resync;
                            self.lose_body(side, st.cur.take(), ctx, out);
                            return;
                        }
                    }
                }
            }
        }
        let hole = chunk.len.saturating_sub(data.len() as u64);
        if hole > 0 && self.mode == Mode::Http {
            self.on_hole(st, side, ctx, chunk, hole, out);
        }
    }

    /// Buffers (bounded) and parses a head; returns the new read position.
    fn head_step(
        &mut self,
        st: &mut Stream,
        side: Side,
        ctx: &mut Ctx,
        chunk: &Chunk,
        pos: usize,
        out: &mut Vec<HttpExchange>,
    ) -> usize {
        let data = &chunk.payload[..];
        let max = ctx.limits.max_head_bytes;
        let mut pos = pos;
        if st.buf.is_empty() {
            pos = skip_crlf(data, pos);
            if pos >= data.len() {
                return pos;
            }
            st.head_first_ns = moment_ns(chunk);
            st.head_tid = chunk.tid;
            st.head_pos = chunk.has_pos.then_some(chunk.pos + pos as u64);
        }
        // `old` bytes came from earlier chunks; whatever the head does not use
        // of this chunk's bytes is still in `data`, so nothing is copied twice.
        let old = st.buf.len();
        let take = (data.len() - pos).min(max.saturating_sub(old));
        st.buf.extend_from_slice(&data[pos..pos + take]);
        // A head can only complete at an empty line; re-running httparse over
        // the whole buffer for every small chunk would be quadratic.
        let tail = &st.buf[old.saturating_sub(2)..];
        if old > 0
            && st.buf.len() < max
            && !has_head_end(tail)
            && plausible(&st.buf, side) != Plausible::No
        {
            return pos + take;
        }
        match parse_head(&st.buf, side) {
            HeadParse::Partial => {
                if st.buf.len() >= max {
                    ctx.c.oversized_heads += 1;
                    st.buf = Vec::new();
                    st.state = State::Resync;
                    self.lose_head(side, ctx, chunk, out);
                    return data.len();
                }
                pos + take
            }
            HeadParse::Done(head) => {
                let consumed = head.len.saturating_sub(old);
                st.buf.clear();
                match side {
                    Side::Req => self.on_request_head(st, head, ctx, chunk),
                    Side::Resp => self.on_response_head(st, head, ctx, chunk, out),
                }
                pos + consumed
            }
            verdict @ (HeadParse::Garbage | HeadParse::Malformed | HeadParse::BadValue) => {
                ctx.c.parse_errors += 1;
                if matches!(verdict, HeadParse::Malformed | HeadParse::BadValue) {
                    self.lose_head(side, ctx, chunk, out);
                }
                match find_head(&st.buf, 1, side, false) {
                    Some(p) if p >= old => {
                        ctx.c.resyncs += 1;
                        st.buf.clear();
                        pos + (p - old)
                    }
                    Some(p) => {
                        // The next head began in an earlier chunk: keep only
                        // those earlier bytes; this chunk is re-appended next round.
                        ctx.c.resyncs += 1;
                        st.buf.drain(..p);
                        st.buf.truncate(old - p);
                        pos
                    }
                    None => {
                        st.buf.clear();
                        st.state = State::Resync;
                        data.len()
                    }
                }
            }
        }
    }

    fn on_request_head(&mut self, st: &mut Stream, head: ParsedHead, ctx: &mut Ctx, chunk: &Chunk) {
        if self.pending.len() >= ctx.limits.max_pending_requests {
            self.overflow(ctx);
            return;
        }
        if head.ambiguous_length() {
            ctx.c.ambiguous_lengths += 1;
            st.last = true;
        }
        let body = if head.chunked {
            Some(Body::Chunked(Chunked::size_line()))
        } else {
            match head.content_length {
                Some(n) if n > 0 => Some(Body::Length(n)),
                _ => None,
            }
        };
        // Pipelining is a request seen while an earlier one is unanswered
        // though every response byte sent by then was seen: a response merely
        // lost in a gap is not evidence of it.
        let caught_up = !chunk.has_pos || self.resp_seen_end.unwrap_or(0) >= chunk.peer_pos;
        self.pipelined |= caught_up && self.pending.iter().any(|p| !p.resp_done && !p.lost);
        let id = self.next_id;
        self.next_id += 1;
        let mut ex = blank_exchange(chunk, self.role);
        ex.tid = st.head_tid;
        ex.request_first_ns = st.head_first_ns;
        ex.request_last_ns = moment_ns(chunk);
        ex.protocol = Protocol::Http1 { minor: head.minor };
        ex.request_headers = head.headers;
        let is_head = head.method == "HEAD";
        let is_connect = head.method == "CONNECT";
        ex.method = head.method;
        ex.target = head.target;
        ctx.starts.push(RequestStart::of(&ex));
        self.pending.push_back(Pending {
            id,
            lost: false,
            ex,
            is_head,
            is_connect,
            upgrade: head.upgrade,
            req_done: body.is_none(),
            resp_done: false,
            resp_floor: chunk.has_pos.then_some(chunk.peer_pos),
        });
        if let Some(b) = body {
            st.cur = Some(id);
            st.state = State::Body(b);
        } else if st.last {
            st.state = State::Ended;
        }
    }

    fn on_response_head(
        &mut self,
        st: &mut Stream,
        head: ParsedHead,
        ctx: &mut Ctx,
        chunk: &Chunk,
        out: &mut Vec<HttpExchange>,
    ) {
        let target = self.pending.iter().position(|p| !p.resp_done);
        let is_connect = target
            .and_then(|i| self.pending.get(i))
            .is_some_and(|p| p.is_connect);
        let status = head.status;
        if status == 101 || (is_connect && (200..300).contains(&status)) {
            self.switch_protocols(st, target, head, ctx, chunk, out);
            return;
        }
        if (100..200).contains(&status) {
            // Interim (100 Continue, 103 Early Hints): the final head follows.
            return;
        }
        let target = self.response_target(st.head_pos, ctx);
        let is_head = target
            .and_then(|i| self.pending.get(i))
            .is_some_and(|p| p.is_head);
        let body = response_body(&head, is_head);
        let Some(p) = target.and_then(|i| self.pending.get_mut(i)) else {
            ctx.c.orphan_responses += 1;
            // Still frame it (as if to a GET) so the next response is found.
            if let Some(b) = body {
                st.cur = None;
                st.state = State::Body(b);
            }
            return;
        };
        p.ex.status = Some(status);
        p.ex.response_headers = head.headers;
        p.ex.response_first_ns = Some(st.head_first_ns);
        p.ex.response_last_ns = Some(moment_ns(chunk));
        match body {
            Some(b) => {
                st.cur = Some(p.id);
                st.state = State::Body(b);
            }
            None => {
                p.resp_done = true;
                self.drain(ctx, out);
            }
        }
    }

    /// Which pending request a final response starting at byte `pos` of the
    /// response direction answers, after loss. Requests whose responses may
    /// have been lost stay queued as stand-ins (`lost`), so later responses
    /// keep their FIFO slots, and the kernel's positions decide:
    /// - a response that starts before a request's floor (what the other
    ///   direction had carried when the request was seen) was sent before
    ///   that request existed: it is not that request's, nor any later one's;
    /// - a stand-in at the head whose next request's floor the response has
    ///   reached may already have been answered in the lost bytes. Without
    ///   pipelining on this connection it was (each request waits for its
    ///   response), so it is retired; with pipelining it cannot be told, so
    ///   the next request becomes a stand-in too and is not exported.
    fn response_target(&mut self, pos: Option<u64>, ctx: &mut Ctx) -> Option<usize> {
        // Bounded: each round removes an entry or returns.
        loop {
            let i = self.pending.iter().position(|p| !p.resp_done)?;
            let Some(pos) = pos else { return Some(i) };
            let head = self.pending.get(i)?;
            if !head.lost {
                return match head.resp_floor {
                    Some(f) if pos < f => None,
                    _ => Some(i),
                };
            }
            let next = self
                .pending
                .iter()
                .skip(i + 1)
                .position(|p| !p.resp_done)
                .map(|j| i + 1 + j);
            let reached = next
                .and_then(|j| self.pending.get(j))
                .and_then(|n| n.resp_floor)
                .is_some_and(|f| pos >= f);
            if !reached {
                return Some(i);
            }
            if self.pipelined {
                if let Some(n) = next.and_then(|j| self.pending.get_mut(j)) {
                    if !n.lost {
                        n.lost = true;
                        ctx.c.lost_to_gaps += 1;
                    }
                }
                return Some(i);
            }
            self.pending.remove(i);
        }
    }

    /// 101 or a 2xx to CONNECT: the bytes after this head are another protocol.
    fn switch_protocols(
        &mut self,
        st: &mut Stream,
        target: Option<usize>,
        head: ParsedHead,
        ctx: &mut Ctx,
        chunk: &Chunk,
        out: &mut Vec<HttpExchange>,
    ) {
        let Some(t) = target else {
            ctx.c.orphan_responses += 1;
            self.ignore();
            return;
        };
        let mut all: Vec<Pending> = self.pending.drain(..).collect();
        for (i, mut p) in all.drain(..).enumerate() {
            if i != t {
                finalize(ctx, out, p);
                continue;
            }
            let protocol = if head.status == 101 {
                head.upgrade
                    .clone()
                    .or_else(|| p.upgrade.clone())
                    .unwrap_or_default()
            } else {
                "connect".to_string()
            };
            p.ex.status = Some(head.status);
            p.ex.response_headers = head.headers.clone();
            p.ex.response_first_ns = Some(st.head_first_ns);
            p.ex.response_last_ns = Some(moment_ns(chunk));
            emit(ctx, out, p, Outcome::Upgraded { protocol });
        }
        self.ignore();
    }

    fn ignore(&mut self) {
        self.mode = Mode::Ignored;
        self.pending = VecDeque::new();
        self.req = Stream::default();
        self.resp = Stream::default();
    }

    /// Too many requests without responses: something is badly off (or we
    /// lost the response stream); pairing can no longer be trusted.
    fn overflow(&mut self, ctx: &mut Ctx) {
        ctx.c.dropped_connections += 1;
        self.ignore();
    }

    fn account(&mut self, side: Side, cur: Option<u64>, bytes: u64, ts: u64) {
        let Some(p) = cur.and_then(|id| self.find_mut(id)) else {
            return;
        };
        match side {
            Side::Req => {
                p.ex.request_body_bytes += bytes;
                p.ex.request_last_ns = ts;
            }
            Side::Resp => {
                p.ex.response_body_bytes += bytes;
                p.ex.response_last_ns = Some(ts);
            }
        }
    }

    fn finish(&mut self, side: Side, cur: Option<u64>, ctx: &mut Ctx, out: &mut Vec<HttpExchange>) {
        if let Some(p) = cur.and_then(|id| self.find_mut(id)) {
            match side {
                Side::Req => p.req_done = true,
                Side::Resp => p.resp_done = true,
            }
        }
        self.drain(ctx, out);
    }

    /// Emits exchanges at the queue front whose request and response are both done.
    fn drain(&mut self, ctx: &mut Ctx, out: &mut Vec<HttpExchange>) {
        while self
            .pending
            .front()
            .is_some_and(|p| p.req_done && p.resp_done)
        {
            if let Some(p) = self.pending.pop_front() {
                emit(ctx, out, p, Outcome::Complete);
            }
        }
    }

    /// Framing lost inside a body.
    fn lose_body(
        &mut self,
        side: Side,
        cur: Option<u64>,
        ctx: &mut Ctx,
        out: &mut Vec<HttpExchange>,
    ) {
        let Some(id) = cur else { return };
        match side {
            // The request head was read, so its response will come: keep its
            // FIFO slot, with the body count we have.
            Side::Req => {
                if let Some(p) = self.find_mut(id) {
                    p.req_done = true;
                }
            }
            Side::Resp => {
                if let Some(i) = self.pending.iter().position(|p| p.id == id) {
                    if let Some(p) = self.pending.remove(i) {
                        emit(ctx, out, p, Outcome::Aborted);
                    }
                }
            }
        }
        self.drain(ctx, out);
    }

    /// A real message head was lost (hole, oversized, malformed).
    fn lose_head(&mut self, side: Side, ctx: &mut Ctx, chunk: &Chunk, out: &mut Vec<HttpExchange>) {
        match side {
            Side::Req => {
                if self.pending.len() >= ctx.limits.max_pending_requests {
                    self.overflow(ctx);
                    return;
                }
                let id = self.next_id;
                self.next_id += 1;
                self.pending.push_back(Pending {
                    id,
                    lost: true,
                    ex: blank_exchange(chunk, self.role),
                    is_head: false,
                    is_connect: false,
                    upgrade: None,
                    req_done: true,
                    resp_done: false,
                    resp_floor: None,
                });
            }
            Side::Resp => {
                if let Some(i) = self.pending.iter().position(|p| !p.resp_done) {
                    if let Some(p) = self.pending.remove(i) {
                        emit(ctx, out, p, Outcome::Aborted);
                    }
                }
                self.drain(ctx, out);
            }
        }
    }

    fn on_hole(
        &mut self,
        st: &mut Stream,
        side: Side,
        ctx: &mut Ctx,
        chunk: &Chunk,
        mut hole: u64,
        out: &mut Vec<HttpExchange>,
    ) {
        loop {
            match &mut st.state {
                State::Resync | State::Ended => return,
                State::Head => {
                    ctx.c.oversized_heads += 1;
                    st.buf.clear();
                    st.state = State::Resync;
                    self.lose_head(side, ctx, chunk, out);
                    return;
                }
                State::Body(body) => {
                    let (n, status) = body.skip_hole(hole);
                    hole -= n;
                    ctx.c.holes_skipped += n;
                    self.account(side, st.cur, n, moment_ns(chunk));
                    match status {
                        HoleStatus::Inside => return,
                        HoleStatus::Done => {
                            st.state = st.next_message();
                            self.finish(side, st.cur.take(), ctx, out);
                            if hole == 0 || self.mode != Mode::Http {
                                return;
                            }
                        }
                        HoleStatus::Lost => {
                            ctx.c.lost_framing += 1;
                            st.state = State::Resync;
                            self.lose_body(side, st.cur.take(), ctx, out);
                            return;
                        }
                    }
                }
            }
        }
    }

    fn on_gap(&mut self, ctx: &mut Ctx, chunk: &Chunk, bytes: u64, out: &mut Vec<HttpExchange>) {
        if self.mode != Mode::Http || bytes == 0 {
            return;
        }
        let Some(side) = side_of(self.role, chunk.direction) else {
            return;
        };
        let mut st = std::mem::take(self.stream_mut(side));
        let inside = match &st.state {
            State::Body(Body::Length(rem)) => bytes < *rem,
            State::Body(Body::UntilClose) => true,
            State::Body(Body::Chunked(Chunked::Data(rem))) => bytes < *rem,
            _ => false,
        };
        if side == Side::Resp && !inside && chunk.has_pos {
            // Whole responses may be in the gap: every request whose response
            // could have started there is dropped, not paired with a later one.
            let end = chunk.pos;
            let cur = st.cur.take();
            for p in self.pending.iter_mut().filter(|p| !p.resp_done && !p.lost) {
                if Some(p.id) == cur || p.resp_floor.is_none_or(|f| f < end) {
                    p.lost = true;
                    ctx.c.lost_to_gaps += 1;
                }
            }
            // The response being read when the bytes went missing is over.
            if let Some(p) = cur.and_then(|id| self.find_mut(id)) {
                p.resp_done = true;
            }
            st.buf.clear();
            st.state = State::Resync;
            *self.stream_mut(side) = st;
            self.drain(ctx, out);
            return;
        }
        self.on_hole(&mut st, side, ctx, chunk, bytes, out);
        if self.mode == Mode::Http {
            *self.stream_mut(side) = st;
        }
    }

    /// The traced process closed the socket: this ends close-delimited bodies.
    fn close(mut self, ctx: &mut Ctx, out: &mut Vec<HttpExchange>) {
        if let (State::Body(Body::UntilClose), Some(id)) = (&self.resp.state, self.resp.cur) {
            if let Some(p) = self.find_mut(id) {
                p.resp_done = true;
            }
        }
        self.drain(ctx, out);
        self.abort_all(ctx, out);
    }

    fn abort_all(&mut self, ctx: &mut Ctx, out: &mut Vec<HttpExchange>) {
        for p in std::mem::take(&mut self.pending) {
            finalize(ctx, out, p);
        }
    }
}

/// HTTP/1.x decoder over all connections. Feed chunks of each connection in
/// order; connections are independent.
pub struct Http1Decoder {
    ctx: Ctx,
    conns: ConnMap<Conn>,
    /// tick -> connection; the smallest tick is the least recently used.
    lru: BTreeMap<u64, ConnId>,
    tick: u64,
}

impl Http1Decoder {
    pub fn new(limits: Limits) -> Self {
        Self {
            ctx: Ctx {
                limits,
                c: DecodeCounters::default(),
                starts: Vec::new(),
            },
            conns: ConnMap::default(),
            lru: BTreeMap::new(),
            tick: 0,
        }
    }

    /// Feed one chunk (in per-connection order); push finished exchanges to `out`.
    pub fn push(&mut self, chunk: &Chunk, out: &mut Vec<HttpExchange>) {
        self.tick += 1;
        let tick = self.tick;
        if chunk.kind == ChunkKind::Close {
            if let Some(conn) = self.conns.remove(&chunk.conn) {
                self.lru.remove(&conn.tick);
                conn.close(&mut self.ctx, out);
            }
            return;
        }
        if let Some(conn) = self.conns.get_mut(&chunk.conn) {
            self.lru.remove(&conn.tick);
            conn.tick = tick;
            self.lru.insert(tick, chunk.conn);
            conn.on_data(&mut self.ctx, chunk, out);
            return;
        }
        while self.conns.len() >= self.ctx.limits.max_connections.max(1) {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            if let Some(mut conn) = self.conns.remove(&victim) {
                self.ctx.c.dropped_connections += 1;
                conn.abort_all(&mut self.ctx, out);
            }
        }
        let mut conn = Conn::new(chunk.role, tick);
        conn.on_data(&mut self.ctx, chunk, out);
        self.lru.insert(tick, chunk.conn);
        self.conns.insert(chunk.conn, conn);
    }

    /// Forget connections whose last chunk is older than `now_ns - idle_ns`;
    /// exchanges in flight there are emitted as Aborted.
    pub fn expire(&mut self, now_ns: u64, idle_ns: u64, out: &mut Vec<HttpExchange>) {
        let cutoff = now_ns.saturating_sub(idle_ns);
        let mut stale: Vec<(u64, ConnId)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.last_ns < cutoff)
            .map(|(id, c)| (c.tick, *id))
            .collect();
        // Oldest first, so output order does not depend on HashMap order.
        stale.sort_unstable();
        for (tick, id) in stale {
            self.lru.remove(&tick);
            if let Some(mut conn) = self.conns.remove(&id) {
                conn.abort_all(&mut self.ctx, out);
            }
        }
    }

    pub fn counters(&self) -> DecodeCounters {
        self.ctx.c
    }

    /// Takes the request starts of the chunks fed since the last call.
    pub fn starts(&mut self) -> std::vec::Drain<'_, RequestStart> {
        self.ctx.starts.drain(..)
    }

    /// Connections currently tracked (tests check memory bounds with it).
    pub fn tracked(&self) -> usize {
        self.conns.len()
    }

    pub fn contains(&self, conn: &ConnId) -> bool {
        self.conns.contains_key(conn)
    }

    /// Stops tracking a connection another decoder took over (h2c upgrade).
    pub fn forget(&mut self, conn: &ConnId) {
        if let Some(c) = self.conns.remove(conn) {
            self.lru.remove(&c.tick);
        }
    }

    /// `bytes` of `chunk`'s direction were never captured, just before it:
    /// handled like bytes cut from the end of the previous chunk.
    pub fn gap(&mut self, chunk: &Chunk, bytes: u64, out: &mut Vec<HttpExchange>) {
        if let Some(conn) = self.conns.get_mut(&chunk.conn) {
            conn.on_gap(&mut self.ctx, chunk, bytes, out);
        }
    }
}

impl Default for Http1Decoder {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const CLIENT_ADDR: ([u8; 4], u16) = ([10, 0, 0, 1], 40000);
    const SERVER_ADDR: ([u8; 4], u16) = ([10, 0, 0, 2], 80);

    fn cid(n: u64) -> ConnId {
        ConnId {
            sock: 0xffff_0000 + n,
            start_ns: 7,
        }
    }

    /// One chunk; `len` may exceed the payload (a hole at the end).
    fn mk(
        conn: ConnId,
        role: Role,
        dir: Direction,
        payload: &[u8],
        len: u64,
        enter: u64,
        exit: u64,
    ) -> Chunk {
        let (local, remote) = match role {
            Role::Server => (SocketAddr::from(SERVER_ADDR), SocketAddr::from(CLIENT_ADDR)),
            _ => (SocketAddr::from(CLIENT_ADDR), SocketAddr::from(SERVER_ADDR)),
        };
        Chunk {
            conn,
            kind: ChunkKind::Data,
            seq: 0,
            ts_enter_ns: enter,
            ts_exit_ns: exit,
            pid: 42,
            tid: 43,
            comm: "curl".into(),
            fd: 3,
            role,
            direction: dir,
            syscall: 1,
            len,
            pos: 0,
            peer_pos: 0,
            has_pos: false,
            truncated: len > payload.len() as u64,
            late_conn: false,
            local,
            remote,
            payload: bytes::Bytes::copy_from_slice(payload),
        }
    }

    fn close_chunk(conn: ConnId, role: Role, ts: u64) -> Chunk {
        let mut c = mk(conn, role, Direction::Egress, b"", 0, ts, ts + 1);
        c.kind = ChunkKind::Close;
        c
    }

    /// A connection driven chunk by chunk with an advancing clock: each chunk
    /// enters at `t` and exits at `t + 5`; `t` then moves on by 100.
    struct Tap {
        dec: Http1Decoder,
        out: Vec<HttpExchange>,
        conn: ConnId,
        role: Role,
        t: u64,
        tid: u32,
        late: bool,
    }

    impl Tap {
        fn new(role: Role) -> Self {
            Self::with(role, Limits::default())
        }
        fn with(role: Role, limits: Limits) -> Self {
            Tap {
                dec: Http1Decoder::new(limits),
                out: Vec::new(),
                conn: cid(1),
                role,
                t: 1000,
                tid: 43,
                late: false,
            }
        }
        fn raw(&mut self, dir: Direction, payload: &[u8], len: u64) {
            let mut c = mk(self.conn, self.role, dir, payload, len, self.t, self.t + 5);
            c.tid = self.tid;
            c.late_conn = self.late;
            self.t += 100;
            self.dec.push(&c, &mut self.out);
        }
        fn ev(&mut self, ev: &Ev) {
            match ev {
                Ev::Out(p, len) => self.raw(Direction::Egress, p, *len),
                Ev::In(p, len) => self.raw(Direction::Ingress, p, *len),
                Ev::Close => {
                    let c = close_chunk(self.conn, self.role, self.t);
                    self.t += 100;
                    self.dec.push(&c, &mut self.out);
                }
            }
        }
        /// Largest head buffer any tracked connection holds.
        fn max_buf(&self) -> usize {
            self.dec
                .conns
                .values()
                .map(|c| c.req.buf.len().max(c.resp.buf.len()))
                .max()
                .unwrap_or(0)
        }
    }

    #[derive(Clone)]
    enum Ev {
        Out(Vec<u8>, u64),
        In(Vec<u8>, u64),
        Close,
    }
    fn o(s: &str) -> Ev {
        Ev::Out(s.as_bytes().to_vec(), s.len() as u64)
    }
    fn i(s: &str) -> Ev {
        Ev::In(s.as_bytes().to_vec(), s.len() as u64)
    }
    fn ob(b: &[u8]) -> Ev {
        Ev::Out(b.to_vec(), b.len() as u64)
    }
    /// Payload plus `extra` uncaptured bytes.
    fn o_hole(s: &str, extra: u64) -> Ev {
        Ev::Out(s.as_bytes().to_vec(), s.len() as u64 + extra)
    }
    fn i_hole(s: &str, extra: u64) -> Ev {
        Ev::In(s.as_bytes().to_vec(), s.len() as u64 + extra)
    }

    type Sum<'a> = (&'a str, &'a str, Option<u16>, u64, u64, Outcome);
    fn sums(out: &[HttpExchange]) -> Vec<Sum<'_>> {
        out.iter()
            .map(|e| {
                (
                    e.method.as_str(),
                    e.target.as_str(),
                    e.status,
                    e.request_body_bytes,
                    e.response_body_bytes,
                    e.outcome.clone(),
                )
            })
            .collect()
    }

    use Outcome::{Aborted, Complete};
    fn upg(p: &str) -> Outcome {
        Outcome::Upgraded {
            protocol: p.to_string(),
        }
    }

    struct Case {
        name: &'static str,
        role: Role,
        evs: Vec<Ev>,
        want: Vec<Sum<'static>>,
        /// Expected counters; `exchanges` is filled in from `want`.
        counters: DecodeCounters,
        tracked: usize,
    }

    fn z() -> DecodeCounters {
        DecodeCounters::default()
    }

    const GET: &str = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    const OK5: &str = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

    fn cases() -> Vec<Case> {
        let chunked_hole_body = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc";
        let tls = [
            0x16u8, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
        ];
        let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        vec![
            Case {
                name: "simple get client",
                role: Role::Client,
                evs: vec![o(GET), i(OK5)],
                want: vec![("GET", "/", Some(200), 0, 5, Complete)],
                counters: z(),
                tracked: 1,
            },
            Case {
                name: "simple get server",
                role: Role::Server,
                evs: vec![i(GET), o(OK5), Ev::Close],
                want: vec![("GET", "/", Some(200), 0, 5, Complete)],
                counters: z(),
                tracked: 0,
            },
            Case {
                name: "keep-alive three exchanges",
                role: Role::Client,
                evs: vec![
                    o(GET),
                    i(OK5),
                    o("POST /p?x=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
                    i("HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
                    o("DELETE /d HTTP/1.1\r\n\r\n"),
                    i("HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno"),
                ],
                want: vec![
                    ("GET", "/", Some(200), 0, 5, Complete),
                    ("POST", "/p?x=1", Some(201), 3, 0, Complete),
                    ("DELETE", "/d", Some(404), 0, 2, Complete),
                ],
                counters: z(),
                tracked: 1,
            },
            Case {
                name: "pipelining with HEAD",
                role: Role::Client,
                evs: vec![
                    o("GET /1 HTTP/1.1\r\n\r\nHEAD /2 HTTP/1.1\r\n\r\n"),
                    i("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
                    o("GET /3 HTTP/1.1\r\n\r\n"),
                    i("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
                ],
                want: vec![
                    ("GET", "/1", Some(200), 0, 3, Complete),
                    ("HEAD", "/2", Some(200), 0, 0, Complete),
                    ("GET", "/3", Some(200), 0, 2, Complete),
                ],
                counters: z(),
                tracked: 1,
            },
            Case {
                name: "chunked request body",
                role: Role::Server,
                evs: vec![
                    i("POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n"),
                    i("5;x=y\r\npedia\r\n0\r\n\r\n"),
                    o("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                ],
                want: vec![("POST", "/u", Some(200), 9, 0, Complete)],
                counters: z(),
                tracked: 1,
            },
            Case {
                name: "garbage before valid request in first chunk",
                role: Role::Client,
                evs: vec![o("hello there\r\nGET /x HTTP/1.1\r\n\r\n"), i(OK5)],
                want: vec![("GET", "/x", Some(200), 0, 5, Complete)],
                counters: DecodeCounters { parse_errors: 1, resyncs: 1, ..z() },
                tracked: 1,
            },
            Case {
                name: "garbage chunks between messages both directions",
                role: Role::Client,
                evs: vec![
                    o(GET),
                    i(OK5),
                    ob(&[0, 1, 2, 0xff, b'x']),
                    i("zzzz not http\r\n"),
                    o("GET /2 HTTP/1.1\r\n\r\n"),
                    i("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
                ],
                want: vec![("GET", "/", Some(200), 0, 5, Complete), ("GET", "/2", Some(200), 0, 2, Complete)],
                counters: DecodeCounters { parse_errors: 2, resyncs: 2, ..z() },
                tracked: 1,
            },
            Case {
                name: "garbage then head in same chunk mid-connection",
                role: Role::Client,
                evs: vec![o(GET), i(OK5), o("\u{1}junk line\r\nGET /2 HTTP/1.1\r\n\r\n"), i(OK5)],
                want: vec![("GET", "/", Some(200), 0, 5, Complete), ("GET", "/2", Some(200), 0, 5, Complete)],
                counters: DecodeCounters { parse_errors: 1, resyncs: 1, ..z() },
                tracked: 1,
            },
            Case {
                name: "100-continue then 200",
                role: Role::Client,
                evs: vec![
                    o("PUT /up HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"),
                    i("HTTP/1.1 100 Continue\r\n\r\n"),
                    o("data"),
                    i("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
                ],
                want: vec![("PUT", "/up", Some(200), 4, 2, Complete)],
                counters: z(),
                tracked: 1,
            },
            Case {
                name: "204 and 304 have no body",
                role: Role::Client,
                evs: vec![
                    o("GET /a HTTP/1.1\r\n\r\n"),
                    i("HTTP/1.1 204 No Content\r\n\r\n"),
                    o("GET /b HTTP/1.1\r\n\r\n"),
                    i("HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
                    o("GET /c HTTP/1.1\r\n\r\n"),
                    i("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
                ],
                want: vec![
                    ("GET", "/a", Some(204), 0, 0, Complete),
                    ("GET", "/b", Some(304), 0, 0, Complete),
                    ("GET", "/c", Some(200), 0, 2, Complete),
                ],
                counters: z(),
                tracked: 1,
            },
            Case {
                name: "HTTP/1.0 close-delimited body ends at Close",
                role: Role::Client,
                evs: vec![o("GET / HTTP/1.0\r\n\r\n"), i("HTTP/1.0 200 OK\r\n\r\nabc"), i("defg"), Ev::Close],
                want: vec![("GET", "/", Some(200), 0, 7, Complete)],
                counters: z(),
                tracked: 0,
            },
            Case {
                name: "close mid-response",
                role: Role::Client,
                evs: vec![o(GET), i("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), Ev::Close],
                want: vec![("GET", "/", Some(200), 0, 3, Aborted)],
                counters: z(),
                tracked: 0,
            },
            Case {
                name: "close after request without response",
                role: Role::Server,
                evs: vec![i(GET), Ev::Close],
                want: vec![("GET", "/", None, 0, 0, Aborted)],
                counters: z(),
                tracked: 0,
            },
            Case {
                name: "websocket upgrade then bytes ignored",
                role: Role::Client,
                evs: vec![
                    o("GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
                    i("HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n\u{81}\u{5}hello"),
                    o("GET /not-http HTTP/1.1\r\n\r\n"),
                    i(OK5),
                    Ev::Close,
                ],
                want: vec![("GET", "/ws", Some(101), 0, 0, upg("websocket"))],
                counters: z(),
                tracked: 0,
            },
            Case {
                name: "h2c upgrade",
                role: Role::Server,
                evs: vec![
                    i("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"),
                    o("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"),
                    Ev::In(h2.clone(), h2.len() as u64),
                    i(GET),
                    o(OK5),
                ],
                want: vec![("GET", "/", Some(101), 0, 0, upg("h2c"))],
                counters: z(),
                tracked: 1,
            },
            Case {
                name: "CONNECT tunnel",
                role: Role::Client,
                evs: vec![
                    o("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
                    i("HTTP/1.1 200 Connection established\r\n\r\n"),
                    ob(&tls),
                    i(OK5),
                ],
                want: vec![("CONNECT", "example.com:443", Some(200), 0, 0, upg("connect"))],
                counters: z(),
                tracked: 1,
            },
            Case {
                name: "CONNECT refused stays HTTP",
                role: Role::Client,
                evs: vec![
                    o("CONNECT example.com:443 HTTP/1.1\r\n\r\n"),
                    i("HTTP/1.1 407 Proxy Auth\r\nContent-Length: 1\r\n\r\nx"),
                    o(GET),
                    i(OK5),
                ],
                want: vec![
                    ("CONNECT", "example.com:443", Some(407), 0, 1, Complete),
                    ("GET", "/", Some(200), 0, 5, Complete),
                ],
                counters: z(),
                tracked: 1,
            },
            Case {
                name: "TLS connection ignored",
                role: Role::Client,
                evs: vec![ob(&tls), Ev::In(tls.to_vec(), 4000), o(GET), i(OK5)],
                want: vec![],
                counters: DecodeCounters { non_http_connections: 1, ..z() },
                tracked: 1,
            },
            Case {
                name: "HTTP/2 prior knowledge",
                role: Role::Client,
                evs: vec![Ev::Out(h2.clone(), h2.len() as u64), i(OK5), o(GET), i(OK5), Ev::Close],
                want: vec![],
                counters: DecodeCounters { http2_connections: 1, ..z() },
                tracked: 0,
            },
            Case {
                name: "orphan response then normal",
                role: Role::Client,
                evs: vec![i("HTTP/1.1 408 Timeout\r\nContent-Length: 3\r\n\r\nbye"), o(GET), i(OK5)],
                want: vec![("GET", "/", Some(200), 0, 5, Complete)],
                counters: DecodeCounters { orphan_responses: 1, ..z() },
                tracked: 1,
            },
            Case {
                name: "bare LF line endings",
                role: Role::Client,
                evs: vec![o("GET /lf HTTP/1.1\nHost: a\n\n"), i("HTTP/1.1 200 OK\nContent-Length: 2\n\nok")],
                want: vec![("GET", "/lf", Some(200), 0, 2, Complete)],
                counters: z(),
                tracked: 1,
            },
            Case {
                name: "hole inside chunk data is skipped",
                role: Role::Client,
                evs: vec![o(GET), i_hole(chunked_hole_body, 13), i("\r\n0\r\n\r\n"), o(GET), i(OK5)],
                want: vec![("GET", "/", Some(200), 0, 16, Complete), ("GET", "/", Some(200), 0, 5, Complete)],
                counters: DecodeCounters { holes_skipped: 13, ..z() },
                tracked: 1,
            },
            Case {
                name: "hole over chunk-size line loses framing",
                role: Role::Client,
                evs: vec![
                    o(GET),
                    i_hole("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde", 10),
                    i("more body bytes\r\n0\r\n\r\n"),
                    o("GET /2 HTTP/1.1\r\n\r\n"),
                    i(OK5),
                ],
                want: vec![("GET", "/", Some(200), 0, 5, Aborted), ("GET", "/2", Some(200), 0, 5, Complete)],
                counters: DecodeCounters { lost_framing: 1, resyncs: 1, ..z() },
                tracked: 1,
            },
            Case {
                name: "served heads that are not RFC-clean still give spans",
                role: Role::Server,
                evs: vec![
                    i("GET /nocolon HTTP/1.1\r\nHost: x\r\nthis line has no colon\r\n\r\n"),
                    o(OK5),
                    i("GET /nul HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
                    o("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"),
                    i("GET /esc HTTP/1.1\r\nHost: x\r\nX-A: a\x1bb\r\n\r\n"),
                    o(OK5),
                    i("GET /caf\u{e9} HTTP/1.1\r\nHost: x\r\n\r\n"),
                    o(OK5),
                ],
                want: vec![
                    ("GET", "/nocolon", Some(200), 0, 5, Complete),
                    ("GET", "/nul", Some(400), 0, 0, Complete),
                    ("GET", "/esc", Some(200), 0, 5, Complete),
                    ("GET", "/caf\u{e9}", Some(200), 0, 5, Complete),
                ],
                counters: z(),
                tracked: 1,
            },
            Case {
                name: "CL and TE together: framed by TE, and what follows is never a request",
                role: Role::Server,
                evs: vec![
                    i("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"),
                    o("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
                    i("GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"),
                ],
                want: vec![("POST", "/a", Some(400), 0, 0, Complete)],
                counters: DecodeCounters { ambiguous_lengths: 1, after_ambiguous_bytes: 70, ..z() },
                tracked: 1,
            },
            Case {
                name: "TE then CL, body served by TE: the span has the TE body",
                role: Role::Server,
                evs: vec![
                    i("POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
                    o("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
                ],
                want: vec![("POST", "/b", Some(200), 3, 2, Complete)],
                counters: DecodeCounters { ambiguous_lengths: 1, ..z() },
                tracked: 1,
            },
            Case {
                name: "hole in response head",
                role: Role::Client,
                evs: vec![
                    o(GET),
                    i_hole("HTTP/1.1 200 OK\r\nX-Big: aaaa", 10000),
                    o("GET /2 HTTP/1.1\r\n\r\n"),
                    i(OK5),
                ],
                want: vec![("GET", "/", None, 0, 0, Aborted), ("GET", "/2", Some(200), 0, 5, Complete)],
                counters: DecodeCounters { oversized_heads: 1, resyncs: 1, ..z() },
                tracked: 1,
            },
            Case {
                name: "hole in request head keeps FIFO pairing",
                role: Role::Client,
                evs: vec![
                    o_hole("GET /big HTTP/1.1\r\nX-Big: zzz", 9000),
                    i("HTTP/1.1 431 Too Large\r\nContent-Length: 3\r\n\r\nbig"),
                    o("GET /next HTTP/1.1\r\n\r\n"),
                    i(OK5),
                ],
                want: vec![("GET", "/next", Some(200), 0, 5, Complete)],
                counters: DecodeCounters { oversized_heads: 1, resyncs: 1, ..z() },
                tracked: 1,
            },
            Case {
                name: "malformed request head keeps FIFO pairing",
                role: Role::Client,
                evs: vec![
                    o("GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n"),
                    i("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"),
                    o("GET /ok HTTP/1.1\r\n\r\n"),
                    i(OK5),
                ],
                want: vec![("GET", "/ok", Some(200), 0, 5, Complete)],
                counters: DecodeCounters { parse_errors: 1, resyncs: 1, ..z() },
                tracked: 1,
            },
            Case {
                name: "conflicting content-length is malformed",
                role: Role::Server,
                evs: vec![
                    i("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
                    o("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"),
                    i("GET /ok HTTP/1.1\r\n\r\n"),
                    o(OK5),
                ],
                want: vec![("GET", "/ok", Some(200), 0, 5, Complete)],
                counters: DecodeCounters { parse_errors: 1, resyncs: 1, ..z() },
                tracked: 1,
            },
            Case {
                name: "role unknown inferred as client",
                role: Role::Unknown,
                evs: vec![o(GET), i(OK5)],
                want: vec![("GET", "/", Some(200), 0, 5, Complete)],
                counters: z(),
                tracked: 1,
            },
            Case {
                name: "role unknown inferred as server",
                role: Role::Unknown,
                evs: vec![i(GET), o(OK5)],
                want: vec![("GET", "/", Some(200), 0, 5, Complete)],
                counters: z(),
                tracked: 1,
            },
            Case {
                name: "chunked response with transfer-encoding list",
                role: Role::Client,
                evs: vec![
                    o(GET),
                    i("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
                    o(GET),
                    i(OK5),
                ],
                want: vec![("GET", "/", Some(200), 0, 3, Complete), ("GET", "/", Some(200), 0, 5, Complete)],
                counters: z(),
                tracked: 1,
            },
        ]
    }

    #[test]
    fn table() {
        for case in cases() {
            let mut tap = Tap::new(case.role);
            for ev in &case.evs {
                tap.ev(ev);
            }
            assert_eq!(sums(&tap.out), case.want, "{}: exchanges", case.name);
            let want_counters = DecodeCounters {
                exchanges: case.want.len() as u64,
                ..case.counters
            };
            assert_eq!(tap.dec.counters(), want_counters, "{}: counters", case.name);
            assert_eq!(tap.dec.tracked(), case.tracked, "{}: tracked", case.name);
            for ex in &tap.out {
                assert_eq!(ex.conn, tap.conn, "{}", case.name);
                let want_role = match case.role {
                    Role::Unknown if case.name.ends_with("server") => Role::Server,
                    Role::Unknown => Role::Client,
                    r => r,
                };
                assert_eq!(ex.role, want_role, "{}: role", case.name);
            }
        }
    }

    fn find<'a>(hs: &'a Headers, name: &str) -> Option<&'a str> {
        hs.get(name)
    }

    #[test]
    fn timestamps_client_and_server() {
        // Client: request is egress (entries), response ingress (exits).
        let mut tap = Tap::new(Role::Client);
        tap.ev(&o(GET)); // t=1000..1005
        tap.ev(&i("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")); // 1100..1105
        tap.ev(&i("cd")); // 1200..1205
        assert_eq!(tap.out.len(), 1);
        let ex = &tap.out[0];
        assert_eq!((ex.request_first_ns, ex.request_last_ns), (1000, 1000));
        assert_eq!(
            (ex.response_first_ns, ex.response_last_ns),
            (Some(1105), Some(1205))
        );
        assert_eq!(
            (ex.pid, ex.tid, ex.comm.as_str(), ex.protocol),
            (42, 43, "curl", Protocol::Http1 { minor: 1 })
        );
        assert_eq!(
            (ex.local, ex.remote),
            (SocketAddr::from(CLIENT_ADDR), SocketAddr::from(SERVER_ADDR))
        );
        assert_eq!(find(&ex.request_headers, "host"), Some("a"));
        assert_eq!(find(&ex.response_headers, "content-length"), Some("4"));

        // Server: request is ingress (exits), response egress (entries).
        let mut tap = Tap::new(Role::Server);
        tap.ev(&i("POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\n")); // 1000..1005
        tap.ev(&i("xy")); // 1100..1105
        tap.ev(&o("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n")); // 1200..1205
        tap.ev(&o("z")); // 1300..1305
        assert_eq!(tap.out.len(), 1);
        let ex = &tap.out[0];
        assert_eq!((ex.request_first_ns, ex.request_last_ns), (1005, 1105));
        assert_eq!(
            (ex.response_first_ns, ex.response_last_ns),
            (Some(1200), Some(1300))
        );
        assert_eq!(
            (ex.request_body_bytes, ex.response_body_bytes, ex.protocol),
            (2, 1, Protocol::Http1 { minor: 0 })
        );
        assert_eq!(
            (ex.local, ex.remote),
            (SocketAddr::from(SERVER_ADDR), SocketAddr::from(CLIENT_ADDR))
        );
    }

    #[test]
    fn interim_response_does_not_set_response_times() {
        let mut tap = Tap::new(Role::Client);
        tap.ev(&o(
            "PUT /up HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
        )); // 1000
        tap.ev(&i("HTTP/1.1 100 Continue\r\n\r\n")); // 1100..1105
        tap.ev(&o("data")); // 1200..1205
        tap.ev(&i("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")); // 1300..1305
        assert_eq!(tap.out.len(), 1);
        let ex = &tap.out[0];
        assert_eq!((ex.request_first_ns, ex.request_last_ns), (1000, 1200));
        assert_eq!(
            (ex.response_first_ns, ex.response_last_ns),
            (Some(1305), Some(1305))
        );
        assert_eq!(find(&ex.response_headers, "content-length"), Some("0"));
    }

    #[test]
    fn head_split_across_three_chunks() {
        let reqs: [&str; 3] = ["GE", "T /a?b=1 HTTP/1.1\r\nHost: x\r", "\n\r\n"];
        let resps: [&str; 3] = ["HTTP/1.1 200 OK\r\nContent-Le", "ngth: 3\r\n\r", "\nabc"];
        for role in [Role::Client, Role::Server] {
            let mut tap = Tap::new(role);
            let (req_dir, resp_dir) = match role {
                Role::Client => (Direction::Egress, Direction::Ingress),
                _ => (Direction::Ingress, Direction::Egress),
            };
            for (k, part) in reqs.iter().enumerate() {
                tap.tid = 100 + k as u32;
                tap.raw(req_dir, part.as_bytes(), part.len() as u64); // t = 1000, 1100, 1200
            }
            assert!(tap.out.is_empty());
            for part in resps {
                tap.raw(resp_dir, part.as_bytes(), part.len() as u64); // t = 1300, 1400, 1500
            }
            assert_eq!(
                sums(&tap.out),
                vec![("GET", "/a?b=1", Some(200), 0, 3, Complete)],
                "{role:?}"
            );
            let ex = &tap.out[0];
            assert_eq!(ex.tid, 100, "thread of the first request byte");
            let (rf, rl, sf, sl) = match role {
                Role::Client => (1000, 1200, 1305, 1505),
                _ => (1005, 1205, 1300, 1500),
            };
            assert_eq!(
                (ex.request_first_ns, ex.request_last_ns),
                (rf, rl),
                "{role:?}"
            );
            assert_eq!(
                (ex.response_first_ns, ex.response_last_ns),
                (Some(sf), Some(sl)),
                "{role:?}"
            );
            assert_eq!(find(&ex.request_headers, "host"), Some("x"));
            assert_eq!(tap.max_buf(), 0);
        }
    }

    #[test]
    fn chunked_response_split_at_every_boundary() {
        let stream = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                      4;name=val\r\nwiki\r\n5\r\npedia\r\nE ; q\r\n in\r\n\r\nchunks.\r\n\
                      0\r\nExpires: never\r\nX-T: 1\r\n\r\n\
                      HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let b = stream.as_bytes();
        let check = |parts: &[&[u8]], label: &str| {
            let mut tap = Tap::new(Role::Client);
            tap.ev(&o("GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"));
            for p in parts {
                tap.raw(Direction::Ingress, p, p.len() as u64);
            }
            assert_eq!(
                sums(&tap.out),
                vec![
                    ("GET", "/1", Some(200), 0, 23, Complete),
                    ("GET", "/2", Some(200), 0, 2, Complete)
                ],
                "{label}"
            );
            assert_eq!(tap.dec.counters().parse_errors, 0, "{label}");
        };
        for x in 1..b.len() {
            check(&[&b[..x], &b[x..]], &format!("split {x}"));
            for y in (x + 1..b.len()).step_by(7) {
                check(&[&b[..x], &b[x..y], &b[y..]], &format!("split {x},{y}"));
            }
        }
    }

    #[test]
    fn body_truncated_at_capture_cap() {
        for role in [Role::Client, Role::Server] {
            let mut tap = Tap::new(role);
            let head = "HTTP/1.1 200 OK\r\nContent-Length: ";
            let cl = 100_000 - head.len() - "99936\r\n\r\n".len();
            let mut resp = format!("{head}{cl}\r\n\r\n").into_bytes();
            assert_eq!(resp.len() + cl, 100_000);
            resp.resize(100_000, b'x');
            let (req_dir, resp_dir) = match role {
                Role::Client => (Direction::Egress, Direction::Ingress),
                _ => (Direction::Ingress, Direction::Egress),
            };
            tap.raw(req_dir, GET.as_bytes(), GET.len() as u64);
            tap.raw(resp_dir, &resp[..4096], 100_000);
            tap.raw(req_dir, b"GET /next HTTP/1.1\r\n\r\n", 22);
            tap.raw(resp_dir, OK5.as_bytes(), OK5.len() as u64);
            assert_eq!(
                sums(&tap.out),
                vec![
                    ("GET", "/", Some(200), 0, cl as u64, Complete),
                    ("GET", "/next", Some(200), 0, 5, Complete)
                ]
            );
            assert_eq!(tap.dec.counters().holes_skipped, 100_000 - 4096);
            assert_eq!(
                tap.dec.counters().parse_errors + tap.dec.counters().oversized_heads,
                0
            );
        }
    }

    #[test]
    fn sendfile_body() {
        let mut tap = Tap::new(Role::Server);
        tap.ev(&i("GET /file HTTP/1.1\r\n\r\n")); // 1000
        tap.ev(&o("HTTP/1.1 200 OK\r\nContent-Length: 50000\r\n\r\n")); // 1100
        tap.ev(&Ev::Out(Vec::new(), 50_000)); // 1200..1205 sendfile
        tap.ev(&i("GET /2 HTTP/1.1\r\n\r\n"));
        tap.ev(&o("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert_eq!(
            sums(&tap.out),
            vec![
                ("GET", "/file", Some(200), 0, 50_000, Complete),
                ("GET", "/2", Some(200), 0, 0, Complete)
            ]
        );
        assert_eq!(tap.out[0].response_last_ns, Some(1200));
        assert_eq!(tap.dec.counters().holes_skipped, 50_000);
    }

    #[test]
    fn hole_past_body_end_hits_next_head() {
        // CL 3, but the syscall moved 3 + 20 more bytes we did not see: a
        // pipelined response head is lost, so the next request's exchange is Aborted.
        let mut tap = Tap::new(Role::Client);
        tap.ev(&o("GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"));
        tap.ev(&i_hole(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
            23,
        ));
        tap.ev(&o("GET /3 HTTP/1.1\r\n\r\n"));
        tap.ev(&i(OK5));
        assert_eq!(
            sums(&tap.out),
            vec![
                ("GET", "/1", Some(200), 0, 5, Complete),
                ("GET", "/2", None, 0, 0, Aborted),
                ("GET", "/3", Some(200), 0, 5, Complete),
            ]
        );
        let c = tap.dec.counters();
        assert_eq!((c.holes_skipped, c.oversized_heads, c.resyncs), (3, 1, 1));
    }

    #[test]
    fn huge_header_counted_without_growth() {
        let limits = Limits {
            max_head_bytes: 1024,
            ..Limits::default()
        };
        let mut tap = Tap::with(Role::Client, limits);
        tap.ev(&o("GET / HTTP/1.1\r\nX-Long: "));
        for _ in 0..200 {
            tap.ev(&o(&"a".repeat(500)));
            assert!(tap.max_buf() <= 1024, "buffer {} over limit", tap.max_buf());
        }
        tap.ev(&o("\r\n\r\n"));
        // Its 431 answer is consumed in the lost request's FIFO slot.
        tap.ev(&i("HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\n\r\n"));
        tap.ev(&o("GET /after HTTP/1.1\r\n\r\n"));
        tap.ev(&i(OK5));
        assert_eq!(
            sums(&tap.out),
            vec![("GET", "/after", Some(200), 0, 5, Complete)]
        );
        let c = tap.dec.counters();
        assert_eq!((c.oversized_heads, c.resyncs, c.parse_errors), (1, 1, 0));
        assert_eq!(tap.max_buf(), 0);
    }

    #[test]
    fn garbage_flood_stays_bounded() {
        let limits = Limits {
            max_head_bytes: 1024,
            ..Limits::default()
        };
        let mut tap = Tap::with(Role::Server, limits);
        tap.ev(&i(GET));
        tap.ev(&o(OK5));
        let mut x: u32 = 12345;
        for _ in 0..500 {
            let junk: Vec<u8> = (0..300)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8 | 0x80
                })
                .collect();
            tap.raw(Direction::Ingress, &junk, 300);
            assert!(tap.max_buf() <= 1024);
        }
        assert_eq!(tap.out.len(), 1);
        tap.ev(&i("GET /back HTTP/1.1\r\n\r\n"));
        tap.ev(&o(OK5));
        assert_eq!(tap.out.len(), 2);
        assert_eq!(tap.out[1].target, "/back");
        assert_eq!(tap.dec.counters().parse_errors, 1);
    }

    #[test]
    fn sensitive_headers_dropped() {
        let mut tap = Tap::new(Role::Client);
        tap.ev(&o(
            "GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer s3cr3t\r\nCOOKIE: sid=1\r\n\
                   X-Api-Key: k\r\nx-auth-token: t\r\nX-CSRF-Token: c\r\nX-Xsrf-Token: x\r\n\
                   Proxy-Authorization: Basic p\r\nUser-Agent: ua\r\nAccept: */*\r\n\r\n",
        ));
        tap.ev(&i(
            "HTTP/1.1 200 OK\r\nSet-Cookie: a=b\r\nContent-Type: text/plain\r\nset-cookie: c=d\r\n\
                   Content-Length: 0\r\n\r\n",
        ));
        assert_eq!(tap.out.len(), 1);
        let ex = &tap.out[0];
        let names = |hs: &Headers| hs.iter().map(|h| h.name.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&ex.request_headers), ["host", "user-agent", "accept"]);
        assert_eq!(
            names(&ex.response_headers),
            ["content-type", "content-length"]
        );
        assert_eq!(find(&ex.request_headers, "user-agent"), Some("ua"));
        let dump = format!("{ex:?}");
        for secret in ["s3cr3t", "sid=1", "Basic p", "a=b", "c=d"] {
            assert!(!dump.contains(secret), "{secret} leaked");
        }
    }

    #[test]
    fn role_unknown_sets_role_on_exchange() {
        for (first, want) in [
            (Direction::Egress, Role::Client),
            (Direction::Ingress, Role::Server),
        ] {
            let mut tap = Tap::new(Role::Unknown);
            let second = if first == Direction::Egress {
                Direction::Ingress
            } else {
                Direction::Egress
            };
            tap.raw(first, GET.as_bytes(), GET.len() as u64);
            tap.raw(second, OK5.as_bytes(), OK5.len() as u64);
            assert_eq!(tap.out.len(), 1);
            assert_eq!(tap.out[0].role, want);
            // Timestamps follow the direction, not the inferred role.
            let want_first = if first == Direction::Egress {
                1000
            } else {
                1005
            };
            assert_eq!(tap.out[0].request_first_ns, want_first);
        }
    }

    #[test]
    fn many_connections_bounded_lru() {
        let limits = Limits {
            max_connections: 8,
            ..Limits::default()
        };
        let mut dec = Http1Decoder::new(limits);
        let mut out = Vec::new();
        let req = |n: u64, t: u64| {
            mk(
                cid(n),
                Role::Client,
                Direction::Egress,
                GET.as_bytes(),
                GET.len() as u64,
                t,
                t + 1,
            )
        };
        for n in 0..8 {
            dec.push(&req(n, n * 10), &mut out);
        }
        // Touch conn 0 so conn 1 is the least recently used.
        dec.push(
            &mk(
                cid(0),
                Role::Client,
                Direction::Ingress,
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                38,
                90,
                91,
            ),
            &mut out,
        );
        dec.push(&req(8, 100), &mut out);
        assert_eq!(dec.tracked(), 8);
        assert_eq!(out.len(), 1, "evicted conn 1's request is reported Aborted");
        assert_eq!((out[0].conn, out[0].outcome.clone()), (cid(1), Aborted));
        dec.push(
            &mk(
                cid(0),
                Role::Client,
                Direction::Ingress,
                b"abc",
                3,
                110,
                111,
            ),
            &mut out,
        );
        assert_eq!(
            (
                out[1].conn,
                out[1].outcome.clone(),
                out[1].response_body_bytes
            ),
            (cid(0), Complete, 3)
        );
        for n in 9..1000 {
            dec.push(&req(n, 200 + n), &mut out);
            assert!(dec.tracked() <= 8);
        }
        let c = dec.counters();
        assert_eq!(c.dropped_connections, 1 + (1000 - 9));
        assert_eq!(c.exchanges, out.len() as u64);
    }

    #[test]
    fn pending_overflow_drops_connection() {
        let limits = Limits {
            max_pending_requests: 2,
            ..Limits::default()
        };
        let mut tap = Tap::with(Role::Client, limits);
        tap.ev(&o("GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"));
        assert_eq!(tap.dec.counters().dropped_connections, 0);
        tap.ev(&o("GET /3 HTTP/1.1\r\n\r\n"));
        tap.ev(&i(OK5));
        tap.ev(&Ev::Close);
        assert!(tap.out.is_empty());
        assert_eq!(tap.dec.counters().dropped_connections, 1);
        assert_eq!(tap.dec.tracked(), 0);
    }

    #[test]
    fn expire_aborts_idle_connections() {
        let mut dec = Http1Decoder::default();
        let mut out = Vec::new();
        dec.push(
            &mk(
                cid(1),
                Role::Client,
                Direction::Egress,
                GET.as_bytes(),
                GET.len() as u64,
                100,
                110,
            ),
            &mut out,
        );
        dec.push(
            &mk(
                cid(2),
                Role::Client,
                Direction::Egress,
                GET.as_bytes(),
                GET.len() as u64,
                500,
                510,
            ),
            &mut out,
        );
        dec.push(
            &mk(
                cid(1),
                Role::Client,
                Direction::Ingress,
                b"HTTP/1.1 200 OK\r\n\r\npartial",
                26,
                120,
                130,
            ),
            &mut out,
        );
        dec.expire(1000, 600, &mut out); // cutoff 400: conn 1 (last 130) goes
        assert_eq!(dec.tracked(), 1);
        assert_eq!(sums(&out), vec![("GET", "/", Some(200), 0, 7, Aborted)]);
        assert_eq!(out[0].conn, cid(1));
        dec.expire(1000, 0, &mut out);
        assert_eq!(dec.tracked(), 0);
        assert_eq!(out.len(), 2);
        assert_eq!((out[1].conn, out[1].status), (cid(2), None));
    }

    #[test]
    fn late_connection_resyncs_on_first_head() {
        let mut tap = Tap::new(Role::Server);
        tap.late = true;
        tap.ev(&i("...rest of some body the capture joined late"));
        tap.ev(&o("more response body"));
        tap.ev(&i("GET /seen HTTP/1.1\r\n\r\n"));
        tap.ev(&o(OK5));
        assert_eq!(
            sums(&tap.out),
            vec![("GET", "/seen", Some(200), 0, 5, Complete)]
        );
        assert_eq!(tap.dec.counters().non_http_connections, 0);

        let mut tap = Tap::new(Role::Server);
        tap.late = true;
        for _ in 0..LATE_CONN_PROBES {
            tap.ev(&i("binary-ish stuff"));
        }
        assert_eq!(tap.dec.counters().non_http_connections, 1);
        tap.ev(&i(GET));
        tap.ev(&o(OK5));
        assert!(tap.out.is_empty());
    }

    /// Pseudo-random streams with random splits and holes: never panic, never
    /// exceed buffer bounds, and counters stay consistent with output.
    #[test]
    fn random_streams_do_not_panic() {
        let limits = Limits {
            max_head_bytes: 512,
            max_connections: 4,
            max_pending_requests: 4,
        };
        let mut dec = Http1Decoder::new(limits);
        let mut out = Vec::new();
        let pieces: [&[u8]; 8] = [
            b"GET / HTTP/1.1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;e\r\nz\r\n0\r\n",
            b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\n",
            b"\x16\x03\x01garbage\n\n\r",
            b"HEAD /h HTTP/1.0\r\nContent-Length: 9\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for step in 0..20_000u64 {
            let conn = cid(rnd(6));
            if rnd(50) == 0 {
                dec.push(&close_chunk(conn, Role::Client, step), &mut out);
                continue;
            }
            let p = pieces[rnd(pieces.len() as u64) as usize];
            let a = rnd(p.len() as u64 + 1) as usize;
            let b = a + rnd((p.len() - a) as u64 + 1) as usize;
            let hole = if rnd(5) == 0 { rnd(100) } else { 0 };
            let dir = if rnd(2) == 0 {
                Direction::Egress
            } else {
                Direction::Ingress
            };
            let role = [Role::Client, Role::Server, Role::Unknown][rnd(3) as usize];
            let mut c = mk(
                conn,
                role,
                dir,
                &p[a..b],
                (b - a) as u64 + hole,
                step * 10,
                step * 10 + 5,
            );
            c.late_conn = rnd(4) == 0;
            dec.push(&c, &mut out);
            assert!(dec.tracked() <= 4);
            for cn in dec.conns.values() {
                assert!(cn.req.buf.len() <= 512 && cn.resp.buf.len() <= 512);
                assert!(cn.pending.len() <= 4);
            }
        }
        assert_eq!(dec.counters().exchanges, out.len() as u64);
        assert!(!out.is_empty());
    }

    /// Server side of one connection with the kernel's byte positions; each
    /// event is (direction, bytes, captured?). Lost events still advance the
    /// positions, as they do in the kernel.
    fn run_with_positions(
        events: &[(Direction, &str, bool)],
    ) -> (Vec<(String, Option<u16>)>, DecodeCounters) {
        let mut dec = crate::decode::Decoder::default();
        let mut out = Vec::new();
        let mut at = [0u64; 2];
        for (i, (dir, text, captured)) in events.iter().enumerate() {
            let (me, peer) = match dir {
                Direction::Egress => (0, 1),
                Direction::Ingress => (1, 0),
            };
            let t = 1000 + 100 * i as u64;
            if *text == "CLOSE" {
                let mut c = close_chunk(cid(1), Role::Server, t);
                (c.pos, c.peer_pos, c.has_pos) = (at[0], at[1], true);
                dec.push(&c, &mut out);
                continue;
            }
            let mut c = mk(
                cid(1),
                Role::Server,
                *dir,
                text.as_bytes(),
                text.len() as u64,
                t,
                t + 5,
            );
            (c.pos, c.peer_pos, c.has_pos) = (at[me], at[peer], true);
            at[me] += text.len() as u64;
            if *captured {
                dec.push(&c, &mut out);
            }
        }
        let got = out.iter().map(|e| (e.target.clone(), e.status)).collect();
        (got, dec.counters().http1)
    }

    #[test]
    fn lost_chunks_never_pair_a_request_with_another_ones_response() {
        use Direction::{Egress as Out, Ingress as In};
        let req = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: a\r\n\r\n");
        let resp = |s: u16| format!("HTTP/1.1 {s} X\r\nContent-Length: 2\r\n\r\nok");
        let (a, b, c, d) = (req("/a"), req("/b"), req("/c"), req("/d"));
        let (r200, r404, r500, r503) = (resp(200), resp(404), resp(500), resp(503));
        let ab = format!("{a}{b}");
        type Case<'a> = (
            &'a str,
            Vec<(Direction, &'a str, bool)>,
            Vec<(&'a str, u16)>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "a lost response: its request is dropped, the next one keeps its own",
                vec![
                    (In, &a, true),
                    (Out, &r200, true),
                    (In, &b, true),
                    (Out, &r404, false),
                    (In, &c, true),
                    (Out, &r500, true),
                ],
                vec![("/a", 200), ("/c", 500)],
            ),
            (
                "two lost requests: their responses are not given to the next request",
                vec![
                    (In, &a, true),
                    (Out, &r200, true),
                    (In, &b, false),
                    (Out, &r404, true),
                    (In, &c, false),
                    (Out, &r500, true),
                    (In, &d, true),
                    (Out, &r503, true),
                ],
                vec![("/a", 200), ("/d", 503)],
            ),
            (
                "nothing lost",
                vec![
                    (In, &a, true),
                    (Out, &r200, true),
                    (In, &b, true),
                    (Out, &r404, true),
                ],
                vec![("/a", 200), ("/b", 404)],
            ),
            (
                "a response lost just before the close is not an aborted exchange",
                vec![
                    (In, &a, true),
                    (Out, &r200, true),
                    (In, &b, true),
                    (Out, &r404, false),
                    (Out, "CLOSE", true),
                ],
                vec![("/a", 200)],
            ),
            (
                "a request unanswered at the close is aborted",
                vec![
                    (In, &a, true),
                    (Out, &r200, true),
                    (In, &b, true),
                    (Out, "CLOSE", true),
                ],
                vec![("/a", 200), ("/b", 0)],
            ),
            (
                "pipelined, nothing lost",
                vec![
                    (In, &ab, true),
                    (Out, &r200, true),
                    (Out, &r404, true),
                    (In, &c, true),
                    (Out, &r500, true),
                ],
                vec![("/a", 200), ("/b", 404), ("/c", 500)],
            ),
            (
                "pipelined, a response lost: what cannot be told apart is dropped",
                vec![
                    (In, &ab, true),
                    (Out, &r200, true),
                    (Out, &r404, false),
                    (In, &c, true),
                    (Out, &r500, true),
                ],
                vec![("/a", 200)],
            ),
        ];
        for (name, events, want) in cases {
            let (got, counters) = run_with_positions(&events);
            let want: Vec<(String, Option<u16>)> = want
                .iter()
                .map(|(p, s)| (p.to_string(), Some(*s).filter(|s| *s > 0)))
                .collect();
            assert_eq!(got, want, "{name}: {counters:?}");
        }
    }
}
