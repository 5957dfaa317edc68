//! HPACK (RFC 7541) header-block decoder for a passive observer.
//!
//! Why our own: every HPACK decoder on crates.io (h2's, `hpack`,
//! `fluke-hpack`, ...) is written for an endpoint that has seen its connection
//! from the first byte, and treats any surprise as a fatal COMPRESSION_ERROR
//! that tears the connection down. A tap has neither property. It may attach
//! to a connection whose dynamic table already holds entries it never saw, and
//! the capture may drop a whole HEADERS block. A strict decoder then either
//! stops for good or, worse, resolves an index against the wrong entry and
//! reports a header the peer never sent. This one keeps decoding, answers
//! "unknown" where it cannot know, and never guesses.
//!
//! # Table model
//!
//! The decoder knows the newest entries of the dynamic table exactly, plus a
//! flag saying whether older entries it does not know may lie beyond them.
//! Index 62 + k resolves to the k-th known entry if there is one; otherwise it
//! is unknown when that flag is set, and a structural error when the table is
//! fully known (the peer referenced something that cannot exist).
//!
//! Rules that keep indices right without ever inventing a value:
//! - Eviction takes the oldest entries first, which are the unknown ones, so a
//!   known entry is evicted only once the known entries alone exceed the
//!   maximum size; from then on nothing unknown is left. Likewise, once the
//!   known entries leave less than 32 bytes (the smallest possible entry) of
//!   room, the table is fully known.
//! - A table size update to 0, or an entry larger than the maximum (RFC 7541
//!   §4.4), empties the table and so makes it fully known again.
//! - An insertion whose name or value we could not read (unknown name index,
//!   undecodable Huffman) adds an entry of unknown size at the *newest* end,
//!   which the model cannot represent; it shifts every index and may have
//!   evicted anything. So it degrades to [`HpackDecoder::lose`]: everything
//!   now in the table becomes unknown, and later insertions are known again.
//! - A bad Huffman string is not structural: its length is known, so parsing
//!   goes on and only that string is reported unknown.
//! - The maximum size used for eviction is an upper bound of the encoder's
//!   real one. Overestimating only keeps entries the peer has evicted, which
//!   it can no longer reference; underestimating would evict entries it still
//!   uses. So the bound only rises on SETTINGS and becomes exact on a size
//!   update.
//! - Memory is capped at [`TABLE_CAP`] bytes whatever the peer announced;
//!   entries dropped for that reason still exist at the peer, so they become
//!   part of the unknown tail rather than vanish.

use std::collections::VecDeque;

/// Most bytes (RFC 7541 §4.1 accounting) the decoder keeps, whatever table
/// size the peer announced, so hostile input cannot grow memory.
pub const TABLE_CAP: usize = 64 * 1024;

/// Longest string literal accepted; longer is a structural error. Bounds the
/// Huffman scratch buffer per field (a string decodes to at most 8/5 of it).
pub const MAX_STRING: usize = 64 * 1024;

/// RFC 7541 §4.1: every entry costs its name and value plus this.
const ENTRY_OVERHEAD: usize = 32;

/// One decoded header field. `None` means the decoder cannot know that part
/// (it was in a table entry it never saw, or its Huffman coding was invalid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// Sent as "never indexed" (RFC 7541 §6.2.3): the peer marks it sensitive.
    pub never_indexed: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockStats {
    /// Fields reported to the callback.
    pub fields: u32,
    /// Of those, fields with a missing name or value.
    pub unknown: u32,
}

/// Structural errors: the block cannot be parsed on. The decoder has already
/// called [`HpackDecoder::lose`] when it returns one of these.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum HpackError {
    #[error("header block ends inside a representation")]
    Truncated,
    #[error("HPACK integer does not fit in 32 bits")]
    IntegerOverflow,
    #[error("string literal of {0} bytes exceeds the {MAX_STRING}-byte limit")]
    StringTooLong(u32),
    #[error("index 0 is not a valid HPACK index")]
    ZeroIndex,
    #[error("index {0} is beyond the (fully known) dynamic table")]
    IndexOutOfRange(u32),
    #[error("dynamic table size update to {requested} exceeds the announced {max}")]
    TableSizeTooLarge { requested: u32, max: u32 },
    #[error("dynamic table size update after a header field")]
    LateSizeUpdate,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Absolute position of the name in the arena (see `HpackDecoder::base`);
    /// the value follows it.
    pos: u64,
    name_len: u32,
    value_len: u32,
}

impl Entry {
    fn size(&self) -> usize {
        self.name_len as usize + self.value_len as usize + ENTRY_OVERHEAD
    }
}

/// HPACK decoder state of one direction of one connection.
#[derive(Debug, Clone)]
pub struct HpackDecoder {
    /// SETTINGS_HEADER_TABLE_SIZE announced by our side: size updates above it
    /// are errors.
    limit: u32,
    /// Upper bound of the encoder's current maximum table size.
    max: u32,
    /// Known entries, newest first.
    entries: VecDeque<Entry>,
    /// Entry bytes in insertion order, so the oldest (evicted first) sit at the
    /// front. Evicted bytes stay until a compaction drops them in one move,
    /// which keeps insertion free of per-entry allocation.
    arena: Vec<u8>,
    /// Absolute position of `arena[0]`; compaction advances it so entry
    /// positions never need rewriting.
    base: u64,
    /// RFC size of the known entries.
    size: usize,
    /// Entries we do not know may exist beyond the known ones.
    unknown_tail: bool,
}

/// A name not yet copied: either bytes outside the table or a table entry.
#[derive(Clone, Copy)]
enum NameRef<'a> {
    Bytes(&'a [u8]),
    Entry(usize),
}

enum Lookup {
    Static(&'static [u8], &'static [u8]),
    Dynamic(usize),
    Unknown,
}

/// Where a string literal's bytes are; `Invalid` if its Huffman code was bad.
#[derive(Clone, Copy)]
enum Str {
    Block(usize, usize),
    Scratch(usize, usize),
    Invalid,
}

impl Str {
    fn get<'a>(self, block: &'a [u8], scratch: &'a [u8]) -> Option<&'a [u8]> {
        match self {
            Str::Block(a, b) => block.get(a..b),
            Str::Scratch(a, b) => scratch.get(a..b),
            Str::Invalid => None,
        }
    }
}

enum NameSrc {
    Static(&'static [u8]),
    Dynamic(usize),
    Literal(Str),
    Unknown,
}

impl HpackDecoder {
    /// A connection seen from its start: empty, fully known table.
    /// `max_table_size` is the SETTINGS_HEADER_TABLE_SIZE our side announced
    /// (4096 when it announced none); it also bounds the encoder's table.
    pub fn new(max_table_size: u32) -> Self {
        Self {
            limit: max_table_size,
            max: max_table_size,
            entries: VecDeque::new(),
            arena: Vec::new(),
            base: 0,
            size: 0,
            unknown_tail: false,
        }
    }

    /// Attached mid-connection: whatever the table already holds is unknown.
    /// Pass the announced table size if known; when not, a generous bound
    /// (e.g. 65536) is safe: overestimating never yields a wrong value.
    pub fn new_unknown(max_table_size: u32) -> Self {
        let mut d = Self::new(max_table_size);
        d.lose();
        d
    }

    /// SETTINGS_HEADER_TABLE_SIZE that this decoder's side announced (call it
    /// when the peer acknowledges the SETTINGS). The encoder may use up to it.
    /// Memory stays capped at [`TABLE_CAP`] whatever `n` is.
    pub fn set_max_table_size(&mut self, n: u32) {
        self.limit = n;
        // A lower limit obliges the encoder to send a size update, which sets
        // `max` exactly; until then the old bound still holds. A higher one
        // lets it grow, and a bound must not be below the truth.
        self.max = self.max.max(n);
    }

    /// A header block was lost or could not be read: every entry now in the
    /// table becomes unknown (count and contents); entries inserted later are
    /// known again.
    pub fn lose(&mut self) {
        // The lost block may have begun with a size update up to the limit.
        self.max = self.max.max(self.limit);
        self.clear();
        self.unknown_tail = self.max as usize >= ENTRY_OVERHEAD;
    }

    /// Known dynamic-table entries.
    pub fn known_entries(&self) -> usize {
        self.entries.len()
    }

    /// Whether unknown entries may exist beyond the known ones.
    pub fn has_unknown_entries(&self) -> bool {
        self.unknown_tail
    }

    /// RFC 7541 §4.1 size of the known entries.
    pub fn known_size(&self) -> usize {
        self.size
    }

    /// Upper bound of the encoder's current maximum table size.
    pub fn max_table_size(&self) -> u32 {
        self.max
    }

    /// Known entry `k` (0 = newest, i.e. HPACK index 62 + k) as (name, value).
    pub fn entry(&self, k: usize) -> Option<(&[u8], &[u8])> {
        self.entries.get(k).map(|e| self.entry_bytes(*e))
    }

    /// Decodes one complete header block (HEADERS + CONTINUATION payloads
    /// already joined by the caller) and calls `f` once per field, in order.
    ///
    /// No heap allocation per field once buffers have grown: names and values
    /// are slices of `block`, the static table, the dynamic table, or
    /// `scratch` (Huffman output, cleared per field; reuse it across calls).
    ///
    /// On `Err` the decoder has already called [`lose`](Self::lose), so the
    /// table stays consistent; the caller must discard the fields of this
    /// block it got so far.
    pub fn decode<F: FnMut(Field<'_>)>(
        &mut self,
        block: &[u8],
        scratch: &mut Vec<u8>,
        mut f: F,
    ) -> Result<BlockStats, HpackError> {
        let r = self.decode_block(block, scratch, &mut f);
        if r.is_err() {
            self.lose();
        }
        r
    }

    fn decode_block<F: FnMut(Field<'_>)>(
        &mut self,
        block: &[u8],
        scratch: &mut Vec<u8>,
        f: &mut F,
    ) -> Result<BlockStats, HpackError> {
        let mut stats = BlockStats::default();
        let mut pos = 0;
        while let Some(&b) = block.get(pos) {
            if b & 0x80 != 0 {
                // §6.1 indexed field.
                let index = read_int(block, &mut pos, 7)?;
                let (name, value) = match self.lookup(index)? {
                    Lookup::Static(n, v) => (Some(n), Some(v)),
                    Lookup::Dynamic(k) => {
                        let (n, v) = self.entry_bytes(self.entries[k]);
                        (Some(n), Some(v))
                    }
                    Lookup::Unknown => (None, None),
                };
                emit(f, &mut stats, name, value, false);
            } else if b & 0xe0 == 0x20 {
                // §6.3 dynamic table size update: only before the first field
                // (§4.2), since it changes what the fields before it meant.
                if stats.fields > 0 {
                    return Err(HpackError::LateSizeUpdate);
                }
                let n = read_int(block, &mut pos, 5)?;
                self.size_update(n)?;
            } else {
                // §6.2 literals: 01 with incremental indexing, 0000 without,
                // 0001 never indexed.
                let indexing = b & 0x40 != 0;
                let never_indexed = !indexing && b & 0x10 != 0;
                let index = read_int(block, &mut pos, if indexing { 6 } else { 4 })?;
                scratch.clear();
                let name = if index == 0 {
                    NameSrc::Literal(read_string(block, &mut pos, scratch)?)
                } else {
                    match self.lookup(index)? {
                        Lookup::Static(n, _) => NameSrc::Static(n),
                        Lookup::Dynamic(k) => NameSrc::Dynamic(k),
                        Lookup::Unknown => NameSrc::Unknown,
                    }
                };
                let value = read_string(block, &mut pos, scratch)?;
                let scratch: &[u8] = scratch;
                let value = value.get(block, scratch);
                let name_bytes = match name {
                    NameSrc::Static(n) => Some(n),
                    NameSrc::Dynamic(k) => Some(self.entry_bytes(self.entries[k]).0),
                    NameSrc::Literal(s) => s.get(block, scratch),
                    NameSrc::Unknown => None,
                };
                emit(f, &mut stats, name_bytes, value, never_indexed);
                if indexing {
                    let name = match name {
                        NameSrc::Static(n) => Some(NameRef::Bytes(n)),
                        NameSrc::Dynamic(k) => Some(NameRef::Entry(k)),
                        NameSrc::Literal(s) => s.get(block, scratch).map(NameRef::Bytes),
                        NameSrc::Unknown => None,
                    };
                    match (name, value) {
                        (Some(name), Some(value)) => self.insert(name, value),
                        // An entry of unknown size and content at the newest end.
                        _ => self.lose(),
                    }
                }
            }
        }
        Ok(stats)
    }

    fn lookup(&self, index: u32) -> Result<Lookup, HpackError> {
        match index {
            0 => Err(HpackError::ZeroIndex),
            1..=61 => {
                let (n, v) = STATIC_TABLE[index as usize - 1];
                Ok(Lookup::Static(n, v))
            }
            _ => {
                let k = (index - 62) as usize;
                if k < self.entries.len() {
                    Ok(Lookup::Dynamic(k))
                } else if self.unknown_tail {
                    Ok(Lookup::Unknown)
                } else {
                    Err(HpackError::IndexOutOfRange(index))
                }
            }
        }
    }

    fn entry_bytes(&self, e: Entry) -> (&[u8], &[u8]) {
        let start = (e.pos - self.base) as usize;
        let mid = start + e.name_len as usize;
        let end = mid + e.value_len as usize;
        (&self.arena[start..mid], &self.arena[mid..end])
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.arena.clear();
        self.base = 0;
        self.size = 0;
    }

    fn size_update(&mut self, n: u32) -> Result<(), HpackError> {
        if n > self.limit {
            return Err(HpackError::TableSizeTooLarge {
                requested: n,
                max: self.limit,
            });
        }
        self.max = n;
        self.evict_to_max();
        Ok(())
    }

    fn insert(&mut self, name: NameRef<'_>, value: &[u8]) {
        let name_len = match name {
            NameRef::Bytes(b) => b.len(),
            NameRef::Entry(k) => self.entries[k].name_len as usize,
        };
        let size = name_len + value.len() + ENTRY_OVERHEAD;
        if size > self.max as usize {
            // §4.4: the table is emptied, at the peer too.
            self.clear();
            self.unknown_tail = false;
            return;
        }
        if size > TABLE_CAP {
            // The peer holds it (and maybe more); we cannot.
            self.lose();
            return;
        }
        // Copy before evicting: the name may live in an entry about to go.
        self.compact();
        let pos = self.base + self.arena.len() as u64;
        match name {
            NameRef::Bytes(b) => self.arena.extend_from_slice(b),
            NameRef::Entry(k) => {
                let e = self.entries[k];
                let start = (e.pos - self.base) as usize;
                self.arena.extend_from_within(start..start + name_len);
            }
        }
        self.arena.extend_from_slice(value);
        self.entries.push_front(Entry {
            pos,
            name_len: name_len as u32,
            value_len: value.len() as u32,
        });
        self.size += size;
        self.evict_to_max();
        while self.size > TABLE_CAP {
            self.evict_oldest();
            self.unknown_tail = true;
        }
    }

    fn evict_to_max(&mut self) {
        let max = self.max as usize;
        while self.size > max {
            // The unknown entries are older, so the peer evicted them first.
            self.evict_oldest();
            self.unknown_tail = false;
        }
        if self.size + ENTRY_OVERHEAD > max {
            self.unknown_tail = false;
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(e) = self.entries.pop_back() {
            self.size -= e.size();
        }
        if self.entries.is_empty() {
            self.arena.clear();
            self.base = 0;
        }
    }

    /// Drops evicted bytes once they are at least half the arena, so the arena
    /// stays under twice the live bytes and each byte moves O(1) times.
    fn compact(&mut self) {
        let dead = match self.entries.back() {
            Some(e) => (e.pos - self.base) as usize,
            None => self.arena.len(),
        };
        if dead > 0 && dead >= self.arena.len() - dead {
            self.arena.drain(..dead);
            self.base += dead as u64;
        }
    }
}

fn emit<F: FnMut(Field<'_>)>(
    f: &mut F,
    stats: &mut BlockStats,
    name: Option<&[u8]>,
    value: Option<&[u8]>,
    never_indexed: bool,
) {
    stats.fields = stats.fields.saturating_add(1);
    if name.is_none() || value.is_none() {
        stats.unknown = stats.unknown.saturating_add(1);
    }
    f(Field {
        name,
        value,
        never_indexed,
    });
}

/// RFC 7541 §5.1 integer with an N-bit prefix, starting at `buf[*pos]`.
fn read_int(buf: &[u8], pos: &mut usize, prefix: u8) -> Result<u32, HpackError> {
    let mask = (1u32 << prefix) - 1;
    let first = u32::from(*buf.get(*pos).ok_or(HpackError::Truncated)?) & mask;
    *pos += 1;
    if first < mask {
        return Ok(first);
    }
    let mut value = u64::from(mask);
    let mut shift = 0;
    loop {
        let b = *buf.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        value += u64::from(b & 0x7f) << shift;
        if value > u64::from(u32::MAX) {
            return Err(HpackError::IntegerOverflow);
        }
        if b & 0x80 == 0 {
            return Ok(value as u32);
        }
        shift += 7;
        // Five continuation bytes carry 35 bits; more can only be padding
        // zeros, which would let one integer run on without bound.
        if shift > 28 {
            return Err(HpackError::IntegerOverflow);
        }
    }
}

/// RFC 7541 §5.2 string literal; Huffman output is appended to `scratch`.
fn read_string(buf: &[u8], pos: &mut usize, scratch: &mut Vec<u8>) -> Result<Str, HpackError> {
    let huffman = *buf.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = read_int(buf, pos, 7)?;
    if len as usize > MAX_STRING {
        return Err(HpackError::StringTooLong(len));
    }
    let start = *pos;
    let end = start + len as usize;
    let raw = buf.get(start..end).ok_or(HpackError::Truncated)?;
    *pos = end;
    if !huffman {
        return Ok(Str::Block(start, end));
    }
    let from = scratch.len();
    if huffman_decode(raw, scratch) {
        Ok(Str::Scratch(from, scratch.len()))
    } else {
        scratch.truncate(from);
        Ok(Str::Invalid)
    }
}

/// Decodes RFC 7541 Huffman `src` onto `dst`. False on an invalid string: EOS
/// inside it, or padding that is longer than 7 bits or not all ones (§5.2).
fn huffman_decode(src: &[u8], dst: &mut Vec<u8>) -> bool {
    // Codes are at least 5 bits, so a string yields at most 8/5 of its bytes.
    dst.reserve(src.len() * 8 / 5 + 1);
    let mut state = 0usize;
    let mut accept = true;
    for &b in src {
        for nibble in [b >> 4, b & 0x0f] {
            let step = HUFFMAN_DECODE[state][nibble as usize];
            if step.flags & FAIL != 0 {
                return false;
            }
            if step.flags & EMIT != 0 {
                dst.push(step.sym);
            }
            state = step.next as usize;
            accept = step.flags & ACCEPT != 0;
        }
    }
    accept
}

/// One transition of the Huffman decoder: from an internal node of the code
/// tree, four input bits lead to `next`, emitting at most one symbol (the
/// shortest code has 5 bits).
#[derive(Clone, Copy)]
struct Step {
    next: u8,
    sym: u8,
    flags: u8,
}

const EMIT: u8 = 1;
/// The bits spell EOS, which must never appear in a string.
const FAIL: u8 = 2;
/// The input may end here: the bits since the last symbol are a valid
/// padding (at most 7 ones).
const ACCEPT: u8 = 4;

/// The nibble-driven state table, built at compile time from the code table;
/// a table that is not a complete prefix code fails the build (the tree would
/// need more than 256 internal nodes or walk into a leaf).
static HUFFMAN_DECODE: [[Step; 16]; 256] = build_huffman_decode();

const fn build_huffman_decode() -> [[Step; 16]; 256] {
    const LEAF: u16 = 0x8000;
    // Children of each internal node: 0 = none yet (the root is nobody's
    // child), LEAF | symbol, or the child's node number.
    let mut tree = [[0u16; 2]; 256];
    let mut nodes = 1;
    let mut sym = 0;
    while sym < HUFFMAN_CODES.len() {
        let (code, len) = HUFFMAN_CODES[sym];
        let mut node = 0usize;
        let mut bit = len;
        while bit > 1 {
            bit -= 1;
            let b = ((code >> bit) & 1) as usize;
            if tree[node][b] == 0 {
                tree[node][b] = nodes;
                nodes += 1;
            }
            node = tree[node][b] as usize;
        }
        tree[node][(code & 1) as usize] = LEAF | sym as u16;
        sym += 1;
    }
    // Valid padding is a prefix of EOS (all ones) of at most 7 bits.
    let mut accept = [false; 256];
    accept[0] = true;
    let mut node = 0usize;
    let mut depth = 0;
    while depth < 7 {
        node = tree[node][1] as usize;
        accept[node] = true;
        depth += 1;
    }
    let mut table = [[Step {
        next: 0,
        sym: 0,
        flags: 0,
    }; 16]; 256];
    let mut state = 0;
    while state < 256 {
        let mut nibble = 0;
        while nibble < 16 {
            let mut node = state;
            let mut flags = 0;
            let mut out = 0;
            let mut bit = 4;
            while bit > 0 {
                bit -= 1;
                let child = tree[node][(nibble >> bit) & 1];
                if child & LEAF != 0 {
                    let s = child & !LEAF;
                    if s == 256 {
                        flags = FAIL;
                        break;
                    }
                    flags |= EMIT;
                    out = s as u8;
                    node = 0;
                } else {
                    node = child as usize;
                }
            }
            if flags & FAIL == 0 && accept[node] {
                flags |= ACCEPT;
            }
            table[state][nibble] = Step {
                next: node as u8,
                sym: out,
                flags,
            };
            nibble += 1;
        }
        state += 1;
    }
    table
}

/// RFC 7541 Appendix A.
static STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// RFC 7541 Appendix B: (code, bit length) of symbols 0..=255 and EOS (256).
#[rustfmt::skip]
const HUFFMAN_CODES: [(u32, u8); 257] = [
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28), // 0..
    (0xfffffe4, 28), (0xfffffe5, 28), (0xfffffe6, 28), (0xfffffe7, 28), // 4..
    (0xfffffe8, 28), (0xffffea, 24), (0x3ffffffc, 30), (0xfffffe9, 28), // 8..
    (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28), (0xfffffec, 28), // 12..
    (0xfffffed, 28), (0xfffffee, 28), (0xfffffef, 28), (0xffffff0, 28), // 16..
    (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28), // 20..
    (0xffffff4, 28), (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28), // 24..
    (0xffffff8, 28), (0xffffff9, 28), (0xffffffa, 28), (0xffffffb, 28), // 28..
    (0x14, 6), (0x3f8, 10), (0x3f9, 10), (0xffa, 12), // 32..
    (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11), // 36..
    (0x3fa, 10), (0x3fb, 10), (0xf9, 8), (0x7fb, 11), // 40..
    (0xfa, 8), (0x16, 6), (0x17, 6), (0x18, 6), // 44..
    (0x0, 5), (0x1, 5), (0x2, 5), (0x19, 6), // 48..
    (0x1a, 6), (0x1b, 6), (0x1c, 6), (0x1d, 6), // 52..
    (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8), // 56..
    (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10), // 60..
    (0x1ffa, 13), (0x21, 6), (0x5d, 7), (0x5e, 7), // 64..
    (0x5f, 7), (0x60, 7), (0x61, 7), (0x62, 7), // 68..
    (0x63, 7), (0x64, 7), (0x65, 7), (0x66, 7), // 72..
    (0x67, 7), (0x68, 7), (0x69, 7), (0x6a, 7), // 76..
    (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7), // 80..
    (0x6f, 7), (0x70, 7), (0x71, 7), (0x72, 7), // 84..
    (0xfc, 8), (0x73, 7), (0xfd, 8), (0x1ffb, 13), // 88..
    (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14), (0x22, 6), // 92..
    (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5), // 96..
    (0x24, 6), (0x5, 5), (0x25, 6), (0x26, 6), // 100..
    (0x27, 6), (0x6, 5), (0x74, 7), (0x75, 7), // 104..
    (0x28, 6), (0x29, 6), (0x2a, 6), (0x7, 5), // 108..
    (0x2b, 6), (0x76, 7), (0x2c, 6), (0x8, 5), // 112..
    (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7), // 116..
    (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15), // 120..
    (0x7fc, 11), (0x3ffd, 14), (0x1ffd, 13), (0xffffffc, 28), // 124..
    (0xfffe6, 20), (0x3fffd2, 22), (0xfffe7, 20), (0xfffe8, 20), // 128..
    (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22), (0x7fffd9, 23), // 132..
    (0x3fffd6, 22), (0x7fffda, 23), (0x7fffdb, 23), (0x7fffdc, 23), // 136..
    (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23), // 140..
    (0xffffec, 24), (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23), // 144..
    (0xffffee, 24), (0x7fffe1, 23), (0x7fffe2, 23), (0x7fffe3, 23), // 148..
    (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22), (0x7fffe5, 23), // 152..
    (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24), // 156..
    (0x3fffda, 22), (0x1fffdd, 21), (0xfffe9, 20), (0x3fffdb, 22), // 160..
    (0x3fffdc, 22), (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21), // 164..
    (0x7fffea, 23), (0x3fffdd, 22), (0x3fffde, 22), (0xfffff0, 24), // 168..
    (0x1fffdf, 21), (0x3fffdf, 22), (0x7fffeb, 23), (0x7fffec, 23), // 172..
    (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21), // 176..
    (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23), // 180..
    (0xfffea, 20), (0x3fffe2, 22), (0x3fffe3, 22), (0x3fffe4, 22), // 184..
    (0x7ffff0, 23), (0x3fffe5, 22), (0x3fffe6, 22), (0x7ffff1, 23), // 188..
    (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20), (0x7fff1, 19), // 192..
    (0x3fffe7, 22), (0x7ffff2, 23), (0x3fffe8, 22), (0x1ffffec, 25), // 196..
    (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27), // 200..
    (0x7ffffdf, 27), (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25), // 204..
    (0x7fff2, 19), (0x1fffe3, 21), (0x3ffffe6, 26), (0x7ffffe0, 27), // 208..
    (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27), (0xfffff2, 24), // 212..
    (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26), // 216..
    (0xffffffd, 28), (0x7ffffe3, 27), (0x7ffffe4, 27), (0x7ffffe5, 27), // 220..
    (0xfffec, 20), (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21), // 224..
    (0x3fffe9, 22), (0x1fffe7, 21), (0x1fffe8, 21), (0x7ffff3, 23), // 228..
    (0x3fffea, 22), (0x3fffeb, 22), (0x1ffffee, 25), (0x1ffffef, 25), // 232..
    (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23), // 236..
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26), // 240..
    (0x7ffffe7, 27), (0x7ffffe8, 27), (0x7ffffe9, 27), (0x7ffffea, 27), // 244..
    (0x7ffffeb, 27), (0xffffffe, 28), (0x7ffffec, 27), (0x7ffffed, 27), // 248..
    (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27), (0x3ffffee, 26), // 252..
    (0x3fffffff, 30), // 256..
];

#[cfg(test)]
mod tests {
    use super::*;

    type Owned = (Option<Vec<u8>>, Option<Vec<u8>>, bool);
    type Table = Vec<(String, String)>;
    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decode_owned(
        d: &mut HpackDecoder,
        block: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<Vec<Owned>, HpackError> {
        let mut out = Vec::new();
        d.decode(block, scratch, |f| {
            out.push((
                f.name.map(<[u8]>::to_vec),
                f.value.map(<[u8]>::to_vec),
                f.never_indexed,
            ))
        })?;
        Ok(out)
    }

    fn table(d: &HpackDecoder) -> Vec<(String, String)> {
        (0..d.known_entries())
            .map(|k| {
                let (n, v) = d.entry(k).unwrap();
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn known(list: &[(&str, &str)]) -> Vec<Owned> {
        list.iter()
            .map(|(n, v)| {
                (
                    Some(n.as_bytes().to_vec()),
                    Some(v.as_bytes().to_vec()),
                    false,
                )
            })
            .collect()
    }

    #[test]
    fn c1_integers() {
        // (prefix bits, encoding, value, bytes consumed)
        let cases: &[(u8, &[u8], u32, usize)] = &[
            (5, &[0x0a], 10, 1),               // C.1.1
            (5, &[0x1f, 0x9a, 0x0a], 1337, 3), // C.1.2
            (8, &[0x2a], 42, 1),               // C.1.3
            (5, &[0xff, 0x9a, 0x0a], 1337, 3), // bits above the prefix ignored
            (5, &[0x1f, 0x9a, 0x0a, 0x02], 1337, 3),
            (7, &[0x7f, 0x00], 127, 2),
            (4, &[0x0f, 0xf0, 0xff, 0xff, 0xff, 0x0f], u32::MAX, 6),
        ];
        for &(prefix, bytes, want, used) in cases {
            let mut pos = 0;
            assert_eq!(read_int(bytes, &mut pos, prefix), Ok(want), "{bytes:x?}");
            assert_eq!(pos, used, "{bytes:x?}");
        }
        let bad: &[(u8, &[u8], HpackError)] = &[
            (5, &[0x1f, 0x9a], HpackError::Truncated),
            (5, &[0x1f], HpackError::Truncated),
            (5, &[], HpackError::Truncated),
            (
                4,
                &[0x0f, 0xf1, 0xff, 0xff, 0xff, 0x0f],
                HpackError::IntegerOverflow,
            ),
            (
                7,
                &[0x7f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00],
                HpackError::IntegerOverflow,
            ),
            (
                7,
                &[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                HpackError::IntegerOverflow,
            ),
        ];
        for &(prefix, bytes, want) in bad {
            assert_eq!(read_int(bytes, &mut 0, prefix), Err(want), "{bytes:x?}");
        }
    }

    #[test]
    fn c2_single_representations() {
        let cases: &[(&str, &str, Owned, Table)] = &[
            (
                "C.2.1",
                "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
                (
                    Some(b"custom-key".to_vec()),
                    Some(b"custom-header".to_vec()),
                    false,
                ),
                pairs(&[("custom-key", "custom-header")]),
            ),
            (
                "C.2.2",
                "040c 2f73 616d 706c 652f 7061 7468",
                (
                    Some(b":path".to_vec()),
                    Some(b"/sample/path".to_vec()),
                    false,
                ),
                vec![],
            ),
            (
                "C.2.3",
                "1008 7061 7373 776f 7264 0673 6563 7265 74",
                (Some(b"password".to_vec()), Some(b"secret".to_vec()), true),
                vec![],
            ),
            (
                "C.2.4",
                "82",
                (Some(b":method".to_vec()), Some(b"GET".to_vec()), false),
                vec![],
            ),
        ];
        for (name, block, field, tab) in cases {
            let mut d = HpackDecoder::new(4096);
            let got = decode_owned(&mut d, &hex(block), &mut Vec::new()).unwrap();
            assert_eq!(&got, std::slice::from_ref(field), "{name}");
            assert_eq!(&table(&d), tab, "{name}");
            assert!(!d.has_unknown_entries());
        }
        let mut d = HpackDecoder::new(4096);
        decode_owned(&mut d, &hex(cases[0].1), &mut Vec::new()).unwrap();
        assert_eq!(d.known_size(), 55);
    }

    struct Step {
        block: &'static str,
        fields: &'static [(&'static str, &'static str)],
        table: &'static [(&'static str, &'static str)],
        size: usize,
    }

    fn run_sequence(name: &str, max: u32, steps: &[Step]) {
        let mut d = HpackDecoder::new(max);
        let mut scratch = Vec::new();
        for (i, s) in steps.iter().enumerate() {
            let got = decode_owned(&mut d, &hex(s.block), &mut scratch).unwrap();
            assert_eq!(got, known(s.fields), "{name} block {i}");
            assert_eq!(table(&d), pairs(s.table), "{name} table after block {i}");
            assert_eq!(d.known_size(), s.size, "{name} size after block {i}");
            assert!(!d.has_unknown_entries(), "{name} block {i}");
        }
    }

    const REQ1: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    const REQ2: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
        ("cache-control", "no-cache"),
    ];
    const REQ3: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];
    const REQ_T1: &[(&str, &str)] = &[(":authority", "www.example.com")];
    const REQ_T2: &[(&str, &str)] = &[
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];
    const REQ_T3: &[(&str, &str)] = &[
        ("custom-key", "custom-value"),
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];

    #[test]
    fn c3_requests_without_huffman() {
        run_sequence(
            "C.3",
            4096,
            &[
                Step {
                    block: "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                    fields: REQ1,
                    table: REQ_T1,
                    size: 57,
                },
                Step {
                    block: "8286 84be 5808 6e6f 2d63 6163 6865",
                    fields: REQ2,
                    table: REQ_T2,
                    size: 110,
                },
                Step {
                    block:
                        "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
                    fields: REQ3,
                    table: REQ_T3,
                    size: 164,
                },
            ],
        );
    }

    #[test]
    fn c4_requests_with_huffman() {
        run_sequence(
            "C.4",
            4096,
            &[
                Step {
                    block: "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                    fields: REQ1,
                    table: REQ_T1,
                    size: 57,
                },
                Step {
                    block: "8286 84be 5886 a8eb 1064 9cbf",
                    fields: REQ2,
                    table: REQ_T2,
                    size: 110,
                },
                Step {
                    block: "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
                    fields: REQ3,
                    table: REQ_T3,
                    size: 164,
                },
            ],
        );
    }

    const DATE1: &str = "Mon, 21 Oct 2013 20:13:21 GMT";
    const DATE2: &str = "Mon, 21 Oct 2013 20:13:22 GMT";
    const LOC: &str = "https://www.example.com";
    const COOKIE: &str = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";
    const RESP1: &[(&str, &str)] = &[
        (":status", "302"),
        ("cache-control", "private"),
        ("date", DATE1),
        ("location", LOC),
    ];
    const RESP2: &[(&str, &str)] = &[
        (":status", "307"),
        ("cache-control", "private"),
        ("date", DATE1),
        ("location", LOC),
    ];
    const RESP3: &[(&str, &str)] = &[
        (":status", "200"),
        ("cache-control", "private"),
        ("date", DATE2),
        ("location", LOC),
        ("content-encoding", "gzip"),
        ("set-cookie", COOKIE),
    ];
    const RESP_T1: &[(&str, &str)] = &[
        ("location", LOC),
        ("date", DATE1),
        ("cache-control", "private"),
        (":status", "302"),
    ];
    const RESP_T2: &[(&str, &str)] = &[
        (":status", "307"),
        ("location", LOC),
        ("date", DATE1),
        ("cache-control", "private"),
    ];
    const RESP_T3: &[(&str, &str)] = &[
        ("set-cookie", COOKIE),
        ("content-encoding", "gzip"),
        ("date", DATE2),
    ];

    #[test]
    fn c5_responses_without_huffman_with_eviction() {
        run_sequence(
            "C.5",
            256,
            &[
                Step {
                    block: "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
                            2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
                            6c65 2e63 6f6d",
                    fields: RESP1,
                    table: RESP_T1,
                    size: 222,
                },
                Step { block: "4803 3330 37c1 c0bf", fields: RESP2, table: RESP_T2, size: 222 },
                Step {
                    block: "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
                            54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
                            5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
                            3d31",
                    fields: RESP3,
                    table: RESP_T3,
                    size: 215,
                },
            ],
        );
    }

    #[test]
    fn c6_responses_with_huffman_with_eviction() {
        run_sequence(
            "C.6",
            256,
            &[
                Step {
                    block: "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
                            2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
                    fields: RESP1,
                    table: RESP_T1,
                    size: 222,
                },
                Step { block: "4883 640e ffc1 c0bf", fields: RESP2, table: RESP_T2, size: 222 },
                Step {
                    block: "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
                            77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
                            9587 3160 65c0 03ed 4ee5 b106 3d50 07",
                    fields: RESP3,
                    table: RESP_T3,
                    size: 215,
                },
            ],
        );
    }

    // ---- Huffman ----

    fn huffman_encode(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut acc: u64 = 0;
        let mut bits = 0u32;
        for &b in s {
            let (code, len) = HUFFMAN_CODES[b as usize];
            acc = (acc << len) | u64::from(code);
            bits += u32::from(len);
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
            acc &= (1 << bits) - 1;
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
        }
        out
    }

    #[test]
    fn huffman_table_is_the_rfc_canonical_complete_code() {
        // Spot checks against the hex column of Appendix B.
        assert_eq!(HUFFMAN_CODES[0], (0x1ff8, 13));
        assert_eq!(HUFFMAN_CODES[b'0' as usize], (0x0, 5));
        assert_eq!(HUFFMAN_CODES[b'a' as usize], (0x3, 5));
        assert_eq!(HUFFMAN_CODES[b' ' as usize], (0x14, 6));
        assert_eq!(HUFFMAN_CODES[255], (0x3ffffee, 26));
        assert_eq!(HUFFMAN_CODES[256], (0x3fffffff, 30));
        // Kraft sum exactly 1 (complete code), and canonical: codes ascend
        // with (length, symbol), so a transcription slip shows up here.
        let kraft: u64 = HUFFMAN_CODES.iter().map(|&(_, l)| 1u64 << (30 - l)).sum();
        assert_eq!(kraft, 1 << 30);
        let mut order: Vec<usize> = (0..257).collect();
        order.sort_by_key(|&s| (HUFFMAN_CODES[s].1, s));
        let mut code = 0u32;
        let mut prev_len = HUFFMAN_CODES[order[0]].1;
        for (i, &s) in order.iter().enumerate() {
            let (c, l) = HUFFMAN_CODES[s];
            if i > 0 {
                code = (code + 1) << (l - prev_len);
            }
            prev_len = l;
            assert_eq!(c, code, "symbol {s}");
        }
    }

    #[test]
    fn huffman_rfc_strings_and_roundtrip() {
        let cases = [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                DATE1,
            ),
            ("9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3", LOC),
            ("9bd9 ab", "gzip"),
            ("", ""),
        ];
        for (h, s) in cases {
            let mut out = Vec::new();
            assert!(huffman_decode(&hex(h), &mut out), "{s}");
            assert_eq!(out, s.as_bytes());
            assert_eq!(huffman_encode(s.as_bytes()), hex(h), "{s}");
        }
        let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for len in [1, 2, 3, 7, 100, all.len()] {
            let mut out = Vec::new();
            assert!(huffman_decode(&huffman_encode(&all[..len]), &mut out));
            assert_eq!(out, &all[..len]);
        }
    }

    #[test]
    fn huffman_invalid() {
        let cases: &[(&str, &[u8])] = &[
            ("zero padding", &[0x00]),             // '0' then 000
            ("padding of 8+ bits", &[0x1f, 0xff]), // 'a', then 11 ones
            ("a whole byte of padding", &[0xff]),
            ("EOS", &[0xff, 0xff, 0xff, 0xfc]), // EOS then 00
            ("EOS aligned", &[0xff, 0xff, 0xff, 0xff]),
            ("truncated long code", &[0xff, 0xfe]), // prefix of a 23+ bit code, padding not all ones
        ];
        for (name, bytes) in cases {
            assert!(!huffman_decode(bytes, &mut Vec::new()), "{name}");
        }
        // 7 ones of padding is fine.
        let mut out = Vec::new();
        assert!(huffman_decode(&[0x1f], &mut out));
        assert_eq!(out, b"a");
    }

    // ---- malformed input ----

    #[derive(Debug, PartialEq)]
    enum Want {
        Err(HpackError),
        /// Ok with this many fields, of which this many unknown.
        Ok(u32, u32),
    }

    #[test]
    fn malformed_blocks() {
        let mut long = vec![0x00, 0x7f, 0x81, 0x80, 0x04]; // string length 65664
        long.resize(70000, b'a');
        // (case, unknown prefix?, block, expected)
        let cases: Vec<(&str, bool, Vec<u8>, Want)> = vec![
            (
                "truncated index",
                false,
                vec![0xff],
                Want::Err(HpackError::Truncated),
            ),
            (
                "truncated multi-byte index",
                false,
                vec![0xff, 0x80],
                Want::Err(HpackError::Truncated),
            ),
            (
                "huge index",
                false,
                hex("ff ff ff ff ff ff 01"),
                Want::Err(HpackError::IntegerOverflow),
            ),
            (
                "huge index, unknown table",
                true,
                hex("ff ff ff ff ff ff 01"),
                Want::Err(HpackError::IntegerOverflow),
            ),
            (
                "index 0",
                false,
                vec![0x80],
                Want::Err(HpackError::ZeroIndex),
            ),
            (
                "index 0, unknown table",
                true,
                vec![0x80],
                Want::Err(HpackError::ZeroIndex),
            ),
            ("known dynamic index", false, vec![0xbe], Want::Ok(1, 0)),
            (
                "out of range, known table",
                false,
                vec![0xbf],
                Want::Err(HpackError::IndexOutOfRange(63)),
            ),
            (
                "dynamic index, unknown table",
                true,
                vec![0xbf],
                Want::Ok(1, 1),
            ),
            (
                "name index out of range",
                false,
                hex("7f 00 01 61"),
                Want::Err(HpackError::IndexOutOfRange(63)),
            ),
            (
                "name index unknown",
                true,
                hex("0f 30 01 61"),
                Want::Ok(1, 1),
            ),
            (
                "truncated name string",
                false,
                hex("40 05 61"),
                Want::Err(HpackError::Truncated),
            ),
            (
                "missing value",
                false,
                hex("40 01 61"),
                Want::Err(HpackError::Truncated),
            ),
            (
                "truncated value length",
                false,
                hex("04 ff"),
                Want::Err(HpackError::Truncated),
            ),
            (
                "string too long",
                false,
                long,
                Want::Err(HpackError::StringTooLong(65664)),
            ),
            (
                "bad huffman value",
                false,
                hex("00 01 61 81 00"),
                Want::Ok(1, 1),
            ),
            (
                "huffman padding > 7 bits",
                false,
                hex("00 01 61 82 1f ff"),
                Want::Ok(1, 1),
            ),
            ("huffman EOS", false, hex("00 81 ff 01 61"), Want::Ok(1, 1)),
            (
                "size update too large",
                false,
                hex("3f e2 1f"),
                Want::Err(HpackError::TableSizeTooLarge {
                    requested: 4097,
                    max: 4096,
                }),
            ),
            (
                "size update at limit",
                false,
                hex("3f e1 1f 82"),
                Want::Ok(1, 0),
            ),
            (
                "size update after a field",
                false,
                hex("82 20"),
                Want::Err(HpackError::LateSizeUpdate),
            ),
            (
                "two size updates first",
                false,
                hex("20 3f e1 1f 82"),
                Want::Ok(1, 0),
            ),
            (
                "truncated size update",
                false,
                hex("3f"),
                Want::Err(HpackError::Truncated),
            ),
            ("empty block", false, vec![], Want::Ok(0, 0)),
        ];
        for (name, unknown, block, want) in cases {
            let mut d = if unknown {
                HpackDecoder::new_unknown(4096)
            } else {
                HpackDecoder::new(4096)
            };
            // One known entry first, so we can see whether it is lost.
            decode_owned(&mut d, &hex("40 01 78 01 79"), &mut Vec::new()).unwrap();
            let got = match d.decode(&block, &mut Vec::new(), |_| {}) {
                Ok(s) => Want::Ok(s.fields, s.unknown),
                Err(e) => Want::Err(e),
            };
            assert_eq!(got, want, "{name}");
            if matches!(want, Want::Err(_)) {
                assert_eq!(
                    d.known_entries(),
                    0,
                    "{name}: table not lost after an error"
                );
                assert!(d.has_unknown_entries(), "{name}");
            }
        }
    }

    #[test]
    fn tolerance_rules() {
        let mut s = Vec::new();
        // Late start: index 62 unknown, then a literal with indexing is learnt.
        let mut d = HpackDecoder::new_unknown(4096);
        let got = decode_owned(&mut d, &hex("be 40 01 61 01 62 be bf"), &mut s).unwrap();
        assert_eq!(
            got,
            vec![
                (None, None, false),
                (Some(b"a".to_vec()), Some(b"b".to_vec()), false),
                (Some(b"a".to_vec()), Some(b"b".to_vec()), false),
                (None, None, false),
            ]
        );
        assert!(d.has_unknown_entries());
        // Size update to 0 makes the table fully known (and empty).
        decode_owned(&mut d, &hex("20 3f e1 1f"), &mut s).unwrap();
        assert!(!d.has_unknown_entries());
        assert_eq!(d.known_entries(), 0);
        assert_eq!(
            d.decode(&[0xbe], &mut s, |_| {}),
            Err(HpackError::IndexOutOfRange(62))
        );

        // Insertion with an unknown name: value reported, then the table is lost.
        let mut d = HpackDecoder::new_unknown(4096);
        decode_owned(&mut d, &hex("40 01 61 01 62"), &mut s).unwrap();
        let got = decode_owned(&mut d, &hex("7f 01 01 76 be"), &mut s).unwrap();
        assert_eq!(
            got,
            vec![(None, Some(b"v".to_vec()), false), (None, None, false)]
        );
        assert_eq!(d.known_entries(), 0);

        // Insertion whose value is bad Huffman: name reported, table lost.
        let mut d = HpackDecoder::new(4096);
        let got = decode_owned(&mut d, &hex("40 01 61 01 62 40 01 63 81 00 be"), &mut s).unwrap();
        assert_eq!(got[1], (Some(b"c".to_vec()), None, false));
        assert_eq!(got[2], (None, None, false));

        // Eviction with an unknown prefix: known entries stay while they alone fit.
        let mut d = HpackDecoder::new_unknown(100);
        decode_owned(&mut d, &hex("40 01 61 01 62"), &mut s).unwrap(); // 34 bytes
        assert!(d.has_unknown_entries());
        decode_owned(&mut d, &hex("40 01 63 01 64"), &mut s).unwrap(); // 68 bytes: an empty entry may fit
        assert!(d.has_unknown_entries());
        decode_owned(&mut d, &hex("40 01 67 01 68"), &mut s).unwrap(); // 102: evicts (unknown, then) a
        assert!(!d.has_unknown_entries());
        assert_eq!(table(&d), pairs(&[("g", "h"), ("c", "d")]));

        // An entry larger than the table empties it, known again.
        let mut d = HpackDecoder::new_unknown(40);
        decode_owned(&mut d, &hex("40 01 61 05 3132 3334 35"), &mut s).unwrap(); // 38 bytes
        assert!(!d.has_unknown_entries());
        assert_eq!(d.known_entries(), 1);
        decode_owned(&mut d, &hex("40 01 61 0a 3132 3334 3536 3738 3930"), &mut s).unwrap();
        assert_eq!(d.known_entries(), 0);
        assert!(!d.has_unknown_entries());

        // An indexed name from an entry that the insertion itself evicts.
        let mut d = HpackDecoder::new(40);
        decode_owned(&mut d, &hex("40 03 6e 6e 6e 01 31"), &mut s).unwrap();
        let got = decode_owned(&mut d, &hex("7e 01 32 be"), &mut s).unwrap();
        assert_eq!(got[1], (Some(b"nnn".to_vec()), Some(b"2".to_vec()), false));
        assert_eq!(table(&d), pairs(&[("nnn", "2")]));

        // Memory stays capped even if the peer announced more: what we drop
        // is unknown, not gone.
        let mut d = HpackDecoder::new(1 << 20);
        let mut block = Vec::new();
        for i in 0..100u32 {
            block.clear();
            block.extend_from_slice(&[0x40, 0x04]);
            block.extend_from_slice(&i.to_be_bytes());
            enc_str(&mut block, &[b'v'; 1000], false);
            d.decode(&block, &mut s, |_| {}).unwrap();
            assert!(d.known_size() <= TABLE_CAP);
        }
        assert!(d.has_unknown_entries());
        assert_eq!(d.entry(0).unwrap().0, 99u32.to_be_bytes());
        let cap_entries = d.known_entries() as u32;
        let mut blk = Vec::new();
        enc_int(&mut blk, 0x80, 7, 62 + cap_entries);
        assert_eq!(
            decode_owned(&mut d, &blk, &mut s).unwrap(),
            vec![(None, None, false)]
        );
    }

    #[test]
    fn settings_and_size_updates() {
        let mut s = Vec::new();
        let mut blk = Vec::new();
        enc_int(&mut blk, 0x20, 5, 8192);
        let mut d = HpackDecoder::new(4096);
        assert_eq!(
            d.decode(&blk, &mut s, |_| {}),
            Err(HpackError::TableSizeTooLarge {
                requested: 8192,
                max: 4096
            })
        );
        d.set_max_table_size(8192);
        // The encoder may now grow (only through an update, but the bound
        // must not be below the truth either way).
        assert_eq!(d.max_table_size(), 8192);
        d.decode(&blk, &mut s, |_| {}).unwrap();
        assert_eq!(d.max_table_size(), 8192);
        // Lowering: the bound stays until the encoder's update says otherwise.
        d.set_max_table_size(100);
        assert_eq!(d.max_table_size(), 8192);
        assert!(d.decode(&blk, &mut s, |_| {}).is_err());
        d.decode(&hex("3f 2d"), &mut s, |_| {}).unwrap(); // 31 + 45 = 76
        assert_eq!(d.max_table_size(), 76);
        // A lost block may have raised it again, up to the limit.
        d.lose();
        assert_eq!(d.max_table_size(), 100);
        // Below 32 bytes nothing fits: losing leaves a known, empty table.
        d.decode(&hex("3f 00"), &mut s, |_| {}).unwrap();
        let mut d2 = HpackDecoder::new_unknown(31);
        assert!(!d2.has_unknown_entries());
        assert_eq!(
            d2.decode(&[0xbe], &mut s, |_| {}),
            Err(HpackError::IndexOutOfRange(62))
        );
    }

    // ---- a small reference encoder, and the tolerance property ----

    fn enc_int(out: &mut Vec<u8>, first: u8, prefix: u8, v: u32) {
        let max = (1u32 << prefix) - 1;
        if v < max {
            out.push(first | v as u8);
            return;
        }
        out.push(first | max as u8);
        let mut v = v - max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }

    fn enc_str(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
        if huffman {
            let h = huffman_encode(s);
            enc_int(out, 0x80, 7, h.len() as u32);
            out.extend_from_slice(&h);
        } else {
            enc_int(out, 0, 7, s.len() as u32);
            out.extend_from_slice(s);
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
    }

    /// A plain HPACK encoder with its own table, making random but valid
    /// choices of representation.
    struct Encoder {
        table: VecDeque<(Vec<u8>, Vec<u8>)>,
        size: usize,
        max: usize,
        limit: usize,
    }

    impl Encoder {
        fn evict(&mut self) {
            while self.size > self.max {
                let (n, v) = self.table.pop_back().unwrap();
                self.size -= n.len() + v.len() + 32;
            }
        }

        fn add(&mut self, n: &[u8], v: &[u8]) {
            self.table.push_front((n.to_vec(), v.to_vec()));
            self.size += n.len() + v.len() + 32;
            if n.len() + v.len() + 32 > self.max {
                self.table.clear();
                self.size = 0;
            }
            self.evict();
        }

        fn find(&self, n: &[u8], v: Option<&[u8]>) -> Vec<u32> {
            let stat = STATIC_TABLE
                .iter()
                .enumerate()
                .map(|(i, (sn, sv))| (i as u32 + 1, *sn, *sv));
            let dynamic = self
                .table
                .iter()
                .enumerate()
                .map(|(i, (dn, dv))| (i as u32 + 62, &dn[..], &dv[..]));
            stat.chain(dynamic)
                .filter(|(_, tn, tv)| *tn == n && v.is_none_or(|v| v == *tv))
                .map(|(i, _, _)| i)
                .collect()
        }

        fn block(&mut self, rng: &mut Rng, headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
            let mut out = Vec::new();
            if rng.chance(8) {
                for _ in 0..1 + rng.below(2) {
                    self.max = match rng.below(4) {
                        0 => 0,
                        1 => self.limit,
                        _ => rng.below(self.limit + 1),
                    };
                    self.evict();
                    enc_int(&mut out, 0x20, 5, self.max as u32);
                }
            }
            for (n, v) in headers {
                let full = self.find(n, Some(v));
                if !full.is_empty() && rng.chance(70) {
                    enc_int(&mut out, 0x80, 7, full[rng.below(full.len())]);
                    continue;
                }
                let (first, prefix, index) = match rng.below(10) {
                    0 => (0x00, 4, false),
                    1 => (0x10, 4, false),
                    _ => (0x40, 6, true),
                };
                let names = self.find(n, None);
                if !names.is_empty() && rng.chance(70) {
                    enc_int(&mut out, first, prefix, names[rng.below(names.len())]);
                } else {
                    enc_int(&mut out, first, prefix, 0);
                    enc_str(&mut out, n, rng.chance(50));
                }
                enc_str(&mut out, v, rng.chance(50));
                if index {
                    self.add(n, v);
                }
            }
            out
        }
    }

    fn random_headers(rng: &mut Rng) -> Vec<(Vec<u8>, Vec<u8>)> {
        const NAMES: &[&str] = &[
            ":method",
            ":path",
            ":status",
            "user-agent",
            "x-request-id",
            "x-a",
            "x-b",
            "cookie",
            "content-type",
            "traceparent",
        ];
        const VALUES: &[&str] = &[
            "GET",
            "/",
            "/api/v1/items",
            "200",
            "curl/8",
            "application/json",
            "abc",
            "d",
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ];
        (0..1 + rng.below(8))
            .map(|_| {
                let n = NAMES[rng.below(NAMES.len())].as_bytes().to_vec();
                let v = match rng.below(10) {
                    0 => (0..rng.below(40)).map(|_| rng.next() as u8).collect(),
                    1 => vec![b'z'; 100 + rng.below(200)], // sometimes larger than the table
                    _ => VALUES[rng.below(VALUES.len())].as_bytes().to_vec(),
                };
                (n, v)
            })
            .collect()
    }

    fn stream(seed: u64, blocks: usize, limit: usize) -> Vec<(Vec<u8>, Headers)> {
        let mut rng = Rng(seed);
        let mut enc = Encoder {
            table: VecDeque::new(),
            size: 0,
            max: limit,
            limit,
        };
        (0..blocks)
            .map(|_| {
                let h = random_headers(&mut rng);
                (enc.block(&mut rng, &h), h)
            })
            .collect()
    }

    /// Decodes with `d` and checks every field it claims to know against the
    /// truth; returns (fields, known fields).
    fn check_block(
        d: &mut HpackDecoder,
        scratch: &mut Vec<u8>,
        block: &[u8],
        truth: &[(Vec<u8>, Vec<u8>)],
        what: &str,
    ) -> (usize, usize) {
        let got = decode_owned(d, block, scratch).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got.len(), truth.len(), "{what}");
        let mut known = 0;
        for ((n, v, _), (tn, tv)) in got.iter().zip(truth) {
            if let Some(n) = n {
                assert_eq!(n, tn, "{what}: wrong name");
            }
            if let Some(v) = v {
                assert_eq!(v, tv, "{what}: wrong value");
            }
            known += usize::from(n.is_some() && v.is_some());
        }
        (truth.len(), known)
    }

    #[test]
    fn full_decoder_matches_the_encoder() {
        for seed in 1..=20u64 {
            let mut d = HpackDecoder::new(256);
            let mut s = Vec::new();
            for (i, (block, truth)) in stream(seed, 300, 256).iter().enumerate() {
                let (n, k) = check_block(
                    &mut d,
                    &mut s,
                    block,
                    truth,
                    &format!("seed {seed} block {i}"),
                );
                assert_eq!(
                    n, k,
                    "seed {seed} block {i}: the full decoder must know everything"
                );
                assert!(!d.has_unknown_entries());
            }
        }
    }

    #[test]
    fn late_start_never_disagrees_and_warms_up() {
        for seed in 1..=20u64 {
            let blocks = stream(seed, 300, 256);
            for start in [1, 7, 50, 123] {
                let mut d = HpackDecoder::new_unknown(256);
                let mut s = Vec::new();
                let (mut total, mut known) = (0, 0);
                for (i, (block, truth)) in blocks.iter().enumerate().skip(start) {
                    let (n, k) = check_block(
                        &mut d,
                        &mut s,
                        block,
                        truth,
                        &format!("seed {seed} start {start} block {i}"),
                    );
                    if i >= start + 20 {
                        total += n;
                        known += k;
                    }
                }
                assert!(
                    known * 100 > total * 50,
                    "seed {seed} start {start}: only {known}/{total} known"
                );
            }
        }
    }

    #[test]
    fn lost_blocks_never_disagree() {
        for seed in 1..=20u64 {
            let blocks = stream(seed, 300, 256);
            let mut rng = Rng(seed ^ 0x5eed);
            let mut d = HpackDecoder::new(256);
            let mut s = Vec::new();
            let (mut total, mut known) = (0, 0);
            for (i, (block, truth)) in blocks.iter().enumerate() {
                if rng.chance(10) {
                    d.lose();
                    continue;
                }
                let (n, k) = check_block(
                    &mut d,
                    &mut s,
                    block,
                    truth,
                    &format!("seed {seed} block {i}"),
                );
                total += n;
                known += k;
            }
            assert!(
                known * 100 > total * 50,
                "seed {seed}: only {known}/{total} known"
            );
        }
    }

    #[test]
    fn random_bytes_never_panic_and_stay_bounded() {
        let mut rng = Rng(0xdead_beef);
        let mut d = HpackDecoder::new_unknown(4096);
        let mut s = Vec::new();
        let blocks = stream(3, 50, 4096);
        for i in 0..20_000 {
            let mut block: Vec<u8> = if i % 2 == 0 {
                (0..rng.below(64)).map(|_| rng.next() as u8).collect()
            } else {
                // Mutated valid blocks reach deeper than pure noise.
                let mut b = blocks[rng.below(blocks.len())].0.clone();
                for _ in 0..1 + rng.below(3) {
                    if !b.is_empty() {
                        let at = rng.below(b.len());
                        b[at] = rng.next() as u8;
                    }
                }
                b
            };
            if rng.chance(5) {
                block.truncate(rng.below(block.len() + 1));
            }
            let _ = d.decode(&block, &mut s, |f| {
                let _ = (f.name.map(<[u8]>::len), f.value.map(<[u8]>::len));
            });
            assert!(d.known_size() <= TABLE_CAP);
            assert!(d.known_size() <= d.max_table_size() as usize);
            assert!(s.len() <= 2 * MAX_STRING * 8 / 5 + 2);
        }
    }
}
