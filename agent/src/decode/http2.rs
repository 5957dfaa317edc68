//! HTTP/2 decoder (RFC 9113): one connection's ordered capture chunks in,
//! one exchange per stream out.
//!
//! Hand-written because every HTTP/2 library (h2, nghttp2) is an endpoint: it
//! owns the connection, answers SETTINGS and PING, and tears the connection
//! down on the first protocol error. A tap sees both directions, cannot ask
//! anything, joins connections in the middle, and loses bytes (capture cap,
//! ring-buffer loss): it must keep frame sync by length, find it again after a
//! loss, and keep HPACK consistent (see `hpack`), never pairing a stream with
//! another stream's response.
//!
//! Per direction: a frame state machine that reads the 9-byte frame headers,
//! buffers (bounded) only the payloads it needs (HEADERS, CONTINUATION,
//! PUSH_PROMISE, SETTINGS, RST_STREAM, GOAWAY) and skips the rest by length,
//! so DATA beyond the capture cap costs nothing and loses no sync. Header
//! blocks are decoded with that direction's HPACK decoder, whatever the
//! stream, so the dynamic table follows the peer's encoder.
//!
//! Loss: bytes missing inside a DATA payload (or any payload we skip) are
//! skipped by count. Bytes missing where a frame we read or a frame header
//! was are a real loss: the direction's HPACK table becomes unknown, every
//! stream open on the connection is dropped and counted (its span could be
//! wrong), and if the frame header itself was lost the
//! direction resynchronises on a run of plausible frame headers.

use crate::capture::{Chunk, ChunkKind, ConnId, ConnMap, Direction, Role};

use super::{
    hpack::{Field, HpackDecoder},
    http1::is_sensitive,
    moment_ns, Headers, HttpExchange, Outcome, Protocol, RequestStart,
};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
/// SETTINGS_HEADER_TABLE_SIZE until a peer announces another.
const DEFAULT_TABLE_SIZE: u32 = 4096;
/// Largest frame length accepted as plausible (the protocol's maximum).
const MAX_FRAME_LEN: u32 = (1 << 24) - 1;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const PRIORITY: u8 = 2;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

/// Resource bounds: every buffer and table is capped by one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Limits {
    /// Streams tracked at once per connection; new ones beyond are dropped.
    pub max_streams: usize,
    /// Largest header block (HEADERS + CONTINUATION) buffered.
    pub max_header_block: usize,
    /// Connections tracked at once; the least recently active is evicted.
    pub max_connections: usize,
}

impl Default for H2Limits {
    fn default() -> Self {
        Self {
            max_streams: 1024,
            max_header_block: 64 * 1024,
            max_connections: 65536,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct H2Counters {
    /// Connections decoded as HTTP/2, and of those the ones joined mid-way.
    pub connections: u64,
    pub late_connections: u64,
    /// Connections switched from HTTP/1.1 by `Upgrade: h2c`.
    pub upgrades: u64,
    /// Exchanges (streams) emitted; of those, with fields HPACK could not decode.
    pub exchanges: u64,
    pub incomplete_exchanges: u64,
    pub frames: u64,
    /// Frame sync lost (a frame header fell into missing bytes), and found again.
    pub sync_lost: u64,
    pub resyncs: u64,
    /// Uncaptured bytes skipped by length inside payloads we do not read.
    pub bytes_skipped: u64,
    /// Header blocks not decoded: lost to missing bytes, oversized, or broken HPACK.
    pub header_blocks_lost: u64,
    pub oversized_header_blocks: u64,
    pub hpack_errors: u64,
    /// Streams not exported because bytes that may have belonged to them were lost.
    pub streams_damaged: u64,
    /// New streams ignored over `max_streams`, and connections evicted over `max_connections`.
    pub streams_over_limit: u64,
    pub dropped_connections: u64,
    /// Frames that break the protocol (CONTINUATION out of place, bad lengths).
    pub protocol_errors: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    len: u32,
    ty: u8,
    flags: u8,
    stream: u32,
}

fn parse_head(b: &[u8; FRAME_HEADER]) -> Head {
    Head {
        len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
        ty: b[3],
        flags: b[4],
        stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
    }
}

/// Could this be a frame header? Strict on purpose: resynchronising on
/// something that merely fits would misread every frame after it.
fn plausible(b: &[u8]) -> Option<Head> {
    let raw: &[u8; FRAME_HEADER] = b.get(..FRAME_HEADER)?.try_into().ok()?;
    if raw[5] & 0x80 != 0 {
        return None;
    }
    let h = parse_head(raw);
    let (allowed, on_stream, len_ok) = match h.ty {
        DATA => (END_STREAM | PADDED, Some(true), true),
        HEADERS => (
            END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG,
            Some(true),
            h.len > 0,
        ),
        PRIORITY => (0, Some(true), h.len == 5),
        RST_STREAM => (0, Some(true), h.len == 4),
        SETTINGS => (
            ACK,
            Some(false),
            h.len.is_multiple_of(6) && (h.flags & ACK == 0 || h.len == 0),
        ),
        PUSH_PROMISE => (END_HEADERS | PADDED, Some(true), h.len >= 4),
        PING => (ACK, Some(false), h.len == 8),
        GOAWAY => (0, Some(false), h.len >= 8),
        WINDOW_UPDATE => (0, None, h.len == 4),
        CONTINUATION => (END_HEADERS, Some(true), true),
        _ => return None,
    };
    let stream_ok = match on_stream {
        Some(true) => h.stream != 0,
        Some(false) => h.stream == 0,
        None => true,
    };
    (h.flags & !allowed == 0 && stream_ok && len_ok && h.len <= MAX_FRAME_LEN).then_some(h)
}

/// Start of a run of plausible frames in `b`: the frames from there must end
/// exactly at the end of `b` (a send or receive usually holds whole frames),
/// or, when `b` is cut (`open_end`), at least two must chain before it ends.
pub fn find_sync(b: &[u8], open_end: bool) -> Option<usize> {
    (0..b.len()).find(|&p| chain_ok(&b[p..], open_end))
}

/// Does a run of plausible frames start at `b[0]` and reach its end?
pub fn chain_ok(b: &[u8], open_end: bool) -> bool {
    let mut p = 0usize;
    let mut frames = 0;
    // Bounded: every step advances by at least one frame header.
    loop {
        if p == b.len() {
            return frames > 0;
        }
        let Some(h) = plausible(&b[p..]) else {
            return open_end && frames >= 2 && b.len() - p < FRAME_HEADER;
        };
        frames += 1;
        p += FRAME_HEADER + h.len as usize;
        if p > b.len() {
            return frames >= 2 || (open_end && frames >= 1 && h.ty == DATA);
        }
    }
}

/// Frame reading state of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Expecting the client preface (bytes of it still to come).
    Preface(usize),
    /// Reading a frame header (`have` bytes of it in `hdr`).
    Header,
    /// Buffering `need` payload bytes of `h`; then skipping `skip` more.
    Payload { h: Head, need: usize, skip: u64 },
    /// Skipping `left` payload bytes of `h` (DATA, or frames we do not read).
    /// `pad`: the first byte (pad length of a padded DATA frame) is still to
    /// come; `body`: payload bytes that count as body.
    Skip {
        h: Head,
        left: u64,
        pad: bool,
        body: u64,
    },
    /// Sync lost: waiting for a chunk with a plausible run of frames.
    Unsynced,
}

/// A header block being collected (HEADERS or PUSH_PROMISE + CONTINUATION).
#[derive(Debug, Default)]
struct Block {
    active: bool,
    stream: u32,
    end_stream: bool,
    push: bool,
    /// Too large or cut: decoding is skipped and the table becomes unknown.
    lost: bool,
    buf: Vec<u8>,
    first_ns: u64,
    tid: u32,
}

struct Dir {
    st: St,
    hdr: [u8; FRAME_HEADER],
    have: usize,
    payload: Vec<u8>,
    block: Block,
    hpack: HpackDecoder,
    scratch: Vec<u8>,
}

impl Dir {
    fn new(st: St, hpack: HpackDecoder) -> Self {
        Self {
            st,
            hdr: [0; FRAME_HEADER],
            have: 0,
            payload: Vec::new(),
            block: Block::default(),
            hpack,
            scratch: Vec::new(),
        }
    }
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Egress => 0,
        Direction::Ingress => 1,
    }
}

fn other(d: usize) -> usize {
    1 - d
}

struct Stream {
    id: u32,
    ex: HttpExchange,
    req_end: bool,
    resp_end: bool,
    /// The final (non-1xx) response head was seen; a later block is trailers.
    resp_final: bool,
}

/// What a header block said, gathered while HPACK decodes it.
#[derive(Default)]
struct Acc {
    method: Option<String>,
    path: Option<String>,
    status: Option<u16>,
    headers: Headers,
    incomplete: bool,
}

impl Acc {
    fn field(&mut self, f: Field<'_>) {
        let (Some(name), Some(value)) = (f.name, f.value) else {
            self.incomplete = true;
            return;
        };
        // Never-indexed fields are what the peer itself marks as sensitive.
        if f.never_indexed || is_sensitive(name) {
            return;
        }
        match name {
            b":method" => self.method = Some(String::from_utf8_lossy(value).into_owned()),
            b":path" => self.path = Some(String::from_utf8_lossy(value).into_owned()),
            b":status" => {
                self.status = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                if self.status.is_none() {
                    self.incomplete = true;
                }
            }
            _ => self.headers.push(name, value),
        }
    }
}

struct Conn {
    role: Role,
    /// Direction index (0 egress, 1 ingress) of client-to-server bytes, once known.
    client_dir: Option<usize>,
    dirs: [Dir; 2],
    streams: Vec<Stream>,
    last_ns: u64,
    tick: u64,
}

struct Ctx {
    limits: H2Limits,
    c: H2Counters,
    /// Request heads read since the dispatcher last took them.
    starts: Vec<RequestStart>,
}

impl Conn {
    fn new(chunk: &Chunk, late: bool, tick: u64) -> Self {
        let hp = || {
            if late {
                HpackDecoder::new_unknown(65536)
            } else {
                HpackDecoder::new(DEFAULT_TABLE_SIZE)
            }
        };
        let client_dir = match chunk.role {
            Role::Client => Some(dir_index(Direction::Egress)),
            Role::Server => Some(dir_index(Direction::Ingress)),
            Role::Unknown => None,
        };
        let start = |d: usize| {
            if late {
                St::Unsynced
            } else if client_dir == Some(d) || client_dir.is_none() {
                // With the role unknown, whichever side sends the preface is the client.
                St::Preface(0)
            } else {
                St::Header
            }
        };
        Self {
            role: chunk.role,
            client_dir,
            dirs: [Dir::new(start(0), hp()), Dir::new(start(1), hp())],
            streams: Vec::new(),
            last_ns: 0,
            tick,
        }
    }

    fn stream_mut(&mut self, id: u32) -> Option<&mut Stream> {
        self.streams.iter_mut().find(|s| s.id == id)
    }

    fn on_data(&mut self, ctx: &mut Ctx, chunk: &Chunk, start: usize, out: &mut Vec<HttpExchange>) {
        self.last_ns = self.last_ns.max(chunk.ts_exit_ns);
        let d = dir_index(chunk.direction);
        let data = &chunk.payload[..];
        let mut pos = start;
        while pos < data.len() {
            pos = self.step(ctx, d, chunk, pos, out);
        }
        let hole = chunk.len.saturating_sub(data.len() as u64);
        if hole > 0 {
            self.on_hole(ctx, d, hole, out);
        }
    }

    /// Advances the frame state machine of direction `d` over `chunk` from
    /// `pos`; returns the new position.
    fn step(
        &mut self,
        ctx: &mut Ctx,
        d: usize,
        chunk: &Chunk,
        pos: usize,
        out: &mut Vec<HttpExchange>,
    ) -> usize {
        let data = &chunk.payload[..];
        let rest = &data[pos..];
        match self.dirs[d].st {
            St::Unsynced => match find_sync(rest, chunk.truncated) {
                Some(p) => {
                    ctx.c.resyncs += 1;
                    self.dirs[d].st = St::Header;
                    self.dirs[d].have = 0;
                    pos + p
                }
                None => data.len(),
            },
            St::Preface(seen) => {
                let want = &PREFACE[seen..];
                let n = want.len().min(rest.len());
                if rest[..n] == want[..n] {
                    if self.client_dir.is_none() {
                        self.client_dir = Some(d);
                        // The other side then speaks frames from its first byte.
                        self.dirs[other(d)].st = St::Header;
                    }
                    self.dirs[d].st = if seen + n == PREFACE.len() {
                        St::Header
                    } else {
                        St::Preface(seen + n)
                    };
                    pos + n
                } else if seen == 0 {
                    // No preface (a server's side, or after an upgrade): frames from here.
                    self.dirs[d].st = St::Header;
                    pos
                } else {
                    ctx.c.protocol_errors += 1;
                    self.lose_sync(ctx, d);
                    pos
                }
            }
            St::Header => {
                let dir = &mut self.dirs[d];
                let n = (FRAME_HEADER - dir.have).min(rest.len());
                dir.hdr[dir.have..dir.have + n].copy_from_slice(&rest[..n]);
                dir.have += n;
                if dir.have == FRAME_HEADER {
                    dir.have = 0;
                    let h = parse_head(&dir.hdr);
                    self.begin_frame(ctx, d, h, chunk, out);
                }
                pos + n
            }
            St::Payload { h, need, skip } => {
                let dir = &mut self.dirs[d];
                if dir.payload.is_empty() && rest.len() >= need {
                    // The whole payload is in this chunk: no copy.
                    self.dirs[d].st = Self::after_payload(h, skip);
                    self.frame(ctx, d, h, &rest[..need], chunk, out);
                    return pos + need;
                }
                let n = (need - dir.payload.len()).min(rest.len());
                dir.payload.extend_from_slice(&rest[..n]);
                if dir.payload.len() == need {
                    let buf = std::mem::take(&mut dir.payload);
                    dir.st = Self::after_payload(h, skip);
                    self.frame(ctx, d, h, &buf, chunk, out);
                    let dir = &mut self.dirs[d];
                    dir.payload = buf;
                    dir.payload.clear();
                }
                pos + n
            }
            St::Skip { h, left, pad, body } => {
                let n = left.min(rest.len() as u64);
                let mut body = body;
                if pad && n > 0 {
                    let pad_len = u64::from(rest[0]);
                    body = body.saturating_sub(1 + pad_len);
                }
                let left = left - n;
                self.dirs[d].st = St::Skip {
                    h,
                    left,
                    pad: pad && n == 0,
                    body,
                };
                if left == 0 {
                    self.dirs[d].st = St::Header;
                    self.end_skip(ctx, d, h, body, chunk, out);
                }
                pos + n as usize
            }
        }
    }

    fn after_payload(h: Head, skip: u64) -> St {
        if skip > 0 {
            St::Skip {
                h,
                left: skip,
                pad: false,
                body: 0,
            }
        } else {
            St::Header
        }
    }

    /// A frame header was read: decide what to do with its payload.
    fn begin_frame(
        &mut self,
        ctx: &mut Ctx,
        d: usize,
        h: Head,
        chunk: &Chunk,
        out: &mut Vec<HttpExchange>,
    ) {
        ctx.c.frames += 1;
        if h.len > MAX_FRAME_LEN || (h.ty <= CONTINUATION && plausible(&self.dirs[d].hdr).is_none())
        {
            ctx.c.protocol_errors += 1;
            self.lose_sync(ctx, d);
            return;
        }
        // A header block must continue with CONTINUATION frames of its stream.
        let block = &self.dirs[d].block;
        if block.active && (h.ty != CONTINUATION || h.stream != block.stream) {
            ctx.c.protocol_errors += 1;
            self.lose_block(ctx, d);
        }
        let len = h.len as usize;
        let need = match h.ty {
            DATA => {
                if h.len == 0 {
                    self.end_skip(ctx, d, h, 0, chunk, out);
                } else {
                    let pad = h.flags & PADDED != 0;
                    self.dirs[d].st = St::Skip {
                        h,
                        left: u64::from(h.len),
                        pad,
                        body: u64::from(h.len),
                    };
                }
                return;
            }
            HEADERS | PUSH_PROMISE | CONTINUATION => {
                if len > ctx.limits.max_header_block {
                    ctx.c.oversized_header_blocks += 1;
                    self.mark_block_lost(ctx, d, h, chunk);
                    self.dirs[d].st = St::Skip {
                        h,
                        left: u64::from(h.len),
                        pad: false,
                        body: 0,
                    };
                    return;
                }
                len
            }
            SETTINGS => len.min(6 * 64),
            RST_STREAM => 4,
            GOAWAY => 8,
            _ => 0,
        };
        let skip = u64::from(h.len) - need as u64;
        if need == 0 {
            self.dirs[d].st = Self::after_payload(h, skip);
            self.frame(ctx, d, h, &[], chunk, out);
        } else {
            self.dirs[d].st = St::Payload { h, need, skip };
        }
    }

    /// The end of a frame whose payload was skipped (DATA and the like).
    fn end_skip(
        &mut self,
        ctx: &mut Ctx,
        d: usize,
        h: Head,
        body: u64,
        chunk: &Chunk,
        out: &mut Vec<HttpExchange>,
    ) {
        if h.ty == DATA {
            self.data_end(ctx, d, h, body, Some(moment_ns(chunk)), out);
        }
    }

    /// The end of a DATA frame of direction `d` with `body` payload bytes;
    /// `ts` is when it came (None when its end fell into missing bytes: the
    /// last moment seen then stands for it).
    fn data_end(
        &mut self,
        ctx: &mut Ctx,
        d: usize,
        h: Head,
        body: u64,
        ts: Option<u64>,
        out: &mut Vec<HttpExchange>,
    ) {
        let Some(client_dir) = self.client_dir else {
            return;
        };
        // An empty END_STREAM frame carries no byte of the message: the
        // message ended with its last byte (curl, for one, closes without
        // reading it once the content-length has arrived).
        let ts = ts.filter(|_| h.len > 0);
        let end = h.flags & END_STREAM != 0;
        if let Some(s) = self.stream_mut(h.stream) {
            if d == client_dir {
                s.ex.request_body_bytes += body;
                s.ex.request_last_ns = ts.unwrap_or(s.ex.request_last_ns);
                s.req_end |= end;
            } else {
                s.ex.response_body_bytes += body;
                s.ex.response_last_ns = ts.or(s.ex.response_last_ns);
                s.resp_end |= end;
            }
        }
        self.finish_if_done(ctx, h.stream, out);
    }

    /// A frame whose payload (or its first `need` bytes) we read.
    fn frame(
        &mut self,
        ctx: &mut Ctx,
        d: usize,
        h: Head,
        p: &[u8],
        chunk: &Chunk,
        out: &mut Vec<HttpExchange>,
    ) {
        match h.ty {
            HEADERS | PUSH_PROMISE => {
                let mut b = p;
                let mut pad = 0usize;
                if h.flags & PADDED != 0 {
                    pad = usize::from(b.first().copied().unwrap_or(0));
                    b = b.get(1..).unwrap_or_default();
                }
                if h.ty == HEADERS && h.flags & PRIORITY_FLAG != 0 {
                    b = b.get(5..).unwrap_or_default();
                }
                if h.ty == PUSH_PROMISE {
                    b = b.get(4..).unwrap_or_default();
                }
                let Some(frag) = b
                    .get(..b.len().saturating_sub(pad))
                    .filter(|_| pad <= b.len())
                else {
                    ctx.c.protocol_errors += 1;
                    self.mark_block_lost(ctx, d, h, chunk);
                    self.lose_block(ctx, d);
                    return;
                };
                let blk = &mut self.dirs[d].block;
                blk.active = true;
                blk.stream = h.stream;
                blk.end_stream = h.ty == HEADERS && h.flags & END_STREAM != 0;
                blk.push = h.ty == PUSH_PROMISE;
                blk.lost = false;
                blk.first_ns = moment_ns(chunk);
                blk.tid = chunk.tid;
                blk.buf.clear();
                self.fragment(ctx, d, h, frag, chunk, out);
            }
            CONTINUATION => {
                if !self.dirs[d].block.active {
                    ctx.c.protocol_errors += 1;
                    self.dirs[d].hpack.lose();
                    return;
                }
                self.fragment(ctx, d, h, p, chunk, out);
            }
            SETTINGS if h.flags & ACK == 0 => {
                for s in p.chunks_exact(6) {
                    let id = u16::from_be_bytes([s[0], s[1]]);
                    let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                    if id == 1 {
                        // The sender's decoder: it bounds the headers coming to it.
                        self.dirs[other(d)].hpack.set_max_table_size(v);
                    }
                }
            }
            RST_STREAM if p.len() == 4 => {
                let code = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                if let Some(i) = self.streams.iter().position(|s| s.id == h.stream) {
                    let mut s = self.streams.swap_remove(i);
                    // NO_ERROR after a complete response: the server just
                    // does not want the rest of the request (RFC 9113 §8.1).
                    s.req_end |= code == 0 && s.resp_end;
                    emit(ctx, out, s, Outcome::Reset { code });
                }
            }
            GOAWAY if p.len() == 8 => {
                let last = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff;
                let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                // Streams above `last` were never processed by the sender.
                let mut i = 0;
                while i < self.streams.len() {
                    if self.streams[i].id > last && self.client_dir.is_some_and(|c| other(c) == d) {
                        let s = self.streams.swap_remove(i);
                        emit(ctx, out, s, Outcome::Reset { code });
                    } else {
                        i += 1;
                    }
                }
            }
            _ => {}
        }
    }

    fn fragment(
        &mut self,
        ctx: &mut Ctx,
        d: usize,
        h: Head,
        frag: &[u8],
        chunk: &Chunk,
        out: &mut Vec<HttpExchange>,
    ) {
        let end = h.flags & END_HEADERS != 0;
        let max = ctx.limits.max_header_block;
        let blk = &mut self.dirs[d].block;
        if !blk.lost {
            if blk.buf.len() + frag.len() > max {
                ctx.c.oversized_header_blocks += 1;
                blk.lost = true;
                blk.buf.clear();
            } else if !(end && blk.buf.is_empty()) {
                blk.buf.extend_from_slice(frag);
            }
        }
        if !end {
            return;
        }
        let blk = std::mem::take(&mut self.dirs[d].block);
        if blk.lost {
            ctx.c.header_blocks_lost += 1;
            self.dirs[d].hpack.lose();
            self.damage(ctx, blk.stream);
            self.dirs[d].block = Block {
                buf: blk.buf,
                ..Block::default()
            };
            return;
        }
        let bytes: &[u8] = if blk.buf.is_empty() { frag } else { &blk.buf };
        let mut acc = Acc::default();
        let dir = &mut self.dirs[d];
        let r = dir.hpack.decode(bytes, &mut dir.scratch, |f| acc.field(f));
        let (stream, end_stream, push, first_ns, tid) =
            (blk.stream, blk.end_stream, blk.push, blk.first_ns, blk.tid);
        // Keep the buffer's capacity for the next block.
        let mut buf = blk.buf;
        buf.clear();
        self.dirs[d].block = Block {
            buf,
            ..Block::default()
        };
        if r.is_err() {
            ctx.c.hpack_errors += 1;
            ctx.c.header_blocks_lost += 1;
            self.damage(ctx, stream);
            return;
        }
        if push {
            // Promised streams are the server's own; their requests are not traced.
            return;
        }
        if self.client_dir.is_none() {
            // Role unknown and no preface: a request names its method.
            if acc.method.is_some() {
                self.client_dir = Some(d);
            } else if acc.status.is_some() {
                self.client_dir = Some(other(d));
            } else {
                return;
            }
        }
        let ts = moment_ns(chunk);
        if Some(d) == self.client_dir {
            self.request_block(ctx, stream, acc, end_stream, first_ns, tid, ts, chunk);
        } else {
            self.response_block(stream, acc, end_stream, first_ns, ts);
        }
        self.finish_if_done(ctx, stream, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn request_block(
        &mut self,
        ctx: &mut Ctx,
        id: u32,
        acc: Acc,
        end_stream: bool,
        first_ns: u64,
        tid: u32,
        ts: u64,
        chunk: &Chunk,
    ) {
        if let Some(s) = self.stream_mut(id) {
            // Request trailers.
            s.req_end |= end_stream;
            s.ex.request_last_ns = ts;
            s.ex.incomplete |= acc.incomplete;
            return;
        }
        // Only client-initiated (odd) streams carry requests.
        if id.is_multiple_of(2) {
            return;
        }
        if self.streams.len() >= ctx.limits.max_streams {
            ctx.c.streams_over_limit += 1;
            return;
        }
        let role = match self.role {
            Role::Unknown => {
                if self.client_dir == Some(dir_index(Direction::Egress)) {
                    Role::Client
                } else {
                    Role::Server
                }
            }
            r => r,
        };
        let ex = HttpExchange {
            conn: chunk.conn,
            pid: chunk.pid,
            tid,
            comm: chunk.comm,
            role,
            local: chunk.local,
            remote: chunk.remote,
            protocol: Protocol::Http2 { stream_id: id },
            incomplete: acc.incomplete || acc.method.is_none() || acc.path.is_none(),
            method: acc.method.unwrap_or_default(),
            target: acc.path.unwrap_or_default(),
            request_headers: acc.headers,
            status: None,
            response_headers: Headers::default(),
            trailers: Headers::default(),
            request_body_bytes: 0,
            response_body_bytes: 0,
            request_first_ns: first_ns,
            request_last_ns: ts,
            response_first_ns: None,
            response_last_ns: None,
            outcome: Outcome::Aborted,
        };
        ctx.starts.push(RequestStart::of(&ex));
        self.streams.push(Stream {
            id,
            ex,
            req_end: end_stream,
            resp_end: false,
            resp_final: false,
        });
    }

    fn response_block(&mut self, id: u32, acc: Acc, end_stream: bool, first_ns: u64, ts: u64) {
        let Some(s) = self.stream_mut(id) else { return };
        if s.resp_final {
            s.ex.trailers = acc.headers;
        } else {
            match acc.status {
                Some(st) if (100..200).contains(&st) => return,
                Some(st) => s.ex.status = Some(st),
                None => s.ex.incomplete = true,
            }
            s.resp_final = true;
            s.ex.response_headers = acc.headers;
            s.ex.response_first_ns = Some(first_ns);
        }
        s.ex.incomplete |= acc.incomplete;
        s.ex.response_last_ns = Some(ts);
        s.resp_end |= end_stream;
    }

    fn finish_if_done(&mut self, ctx: &mut Ctx, id: u32, out: &mut Vec<HttpExchange>) {
        if let Some(i) = self
            .streams
            .iter()
            .position(|s| s.id == id && s.req_end && s.resp_end)
        {
            let s = self.streams.swap_remove(i);
            emit(ctx, out, s, Outcome::Complete);
        }
    }

    /// A header block for `stream` was lost: what its span would say could
    /// be wrong, so it is dropped now (later frames of it are ignored).
    fn damage(&mut self, ctx: &mut Ctx, stream: u32) {
        if let Some(i) = self.streams.iter().position(|s| s.id == stream) {
            self.streams.swap_remove(i);
            ctx.c.streams_damaged += 1;
        }
    }

    /// Frames of any stream may have been lost: every open stream is dropped.
    fn damage_all(&mut self, ctx: &mut Ctx) {
        ctx.c.streams_damaged += self.streams.len() as u64;
        self.streams.clear();
    }

    fn mark_block_lost(&mut self, ctx: &mut Ctx, d: usize, h: Head, chunk: &Chunk) {
        let blk = &mut self.dirs[d].block;
        if h.ty != CONTINUATION {
            blk.stream = h.stream;
            blk.first_ns = moment_ns(chunk);
            blk.tid = chunk.tid;
            blk.end_stream = h.ty == HEADERS && h.flags & END_STREAM != 0;
            blk.push = h.ty == PUSH_PROMISE;
        }
        blk.active = true;
        blk.lost = true;
        blk.buf.clear();
        if h.flags & END_HEADERS != 0 {
            self.lose_block(ctx, d);
        }
    }

    /// The header block being collected cannot be decoded.
    fn lose_block(&mut self, ctx: &mut Ctx, d: usize) {
        let stream = self.dirs[d].block.stream;
        let buf = std::mem::take(&mut self.dirs[d].block.buf);
        self.dirs[d].block = Block {
            buf,
            ..Block::default()
        };
        ctx.c.header_blocks_lost += 1;
        self.dirs[d].hpack.lose();
        self.damage(ctx, stream);
    }

    /// Frames of unknown kind were lost in direction `d`.
    fn lose_sync(&mut self, ctx: &mut Ctx, d: usize) {
        ctx.c.sync_lost += 1;
        if self.dirs[d].block.active {
            self.lose_block(ctx, d);
        }
        self.dirs[d].hpack.lose();
        self.dirs[d].payload.clear();
        self.dirs[d].have = 0;
        self.dirs[d].st = St::Unsynced;
        self.damage_all(ctx);
    }

    /// `hole` bytes of direction `d` were not captured, right after what was.
    fn on_hole(&mut self, ctx: &mut Ctx, d: usize, mut hole: u64, out: &mut Vec<HttpExchange>) {
        // Bounded: each round consumes the current frame's rest or ends.
        loop {
            match self.dirs[d].st {
                St::Unsynced => return,
                St::Skip { h, left, pad, body } => {
                    let n = left.min(hole);
                    ctx.c.bytes_skipped += n;
                    hole -= n;
                    let left = left - n;
                    // A lost pad length: the body count may include padding.
                    self.dirs[d].st = St::Skip {
                        h,
                        left,
                        pad: pad && n == 0,
                        body,
                    };
                    if left > 0 {
                        return;
                    }
                    self.dirs[d].st = St::Header;
                    if h.ty == DATA {
                        self.data_end(ctx, d, h, body, None, out);
                    }
                    if hole == 0 {
                        return;
                    }
                }
                St::Payload { h, need, skip } => {
                    // A frame we had to read is cut: what it said is lost.
                    let have = self.dirs[d].payload.len();
                    self.dirs[d].payload.clear();
                    let rest = (need - have) as u64 + skip;
                    if matches!(h.ty, HEADERS | PUSH_PROMISE | CONTINUATION) {
                        self.dirs[d].block.active = true;
                        self.dirs[d].block.stream = h.stream;
                        self.lose_block(ctx, d);
                    } else {
                        self.damage_all(ctx);
                    }
                    self.dirs[d].st = St::Skip {
                        h,
                        left: rest,
                        pad: false,
                        body: 0,
                    };
                }
                St::Header | St::Preface(_) => {
                    // Whole frames may be in the hole.
                    self.lose_sync(ctx, d);
                    return;
                }
            }
        }
    }

    /// The traced process closed its socket: open streams end unanswered.
    fn close(self, ctx: &mut Ctx, out: &mut Vec<HttpExchange>) {
        // Clients such as curl close without reading the END_STREAM that
        // follows a body of the announced content-length.
        let full = |h: &Headers, got: u64| {
            h.get("content-length")
                .and_then(|v| v.trim().parse::<u64>().ok())
                == Some(got)
        };
        for mut s in self.streams {
            s.req_end |= full(&s.ex.request_headers, s.ex.request_body_bytes);
            s.resp_end |= s.resp_final && full(&s.ex.response_headers, s.ex.response_body_bytes);
            emit(ctx, out, s, Outcome::Aborted);
        }
    }
}

fn emit(ctx: &mut Ctx, out: &mut Vec<HttpExchange>, s: Stream, outcome: Outcome) {
    let mut ex = s.ex;
    ex.outcome = if s.req_end && s.resp_end {
        Outcome::Complete
    } else {
        outcome
    };
    ctx.c.exchanges += 1;
    if ex.incomplete {
        ctx.c.incomplete_exchanges += 1;
    }
    out.push(ex);
}

/// HTTP/2 decoder over all connections that the dispatcher hands it.
pub struct Http2Decoder {
    ctx: Ctx,
    conns: ConnMap<Conn>,
    tick: u64,
}

impl Http2Decoder {
    pub fn new(limits: H2Limits) -> Self {
        Self {
            ctx: Ctx {
                limits,
                c: H2Counters::default(),
                starts: Vec::new(),
            },
            conns: ConnMap::default(),
            tick: 0,
        }
    }

    /// Starts decoding a connection at `start` in `chunk`: from its start
    /// (`late` false: tables empty, preface expected from the client) or
    /// joined mid-way (tables unknown, sync searched for).
    pub fn start(&mut self, chunk: &Chunk, late: bool, start: usize, out: &mut Vec<HttpExchange>) {
        self.make_room(out);
        self.tick += 1;
        let mut conn = Conn::new(chunk, late, self.tick);
        self.ctx.c.connections += 1;
        if late {
            self.ctx.c.late_connections += 1;
        }
        conn.on_data(&mut self.ctx, chunk, start, out);
        self.conns.insert(chunk.conn, conn);
    }

    /// `Upgrade: h2c` was answered with 101: the upgrading request is stream
    /// 1, its response comes in HTTP/2 from `start` in `chunk` (the 101 head's end).
    pub fn upgrade(
        &mut self,
        chunk: &Chunk,
        mut request: HttpExchange,
        start: usize,
        out: &mut Vec<HttpExchange>,
    ) {
        self.make_room(out);
        self.tick += 1;
        let mut conn = Conn::new(chunk, false, self.tick);
        self.ctx.c.connections += 1;
        self.ctx.c.upgrades += 1;
        request.protocol = Protocol::Http2 { stream_id: 1 };
        request.status = None;
        request.response_headers = Headers::default();
        request.response_first_ns = None;
        request.response_last_ns = None;
        conn.role = request.role;
        conn.client_dir = Some(dir_index(match request.role {
            Role::Server => Direction::Ingress,
            _ => Direction::Egress,
        }));
        if let Some(c) = conn.client_dir {
            conn.dirs[c].st = St::Preface(0);
            conn.dirs[other(c)].st = St::Header;
        }
        conn.streams.push(Stream {
            id: 1,
            ex: request,
            req_end: true,
            resp_end: false,
            resp_final: false,
        });
        conn.on_data(&mut self.ctx, chunk, start, out);
        self.conns.insert(chunk.conn, conn);
    }

    fn make_room(&mut self, out: &mut Vec<HttpExchange>) {
        while self.conns.len() >= self.ctx.limits.max_connections.max(1) {
            let Some(victim) = self
                .conns
                .iter()
                .min_by_key(|(_, c)| c.tick)
                .map(|(id, _)| *id)
            else {
                break;
            };
            if let Some(c) = self.conns.remove(&victim) {
                self.ctx.c.dropped_connections += 1;
                c.close(&mut self.ctx, out);
            }
        }
    }

    /// Is this connection decoded here?
    pub fn contains(&self, conn: &ConnId) -> bool {
        self.conns.contains_key(conn)
    }

    /// Feeds one chunk of a connection decoded here (in order).
    pub fn push(&mut self, chunk: &Chunk, out: &mut Vec<HttpExchange>) {
        if chunk.kind == ChunkKind::Close {
            if let Some(c) = self.conns.remove(&chunk.conn) {
                c.close(&mut self.ctx, out);
            }
            return;
        }
        self.tick += 1;
        if let Some(c) = self.conns.get_mut(&chunk.conn) {
            c.tick = self.tick;
            c.on_data(&mut self.ctx, chunk, 0, out);
        }
    }

    /// Bytes of a connection's direction that were never captured (a gap the
    /// chunk positions reveal), before the chunk that comes next.
    pub fn gap(
        &mut self,
        conn: &ConnId,
        direction: Direction,
        bytes: u64,
        out: &mut Vec<HttpExchange>,
    ) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.on_hole(&mut self.ctx, dir_index(direction), bytes, out);
        }
    }

    /// Forgets connections idle since before `now_ns - idle_ns`; their open
    /// streams end as aborted.
    pub fn expire(&mut self, now_ns: u64, idle_ns: u64, out: &mut Vec<HttpExchange>) {
        let cutoff = now_ns.saturating_sub(idle_ns);
        let mut stale: Vec<(u64, ConnId)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.last_ns < cutoff)
            .map(|(id, c)| (c.tick, *id))
            .collect();
        stale.sort_unstable();
        for (_, id) in stale {
            if let Some(c) = self.conns.remove(&id) {
                c.close(&mut self.ctx, out);
            }
        }
    }

    pub fn counters(&self) -> H2Counters {
        self.ctx.c
    }

    /// Takes the request starts of the chunks fed since the last call.
    pub fn starts(&mut self) -> std::vec::Drain<'_, RequestStart> {
        self.ctx.starts.drain(..)
    }

    pub fn tracked(&self) -> usize {
        self.conns.len()
    }
}

impl Default for Http2Decoder {
    fn default() -> Self {
        Self::new(H2Limits::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Decoder;
    use std::net::SocketAddr;

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// HPACK literal without indexing, new name, raw strings.
    fn lit(name: &str, value: &str) -> Vec<u8> {
        let mut v = vec![0x00, name.len() as u8];
        v.extend_from_slice(name.as_bytes());
        v.push(value.len() as u8);
        v.extend_from_slice(value.as_bytes());
        v
    }

    /// HPACK literal WITH incremental indexing, new name.
    fn lit_idx(name: &str, value: &str) -> Vec<u8> {
        let mut v = lit(name, value);
        v[0] = 0x40;
        v
    }

    /// A request block: GET (static 2) or POST (3), :scheme http (6), a path and authority.
    fn req_block(post: bool, path: &str, extra: &[u8]) -> Vec<u8> {
        let mut b = vec![if post { 0x83 } else { 0x82 }, 0x86];
        b.extend(lit(":path", path));
        b.extend(lit(":authority", "svc:50051"));
        b.extend_from_slice(extra);
        b
    }

    fn status_block(status: &str, extra: &[u8]) -> Vec<u8> {
        let mut b = lit(":status", status);
        b.extend_from_slice(extra);
        b
    }

    const CLIENT: ([u8; 4], u16) = ([127, 0, 0, 1], 40000);
    const SERVER: ([u8; 4], u16) = ([127, 0, 0, 1], 50051);

    struct Tap {
        dec: Decoder,
        out: Vec<HttpExchange>,
        role: Role,
        late: bool,
        t: u64,
    }

    impl Tap {
        fn new(role: Role) -> Self {
            Tap {
                dec: Decoder::default(),
                out: Vec::new(),
                role,
                late: false,
                t: 1000,
            }
        }

        fn chunk(&mut self, dir: Direction, payload: &[u8], len: u64) -> Chunk {
            let (local, remote) = match self.role {
                Role::Server => (SocketAddr::from(SERVER), SocketAddr::from(CLIENT)),
                _ => (SocketAddr::from(CLIENT), SocketAddr::from(SERVER)),
            };
            self.t += 100;
            Chunk {
                conn: ConnId {
                    sock: 1,
                    start_ns: 1,
                },
                kind: ChunkKind::Data,
                seq: 0,
                ts_enter_ns: self.t,
                ts_exit_ns: self.t + 5,
                pid: 7,
                tid: 8,
                comm: "grpc".into(),
                fd: 3,
                role: self.role,
                direction: dir,
                syscall: 1,
                len,
                truncated: len > payload.len() as u64,
                late_conn: self.late,
                local,
                remote,
                pos: 0,
                peer_pos: 0,
                has_pos: false,
                payload: bytes::Bytes::copy_from_slice(payload),
            }
        }

        fn send(&mut self, dir: Direction, payload: &[u8]) {
            let c = self.chunk(dir, payload, payload.len() as u64);
            self.dec.push(&c, &mut self.out);
        }

        /// `payload` captured of `len` bytes moved.
        fn send_cut(&mut self, dir: Direction, payload: &[u8], len: u64) {
            let c = self.chunk(dir, payload, len);
            self.dec.push(&c, &mut self.out);
        }

        fn h2(&self) -> H2Counters {
            self.dec.counters().http2
        }
    }

    /// Client side: requests are egress.
    const REQ: Direction = Direction::Egress;
    const RESP: Direction = Direction::Ingress;

    fn client_start(tap: &mut Tap) {
        let mut p = PREFACE.to_vec();
        p.extend(frame(SETTINGS, 0, 0, &[0, 1, 0, 0, 0x10, 0]));
        tap.send(REQ, &p);
        tap.send(RESP, &frame(SETTINGS, 0, 0, &[]));
    }

    fn summary(ex: &HttpExchange) -> (Protocol, &str, &str, Option<u16>, u64, Outcome) {
        (
            ex.protocol,
            ex.method.as_str(),
            ex.target.as_str(),
            ex.status,
            ex.response_body_bytes,
            ex.outcome.clone(),
        )
    }

    #[test]
    fn one_stream_both_orders_of_split_and_coalesced_input() {
        let mut client = PREFACE.to_vec();
        client.extend(frame(SETTINGS, 0, 0, &[]));
        client.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &req_block(false, "/a?x=1", &lit("user-agent", "t/1")),
        ));
        let mut server = frame(SETTINGS, 0, 0, &[]);
        server.extend(frame(SETTINGS, ACK, 0, &[]));
        server.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &status_block("200", &lit("content-type", "text/plain")),
        ));
        server.extend(frame(DATA, 0, 1, b"hello"));
        server.extend(frame(DATA, END_STREAM, 1, b"!"));
        // Every split point of each direction, one byte at a time included.
        // (A first chunk of fewer than 4 bytes is not recognised as a preface.)
        for split in (4..client.len()).step_by(7).chain([client.len()]) {
            let mut tap = Tap::new(Role::Client);
            tap.send(REQ, &client[..split]);
            if split < client.len() {
                tap.send(REQ, &client[split..]);
            }
            for piece in server.chunks(split.min(server.len())) {
                tap.send(RESP, piece);
            }
            assert_eq!(tap.out.len(), 1, "split {split}: {:?}", tap.h2());
            let ex = &tap.out[0];
            assert_eq!(
                summary(ex),
                (
                    Protocol::Http2 { stream_id: 1 },
                    "GET",
                    "/a?x=1",
                    Some(200),
                    6,
                    Outcome::Complete
                ),
                "split {split}"
            );
            assert_eq!(ex.request_headers.get(":authority"), Some("svc:50051"));
            assert_eq!(ex.request_headers.get(":scheme"), Some("http"));
            assert_eq!(ex.request_headers.get("user-agent"), Some("t/1"));
            assert_eq!(ex.response_headers.get("content-type"), Some("text/plain"));
            assert!(!ex.incomplete);
            assert_eq!(ex.role, Role::Client);
            assert!(ex.response_first_ns.unwrap() >= ex.request_first_ns);
        }
    }

    #[test]
    fn interleaved_streams_grpc_trailers_resets_and_goaway() {
        let mut tap = Tap::new(Role::Server);
        // Server side: requests are ingress.
        let (req, resp) = (Direction::Ingress, Direction::Egress);
        let mut p = PREFACE.to_vec();
        p.extend(frame(SETTINGS, 0, 0, &[]));
        tap.send(req, &p);
        let grpc = lit("content-type", "application/grpc");
        let mut burst = Vec::new();
        for id in [1u32, 3, 5, 7, 9] {
            burst.extend(frame(
                HEADERS,
                END_HEADERS,
                id,
                &req_block(true, &format!("/demo.Echo/M{id}"), &grpc),
            ));
            burst.extend(frame(DATA, END_STREAM, id, &[0, 0, 0, 0, 2, 8, 1]));
        }
        tap.send(req, &burst);
        // Stream 5: Trailers-Only error; 3: headers, data, trailers; 1: RST by the client.
        tap.send(
            resp,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                5,
                &status_block("200", &lit("grpc-status", "5")),
            ),
        );
        tap.send(
            resp,
            &frame(HEADERS, END_HEADERS, 3, &status_block("200", &grpc)),
        );
        tap.send(resp, &frame(DATA, 0, 3, &[0, 0, 0, 0, 1, 7]));
        tap.send(req, &frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()));
        tap.send(
            resp,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                3,
                &lit("grpc-status", "0"),
            ),
        );
        // GOAWAY from the server: stream 7 was processed, 9 was not.
        let mut ga = 7u32.to_be_bytes().to_vec();
        ga.extend(0u32.to_be_bytes());
        tap.send(resp, &frame(GOAWAY, 0, 0, &ga));
        tap.send(
            resp,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                7,
                &status_block("200", &lit("grpc-status", "0")),
            ),
        );
        type Got<'a> = (u32, &'a str, Option<u16>, Outcome, Option<&'a str>);
        let got: Vec<Got<'_>> = tap
            .out
            .iter()
            .map(|e| match e.protocol {
                Protocol::Http2 { stream_id } => (
                    stream_id,
                    e.target.as_str(),
                    e.status,
                    e.outcome.clone(),
                    e.trailers
                        .get("grpc-status")
                        .or(e.response_headers.get("grpc-status")),
                ),
                _ => panic!("not h2"),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (5, "/demo.Echo/M5", Some(200), Outcome::Complete, Some("5")),
                (1, "/demo.Echo/M1", None, Outcome::Reset { code: 8 }, None),
                (3, "/demo.Echo/M3", Some(200), Outcome::Complete, Some("0")),
                (9, "/demo.Echo/M9", None, Outcome::Reset { code: 0 }, None),
                (7, "/demo.Echo/M7", Some(200), Outcome::Complete, Some("0")),
            ]
        );
        assert!(tap
            .out
            .iter()
            .all(|e| e.role == Role::Server && e.request_body_bytes == 7));
        assert_eq!(tap.out[2].response_body_bytes, 6);
    }

    #[test]
    fn padding_priority_continuation_and_interim_heads() {
        let mut tap = Tap::new(Role::Client);
        client_start(&mut tap);
        let block = req_block(false, "/long", &lit("x-long", &"v".repeat(100)));
        let (a, b) = block.split_at(10);
        // HEADERS padded with priority, then a CONTINUATION.
        let mut hp = vec![3u8];
        hp.extend([0, 0, 0, 0, 16]);
        hp.extend_from_slice(a);
        hp.extend([0, 0, 0]);
        let mut s = frame(HEADERS, PADDED | PRIORITY_FLAG | END_STREAM, 1, &hp);
        s.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        tap.send(REQ, &s);
        tap.send(
            RESP,
            &frame(HEADERS, END_HEADERS, 1, &status_block("103", &[])),
        );
        tap.send(
            RESP,
            &frame(HEADERS, END_HEADERS, 1, &status_block("404", &[])),
        );
        let mut dp = vec![4u8];
        dp.extend(b"body");
        dp.extend([0; 4]);
        tap.send(RESP, &frame(DATA, PADDED | END_STREAM, 1, &dp));
        assert_eq!(tap.out.len(), 1, "{:?}", tap.h2());
        assert_eq!(
            summary(&tap.out[0]),
            (
                Protocol::Http2 { stream_id: 1 },
                "GET",
                "/long",
                Some(404),
                4,
                Outcome::Complete
            )
        );
        assert_eq!(
            tap.out[0].request_headers.get("x-long").map(str::len),
            Some(100)
        );
    }

    #[test]
    fn data_beyond_the_capture_cap_is_skipped_without_losing_sync() {
        let mut tap = Tap::new(Role::Client);
        client_start(&mut tap);
        tap.send(
            REQ,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &req_block(false, "/big", &[]),
            ),
        );
        let mut resp = frame(HEADERS, END_HEADERS, 1, &status_block("200", &[]));
        resp.extend(frame(DATA, END_STREAM, 1, &vec![b'x'; 100_000]));
        // Captured: the first 4096 bytes; the syscall moved all of it.
        tap.send_cut(RESP, &resp[..4096], resp.len() as u64);
        tap.send(
            REQ,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                3,
                &req_block(false, "/next", &[]),
            ),
        );
        tap.send(
            RESP,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                3,
                &status_block("204", &[]),
            ),
        );
        let got: Vec<_> = tap.out.iter().map(summary).collect();
        assert_eq!(
            got[0],
            (
                Protocol::Http2 { stream_id: 1 },
                "GET",
                "/big",
                Some(200),
                100_000,
                Outcome::Complete
            )
        );
        assert_eq!(
            got[1],
            (
                Protocol::Http2 { stream_id: 3 },
                "GET",
                "/next",
                Some(204),
                0,
                Outcome::Complete
            )
        );
        assert_eq!(tap.h2().sync_lost, 0);
    }

    #[test]
    fn a_lost_header_block_damages_its_stream_only_and_sync_holds() {
        let mut tap = Tap::new(Role::Client);
        client_start(&mut tap);
        tap.send(
            REQ,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &req_block(false, "/one", &[]),
            ),
        );
        // A response header block cut by the capture cap: the frame length
        // keeps sync, but the block (which indexes a new entry) is lost.
        let blk = status_block("200", &lit_idx("x-big", &"y".repeat(120)));
        let f = frame(HEADERS, END_HEADERS | END_STREAM, 1, &blk);
        tap.send_cut(RESP, &f[..40], f.len() as u64);
        tap.send(
            REQ,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                3,
                &req_block(false, "/two", &[]),
            ),
        );
        // Refers to the dynamic entry (index 62) the lost block inserted: unknown.
        let mut b = status_block("200", &[]);
        b.push(0x80 | 62);
        tap.send(RESP, &frame(HEADERS, END_HEADERS | END_STREAM, 3, &b));
        assert_eq!(tap.out.len(), 1, "stream 1 is not exported: {:?}", tap.h2());
        let ex = &tap.out[0];
        assert_eq!(
            summary(ex),
            (
                Protocol::Http2 { stream_id: 3 },
                "GET",
                "/two",
                Some(200),
                0,
                Outcome::Complete
            )
        );
        assert!(ex.incomplete && ex.response_headers.get("x-big").is_none());
        let c = tap.h2();
        assert_eq!(
            (c.streams_damaged, c.header_blocks_lost, c.sync_lost),
            (1, 1, 0)
        );
    }

    #[test]
    fn a_hole_over_frame_headers_resyncs_and_drops_open_streams() {
        let mut tap = Tap::new(Role::Client);
        client_start(&mut tap);
        tap.send(
            REQ,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &req_block(false, "/one", &[]),
            ),
        );
        tap.send(
            REQ,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                3,
                &req_block(false, "/two", &[]),
            ),
        );
        let mut r = frame(HEADERS, END_HEADERS, 1, &status_block("500", &[]));
        r.extend(frame(DATA, 0, 1, b"abc"));
        // Everything past the first DATA frame's header is lost, frames included.
        tap.send_cut(RESP, &r[..r.len() - 3], r.len() as u64 + 200);
        let mut next = frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            3,
            &status_block("200", &[]),
        );
        next.extend(frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0]));
        tap.send(RESP, &next);
        tap.send(
            REQ,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                5,
                &req_block(false, "/three", &[]),
            ),
        );
        tap.send(
            RESP,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                5,
                &status_block("201", &[]),
            ),
        );
        let got: Vec<_> = tap.out.iter().map(summary).collect();
        assert_eq!(
            got,
            vec![(
                Protocol::Http2 { stream_id: 5 },
                "GET",
                "/three",
                Some(201),
                0,
                Outcome::Complete
            )]
        );
        let c = tap.h2();
        assert_eq!(
            (c.sync_lost, c.resyncs, c.streams_damaged),
            (1, 1, 2),
            "{c:?}"
        );
    }

    #[test]
    fn joined_mid_connection_decodes_what_it_can_and_learns_new_entries() {
        let mut tap = Tap::new(Role::Server);
        tap.late = true;
        let (req, resp) = (Direction::Ingress, Direction::Egress);
        // A request referring to a dynamic entry from before the agent (63),
        // and inserting a new one the next request refers to (62 then).
        let mut b = req_block(true, "/demo.Echo/Unary", &[0x80 | 63]);
        b.extend(lit_idx("content-type", "application/grpc"));
        let mut first = frame(HEADERS, END_HEADERS, 11, &b);
        first.extend(frame(DATA, END_STREAM, 11, &[0, 0, 0, 0, 0]));
        tap.send(req, &first);
        tap.send(
            resp,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                11,
                &status_block("200", &lit("grpc-status", "0")),
            ),
        );
        let mut b2 = req_block(true, "/demo.Echo/Unary", &[0x80 | 62]);
        b2.extend(lit("te", "trailers"));
        tap.send(req, &frame(HEADERS, END_HEADERS | END_STREAM, 13, &b2));
        tap.send(
            resp,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                13,
                &status_block("200", &lit("grpc-status", "0")),
            ),
        );
        assert_eq!(tap.out.len(), 2, "{:?}", tap.h2());
        let (a, b) = (&tap.out[0], &tap.out[1]);
        assert!(a.incomplete, "index 63 was never seen");
        assert_eq!(
            a.request_headers.get("content-type"),
            Some("application/grpc")
        );
        assert!(!b.incomplete, "index 62 was learnt after the attach");
        assert_eq!(
            b.request_headers.get("content-type"),
            Some("application/grpc")
        );
        for e in [a, b] {
            assert_eq!(
                (e.method.as_str(), e.target.as_str(), e.status),
                ("POST", "/demo.Echo/Unary", Some(200))
            );
        }
        assert_eq!(tap.h2().late_connections, 1);
    }

    #[test]
    fn h2c_upgrade_makes_the_request_stream_one() {
        let mut tap = Tap::new(Role::Client);
        tap.send(REQ, b"GET /up HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n");
        let mut r =
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                .to_vec();
        r.extend(frame(SETTINGS, 0, 0, &[]));
        r.extend(frame(HEADERS, END_HEADERS, 1, &status_block("200", &[])));
        tap.send(RESP, &r);
        let mut p = PREFACE.to_vec();
        p.extend(frame(SETTINGS, 0, 0, &[]));
        tap.send(REQ, &p);
        tap.send(RESP, &frame(DATA, END_STREAM, 1, b"ok"));
        assert_eq!(tap.out.len(), 1, "{:?}", tap.dec.counters());
        assert_eq!(
            summary(&tap.out[0]),
            (
                Protocol::Http2 { stream_id: 1 },
                "GET",
                "/up",
                Some(200),
                2,
                Outcome::Complete
            )
        );
        assert_eq!(tap.h2().upgrades, 1);
        assert_eq!(
            tap.dec.tracked(),
            1,
            "the HTTP/1 decoder let the connection go"
        );
    }

    #[test]
    fn close_aborts_open_streams_and_sensitive_fields_are_dropped() {
        let mut tap = Tap::new(Role::Client);
        client_start(&mut tap);
        let mut extra = lit("authorization", "Bearer s3cr3t");
        extra.extend([0x10, 1, b'x', 1, b'y']); // never indexed: x: y
        tap.send(
            REQ,
            &frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &req_block(false, "/a", &extra),
            ),
        );
        let mut c = tap.chunk(REQ, b"", 0);
        c.kind = ChunkKind::Close;
        tap.dec.push(&c, &mut tap.out);
        assert_eq!(tap.out.len(), 1);
        assert_eq!(tap.out[0].outcome, Outcome::Aborted);
        let dump = format!("{:?}", tap.out[0]);
        assert!(
            !dump.contains("s3cr3t") && tap.out[0].request_headers.get("x").is_none(),
            "{dump}"
        );
        assert_eq!(tap.dec.tracked(), 0);
    }

    #[test]
    fn garbage_and_hostile_frames_never_panic_and_stay_bounded() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..200 {
            let mut tap = Tap::new(if round % 2 == 0 {
                Role::Client
            } else {
                Role::Server
            });
            client_start(&mut tap);
            for _ in 0..50 {
                let n = (rnd() % 300) as usize;
                let mut b: Vec<u8> = (0..n).map(|_| rnd() as u8).collect();
                if rnd() % 3 == 0 {
                    // Plausible headers with hostile contents.
                    let ty = (rnd() % 10) as u8;
                    b = frame(ty, rnd() as u8 & 0x2d, (rnd() % 8) as u32, &b);
                }
                let dir = if rnd() % 2 == 0 { REQ } else { RESP };
                let extra = if rnd() % 5 == 0 { rnd() % 1000 } else { 0 };
                tap.send_cut(dir, &b, b.len() as u64 + extra);
            }
            assert!(tap.dec.tracked() <= 1);
        }
        // A flood of streams that never end stays within the stream bound.
        let mut tap = Tap::new(Role::Client);
        client_start(&mut tap);
        for id in 0..3000u32 {
            tap.send(
                REQ,
                &frame(
                    HEADERS,
                    END_HEADERS,
                    2 * id + 1,
                    &req_block(false, "/", &[]),
                ),
            );
        }
        assert_eq!(
            tap.h2().streams_over_limit,
            3000 - H2Limits::default().max_streams as u64
        );
    }

    #[test]
    fn sync_search_needs_a_run_of_frames() {
        let f = [
            frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 1]),
            frame(PING, 0, 0, &[0; 8]),
        ]
        .concat();
        let cases: [(&[u8], bool, Option<usize>); 6] = [
            (&f, false, Some(0)),
            (&[&[0xde, 0xad][..], &f].concat(), false, Some(2)),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", false, None),
            (&f[..f.len() - 3], false, Some(0)),
            (&f[..12], false, None),
            (&f[..f.len() - 3], true, Some(0)),
        ];
        for (i, (b, open, want)) in cases.into_iter().enumerate() {
            assert_eq!(find_sync(b, open), want, "case {i}");
        }
    }
}
