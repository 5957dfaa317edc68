//! Per-connection ordering of chunks.
//!
//! The kernel numbers each connection's chunks (both directions) before it
//! writes them to the ring buffer; two threads using one socket on two CPUs can
//! write them out of order, and a full ring buffer loses some. Chunks are
//! released in sequence order; a gap still open after a whole drain pass
//! (the two chunks of a race are written microseconds apart) is a loss, which
//! is counted and skipped.
//!
//! Released chunks also get their byte positions: the kernel sends offsets
//! mod 2^32, extended here to 64 bits from the connection's previous offset
//! in that direction (chunks are in order by then, so the step is small and
//! a signed 32-bit delta recovers it). Positions reveal what sequence
//! numbers cannot: bytes moved by calls the kernel side never captured (a
//! lost syscall entry, a syscall we do not hook) as well as lost records.
//!
//! A process that dies with sockets open never calls close(): the kernel
//! closes them, and no close record comes. Connections idle for `IDLE` are
//! therefore forgotten, so the state stays bounded on a busy host.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::event::{Chunk, ChunkKind, ConnMap, Direction};

/// Chunks held per connection before a gap is given up on regardless.
const MAX_HELD: usize = 256;
/// Connections with no chunk for this long are forgotten.
pub const IDLE: Duration = Duration::from_secs(300);
/// Drain passes between sweeps for idle connections.
const SWEEP_EVERY: u64 = 1024;

/// Byte accounting of one direction of a connection.
#[derive(Default)]
struct StreamPos {
    /// Latest full offset known in this direction (a chunk's end, or the
    /// other direction's view of it): the reference 32-bit offsets extend from.
    known: u64,
    /// End of the furthest chunk released in this direction.
    end: u64,
}

/// The 64-bit offset nearest `reference` whose low 32 bits are `low`.
fn extend(reference: u64, low: u32) -> u64 {
    let delta = i64::from(low.wrapping_sub(reference as u32) as i32);
    // Below 0 only for nonsense input: keep the raw value rather than wrap.
    reference
        .checked_add_signed(delta)
        .unwrap_or(u64::from(low))
}

struct ConnOrder {
    next: u64,
    /// Indexed by `dir_index`.
    pos: [StreamPos; 2],
    held: BTreeMap<u64, Chunk>,
    close: Option<Chunk>,
    /// A gap was open at the end of the previous pass.
    stalled: bool,
    /// Start of the drain pass that last brought a chunk.
    seen: Instant,
}

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReorderStats {
    /// Sequence numbers never seen (lost in the kernel or evicted).
    pub gaps: u64,
    /// Chunks that came after their successors had been released.
    pub late: u64,
    /// Chunks that arrived out of order and were put back in order.
    pub reordered: u64,
    /// Holes in a direction's byte stream that chunk positions reveal: a
    /// chunk starting past the previous one's end, or a close past the last
    /// chunk's end. Cut payloads (`truncated`) are not holes.
    pub stream_gaps: u64,
    /// Bytes in those holes: moved by the socket, seen by no chunk.
    pub stream_gap_bytes: u64,
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Egress => 0,
        Direction::Ingress => 1,
    }
}

pub struct Reorder {
    conns: ConnMap<ConnOrder>,
    pub stats: ReorderStats,
    /// Start of the current drain pass (one clock read per pass, not per chunk).
    now: Instant,
    passes: u64,
}

impl Default for Reorder {
    fn default() -> Self {
        Self {
            conns: ConnMap::default(),
            stats: ReorderStats::default(),
            now: Instant::now(),
            passes: 0,
        }
    }
}

impl Reorder {
    /// Takes one chunk; appends to `out` whatever is now in order.
    pub fn push(&mut self, chunk: Chunk, out: &mut Vec<Chunk>) {
        let id = chunk.conn;
        let now = self.now;
        let st = self.conns.entry(id).or_insert_with(|| ConnOrder {
            next: 0,
            pos: Default::default(),
            held: BTreeMap::new(),
            close: None,
            stalled: false,
            seen: now,
        });
        st.seen = now;
        if chunk.kind == ChunkKind::Close {
            st.close = Some(chunk);
        } else if chunk.seq < st.next {
            self.stats.late += 1;
            Self::emit(st, &mut self.stats, chunk, out);
            return;
        } else if chunk.seq == st.next {
            st.next += 1;
            Self::emit(st, &mut self.stats, chunk, out);
        } else {
            self.stats.reordered += 1;
            st.held.insert(chunk.seq, chunk);
            if st.held.len() > MAX_HELD {
                Self::skip_gap(st, &mut self.stats);
            }
        }
        if Self::release(st, &mut self.stats, out) {
            self.conns.remove(&id);
        }
    }

    /// Releases one chunk: extends its positions and counts the hole before it.
    fn emit(st: &mut ConnOrder, stats: &mut ReorderStats, mut c: Chunk, out: &mut Vec<Chunk>) {
        if c.has_pos {
            let own = dir_index(c.direction);
            let peer = 1 - own;
            let s = &mut st.pos[own];
            c.pos = extend(s.known, c.pos as u32);
            let end = c.pos + c.len;
            Self::count_hole(stats, s.end, c.pos);
            s.end = s.end.max(end);
            s.known = end;
            let p = &mut st.pos[peer];
            c.peer_pos = extend(p.known, c.peer_pos as u32);
            p.known = c.peer_pos;
            if c.kind == ChunkKind::Close {
                // The connection's last word: what the app read after the
                // last ingress chunk was never seen either.
                Self::count_hole(stats, p.end, c.peer_pos);
                p.end = p.end.max(c.peer_pos);
            }
        }
        out.push(c);
    }

    fn count_hole(stats: &mut ReorderStats, end: u64, next: u64) {
        if next > end {
            stats.stream_gaps += 1;
            stats.stream_gap_bytes += next - end;
        }
    }

    /// Releases consecutive held chunks, then the close when its turn comes.
    /// Returns true when the connection is finished.
    fn release(st: &mut ConnOrder, stats: &mut ReorderStats, out: &mut Vec<Chunk>) -> bool {
        while let Some(c) = st.held.remove(&st.next) {
            st.next += 1;
            Self::emit(st, stats, c, out);
        }
        if st.held.is_empty() {
            st.stalled = false;
        }
        match &st.close {
            // The close carries the count of data chunks before it.
            Some(c) if c.seq <= st.next && st.held.is_empty() => {
                if let Some(c) = st.close.take() {
                    Self::emit(st, stats, c, out);
                }
                true
            }
            _ => false,
        }
    }

    fn skip_gap(st: &mut ConnOrder, stats: &mut ReorderStats) {
        let first = st
            .held
            .keys()
            .next()
            .copied()
            .or_else(|| st.close.as_ref().map(|c| c.seq));
        if let Some(first) = first {
            if first > st.next {
                stats.gaps += first - st.next;
                st.next = first;
            }
        }
    }

    /// End of a drain pass: gaps open since the previous pass are losses.
    pub fn end_pass(&mut self, out: &mut Vec<Chunk>) {
        self.end_pass_at(Instant::now(), out);
    }

    fn end_pass_at(&mut self, now: Instant, out: &mut Vec<Chunk>) {
        self.now = now;
        self.passes += 1;
        if self.passes.is_multiple_of(SWEEP_EVERY) {
            self.conns
                .retain(|_, st| now.duration_since(st.seen) < IDLE);
        }
        let stats = &mut self.stats;
        self.conns.retain(|_, st| {
            let waiting = !st.held.is_empty() || st.close.is_some();
            if !waiting {
                return true;
            }
            if st.stalled {
                Self::skip_gap(st, stats);
                st.stalled = false;
                return !Self::release(st, stats, out);
            }
            st.stalled = true;
            true
        });
    }

    /// Connections with ordering state.
    pub fn tracked(&self) -> usize {
        self.conns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::event::tests::{decode_one as decode, header};
    use agent_common::{KIND_CLOSE, KIND_DATA};
    use std::time::Duration;

    fn data(seq: u64) -> Chunk {
        decode(&header(KIND_DATA, seq, b"x")).unwrap()
    }
    fn close(seq: u64) -> Chunk {
        decode(&header(KIND_CLOSE, seq, b"")).unwrap()
    }
    fn seqs(v: &[Chunk]) -> Vec<(u64, bool)> {
        v.iter()
            .map(|c| (c.seq, c.kind == ChunkKind::Close))
            .collect()
    }

    #[test]
    fn table() {
        // (input, expected output after pushes and two end_pass calls, gaps, late)
        type Case = (Vec<Chunk>, Vec<(u64, bool)>, u64, u64);
        let cases: Vec<(&str, Case)> = vec![
            (
                "in order",
                (
                    vec![data(0), data(1), data(2)],
                    vec![(0, false), (1, false), (2, false)],
                    0,
                    0,
                ),
            ),
            (
                "swapped",
                (
                    vec![data(1), data(0), data(2)],
                    vec![(0, false), (1, false), (2, false)],
                    0,
                    0,
                ),
            ),
            (
                "close after data",
                (
                    vec![data(0), close(2), data(1)],
                    vec![(0, false), (1, false), (2, true)],
                    0,
                    0,
                ),
            ),
            (
                "lost chunk",
                (
                    vec![data(0), data(2), data(3)],
                    vec![(0, false), (2, false), (3, false)],
                    1,
                    0,
                ),
            ),
            (
                "lost before close",
                (vec![data(0), close(2)], vec![(0, false), (2, true)], 1, 0),
            ),
            (
                "late duplicate",
                (
                    vec![data(0), data(1), data(0)],
                    vec![(0, false), (1, false), (0, false)],
                    0,
                    1,
                ),
            ),
        ];
        for (name, (input, want, gaps, late)) in cases {
            let mut r = Reorder::default();
            let mut out = Vec::new();
            for c in input {
                r.push(c, &mut out);
            }
            r.end_pass(&mut out);
            r.end_pass(&mut out);
            assert_eq!(seqs(&out), want, "{name}");
            assert_eq!((r.stats.gaps, r.stats.late), (gaps, late), "{name}");
        }
    }

    #[test]
    fn extend_table() {
        const G4: u64 = 1 << 32;
        // (reference, low 32 bits, extended)
        let cases: [(u64, u32, u64); 7] = [
            (0, 0, 0),
            (0, 100, 100),
            (100, 50, 50),
            (G4 - 10, 5, G4 + 5),
            (G4 + 5, (G4 - 10) as u32, G4 - 10),
            (3 * G4 + 7, 0x7fff_0000, 3 * G4 + 0x7fff_0000),
            // Would be before 0: the raw value, not a wrapped u64.
            (0, u32::MAX, u64::from(u32::MAX)),
        ];
        for (reference, low, want) in cases {
            assert_eq!(
                extend(reference, low),
                want,
                "extend({reference:#x}, {low:#x})"
            );
        }
    }

    /// A chunk as decoded: `start` and `peer` keep only their low 32 bits.
    fn at(seq: u64, dir: Direction, len: u64, start: u64, peer: u64) -> Chunk {
        let mut c = data(seq);
        c.direction = dir;
        c.len = len;
        c.pos = u64::from(start as u32);
        c.peer_pos = u64::from(peer as u32);
        c
    }
    fn closed(seq: u64, egress_end: u64, ingress_end: u64) -> Chunk {
        let mut c = at(seq, Direction::Egress, 0, egress_end, ingress_end);
        c.kind = ChunkKind::Close;
        c
    }

    #[test]
    fn positions_and_stream_gaps_table() {
        use Direction::{Egress as E, Ingress as I};
        const G: u64 = 1 << 30;
        // (input in arrival order, expected (seq, pos, peer_pos) in release
        // order, stream_gaps, stream_gap_bytes)
        type Case = (Vec<Chunk>, Vec<(u64, u64, u64)>, u64, u64);
        let no_pos = {
            let mut c = at(1, E, 10, 999, 999);
            c.has_pos = false;
            c
        };
        let cases: Vec<(&str, Case)> = vec![
            (
                "request, response, close",
                (
                    vec![
                        at(0, E, 10, 0, 0),
                        at(1, I, 20, 0, 10),
                        at(2, E, 5, 10, 20),
                        closed(3, 15, 20),
                    ],
                    vec![(0, 0, 0), (1, 0, 10), (2, 10, 20), (3, 15, 20)],
                    0,
                    0,
                ),
            ),
            (
                "lost syscall entry",
                (
                    vec![at(0, E, 10, 0, 0), at(1, E, 10, 30, 0)],
                    vec![(0, 0, 0), (1, 30, 0)],
                    1,
                    20,
                ),
            ),
            (
                "lost first chunk",
                (vec![at(0, I, 10, 100, 0)], vec![(0, 100, 0)], 1, 100),
            ),
            (
                "lost record: seq and stream gap",
                (
                    vec![at(0, E, 10, 0, 0), at(2, E, 10, 25, 0)],
                    vec![(0, 0, 0), (2, 25, 0)],
                    1,
                    15,
                ),
            ),
            (
                "wrap around 4 GiB",
                (
                    (0..6)
                        .map(|i| at(i, E, G + G / 2, i * (G + G / 2), 3 * G + i))
                        .collect(),
                    (0..6).map(|i| (i, i * (G + G / 2), 3 * G + i)).collect(),
                    0,
                    0,
                ),
            ),
            (
                "gap across the wrap",
                (
                    vec![
                        at(0, E, 3 * G, 0, 0),
                        at(1, E, G, 4 * G + G / 2, 0),
                        at(2, I, 1, 0, 5 * G + G / 2),
                    ],
                    vec![(0, 0, 0), (1, 4 * G + G / 2, 0), (2, 0, 5 * G + G / 2)],
                    1,
                    G + G / 2,
                ),
            ),
            (
                "reordered chunks",
                (
                    vec![at(1, E, 10, 10, 0), at(0, E, 10, 0, 0), at(2, I, 4, 0, 20)],
                    vec![(0, 0, 0), (1, 10, 0), (2, 0, 20)],
                    0,
                    0,
                ),
            ),
            (
                "late connection: positions from the first chunk seen",
                (
                    vec![at(0, I, 7, 0, 0), at(1, E, 3, 0, 7)],
                    vec![(0, 0, 0), (1, 0, 7)],
                    0,
                    0,
                ),
            ),
            (
                "late connection whose first record was lost",
                (
                    vec![at(1, I, 7, 7, 0), at(2, E, 3, 0, 14)],
                    vec![(1, 7, 0), (2, 0, 14)],
                    1,
                    7,
                ),
            ),
            (
                "close reveals lost tails of both directions",
                (
                    vec![at(0, E, 10, 0, 0), at(1, I, 5, 0, 10), closed(3, 30, 8)],
                    vec![(0, 0, 0), (1, 0, 10), (3, 30, 8)],
                    2,
                    23,
                ),
            ),
            (
                "chunks without positions",
                (
                    vec![at(0, E, 10, 0, 0), no_pos],
                    vec![(0, 0, 0), (1, 999, 999)],
                    0,
                    0,
                ),
            ),
        ];
        for (name, (input, want, gaps, gap_bytes)) in cases {
            let mut r = Reorder::default();
            let mut out = Vec::new();
            for c in input {
                r.push(c, &mut out);
            }
            r.end_pass(&mut out);
            r.end_pass(&mut out);
            let got: Vec<(u64, u64, u64)> =
                out.iter().map(|c| (c.seq, c.pos, c.peer_pos)).collect();
            assert_eq!(got, want, "{name}");
            assert_eq!(
                (r.stats.stream_gaps, r.stats.stream_gap_bytes),
                (gaps, gap_bytes),
                "{name}"
            );
        }
    }

    #[test]
    fn a_late_chunk_gets_its_position_and_is_not_a_second_gap() {
        let mut r = Reorder::default();
        let mut out = Vec::new();
        r.push(at(0, Direction::Egress, 10, 0, 0), &mut out);
        r.push(at(2, Direction::Egress, 10, 20, 0), &mut out);
        r.end_pass(&mut out);
        r.end_pass(&mut out);
        // seq 1 comes after the gap was given up on: its bytes were a hole.
        r.push(at(1, Direction::Egress, 10, 10, 0), &mut out);
        let got: Vec<(u64, u64)> = out.iter().map(|c| (c.seq, c.pos)).collect();
        assert_eq!(got, vec![(0, 0), (2, 20), (1, 10)]);
        assert_eq!(
            (r.stats.late, r.stats.stream_gaps, r.stats.stream_gap_bytes),
            (1, 1, 10)
        );
    }

    #[test]
    fn truncation_is_not_a_gap() {
        let mut r = Reorder::default();
        let mut out = Vec::new();
        // `data` chunks carry 1 captured byte of len 8, all truncated.
        let first = at(0, Direction::Egress, 8, 0, 0);
        assert!(first.truncated && first.payload.len() < first.len as usize);
        r.push(first, &mut out);
        r.push(at(1, Direction::Egress, 8, 8, 0), &mut out);
        assert_eq!(out.iter().map(|c| c.pos).collect::<Vec<_>>(), vec![0, 8]);
        assert_eq!(r.stats.stream_gaps, 0);
    }

    #[test]
    fn a_gap_waits_one_pass_then_is_skipped() {
        let mut r = Reorder::default();
        let mut out = Vec::new();
        r.push(data(1), &mut out);
        r.end_pass(&mut out);
        assert!(out.is_empty(), "held through the first pass");
        r.end_pass(&mut out);
        assert_eq!(seqs(&out), vec![(1, false)]);
        assert_eq!(r.stats.gaps, 1);
    }

    #[test]
    fn connections_without_a_close_are_forgotten_after_idle() {
        let mut r = Reorder::default();
        let mut out = Vec::new();
        let t0 = Instant::now();
        r.end_pass_at(t0, &mut out);
        r.push(data(0), &mut out); // its process died: no close will come
        assert_eq!(r.tracked(), 1);
        for i in 1..SWEEP_EVERY {
            r.end_pass_at(t0 + Duration::from_millis(i), &mut out);
        }
        assert_eq!(r.tracked(), 1, "kept while recent");
        // The next sweep comes after IDLE has passed.
        for i in 0..SWEEP_EVERY {
            r.end_pass_at(t0 + IDLE + Duration::from_millis(i), &mut out);
        }
        assert_eq!(r.tracked(), 0);
    }

    #[test]
    fn closed_connections_are_forgotten_and_hold_is_bounded() {
        let mut r = Reorder::default();
        let mut out = Vec::new();
        r.push(data(0), &mut out);
        r.push(close(1), &mut out);
        assert_eq!(r.tracked(), 0);
        for s in 1..=(MAX_HELD as u64 + 1) {
            r.push(data(s), &mut out);
        }
        // seq 0 never came: the hold overflowed and the gap was skipped.
        assert_eq!(r.stats.gaps, 1);
        assert_eq!(out.len(), 2 + MAX_HELD + 1);
    }
}
