//! Per-connection ordering of chunks.
//!
//! The kernel numbers each connection's chunks (both directions) before it
//! writes them to the ring buffer; two threads using one socket on two CPUs can
//! write them out of order, and a full ring buffer loses some. Chunks are
//! released in sequence order; a gap still open after a whole drain pass
//! (the two chunks of a race are written microseconds apart) is a loss, which
//! is counted and skipped.
//!
//! A process that dies with sockets open never calls close(): the kernel
//! closes them, and no close record comes. Connections idle for `IDLE` are
//! therefore forgotten, so the state stays bounded on a busy host.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::event::{Chunk, ChunkKind, ConnMap};

/// Chunks held per connection before a gap is given up on regardless.
const MAX_HELD: usize = 256;
/// Connections with no chunk for this long are forgotten.
pub const IDLE: Duration = Duration::from_secs(300);
/// Drain passes between sweeps for idle connections.
const SWEEP_EVERY: u64 = 1024;

struct ConnOrder {
    next: u64,
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
        Self { conns: ConnMap::default(), stats: ReorderStats::default(), now: Instant::now(), passes: 0 }
    }
}

impl Reorder {
    /// Takes one chunk; appends to `out` whatever is now in order.
    pub fn push(&mut self, chunk: Chunk, out: &mut Vec<Chunk>) {
        let id = chunk.conn;
        let now = self.now;
        let st = self.conns.entry(id).or_insert_with(|| ConnOrder {
            next: 0,
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
            out.push(chunk);
            return;
        } else if chunk.seq == st.next {
            st.next += 1;
            out.push(chunk);
        } else {
            self.stats.reordered += 1;
            st.held.insert(chunk.seq, chunk);
            if st.held.len() > MAX_HELD {
                Self::skip_gap(st, &mut self.stats);
            }
        }
        if Self::release(st, out) {
            self.conns.remove(&id);
        }
    }

    /// Releases consecutive held chunks, then the close when its turn comes.
    /// Returns true when the connection is finished.
    fn release(st: &mut ConnOrder, out: &mut Vec<Chunk>) -> bool {
        while let Some(c) = st.held.remove(&st.next) {
            st.next += 1;
            out.push(c);
        }
        if st.held.is_empty() {
            st.stalled = false;
        }
        match &st.close {
            // The close carries the count of data chunks before it.
            Some(c) if c.seq <= st.next && st.held.is_empty() => {
                out.extend(st.close.take());
                true
            }
            _ => false,
        }
    }

    fn skip_gap(st: &mut ConnOrder, stats: &mut ReorderStats) {
        let first = st.held.keys().next().copied().or_else(|| st.close.as_ref().map(|c| c.seq));
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
            self.conns.retain(|_, st| now.duration_since(st.seen) < IDLE);
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
                return !Self::release(st, out);
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
    use std::time::Duration;
    use agent_common::{KIND_CLOSE, KIND_DATA};

    fn data(seq: u64) -> Chunk {
        decode(&header(KIND_DATA, seq, b"x")).unwrap()
    }
    fn close(seq: u64) -> Chunk {
        decode(&header(KIND_CLOSE, seq, b"")).unwrap()
    }
    fn seqs(v: &[Chunk]) -> Vec<(u64, bool)> {
        v.iter().map(|c| (c.seq, c.kind == ChunkKind::Close)).collect()
    }

    #[test]
    fn table() {
        // (input, expected output after pushes and two end_pass calls, gaps, late)
        type Case = (Vec<Chunk>, Vec<(u64, bool)>, u64, u64);
        let cases: Vec<(&str, Case)> = vec![
            ("in order", (vec![data(0), data(1), data(2)], vec![(0, false), (1, false), (2, false)], 0, 0)),
            ("swapped", (vec![data(1), data(0), data(2)], vec![(0, false), (1, false), (2, false)], 0, 0)),
            ("close after data", (vec![data(0), close(2), data(1)], vec![(0, false), (1, false), (2, true)], 0, 0)),
            ("lost chunk", (vec![data(0), data(2), data(3)], vec![(0, false), (2, false), (3, false)], 1, 0)),
            ("lost before close", (vec![data(0), close(2)], vec![(0, false), (2, true)], 1, 0)),
            ("late duplicate", (vec![data(0), data(1), data(0)], vec![(0, false), (1, false), (0, false)], 0, 1)),
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
