//! Decode stage: per-connection byte streams -> protocol exchanges.
//!
//! [`Decoder`] dispatches each connection to the decoder of its protocol
//! (HTTP/1.x, HTTP/2 by its preface, after an `Upgrade: h2c`, or by a run of
//! plausible frames on connections older than the agent). Both protocols hand
//! the correlate stage one protocol-neutral [`HttpExchange`].
pub mod hpack;
pub mod http1;
pub mod http2;
pub use http1::{DecodeCounters, Http1Decoder, Limits};
pub use http2::{H2Counters, H2Limits, Http2Decoder};

use crate::capture::{Chunk, ChunkKind, Comm, ConnId, ConnMap, Direction, Role};
use std::net::SocketAddr;

/// Timestamp rule, for the first and the last bytes of a message alike: bytes
/// sent are handed to the kernel at syscall entry, bytes received reach the
/// process at syscall exit. Exit of a send would be wrong: on loopback the
/// peer may read the bytes before the sender's syscall returns, and a SERVER
/// span would then end after the CLIENT span that contains it.
pub(crate) fn moment_ns(chunk: &Chunk) -> u64 {
    match chunk.direction {
        Direction::Egress => chunk.ts_enter_ns,
        Direction::Ingress => chunk.ts_exit_ns,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http1,
    Http2,
}

/// Counters of the dispatch and of both decoders.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AllCounters {
    pub http1: DecodeCounters,
    pub http2: H2Counters,
}

/// Per connection: its protocol, and where each direction's next byte is
/// (from the kernel's byte positions), so bytes never captured are known.
#[derive(Debug, Clone, Copy)]
struct ConnState {
    kind: Kind,
    next: [Option<u64>; 2],
}

/// The decode stage: picks each connection's protocol from its first bytes
/// and feeds its chunks to that decoder, telling it first of any bytes the
/// chunk positions show were lost before a chunk.
pub struct Decoder {
    http1: Http1Decoder,
    http2: Http2Decoder,
    kinds: ConnMap<ConnState>,
    max_connections: usize,
    /// Bytes lost between chunks, as the positions show.
    pub gap_bytes: u64,
    /// Request starts since the last [`Decoder::take_starts`], each with the
    /// number of exchanges in `out` before it (so the two keep chunk order);
    /// only kept once asked for with [`Decoder::keep_starts`].
    starts: Vec<(usize, RequestStart)>,
    keep_starts: bool,
}

fn dir_slot(d: Direction) -> usize {
    match d {
        Direction::Egress => 0,
        Direction::Ingress => 1,
    }
}

/// Moves `next` past `chunk`; returns the bytes missing before it.
fn advance(next: &mut [Option<u64>; 2], chunk: &Chunk) -> u64 {
    if !chunk.has_pos || chunk.kind != ChunkKind::Data {
        return 0;
    }
    let slot = &mut next[dir_slot(chunk.direction)];
    let gap = slot.map_or(0, |n| chunk.pos.saturating_sub(n));
    *slot = Some(chunk.pos + chunk.len);
    gap
}

impl Decoder {
    pub fn new(h1: Limits, h2: H2Limits) -> Self {
        let max_connections = h1.max_connections + h2.max_connections;
        Self {
            http1: Http1Decoder::new(h1),
            http2: Http2Decoder::new(h2),
            kinds: ConnMap::default(),
            max_connections,
            gap_bytes: 0,
            starts: Vec::new(),
            keep_starts: false,
        }
    }

    /// Also report each request when its head is read (see [`RequestStart`]);
    /// the caller must then drain them with [`Decoder::take_starts`].
    pub fn keep_starts(mut self) -> Self {
        self.keep_starts = true;
        self
    }

    /// Request starts since the last call, in chunk order, each with the
    /// index in the exchange output before which it happened.
    pub fn take_starts(&mut self, out: &mut Vec<(usize, RequestStart)>) {
        out.append(&mut self.starts);
    }

    /// Moves the decoders' request starts of the chunk just fed.
    fn collect_starts(&mut self, before: usize) {
        let keep = self.keep_starts;
        for s in self.http1.starts().chain(self.http2.starts()) {
            if keep {
                self.starts.push((before, s));
            }
        }
    }

    /// Feeds one chunk (in per-connection order); pushes finished exchanges to `out`.
    pub fn push(&mut self, chunk: &Chunk, out: &mut Vec<HttpExchange>) {
        let before = out.len();
        self.dispatch(chunk, out);
        self.collect_starts(before);
    }

    fn dispatch(&mut self, chunk: &Chunk, out: &mut Vec<HttpExchange>) {
        let Some(st) = self.kinds.get_mut(&chunk.conn) else {
            self.first(chunk, out);
            return;
        };
        let kind = st.kind;
        if chunk.kind == ChunkKind::Close && chunk.has_pos {
            // A close gives both directions' ends: a lost tail shows there.
            let next = st.next;
            for (d, end) in [
                (Direction::Egress, chunk.pos),
                (Direction::Ingress, chunk.peer_pos),
            ] {
                let gap = next[dir_slot(d)].map_or(0, |n| end.saturating_sub(n));
                if gap > 0 {
                    let at = Chunk {
                        kind: ChunkKind::Data,
                        direction: d,
                        pos: end,
                        len: 0,
                        ..chunk.clone()
                    };
                    self.gap_bytes += gap;
                    match kind {
                        Kind::Http2 => self.http2.gap(&chunk.conn, d, gap, out),
                        Kind::Http1 => self.http1.gap(&at, gap, out),
                    }
                }
            }
        }
        let Some(st) = self.kinds.get_mut(&chunk.conn) else {
            return;
        };
        let gap = advance(&mut st.next, chunk);
        if gap > 0 {
            self.gap_bytes += gap;
            match kind {
                Kind::Http2 => self.http2.gap(&chunk.conn, chunk.direction, gap, out),
                Kind::Http1 => self.http1.gap(chunk, gap, out),
            }
        }
        match kind {
            Kind::Http2 => self.http2.push(chunk, out),
            Kind::Http1 => {
                let before = out.len();
                self.http1.push(chunk, out);
                self.upgrade(chunk, before, out);
            }
        }
        if chunk.kind == ChunkKind::Close {
            self.kinds.remove(&chunk.conn);
        }
    }

    /// The first chunk of a connection decides its protocol.
    fn first(&mut self, chunk: &Chunk, out: &mut Vec<HttpExchange>) {
        if chunk.kind == ChunkKind::Close || (chunk.payload.is_empty() && chunk.len > 0) {
            // Nothing to classify by (a close, sendfile, or all cut).
            return;
        }
        // Bytes before the first chunk were lost: decode it as joined mid-way.
        let owned;
        let chunk = if !chunk.late_conn && chunk.has_pos && chunk.pos > 0 {
            owned = Chunk {
                late_conn: true,
                ..chunk.clone()
            };
            &owned
        } else {
            chunk
        };
        let kind = match classify(chunk) {
            Some(start) => {
                self.http2.start(
                    chunk,
                    chunk.late_conn && start.is_none(),
                    start.unwrap_or(0),
                    out,
                );
                Kind::Http2
            }
            None => {
                self.http1.push(chunk, out);
                Kind::Http1
            }
        };
        if self.kinds.len() >= self.max_connections {
            self.sweep();
        }
        let mut st = ConnState {
            kind,
            next: [None; 2],
        };
        advance(&mut st.next, chunk);
        self.kinds.insert(chunk.conn, st);
    }

    /// An HTTP/1.1 `Upgrade: h2c` answered by 101 in this chunk: the request
    /// becomes stream 1 of the HTTP/2 connection that follows the 101 head.
    fn upgrade(&mut self, chunk: &Chunk, before: usize, out: &mut Vec<HttpExchange>) {
        let Some(i) = out[before..].iter().position(|e| {
            e.conn == chunk.conn
                && matches!(&e.outcome, Outcome::Upgraded { protocol } if protocol == "h2c")
        }) else {
            return;
        };
        let ex = out.remove(before + i);
        let data = &chunk.payload[..];
        // The 101 head ends this chunk's HTTP/1: find where.
        let head = find(data, b"HTTP/1.1 101")
            .and_then(|p| find(&data[p..], b"\r\n\r\n").map(|e| p + e + 4));
        let start = head.unwrap_or(data.len());
        self.http1.forget(&chunk.conn);
        self.http2.upgrade(chunk, ex, start, out);
        if let Some(st) = self.kinds.get_mut(&chunk.conn) {
            st.kind = Kind::Http2;
        }
    }

    /// Forgets protocol choices of connections neither decoder still tracks.
    fn sweep(&mut self) {
        let (h1, h2) = (&self.http1, &self.http2);
        self.kinds.retain(|id, st| match st.kind {
            Kind::Http1 => h1.contains(id),
            Kind::Http2 => h2.contains(id),
        });
    }

    pub fn expire(&mut self, now_ns: u64, idle_ns: u64, out: &mut Vec<HttpExchange>) {
        self.http1.expire(now_ns, idle_ns, out);
        self.http2.expire(now_ns, idle_ns, out);
        self.sweep();
    }

    pub fn counters(&self) -> AllCounters {
        AllCounters {
            http1: self.http1.counters(),
            http2: self.http2.counters(),
        }
    }

    pub fn tracked(&self) -> usize {
        self.http1.tracked() + self.http2.tracked()
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(Limits::default(), H2Limits::default())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Is this first chunk of a connection HTTP/2? `Some(Some(p))`: yes, from its
/// start, the frames begin at `p`; `Some(None)`: yes, joined mid-way; `None`:
/// leave it to HTTP/1 (which ignores what is not HTTP/1 either).
fn classify(chunk: &Chunk) -> Option<Option<usize>> {
    let d = &chunk.payload[..];
    let n = d.len().min(http2::PREFACE.len());
    if n >= 4 && d[..n] == http2::PREFACE[..n] {
        return Some(Some(0));
    }
    if !chunk.late_conn {
        // A server speaks first only in HTTP/2, and its first frame is SETTINGS.
        let server_first = matches!(
            (chunk.role, chunk.direction),
            (Role::Server, Direction::Egress)
                | (Role::Client, Direction::Ingress)
                | (Role::Unknown, _)
        );
        let settings_first = d.len() >= 9 && d[3] == 4 && d[5..9] == [0; 4];
        return (server_first && settings_first && http2::chain_ok(d, chunk.truncated))
            .then_some(Some(0));
    }
    // Joined mid-way: a run of frames from a frame boundary.
    http2::find_sync(d, chunk.truncated).map(|_| None)
}

/// A header as tests and callers build them; names lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// A request head was read, before any response: what the correlate stage
/// needs to give the request's span its ids then, so that calls made while it
/// is served can name it as their parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestStart {
    pub conn: ConnId,
    pub pid: u32,
    /// Thread that carried the first byte of the request.
    pub tid: u32,
    pub role: Role,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// HTTP/2 stream id; 0 for HTTP/1.
    pub stream: u32,
    pub request_first_ns: u64,
    /// Only the trace-context fields of the request (usually none: no allocation).
    pub context_headers: Headers,
}

impl RequestStart {
    pub fn of(ex: &HttpExchange) -> Self {
        let mut context_headers = Headers::default();
        for h in ex.request_headers.iter() {
            if crate::correlate::context::CONTEXT_HEADERS.contains(&h.name) {
                context_headers.push(h.name.as_bytes(), h.value.as_bytes());
            }
        }
        Self {
            conn: ex.conn,
            pid: ex.pid,
            tid: ex.tid,
            role: ex.role,
            local: ex.local,
            remote: ex.remote,
            stream: ex.stream(),
            request_first_ns: ex.request_first_ns,
            context_headers,
        }
    }
}

impl HttpExchange {
    /// HTTP/2 stream id; 0 for HTTP/1.
    pub fn stream(&self) -> u32 {
        match self.protocol {
            Protocol::Http2 { stream_id } => stream_id,
            Protocol::Http1 { .. } => 0,
        }
    }
}

/// One header of a [`Headers`] set, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderRef<'a> {
    pub name: &'a str,
    pub value: &'a str,
}

/// The header fields of one message, in order, in one buffer: names
/// lowercased, values lossy UTF-8. One allocation per message rather than two
/// per header, whichever protocol the fields came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    buf: String,
    /// (name start, value start, value end) in `buf`; the name ends where the value starts.
    fields: Vec<(u32, u32, u32)>,
}

impl Headers {
    /// Room for `fields` fields of `bytes` bytes in all, so that filling
    /// them allocates twice rather than at every doubling.
    pub fn reserve(&mut self, bytes: usize, fields: usize) {
        self.buf.reserve(bytes);
        self.fields.reserve(fields);
    }

    /// Appends a field; the name is lowercased.
    pub fn push(&mut self, name: &[u8], value: &[u8]) {
        let start = self.buf.len() as u32;
        match std::str::from_utf8(name) {
            Ok(n) if !n.bytes().any(|b| b.is_ascii_uppercase()) => self.buf.push_str(n),
            _ => {
                let n = String::from_utf8_lossy(name);
                self.buf.extend(n.chars().map(|c| c.to_ascii_lowercase()));
            }
        }
        let mid = self.buf.len() as u32;
        // Values are nearly always ASCII: validating is cheaper than the
        // lossy conversion's chunk walk.
        match std::str::from_utf8(value) {
            Ok(v) => self.buf.push_str(v),
            Err(_) => self.buf.push_str(&String::from_utf8_lossy(value)),
        }
        self.fields.push((start, mid, self.buf.len() as u32));
    }

    fn at(&self, i: usize) -> Option<HeaderRef<'_>> {
        let &(s, m, e) = self.fields.get(i)?;
        Some(HeaderRef {
            name: self.buf.get(s as usize..m as usize)?,
            value: self.buf.get(m as usize..e as usize)?,
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = HeaderRef<'_>> + '_ {
        (0..self.fields.len()).filter_map(|i| self.at(i))
    }

    /// Value of the first field named `name` (lowercase).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|h| h.name == name).map(|h| h.value)
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Bytes held (names and values), for bounds.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.fields.clear();
    }
}

impl<'a> FromIterator<&'a Header> for Headers {
    fn from_iter<I: IntoIterator<Item = &'a Header>>(iter: I) -> Self {
        let mut h = Headers::default();
        for x in iter {
            h.push(x.name.as_bytes(), x.value.as_bytes());
        }
        h
    }
}

impl<'a> FromIterator<(&'a str, &'a str)> for Headers {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a str)>>(iter: I) -> Self {
        let mut h = Headers::default();
        for (n, v) in iter {
            h.push(n.as_bytes(), v.as_bytes());
        }
        h
    }
}

/// The wire protocol of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x; `minor` is 0 or 1.
    Http1 { minor: u8 },
    /// HTTP/2, one exchange per stream.
    Http2 { stream_id: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Request and final response both complete.
    Complete,
    /// Connection closed (or expired) before the response completed.
    Aborted,
    /// HTTP/2: the stream was reset (RST_STREAM) or cut by GOAWAY; the code.
    Reset { code: u32 },
    /// 101 Switching Protocols (or 2xx to CONNECT): the protocol after this is not HTTP/1.
    /// `protocol` is the lowercased Upgrade header value ("websocket", "h2c", ...) or "connect".
    Upgraded { protocol: String },
}

/// One request/response exchange (an HTTP/1 message pair or an HTTP/2
/// stream) as ONE end of a connection saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpExchange {
    pub conn: ConnId,
    pub pid: u32,
    /// Thread that carried the first byte of the request.
    pub tid: u32,
    pub comm: Comm,
    /// Client: this process sent the request. Server: it received it.
    pub role: Role,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub protocol: Protocol,
    /// HTTP/2: `:method`; empty when it could not be decoded.
    pub method: String,
    /// Request-target exactly as sent, e.g. "/a?b=1" (or absolute-form for
    /// proxies); HTTP/2: `:path`.
    pub target: String,
    /// Request headers in order, WITHOUT sensitive ones. HTTP/2 keeps its
    /// pseudo-headers here (`:authority`, `:scheme`).
    pub request_headers: Headers,
    /// Final (non-1xx) status; None when no final response head was seen.
    /// A 101 that switched protocols is reported here too (Outcome::Upgraded).
    pub status: Option<u16>,
    pub response_headers: Headers,
    /// Trailer fields after the response body (HTTP/2, and chunked HTTP/1).
    pub trailers: Headers,
    /// Body bytes (after de-chunking: the payload bytes; holes counted too).
    pub request_body_bytes: u64,
    pub response_body_bytes: u64,
    /// Kernel monotonic ns of the first and last chunk carrying the message:
    /// for bytes this process SENT (egress) the syscall's entry (handed to the
    /// kernel), for bytes it RECEIVED (ingress) its exit (in the process). So a
    /// peer never receives before the sender's moment, on one clock.
    pub request_first_ns: u64,
    pub request_last_ns: u64,
    /// First and last byte of the FINAL response (1xx interim heads ignored).
    pub response_first_ns: Option<u64>,
    pub response_last_ns: Option<u64>,
    pub outcome: Outcome,
    /// Some header fields could not be decoded (HTTP/2: an HPACK entry the
    /// agent never saw): what is present is right, what is missing is unknown.
    pub incomplete: bool,
}
