//! HTTP exchanges -> spans, linked into whole traces.
//!
//! Each exchange becomes a SERVER span (the traced process received the
//! request) or a CLIENT span (it sent it). A span's ids are decided when its
//! request head is read ([`RequestStart`]), not when its response ends, so
//! that the calls a request causes can name it as their parent while it is
//! still being served. The parent rules, in order:
//!
//! 1. SERVER whose request a CLIENT span of this agent sent (the mirrored
//!    connection on this host, the same HTTP/2 stream, the next unmatched
//!    request in the connection's order): that CLIENT span, whatever headers
//!    the request carries; its trace.
//! 2. SERVER whose request carries context: the header's span, its trace.
//! 3. CLIENT sent while its process served a SERVER span (in-process link,
//!    below): that SERVER span, unless the outgoing context names a span that
//!    is neither one of the agent's in that process nor the one the SERVER's
//!    request carried (forwarded unchanged): an SDK in the app made that span,
//!    and it is the parent.
//! 4. CLIENT whose request carries context: the header's span.
//! 5. Otherwise a new trace.
//!
//! In-process links: the outgoing request carries the trace id of exactly one
//! SERVER request open in the same process (async runtimes, event loops and
//! thread pools that forward context); or, without context, it was sent by a
//! thread that had received exactly one request it had not yet answered. A
//! thread with several open (an event loop) is not guessed at, but counted;
//! [`ThreadLink::MostRecent`] takes the newest instead.
//!
//! Sampling is decided once per trace, at its root: every descendant follows,
//! so no trace is exported half.
//!
//! Finished exchanges whose other end is on this host are held (at most the
//! assembly window) until that end finishes too, so each span gets the
//! other's two moments as events (client send, server receive, server send,
//! client receive). Requests whose heads were never reported (a decoder path
//! without starts) are started when they finish and follow the same rules.

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, Hash},
    net::SocketAddr,
};

use smallvec::SmallVec;

use super::{
    context::{self, RemoteContext, SpanId, TraceId},
    sampling::Sampler,
    AttrValue, SpanKind, SpanRecord, Status,
};
use crate::{
    capture::{ConnId, Role},
    decode::{Headers, HttpExchange, Outcome, Protocol, RequestStart},
};

const KNOWN_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY",
];
/// Requests the correlator tracks (open, held, or lingering for late
/// lookups); beyond this the entries that expire first are cut short.
const MAX_OPEN: usize = 65536;
/// How long a span that went out stays known for late lookups.
const LINGER_NS: u64 = 300_000_000;
/// An open request whose exchange never finishes (lost, or a connection the
/// decoder dropped) is forgotten after this long.
const OPEN_MAX_AGE_NS: u64 = 300_000_000_000;

/// What to do with a CLIENT request sent by a thread that had several
/// received requests open (an event loop) and carried no context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ThreadLink {
    /// No in-process parent (a new trace): never a wrong parent.
    #[default]
    None,
    /// The request the thread received most recently.
    MostRecent,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SpanCounters {
    /// Spans built and handed on (sampled).
    pub spans: u64,
    pub server_spans: u64,
    pub client_spans: u64,
    /// Not exported: the caller's or the ratio sampler's decision.
    pub sampled_out: u64,
    /// Exchanges whose end could not be told (no role): not turned into spans.
    pub unknown_role: u64,
    /// SERVER spans whose request a CLIENT span on this host sent.
    pub paired: u64,
    /// CLIENT spans linked to the SERVER span of their process by the
    /// propagated trace id, and by the sending thread.
    pub linked_by_trace: u64,
    pub linked_by_thread: u64,
    /// CLIENT spans whose parent is a span an SDK in the app made.
    pub sdk_parents: u64,
    /// No in-process link: the trace id matched several open requests; the
    /// thread had several open (event loop; with `MostRecent`, linked anyway).
    pub ambiguous_trace: u64,
    pub ambiguous_thread: u64,
    /// CLIENT requests left unlinked because the thread that sent them had
    /// another call for the same SERVER request in flight on the same
    /// connection (a client library writing other threads' calls, as
    /// grpcio's does): the thread does not tell whose call it is.
    pub overlapping_calls: u64,
    /// Of those, earlier calls already linked whose link could not be taken
    /// back (their peer had gone out or had children).
    pub overlapping_kept: u64,
    /// SERVER requests paired with their CLIENT although the CLIENT's start
    /// was reported after theirs (different CPUs, different drain passes).
    pub late_pairs: u64,
    /// Exchanges that finished without a reported request start.
    pub late_starts: u64,
    /// Tracked requests cut short by the bound (their links are lost).
    pub evicted: u64,
    /// Requests carrying context, by format; and malformed context headers.
    pub context_w3c: u64,
    pub context_b3: u64,
    pub context_jaeger: u64,
    pub context_malformed: u64,
}

/// (client address, server address) of a connection and its HTTP/2 stream
/// (0 for HTTP/1: on one connection both ends number streams alike).
type MirrorKey = (SocketAddr, SocketAddr, u32);
/// A request on a connection: its stream and the moment its first byte was seen.
type RequestKey = (ConnId, u32, u64);

/// (parent, trace, the parent came from a header, sampled, the other end's entry)
type Link = (Option<SpanId>, TraceId, bool, bool, Option<u64>);

/// One request, from its head on.
struct Open {
    kind: SpanKind,
    pid: u32,
    tid: u32,
    key: RequestKey,
    mirror: MirrorKey,
    start_ns: u64,
    /// SERVER: when it began to answer (or ended without answering).
    answered_ns: Option<u64>,
    span_id: SpanId,
    trace_id: TraceId,
    parent: Option<SpanId>,
    /// The parent came from the request's headers.
    remote_parent: bool,
    sampled: bool,
    /// The request's own context (SERVER: what it received).
    ctx: Option<RemoteContext>,
    /// The other end of this request on this host.
    peer: Option<u64>,
    /// Finished, waiting for the peer's moments (at most until `expires_ns`).
    held: Option<Box<HttpExchange>>,
    /// (first, last) moment of the finished exchange, for the peer's events.
    moments: Option<(u64, u64)>,
    emitted: bool,
    expires_ns: u64,
    /// CLIENT: its parent was chosen by the sending thread.
    via_thread: bool,
    /// SERVER: a thread sent overlapping calls for it; no more thread links.
    multiplexed: bool,
    /// Spans whose trace was taken from this one (in-process children, the
    /// mirrored peer): while there are none, its trace can still change.
    children: u32,
}

pub struct SpanBuilder {
    sampler: Sampler,
    /// Add to kernel monotonic ns to get Unix ns.
    epoch_offset_ns: i128,
    window_ns: u64,
    thread_link: ThreadLink,
    opens: FastMap<u64, Open>,
    expiry: Deadlines,
    by_request: FastMap<RequestKey, u64>,
    /// CLIENT requests not yet matched by a SERVER start, oldest first.
    mirror: FastMap<MirrorKey, Ids>,
    /// SERVER requests whose start found no CLIENT to mirror, for a CLIENT
    /// start reported just after them; `orphan_order` ages them out.
    orphans: FastMap<MirrorKey, Ids>,
    orphan_order: VecDeque<(u64, MirrorKey, u64)>,
    /// CLIENT requests linked by their thread and not finished, per thread.
    calls: FastMap<(u32, u32), Ids>,
    /// SERVER requests by (pid, tid) that received them.
    threads: FastMap<(u32, u32), Slot>,
    /// SERVER requests by (pid, trace id received or given). SipHash: the
    /// ids of received context are chosen by whoever sends the request.
    traces: HashMap<(u32, TraceId), Slot>,
    /// Every tracked span by (pid, span id): ids the agent drew.
    spans: FastMap<(u32, SpanId), u64>,
    next_id: u64,
    /// Also set the pre-2026 gRPC attributes (`rpc.system`, `rpc.service`,
    /// `rpc.grpc.status_code`) that many dashboards still query.
    legacy_rpc: bool,
    pub counters: SpanCounters,
}

/// Open requests kept per thread or trace: more than one is ambiguous
/// anyway, so beyond this the oldest leave the index and the slot is marked
/// crowded (an event loop): never guessed at again, whatever it empties to.
const MAX_PER_INDEX: usize = 64;

/// Maps keyed by what the kernel or the agent chose (connections, threads,
/// the agent's own ids), never by bytes a peer sent: a fast hash suffices.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Ids per key: almost always one or two, so they live inline (a heap
/// allocation per request per index was a fifth of the correlator's cost).
type Ids = SmallVec<[u64; 4]>;

#[derive(Default)]
struct Slot {
    ids: Ids,
    crowded: bool,
}

/// Kinds of deadline, one queue each.
const DL_OPEN: usize = 0;
const DL_HELD: usize = 1;
const DL_LINGER: usize = 2;

/// Deadlines of tracked requests, a FIFO per kind: each kind is `now` (or
/// the exchange's end) plus a constant, so entries arrive in deadline order,
/// or nearly (an entry may leave a few milliseconds late), and a queue does
/// what a heap did at O(1). Entries are lazy: one whose request's
/// `expires_ns` has moved is stale and skipped. A heap kept the stale
/// 300 s open-age entry of every request ever made (millions under load);
/// here stale fronts go at every look, and the queues are compacted when
/// they hold far more entries than there are live requests.
#[derive(Default)]
struct Deadlines {
    queues: [VecDeque<(u64, u64)>; 3],
    len: usize,
}

impl Deadlines {
    fn push(&mut self, kind: usize, at: u64, id: u64) {
        self.queues[kind].push_back((at, id));
        self.len += 1;
    }

    /// The earliest live entry, (kind, deadline, id), after dropping stale fronts.
    fn first(&mut self, live: impl Fn(u64, u64) -> bool) -> Option<(usize, u64, u64)> {
        let mut best: Option<(usize, u64, u64)> = None;
        for (k, q) in self.queues.iter_mut().enumerate() {
            while let Some(&(at, id)) = q.front() {
                if live(at, id) {
                    if best.is_none_or(|(_, b, _)| at < b) {
                        best = Some((k, at, id));
                    }
                    break;
                }
                q.pop_front();
                self.len -= 1;
            }
        }
        best
    }

    fn pop(&mut self, kind: usize) {
        if self.queues[kind].pop_front().is_some() {
            self.len -= 1;
        }
    }

    /// Drops stale entries once they outnumber the live requests.
    fn compact(&mut self, tracked: usize, live: impl Fn(u64, u64) -> bool) {
        if self.len <= 2 * tracked + 1024 {
            return;
        }
        for q in &mut self.queues {
            q.retain(|&(at, id)| live(at, id));
        }
        self.len = self.queues.iter().map(VecDeque::len).sum();
    }
}

/// Whether a deadline entry (deadline, id) is still its request's.
fn live(opens: &FastMap<u64, Open>) -> impl Fn(u64, u64) -> bool + '_ {
    move |at, id| opens.get(&id).is_some_and(|o| o.expires_ns == at)
}

fn index<K: Hash + Eq, S: BuildHasher>(map: &mut HashMap<K, Slot, S>, k: K, id: u64) {
    let v = map.entry(k).or_default();
    if v.ids.len() >= MAX_PER_INDEX {
        v.ids.remove(0);
        v.crowded = true;
    }
    v.ids.push(id);
}

/// Removes `id` from the queue of `k`, and the queue when it empties. Ids
/// go in arrival order and mostly leave in it: the front first.
fn forget<K: Hash + Eq, S: BuildHasher>(map: &mut HashMap<K, Ids, S>, k: K, id: u64) {
    if let Some(q) = map.get_mut(&k) {
        if let Some(i) = q.iter().position(|i| *i == id) {
            q.remove(i);
        }
        if q.is_empty() {
            map.remove(&k);
        }
    }
}

/// Takes the first id of the queue of `k` that `fit` accepts, and drops the
/// queue when it empties.
fn take_first<K: Hash + Eq, S: BuildHasher>(
    map: &mut HashMap<K, Ids, S>,
    k: K,
    fit: impl Fn(u64) -> bool,
) -> Option<u64> {
    let q = map.get_mut(&k)?;
    let i = q.iter().position(|id| fit(*id))?;
    let id = q.remove(i);
    if q.is_empty() {
        map.remove(&k);
    }
    Some(id)
}

/// Removes `id` from an index slot, and the slot when it empties.
fn unindex<K: Hash + Eq, S: BuildHasher>(map: &mut HashMap<K, Slot, S>, k: K, id: u64) {
    if let Some(v) = map.get_mut(&k) {
        v.ids.retain(|i| *i != id);
        if v.ids.is_empty() && !v.crowded {
            map.remove(&k);
        }
    }
}

impl SpanBuilder {
    /// `window_ns`: how long a finished exchange waits for its other end.
    pub fn new(sampler: Sampler, epoch_offset_ns: i128, window_ns: u64) -> Self {
        Self {
            sampler,
            epoch_offset_ns,
            window_ns,
            thread_link: ThreadLink::None,
            opens: FastMap::default(),
            expiry: Deadlines::default(),
            by_request: FastMap::default(),
            mirror: FastMap::default(),
            orphans: FastMap::default(),
            orphan_order: VecDeque::new(),
            calls: FastMap::default(),
            threads: FastMap::default(),
            traces: HashMap::new(),
            spans: FastMap::default(),
            next_id: 0,
            legacy_rpc: true,
            counters: SpanCounters::default(),
        }
    }

    /// Turns the legacy gRPC attributes on or off (on by default).
    pub fn with_legacy_rpc_attributes(mut self, on: bool) -> Self {
        self.legacy_rpc = on;
        self
    }

    pub fn with_thread_link(mut self, mode: ThreadLink) -> Self {
        self.thread_link = mode;
        self
    }

    /// Takes a decode batch: request starts (each tagged with the index of
    /// the exchange before which it happened) and finished exchanges, in
    /// chunk order; appends spans that are ready.
    pub fn push_batch(
        &mut self,
        starts: &mut Vec<(usize, RequestStart)>,
        exchanges: &mut Vec<HttpExchange>,
        now_ns: u64,
        out: &mut Vec<SpanRecord>,
    ) {
        let mut starts = starts.drain(..).peekable();
        for (i, ex) in exchanges.drain(..).enumerate() {
            while let Some((_, s)) = starts.next_if(|(at, _)| *at <= i) {
                self.start(&s, now_ns, out);
            }
            self.push(ex, now_ns, out);
        }
        for (_, s) in starts {
            self.start(&s, now_ns, out);
        }
    }

    /// A request head was read: decides its span's ids and parent.
    pub fn start(&mut self, s: &RequestStart, now_ns: u64, out: &mut Vec<SpanRecord>) {
        let kind = match s.role {
            Role::Server => SpanKind::Server,
            Role::Client => SpanKind::Client,
            Role::Unknown => return,
        };
        let key = (s.conn, s.stream, s.request_first_ns);
        if self.by_request.contains_key(&key) {
            return;
        }
        let extracted = context::extract(&s.context_headers);
        self.count_context(&extracted);
        let ctx = extracted.context;
        let deny =
            ctx.is_none() && header(&s.context_headers, "b3").is_some_and(|v| v.trim() == "0");
        let mirror = match kind {
            SpanKind::Client => (s.local, s.remote, s.stream),
            SpanKind::Server => (s.remote, s.local, s.stream),
        };
        let t = s.request_first_ns;
        self.age_orphans(now_ns);
        let mut link: Option<Link> = None;
        let mut via_thread = false;
        match kind {
            SpanKind::Server => {
                if let Some(c) = self.take_mirror(mirror, t) {
                    if let Some(o) = self.opens.get(&c) {
                        self.counters.paired += 1;
                        link = Some((Some(o.span_id), o.trace_id, false, o.sampled, Some(c)));
                    }
                }
            }
            SpanKind::Client => {
                let found = self.in_process_parent(s.pid, s.tid, t, ctx.as_ref());
                let found = match found {
                    Some((p, true)) => self.unless_overlapping(s, p),
                    other => other.map(|(p, _)| p),
                };
                if let Some(p) = found {
                    if let Some(o) = self.opens.get_mut(&p) {
                        link = Some(match &ctx {
                            Some(c)
                                if Some(c.span_id) != o.ctx.as_ref().map(|r| r.span_id)
                                    && !self.spans.contains_key(&(s.pid, c.span_id)) =>
                            {
                                self.counters.sdk_parents += 1;
                                (Some(c.span_id), c.trace_id, true, o.sampled, None)
                            }
                            _ => {
                                o.children += 1;
                                via_thread = ctx.is_none();
                                (Some(o.span_id), o.trace_id, false, o.sampled, None)
                            }
                        });
                    }
                }
            }
        }
        let (parent, trace_id, remote_parent, sampled, peer) = link.unwrap_or_else(|| {
            let (trace_id, parent) = match &ctx {
                Some(c) => (c.trace_id, Some(c.span_id)),
                None => (TraceId::random(), None),
            };
            let sampled = !deny && self.sampler.should_sample(trace_id, ctx.as_ref());
            (parent, trace_id, parent.is_some(), sampled, None)
        });
        let id = self.next_id;
        self.next_id += 1;
        let span_id = SpanId::random();
        if let Some(p) = peer.and_then(|p| self.opens.get_mut(&p)) {
            p.peer = Some(id);
            p.children += 1;
        }
        let mut adopted = None;
        match kind {
            SpanKind::Client => {
                adopted = self.take_orphan(mirror, t);
                if adopted.is_none() {
                    self.mirror.entry(mirror).or_default().push(id);
                }
                if via_thread {
                    self.calls.entry((s.pid, s.tid)).or_default().push(id);
                }
            }
            SpanKind::Server => {
                if peer.is_none() {
                    self.orphans.entry(mirror).or_default().push(id);
                    self.orphan_order.push_back((now_ns, mirror, id));
                }
                index(&mut self.threads, (s.pid, s.tid), id);
                index(&mut self.traces, (s.pid, trace_id), id);
                if let Some(c) = ctx.as_ref().filter(|c| c.trace_id != trace_id) {
                    index(&mut self.traces, (s.pid, c.trace_id), id);
                }
            }
        }
        self.spans.insert((s.pid, span_id), id);
        self.by_request.insert(key, id);
        let expires_ns = now_ns.saturating_add(OPEN_MAX_AGE_NS);
        self.opens.insert(
            id,
            Open {
                kind,
                pid: s.pid,
                tid: s.tid,
                key,
                mirror,
                start_ns: t,
                answered_ns: None,
                span_id,
                trace_id,
                parent,
                remote_parent,
                sampled,
                ctx,
                peer: peer.or(adopted),
                held: None,
                moments: None,
                emitted: false,
                expires_ns,
                via_thread,
                multiplexed: false,
                children: u32::from(adopted.is_some()),
            },
        );
        if let Some(sv) = adopted {
            self.counters.paired += 1;
            self.counters.late_pairs += 1;
            self.retrace(sv, trace_id, sampled);
            if let Some(o) = self.opens.get_mut(&sv) {
                o.parent = Some(span_id);
                o.remote_parent = false;
                o.peer = Some(id);
            }
        }
        self.expiry.push(DL_OPEN, expires_ns, id);
        self.expiry.compact(self.opens.len(), live(&self.opens));
        while self.opens.len() > MAX_OPEN {
            // Entries that expire first go first: those lingering after their
            // span went out, before any still open.
            let cut = self
                .expiry
                .first(live(&self.opens))
                .and_then(|(_, _, id)| self.opens.get(&id))
                .is_some_and(|o| !o.emitted);
            if !self.expire_one(u64::MAX, out) {
                break;
            }
            if cut {
                self.counters.evicted += 1;
            }
        }
    }

    fn count_context(&mut self, e: &context::Extracted) {
        self.counters.context_malformed += e.malformed.len() as u64;
        if let Some(c) = &e.context {
            match c.format {
                context::Format::W3c => self.counters.context_w3c += 1,
                context::Format::B3Single | context::Format::B3Multi => {
                    self.counters.context_b3 += 1
                }
                context::Format::Jaeger => self.counters.context_jaeger += 1,
            }
        }
    }

    /// `p`, the SERVER request a CLIENT request's thread serves, unless that
    /// thread already has a call for `p` in flight on the same connection:
    /// a caller that waits for its answer sends one at a time, so the thread
    /// is writing other threads' calls too, and neither call is linked
    /// (the earlier one loses its link if nothing has followed it yet).
    fn unless_overlapping(&mut self, s: &RequestStart, p: u64) -> Option<u64> {
        let parent = self.opens.get(&p)?;
        let parent_span = parent.span_id;
        // The thread's unfinished calls still linked to `p` by the thread.
        let earlier: Ids = self
            .calls
            .get(&(s.pid, s.tid))
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|c| {
                        self.opens
                            .get(c)
                            .is_some_and(|o| o.via_thread && o.parent == Some(parent_span))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let clash = parent.multiplexed
            || earlier.iter().any(|c| {
                self.opens.get(c).is_some_and(|o| {
                    (o.mirror.0, o.mirror.1) == (s.local, s.remote)
                        && o.start_ns <= s.request_first_ns
                })
            });
        if !clash {
            return Some(p);
        }
        self.counters.overlapping_calls += 1;
        if let Some(o) = self.opens.get_mut(&p) {
            o.multiplexed = true;
        }
        for c in earlier {
            self.unlink_call(c, p);
        }
        None
    }

    /// Takes back the thread link of CLIENT `c` to SERVER `p`: it starts a
    /// trace of its own, with its peer, unless either has been exported or
    /// has children.
    fn unlink_call(&mut self, c: u64, p: u64) {
        let Some(o) = self.opens.get(&c) else { return };
        let peer = o.peer.and_then(|pe| self.opens.get(&pe).map(|po| (pe, po)));
        let fixed = o.emitted
            || o.children > u32::from(peer.is_some())
            || peer.is_some_and(|(_, po)| po.emitted || po.children > 0);
        if fixed {
            self.counters.overlapping_kept += 1;
            return;
        }
        let peer = peer.map(|(pe, _)| pe);
        let trace = TraceId::random();
        let sampled = self.sampler.should_sample(trace, None);
        self.retrace(c, trace, sampled);
        if let Some(pe) = peer {
            self.retrace(pe, trace, sampled);
        }
        if let Some(o) = self.opens.get_mut(&c) {
            o.parent = None;
            o.remote_parent = false;
            o.via_thread = false;
        }
        if let Some(o) = self.opens.get_mut(&p) {
            o.children = o.children.saturating_sub(1);
        }
    }

    /// Moves span `id` to another trace (its trace-id index entry with it).
    fn retrace(&mut self, id: u64, trace: TraceId, sampled: bool) {
        let Some(o) = self.opens.get_mut(&id) else {
            return;
        };
        let (old, pid, indexed) = (
            o.trace_id,
            o.pid,
            o.kind == SpanKind::Server && o.answered_ns.is_none(),
        );
        o.trace_id = trace;
        o.sampled = sampled;
        if indexed && old != trace {
            unindex(&mut self.traces, (pid, old), id);
            index(&mut self.traces, (pid, trace), id);
        }
    }

    /// A SERVER request of the mirrored connection, received at or after
    /// `t`, that found no CLIENT when it started and can still take one as
    /// its parent (nothing exported, no children yet).
    fn take_orphan(&mut self, key: MirrorKey, t: u64) -> Option<u64> {
        let opens = &self.opens;
        take_first(&mut self.orphans, key, |id| {
            opens.get(&id).is_some_and(|o| {
                o.start_ns >= t && !o.emitted && o.children == 0 && o.peer.is_none()
            })
        })
    }

    /// Forgets orphans older than a linger (a CLIENT start comes a drain pass
    /// or two late, not seconds).
    fn age_orphans(&mut self, now_ns: u64) {
        while let Some(&(at, key, id)) = self.orphan_order.front() {
            let age = self.window_ns.min(LINGER_NS);
            if at.saturating_add(age) > now_ns && self.orphan_order.len() <= MAX_OPEN {
                break;
            }
            self.orphan_order.pop_front();
            forget(&mut self.orphans, key, id);
        }
    }

    /// The oldest unmatched CLIENT request of the mirrored connection that
    /// began before `t` (a server never reads a request before it is sent).
    fn take_mirror(&mut self, key: MirrorKey, t: u64) -> Option<u64> {
        let opens = &self.opens;
        take_first(&mut self.mirror, key, |id| {
            opens.get(&id).is_some_and(|o| o.start_ns <= t)
        })
    }

    /// Whether SERVER request `id` was received and not yet answered at `t`.
    fn open_at(&self, id: u64, t: u64) -> bool {
        self.opens
            .get(&id)
            .is_some_and(|o| o.start_ns <= t && o.answered_ns.is_none_or(|a| a > t))
    }

    /// The SERVER request a CLIENT request sent at `t` by (pid, tid) was made for.
    fn in_process_parent(
        &mut self,
        pid: u32,
        tid: u32,
        t: u64,
        ctx: Option<&RemoteContext>,
    ) -> Option<(u64, bool)> {
        // A crowded slot stands for "many": two made-up ids that match nothing.
        let open = |slot: Option<&Slot>| -> Ids {
            match slot {
                Some(v) if v.crowded => SmallVec::from_slice(&[u64::MAX, u64::MAX]),
                Some(v) => v
                    .ids
                    .iter()
                    .copied()
                    .filter(|id| self.open_at(*id, t))
                    .collect(),
                None => Ids::new(),
            }
        };
        let on_thread = open(self.threads.get(&(pid, tid)));
        if let Some(c) = ctx {
            let by_trace = open(self.traces.get(&(pid, c.trace_id)));
            return match by_trace.as_slice() {
                [] => None,
                [one] => {
                    self.counters.linked_by_trace += 1;
                    Some((*one, false))
                }
                many => {
                    // The same trace twice in one process: the thread decides.
                    let mine: Ids = many
                        .iter()
                        .copied()
                        .filter(|id| on_thread.contains(id))
                        .collect();
                    if let [one] = mine.as_slice() {
                        self.counters.linked_by_trace += 1;
                        Some((*one, false))
                    } else {
                        self.counters.ambiguous_trace += 1;
                        None
                    }
                }
            };
        }
        match on_thread.as_slice() {
            [] => None,
            [one] => {
                self.counters.linked_by_thread += 1;
                Some((*one, true))
            }
            many => {
                self.counters.ambiguous_thread += 1;
                match self.thread_link {
                    ThreadLink::None => None,
                    ThreadLink::MostRecent => many
                        .iter()
                        .copied()
                        .max_by_key(|id| self.opens.get(id).map_or(0, |o| o.start_ns))
                        .map(|id| (id, true)),
                }
            }
        }
    }

    /// Takes one finished exchange (`now_ns`: kernel monotonic time); appends
    /// spans that are ready.
    pub fn push(&mut self, ex: HttpExchange, now_ns: u64, out: &mut Vec<SpanRecord>) {
        if ex.role == Role::Unknown {
            self.counters.unknown_role += 1;
            return;
        }
        let key = (ex.conn, ex.stream(), ex.request_first_ns);
        // An h2c upgrade makes the HTTP/1 request (started as stream 0)
        // stream 1 of the HTTP/2 connection that follows.
        let started = self.by_request.get(&key).or_else(|| {
            (key.1 == 1)
                .then(|| self.by_request.get(&(key.0, 0, key.2)))
                .flatten()
        });
        let id = match started {
            Some(id) => *id,
            None => {
                self.counters.late_starts += 1;
                self.start(&RequestStart::of(&ex), now_ns, out);
                match self.by_request.get(&key) {
                    Some(id) => *id,
                    None => return,
                }
            }
        };
        let window = self.window_ns;
        let Some(o) = self.opens.get_mut(&id) else {
            return;
        };
        let end = end_ns(&ex);
        o.moments = Some((ex.request_first_ns, end));
        if o.kind == SpanKind::Server {
            o.answered_ns = Some(ex.response_first_ns.unwrap_or(end));
            // Answered: no later call of its thread or trace is made for it.
            let (pid, tid, trace, got) =
                (o.pid, o.tid, o.trace_id, o.ctx.as_ref().map(|c| c.trace_id));
            unindex(&mut self.threads, (pid, tid), id);
            unindex(&mut self.traces, (pid, trace), id);
            if let Some(t) = got {
                unindex(&mut self.traces, (pid, t), id);
            }
        }
        if o.kind == SpanKind::Client {
            // Finished: no longer a call in flight of its thread. A CLIENT is
            // matched or not by now: a server reads a request before the
            // client can have its response.
            let (thread, m, unmatched) = ((o.pid, o.tid), o.mirror, o.peer.is_none());
            forget(&mut self.calls, thread, id);
            if unmatched {
                forget(&mut self.mirror, m, id);
            }
        }
        let peer = self.opens.get(&id).and_then(|o| o.peer);
        let peer_done = peer
            .and_then(|p| self.opens.get(&p))
            .and_then(|p| p.moments.map(|m| (m, p.emitted)));
        let Some(o) = self.opens.get_mut(&id) else {
            return;
        };
        match (peer, peer_done) {
            // The other end finished first and waits: both go out together.
            (Some(p), Some((_, false))) => {
                self.emit(id, Some(ex), out);
                self.emit(p, None, out);
            }
            // Its other end on this host has not finished yet: hold it.
            (Some(_), None) => {
                o.held = Some(Box::new(ex));
                o.expires_ns = now_ns.saturating_add(window);
                let e = o.expires_ns;
                self.expiry.push(DL_HELD, e, id);
            }
            _ => self.emit(id, Some(ex), out),
        }
    }

    /// Builds the span of `id` from `ex` (or its held exchange), with its
    /// peer's moments when known, and keeps the entry only as long as late
    /// lookups (peer, threads) may need it.
    fn emit(&mut self, id: u64, ex: Option<HttpExchange>, out: &mut Vec<SpanRecord>) {
        let window = self.window_ns;
        let Some(o) = self.opens.get_mut(&id) else {
            return;
        };
        let Some(ex) = ex.or_else(|| o.held.take().map(|b| *b)) else {
            return;
        };
        o.emitted = true;
        // Kept a little past its end for late lookups (CLIENT starts of its
        // thread reported after it finished, a drain pass or two late): not
        // the whole assembly window, which would multiply the live state.
        let linger = o
            .moments
            .map_or(0, |m| m.1)
            .saturating_add(window.min(LINGER_NS));
        o.expires_ns = o.expires_ns.min(linger);
        let (e, orphan) = (
            o.expires_ns,
            (o.kind == SpanKind::Server && o.peer.is_none()).then_some(o.mirror),
        );
        self.expiry.push(DL_LINGER, e, id);
        // Gone out: no late CLIENT can adopt it now, so it leaves its
        // connection's orphans at once rather than after the linger (at
        // high rates a connection had hundreds, scanned at every start).
        if let Some(m) = orphan {
            forget(&mut self.orphans, m, id);
        }
        let Some(o) = self.opens.get(&id) else {
            return;
        };
        let peer = o
            .peer
            .and_then(|p| self.opens.get(&p))
            .and_then(|p| p.moments);
        let mut events = Vec::new();
        if let Some((first, last)) = peer {
            let names = match o.kind {
                SpanKind::Client => ["server_receive", "server_send"],
                SpanKind::Server => ["client_send", "client_receive"],
            };
            events.push((names[0], self.unix(first)));
            events.push((names[1], self.unix(last)));
        }
        if !o.sampled {
            self.counters.sampled_out += 1;
            return;
        }
        let span = self.build(o, &ex, events);
        self.counters.spans += 1;
        match span.kind {
            SpanKind::Server => self.counters.server_spans += 1,
            SpanKind::Client => self.counters.client_spans += 1,
        }
        out.push(span);
    }

    /// Ends entries whose time is up (`now_ns`: monotonic; `u64::MAX`: all):
    /// held spans go out without their peer's moments.
    pub fn flush(&mut self, now_ns: u64, out: &mut Vec<SpanRecord>) {
        while self.expire_one(now_ns, out) {}
    }

    /// Ends the entry that expires first if it expires by `now_ns`.
    fn expire_one(&mut self, now_ns: u64, out: &mut Vec<SpanRecord>) -> bool {
        let Some((kind, at, id)) = self.expiry.first(live(&self.opens)) else {
            return false;
        };
        if at > now_ns {
            return false;
        }
        self.expiry.pop(kind);
        if self.opens.get(&id).is_some_and(|o| o.held.is_some()) {
            self.emit(id, None, out);
        }
        self.remove(id);
        true
    }

    fn remove(&mut self, id: u64) {
        let Some(o) = self.opens.remove(&id) else {
            return;
        };
        self.by_request.remove(&o.key);
        self.spans.remove(&(o.pid, o.span_id));
        match o.kind {
            SpanKind::Client => {
                forget(&mut self.calls, (o.pid, o.tid), id);
                forget(&mut self.mirror, o.mirror, id);
            }
            SpanKind::Server => {
                unindex(&mut self.threads, (o.pid, o.tid), id);
                unindex(&mut self.traces, (o.pid, o.trace_id), id);
                if let Some(c) = o.ctx.as_ref() {
                    unindex(&mut self.traces, (o.pid, c.trace_id), id);
                }
            }
        }
        if let Some(p) = o.peer.and_then(|p| self.opens.get_mut(&p)) {
            p.peer = None;
        }
    }

    /// Requests tracked (open, held or lingering).
    pub fn waiting(&self) -> usize {
        self.opens.len()
    }

    fn unix(&self, mono: u64) -> u64 {
        (mono as i128 + self.epoch_offset_ns).max(0) as u64
    }

    fn build(
        &self,
        o: &Open,
        ex: &HttpExchange,
        mut events: Vec<(&'static str, u64)>,
    ) -> SpanRecord {
        let start_ns = self.unix(ex.request_first_ns);
        let end = self.unix(end_ns(ex)).max(start_ns);
        events.sort_by_key(|e| e.1);
        let method = normalize_method(&ex.method);
        let path = url_path(&ex.target);
        let grpc = Grpc::of(ex);
        let name = match &grpc {
            Some(g) => g.method.to_string(),
            None => format!(
                "{} {}",
                if method == "_OTHER" { "HTTP" } else { method },
                path
            ),
        };
        let status = span_status(o.kind, ex, grpc.as_ref());
        // The request's own context describes this trace only when it names it.
        let own = o.ctx.as_ref().filter(|c| c.trace_id == o.trace_id);
        SpanRecord {
            trace_id: o.trace_id,
            span_id: o.span_id,
            parent_span_id: o.parent,
            remote_parent: o.remote_parent,
            trace_state: own.and_then(|c| c.trace_state.clone()),
            flags: own.map_or(1, |c| c.trace_flags | 1),
            name,
            kind: o.kind,
            start_ns,
            end_ns: end,
            attributes: attributes(o.kind, ex, method, path, grpc.as_ref(), self.legacy_rpc),
            events,
            status,
            pid: ex.pid,
            comm: ex.comm.to_string(),
        }
    }
}

/// The last moment of an exchange this end saw.
fn end_ns(ex: &HttpExchange) -> u64 {
    ex.response_last_ns
        .or(ex.response_first_ns)
        .unwrap_or(ex.request_last_ns)
        .max(ex.request_first_ns)
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.get(name)
}

/// gRPC status code names, indexed by code.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
/// Codes that are errors on a server (OpenTelemetry gRPC conventions): the
/// server failed, not the caller.
const GRPC_SERVER_ERRORS: [u32; 6] = [2, 4, 12, 13, 14, 15];
/// HTTP/2 RST_STREAM CANCEL: the gRPC call was cancelled.
const H2_CANCEL: u32 = 8;

/// `/package.Service/Method`: what gRPC paths look like.
fn grpc_path(p: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    };
    match p.strip_prefix('/').and_then(|r| r.split_once('/')) {
        Some((svc, m)) => ok(svc) && svc.contains('.') && ok(m) && !m.contains('.'),
        None => false,
    }
}

/// A gRPC call: an HTTP/2 stream whose request is `application/grpc*`.
struct Grpc<'a> {
    /// `package.Service/Method`.
    method: &'a str,
    /// `package.Service`.
    service: &'a str,
    /// From the trailers, or the headers of a Trailers-Only response; a reset
    /// stream is CANCELLED.
    code: Option<u32>,
}

impl<'a> Grpc<'a> {
    fn of(ex: &'a HttpExchange) -> Option<Self> {
        if !matches!(ex.protocol, Protocol::Http2 { .. }) {
            return None;
        }
        let grpc = match header(&ex.request_headers, "content-type") {
            Some(ct) => ct
                .as_bytes()
                .get(..16)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc")),
            // Joined mid-connection, the content-type is often an HPACK entry
            // the agent never saw: a POST to `/package.Service/Method` then
            // stands for it (the span is marked incomplete either way).
            None => ex.incomplete && ex.method == "POST" && grpc_path(&ex.target),
        };
        if !grpc {
            return None;
        }
        let method = ex.target.strip_prefix('/').unwrap_or(&ex.target);
        let method = method.split('?').next().unwrap_or(method);
        let service = method.rsplit_once('/').map_or(method, |(s, _)| s);
        let code = header(&ex.trailers, "grpc-status")
            .or_else(|| header(&ex.response_headers, "grpc-status"))
            .and_then(|v| v.trim().parse::<u32>().ok())
            .or(match ex.outcome {
                Outcome::Reset { code: H2_CANCEL } => Some(1),
                _ => None,
            });
        Some(Self {
            method,
            service,
            code,
        })
    }

    fn code_name(&self) -> Option<&'static str> {
        self.code
            .map(|c| GRPC_CODES.get(c as usize).copied().unwrap_or("UNKNOWN"))
    }

    fn is_error(&self, kind: SpanKind) -> bool {
        match (self.code, kind) {
            (Some(0), _) | (None, _) => false,
            (Some(_), SpanKind::Client) => true,
            (Some(c), SpanKind::Server) => GRPC_SERVER_ERRORS.contains(&c),
        }
    }
}

fn normalize_method(m: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .copied()
        .find(|k| *k == m)
        .unwrap_or("_OTHER")
}

/// Path of a request-target (origin or absolute form), without the query.
pub fn url_path(target: &str) -> String {
    let rest = match target.find("://") {
        Some(i) => {
            let after = &target[i + 3..];
            after.find('/').map_or("/", |j| &after[j..])
        }
        None => target,
    };
    let path = rest.split(['?', '#']).next().unwrap_or("");
    if path.is_empty() {
        "/".to_string()
    } else {
        path.to_string()
    }
}

/// Query of a request-target with the values of sensitive parameters
/// replaced (see [`crate::redact`]).
pub fn redacted_query(target: &str) -> Option<String> {
    let q = target.split_once('?')?.1;
    let q = q.split('#').next().unwrap_or("");
    Some(crate::redact::active().query(q).into_owned())
}

/// Host and port of a Host header value (`name`, `name:port`, `[v6]:port`).
fn parse_host(v: &str) -> Option<(String, Option<u16>)> {
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    if let Some(rest) = v.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return Some((host.to_string(), port));
    }
    match v.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), p.parse().ok())),
        _ => Some((v.to_string(), None)),
    }
}

fn span_status(kind: SpanKind, ex: &HttpExchange, grpc: Option<&Grpc<'_>>) -> Status {
    match (&ex.outcome, grpc) {
        (_, Some(g)) if g.is_error(kind) => {
            return Status::Error(g.code_name().unwrap_or("UNKNOWN").to_string())
        }
        (Outcome::Aborted, _) => {
            return Status::Error("connection closed before the response completed".into())
        }
        (Outcome::Reset { code }, _) => {
            return Status::Error(format!("stream reset (HTTP/2 error code {code})"))
        }
        (_, Some(g)) if g.code.is_some() => return Status::Unset,
        _ => {}
    }
    match ex.status {
        Some(s) if s >= 500 => Status::Error(format!("HTTP {s}")),
        Some(s) if s >= 400 && kind == SpanKind::Client => Status::Error(format!("HTTP {s}")),
        _ => Status::Unset,
    }
}

fn attributes(
    kind: SpanKind,
    ex: &HttpExchange,
    method: &'static str,
    path: String,
    grpc: Option<&Grpc<'_>>,
    legacy_rpc: bool,
) -> Vec<(&'static str, AttrValue)> {
    use AttrValue::{Bool, Int, Str};
    let mut a: Vec<(&'static str, AttrValue)> = Vec::with_capacity(24);
    match grpc {
        Some(g) => {
            a.push(("rpc.system.name", Str("grpc".into())));
            a.push(("rpc.method", Str(g.method.to_string().into())));
            if let Some(name) = g.code_name() {
                a.push(("rpc.status_code", Str(name.into())));
            }
            if legacy_rpc {
                a.push(("rpc.system", Str("grpc".into())));
                a.push(("rpc.service", Str(g.service.to_string().into())));
                if let Some(c) = g.code {
                    a.push(("rpc.grpc.status_code", Int(i64::from(c))));
                }
            }
        }
        None if !ex.method.is_empty() => {
            a.push(("http.request.method", Str(method.into())));
            if method == "_OTHER" {
                a.push((
                    "http.request.method_original",
                    Str(ex.method.clone().into()),
                ));
            }
        }
        None => {}
    }
    if grpc.is_none() && !ex.target.is_empty() {
        a.push(("url.path", Str(path.into())));
        if let Some(q) = redacted_query(&ex.target) {
            a.push(("url.query", Str(q.into())));
        }
    }
    let h2 = matches!(ex.protocol, Protocol::Http2 { .. });
    let scheme = if h2 {
        header(&ex.request_headers, ":scheme")
    } else {
        Some("http")
    };
    if let (None, Some(scheme)) = (grpc, scheme) {
        let scheme = match scheme {
            "http" => Str("http".into()),
            "https" => Str("https".into()),
            other => Str(other.to_string().into()),
        };
        a.push(("url.scheme", scheme));
    }
    if let Some(s) = ex.status {
        a.push(("http.response.status_code", Int(i64::from(s))));
    }
    let (fallback, peer) = match kind {
        SpanKind::Client => (ex.remote, ex.remote),
        SpanKind::Server => (ex.local, ex.remote),
    };
    let host = header(&ex.request_headers, ":authority")
        .or_else(|| header(&ex.request_headers, "host"))
        .and_then(parse_host);
    let (server_address, server_port) = match host {
        Some((h, p)) => (h, p.unwrap_or(fallback.port())),
        None => (fallback.ip().to_string(), fallback.port()),
    };
    a.push(("server.address", Str(server_address.into())));
    a.push(("server.port", Int(i64::from(server_port))));
    if kind == SpanKind::Server {
        let forwarded = header(&ex.request_headers, "x-forwarded-for")
            .and_then(|v| v.split(',').next())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        match forwarded {
            Some(f) => a.push(("client.address", Str(f.into()))),
            None => {
                a.push(("client.address", Str(peer.ip().to_string().into())));
                a.push(("client.port", Int(i64::from(peer.port()))));
            }
        }
    }
    a.push(("network.peer.address", Str(peer.ip().to_string().into())));
    a.push(("network.peer.port", Int(i64::from(peer.port()))));
    a.push(("network.protocol.name", Str("http".into())));
    let version = match ex.protocol {
        Protocol::Http1 { minor: 0 } => "1.0",
        Protocol::Http1 { .. } => "1.1",
        Protocol::Http2 { .. } => "2",
    };
    a.push(("network.protocol.version", Str(version.into())));
    if let Protocol::Http2 { stream_id } = ex.protocol {
        a.push(("http2.stream.id", Int(i64::from(stream_id))));
    }
    if let Some(ua) = header(&ex.request_headers, "user-agent") {
        a.push(("user_agent.original", Str(ua.to_string().into())));
    }
    a.push(("http.request.body.size", Int(ex.request_body_bytes as i64)));
    a.push((
        "http.response.body.size",
        Int(ex.response_body_bytes as i64),
    ));
    a.push(("thread.id", Int(i64::from(ex.tid))));
    if ex.incomplete {
        a.push(("http2.hpack.incomplete", Bool(true)));
    }
    match (&ex.outcome, ex.status, grpc) {
        (_, _, Some(g)) if g.is_error(kind) => {
            a.push(("error.type", Str(g.code_name().unwrap_or("UNKNOWN").into())))
        }
        (Outcome::Aborted, _, _) => a.push(("error.type", Str("aborted".into()))),
        (Outcome::Reset { .. }, _, _) => a.push(("error.type", Str("reset".into()))),
        (_, _, Some(g)) if g.code.is_some() => {}
        (_, Some(s), _) if s >= 500 || (s >= 400 && kind == SpanKind::Client) => {
            a.push(("error.type", Str(s.to_string().into())))
        }
        (Outcome::Upgraded { protocol }, _, _) => {
            a.push(("network.protocol.upgrade", Str(protocol.clone().into())))
        }
        _ => {}
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::ConnId;

    fn ex(
        role: Role,
        local: &str,
        remote: &str,
        headers: &[(&str, &str)],
        t: (u64, u64, u64, u64),
    ) -> HttpExchange {
        HttpExchange {
            conn: ConnId {
                sock: 1,
                start_ns: 1,
            },
            pid: 10,
            tid: 11,
            comm: "svc".into(),
            role,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            method: "GET".into(),
            target: "/a/b?x=1&token=abc".into(),
            protocol: Protocol::Http1 { minor: 1 },
            request_headers: headers.iter().copied().collect(),
            status: Some(200),
            response_headers: Headers::default(),
            trailers: Headers::default(),
            request_body_bytes: 0,
            response_body_bytes: 5,
            request_first_ns: t.0,
            request_last_ns: t.1,
            response_first_ns: Some(t.2),
            response_last_ns: Some(t.3),
            outcome: Outcome::Complete,
            incomplete: false,
        }
    }

    const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const S: &str = "00f067aa0ba902b7";

    fn builder() -> SpanBuilder {
        SpanBuilder::new(
            Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            1_000,
            100,
        )
    }

    #[test]
    fn server_span_continues_w3c_context_with_semconv_attributes() {
        let mut b = builder();
        let mut out = vec![];
        let tp = format!("00-{T}-{S}-01");
        let e = ex(
            Role::Server,
            "127.0.0.1:8080",
            "127.0.0.1:50000",
            &[
                ("traceparent", &tp),
                ("host", "example:8080"),
                ("user-agent", "curl/8"),
            ],
            (100, 110, 150, 160),
        );
        b.push(e, 0, &mut out);
        b.flush(u64::MAX, &mut out);
        assert_eq!(out.len(), 1);
        let s = &out[0];
        assert_eq!(s.trace_id.to_hex(), T);
        assert_eq!(s.parent_span_id.map(|p| p.to_hex()), Some(S.to_string()));
        assert_eq!(s.kind, SpanKind::Server);
        assert_eq!(s.name, "GET /a/b");
        assert_eq!((s.start_ns, s.end_ns), (1_100, 1_160));
        let want: [(&str, AttrValue); 10] = [
            ("http.request.method", AttrValue::Str("GET".into())),
            ("url.path", AttrValue::Str("/a/b".into())),
            ("url.query", AttrValue::Str("x=1&token=REDACTED".into())),
            ("http.response.status_code", AttrValue::Int(200)),
            ("server.address", AttrValue::Str("example".into())),
            ("server.port", AttrValue::Int(8080)),
            ("client.address", AttrValue::Str("127.0.0.1".into())),
            ("client.port", AttrValue::Int(50000)),
            ("network.protocol.version", AttrValue::Str("1.1".into())),
            ("user_agent.original", AttrValue::Str("curl/8".into())),
        ];
        for (k, v) in want {
            assert_eq!(s.attr(k), Some(&v), "{k}");
        }
        assert_eq!(s.status, Status::Unset);
        assert_eq!(b.counters.context_w3c, 1);
    }

    /// A decode-stage event, as the pipeline hands them over.
    enum Step {
        Start(HttpExchange),
        Done(HttpExchange),
    }
    use Step::{Done, Start};

    /// An exchange named by its path, of process 10's thread `tid`.
    fn named(
        role: Role,
        conn: (&str, &str),
        tid: u32,
        path: &str,
        headers: &[(&str, &str)],
        t: (u64, u64, u64, u64),
    ) -> HttpExchange {
        let mut e = ex(role, conn.0, conn.1, headers, t);
        e.tid = tid;
        e.target = path.into();
        // One socket per local address, as on a host.
        e.conn.sock = e.local.port().into();
        e
    }

    /// The exchange as an h2c upgrade finishes it: HTTP/2 stream 1.
    fn upgraded(e: HttpExchange) -> HttpExchange {
        on_stream(e, 1)
    }

    fn on_stream(mut e: HttpExchange, stream_id: u32) -> HttpExchange {
        e.protocol = Protocol::Http2 { stream_id };
        e
    }

    fn run(b: &mut SpanBuilder, steps: Vec<Step>) -> Vec<SpanRecord> {
        let mut out = vec![];
        for s in steps {
            match s {
                Start(e) => b.start(&RequestStart::of(&e), 0, &mut out),
                Done(e) => b.push(e, 0, &mut out),
            }
        }
        b.flush(u64::MAX, &mut out);
        out
    }

    fn span<'a>(out: &'a [SpanRecord], path: &str) -> &'a SpanRecord {
        out.iter()
            .find(|s| s.attr("url.path") == Some(&AttrValue::Str(path.to_string().into())))
            .unwrap_or_else(|| panic!("no span {path}"))
    }

    const GW: (&str, &str) = ("127.0.0.1:50000", "127.0.0.1:8080");
    const GW_S: (&str, &str) = ("127.0.0.1:8080", "127.0.0.1:50000");
    const GW2_S: (&str, &str) = ("127.0.0.1:8080", "127.0.0.1:50002");
    const OUT: (&str, &str) = ("127.0.0.1:50001", "10.0.0.9:9000");

    /// Who a span's parent should be.
    #[derive(Debug)]
    enum Want {
        Root,
        /// The span of that path, in its trace.
        Span(&'static str),
        /// The header's span id (hex), in the header's trace.
        Header(&'static str),
    }

    #[test]
    fn parent_rules_table() {
        let tp = |s: &'static str| -> String { format!("00-{T}-{s}-01") };
        let (tp_in, tp_sdk) = (tp(S), tp("1111111111111111"));
        let other = "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-2222222222222222-01".to_string();
        type Case = (
            &'static str,
            Vec<Step>,
            Vec<(&'static str, Want)>,
            SpanCounters,
        );
        let c = |f: fn(&mut SpanCounters)| {
            let mut k = SpanCounters::default();
            f(&mut k);
            k
        };
        let cases: Vec<Case> = vec![
            (
                "both ends on this host, no context: the server under the client",
                vec![
                    Start(named(Role::Client, GW, 1, "/a", &[], (100, 101, 145, 150))),
                    Start(named(Role::Server, GW_S, 2, "/a-s", &[], (110, 111, 140, 141))),
                    Done(named(Role::Server, GW_S, 2, "/a-s", &[], (110, 111, 140, 141))),
                    Done(named(Role::Client, GW, 1, "/a", &[], (100, 101, 145, 150))),
                ],
                vec![("/a", Want::Root), ("/a-s", Want::Span("/a"))],
                c(|k| k.paired = 1),
            ),
            (
                "both ends with context: the server under the client, the client under the header",
                vec![
                    Start(named(Role::Client, GW, 1, "/a", &[("traceparent", &tp_in)], (100, 101, 145, 150))),
                    Start(named(Role::Server, GW_S, 2, "/a-s", &[("traceparent", &tp_in)], (110, 111, 140, 141))),
                    Done(named(Role::Server, GW_S, 2, "/a-s", &[("traceparent", &tp_in)], (110, 111, 140, 141))),
                    Done(named(Role::Client, GW, 1, "/a", &[("traceparent", &tp_in)], (100, 101, 145, 150))),
                ],
                vec![("/a", Want::Header(S)), ("/a-s", Want::Span("/a"))],
                c(|k| {
                    k.paired = 1;
                    k.context_w3c = 2;
                }),
            ),
            (
                "h2c upgrade: started as HTTP/1, finished as stream 1, still one request per end",
                vec![
                    Start(named(Role::Client, GW, 1, "/a", &[("traceparent", &tp_in)], (100, 101, 145, 150))),
                    Start(named(Role::Server, GW_S, 2, "/a-s", &[("traceparent", &tp_in)], (110, 111, 140, 141))),
                    Done(upgraded(named(Role::Server, GW_S, 2, "/a-s", &[("traceparent", &tp_in)], (110, 111, 140, 141)))),
                    Done(upgraded(named(Role::Client, GW, 1, "/a", &[("traceparent", &tp_in)], (100, 101, 145, 150)))),
                ],
                vec![("/a", Want::Header(S)), ("/a-s", Want::Span("/a"))],
                c(|k| {
                    k.paired = 1;
                    k.context_w3c = 2;
                }),
            ),
            (
                "the server's start reported before its client's: still paired",
                vec![
                    Start(named(Role::Server, GW_S, 2, "/a-s", &[], (110, 111, 140, 141))),
                    Start(named(Role::Client, GW, 1, "/a", &[], (100, 101, 145, 150))),
                    Done(named(Role::Server, GW_S, 2, "/a-s", &[], (110, 111, 140, 141))),
                    Done(named(Role::Client, GW, 1, "/a", &[], (100, 101, 145, 150))),
                ],
                vec![("/a", Want::Root), ("/a-s", Want::Span("/a"))],
                c(|k| {
                    k.paired = 1;
                    k.late_pairs = 1;
                }),
            ),
            (
                "a thread writes another thread's call on a shared connection: neither call is linked",
                vec![
                    Start(named(Role::Server, GW_S, 7, "/in1", &[], (100, 101, 200, 201))),
                    Start(named(Role::Server, GW2_S, 8, "/in2", &[], (102, 103, 210, 211))),
                    Start(on_stream(named(Role::Client, OUT, 7, "/out1", &[], (120, 121, 150, 151)), 1)),
                    Start(on_stream(named(Role::Client, OUT, 7, "/out2", &[], (125, 126, 155, 156)), 3)),
                    Done(on_stream(named(Role::Client, OUT, 7, "/out1", &[], (120, 121, 150, 151)), 1)),
                    Done(on_stream(named(Role::Client, OUT, 7, "/out2", &[], (125, 126, 155, 156)), 3)),
                    Done(named(Role::Server, GW_S, 7, "/in1", &[], (100, 101, 200, 201))),
                    Done(named(Role::Server, GW2_S, 8, "/in2", &[], (102, 103, 210, 211))),
                ],
                vec![("/in1", Want::Root), ("/in2", Want::Root), ("/out1", Want::Root), ("/out2", Want::Root)],
                c(|k| {
                    k.linked_by_thread = 2;
                    k.overlapping_calls = 1;
                }),
            ),
            (
                "one call after another from the thread on one connection: both linked",
                vec![
                    Start(named(Role::Server, GW_S, 7, "/in", &[], (100, 101, 200, 201))),
                    Start(on_stream(named(Role::Client, OUT, 7, "/out1", &[], (120, 121, 130, 131)), 1)),
                    Done(on_stream(named(Role::Client, OUT, 7, "/out1", &[], (120, 121, 130, 131)), 1)),
                    Start(on_stream(named(Role::Client, OUT, 7, "/out2", &[], (140, 141, 150, 151)), 3)),
                    Done(on_stream(named(Role::Client, OUT, 7, "/out2", &[], (140, 141, 150, 151)), 3)),
                    Done(named(Role::Server, GW_S, 7, "/in", &[], (100, 101, 200, 201))),
                ],
                vec![("/in", Want::Root), ("/out1", Want::Span("/in")), ("/out2", Want::Span("/in"))],
                c(|k| k.linked_by_thread = 2),
            ),
            (
                "thread-per-request, nothing forwarded: the call under the request its thread serves",
                vec![
                    Start(named(Role::Server, GW_S, 7, "/in", &[], (100, 101, 200, 201))),
                    Start(named(Role::Client, OUT, 7, "/out", &[], (120, 121, 150, 151))),
                    Done(named(Role::Client, OUT, 7, "/out", &[], (120, 121, 150, 151))),
                    Done(named(Role::Server, GW_S, 7, "/in", &[], (100, 101, 200, 201))),
                ],
                vec![("/in", Want::Root), ("/out", Want::Span("/in"))],
                c(|k| k.linked_by_thread = 1),
            ),
            (
                "thread reuse: the thread answered its first request before the call",
                vec![
                    Start(named(Role::Server, GW_S, 7, "/in1", &[], (100, 101, 110, 111))),
                    Done(named(Role::Server, GW_S, 7, "/in1", &[], (100, 101, 110, 111))),
                    Start(named(Role::Server, GW_S, 7, "/in2", &[], (120, 121, 200, 201))),
                    Start(named(Role::Client, OUT, 7, "/out", &[], (130, 131, 150, 151))),
                    Done(named(Role::Client, OUT, 7, "/out", &[], (130, 131, 150, 151))),
                    Done(named(Role::Server, GW_S, 7, "/in2", &[], (120, 121, 200, 201))),
                ],
                vec![("/in1", Want::Root), ("/in2", Want::Root), ("/out", Want::Span("/in2"))],
                c(|k| k.linked_by_thread = 1),
            ),
            (
                "event loop, nothing forwarded: two requests open on the thread, no guess",
                vec![
                    Start(named(Role::Server, GW_S, 7, "/in1", &[], (100, 101, 200, 201))),
                    Start(named(Role::Server, GW2_S, 7, "/in2", &[], (110, 111, 210, 211))),
                    Start(named(Role::Client, OUT, 7, "/out", &[], (130, 131, 150, 151))),
                    Done(named(Role::Client, OUT, 7, "/out", &[], (130, 131, 150, 151))),
                    Done(named(Role::Server, GW_S, 7, "/in1", &[], (100, 101, 200, 201))),
                    Done(named(Role::Server, GW2_S, 7, "/in2", &[], (110, 111, 210, 211))),
                ],
                vec![("/in1", Want::Root), ("/in2", Want::Root), ("/out", Want::Root)],
                c(|k| k.ambiguous_thread = 1),
            ),
            (
                "event loop forwarding context: linked by trace id, across threads",
                vec![
                    Start(named(Role::Server, GW_S, 7, "/in1", &[("traceparent", &other)], (100, 101, 200, 201))),
                    Start(named(Role::Server, GW2_S, 7, "/in2", &[("traceparent", &tp_in)], (110, 111, 210, 211))),
                    Start(named(Role::Client, OUT, 8, "/out", &[("traceparent", &tp_in)], (130, 131, 150, 151))),
                    Done(named(Role::Client, OUT, 8, "/out", &[("traceparent", &tp_in)], (130, 131, 150, 151))),
                    Done(named(Role::Server, GW_S, 7, "/in1", &[("traceparent", &other)], (100, 101, 200, 201))),
                    Done(named(Role::Server, GW2_S, 7, "/in2", &[("traceparent", &tp_in)], (110, 111, 210, 211))),
                ],
                vec![
                    ("/in1", Want::Header("2222222222222222")),
                    ("/in2", Want::Header(S)),
                    ("/out", Want::Span("/in2")),
                ],
                c(|k| {
                    k.linked_by_trace = 1;
                    k.context_w3c = 3;
                }),
            ),
            (
                "an SDK in the app made the outgoing span: it is the parent",
                vec![
                    Start(named(Role::Server, GW_S, 7, "/in", &[("traceparent", &tp_in)], (100, 101, 200, 201))),
                    Start(named(Role::Client, OUT, 7, "/out", &[("traceparent", &tp_sdk)], (130, 131, 150, 151))),
                    Done(named(Role::Client, OUT, 7, "/out", &[("traceparent", &tp_sdk)], (130, 131, 150, 151))),
                    Done(named(Role::Server, GW_S, 7, "/in", &[("traceparent", &tp_in)], (100, 101, 200, 201))),
                ],
                vec![("/in", Want::Header(S)), ("/out", Want::Header("1111111111111111"))],
                c(|k| {
                    k.linked_by_trace = 1;
                    k.sdk_parents = 1;
                    k.context_w3c = 2;
                }),
            ),
            (
                "keep-alive: requests pair in the connection's order",
                vec![
                    Start(named(Role::Client, GW, 1, "/k1", &[], (100, 101, 120, 121))),
                    Start(named(Role::Server, GW_S, 2, "/k1-s", &[], (105, 106, 115, 116))),
                    Done(named(Role::Server, GW_S, 2, "/k1-s", &[], (105, 106, 115, 116))),
                    Done(named(Role::Client, GW, 1, "/k1", &[], (100, 101, 120, 121))),
                    Start(named(Role::Client, GW, 1, "/k2", &[], (130, 131, 150, 151))),
                    Start(named(Role::Server, GW_S, 2, "/k2-s", &[], (135, 136, 145, 146))),
                    Done(named(Role::Server, GW_S, 2, "/k2-s", &[], (135, 136, 145, 146))),
                    Done(named(Role::Client, GW, 1, "/k2", &[], (130, 131, 150, 151))),
                ],
                vec![
                    ("/k1", Want::Root),
                    ("/k1-s", Want::Span("/k1")),
                    ("/k2", Want::Root),
                    ("/k2-s", Want::Span("/k2")),
                ],
                c(|k| k.paired = 2),
            ),
            (
                "a three-hop chain resolves whatever order the spans finish in",
                vec![
                    Start(named(Role::Client, GW, 1, "/a", &[], (100, 101, 300, 301))),
                    Start(named(Role::Server, GW_S, 7, "/a-s", &[], (105, 106, 290, 291))),
                    Start(named(Role::Client, OUT, 7, "/b", &[], (120, 121, 150, 151))),
                    Done(named(Role::Client, OUT, 7, "/b", &[], (120, 121, 150, 151))),
                    Done(named(Role::Server, GW_S, 7, "/a-s", &[], (105, 106, 290, 291))),
                    Done(named(Role::Client, GW, 1, "/a", &[], (100, 101, 300, 301))),
                ],
                vec![("/a", Want::Root), ("/a-s", Want::Span("/a")), ("/b", Want::Span("/a-s"))],
                c(|k| {
                    k.paired = 1;
                    k.linked_by_thread = 1;
                }),
            ),
            (
                "exchanges without reported starts are started when they finish",
                vec![
                    Done(named(Role::Server, GW_S, 7, "/in", &[], (100, 101, 200, 201))),
                    Done(named(Role::Client, OUT, 9, "/out", &[], (130, 131, 150, 151))),
                ],
                vec![("/in", Want::Root), ("/out", Want::Root)],
                c(|k| k.late_starts = 2),
            ),
        ];
        for (name, steps, want, counters) in cases {
            let mut b = builder();
            let out = run(&mut b, steps);
            assert_eq!(out.len(), want.len(), "{name}: {out:#?}");
            for (path, w) in &want {
                let s = span(&out, path);
                match w {
                    Want::Root => assert_eq!(s.parent_span_id, None, "{name}: {path}"),
                    Want::Span(p) => {
                        let parent = span(&out, p);
                        assert_eq!(s.parent_span_id, Some(parent.span_id), "{name}: {path}");
                        assert_eq!(s.trace_id, parent.trace_id, "{name}: {path}");
                        assert!(!s.remote_parent, "{name}: {path}");
                    }
                    Want::Header(h) => {
                        assert_eq!(
                            s.parent_span_id.map(|p| p.to_hex()).as_deref(),
                            Some(*h),
                            "{name}: {path}"
                        );
                        assert!(s.remote_parent, "{name}: {path}");
                    }
                }
            }
            let mut got = b.counters;
            // Only the linking counters are this table's business.
            (got.spans, got.server_spans, got.client_spans) = (0, 0, 0);
            assert_eq!(got, counters, "{name}");
            assert_eq!(b.waiting(), 0, "{name}: everything ends at the final flush");
        }
    }

    #[test]
    fn paired_spans_get_each_others_moments_whichever_finishes_first() {
        for server_first in [true, false] {
            let mut b = builder();
            let cl = named(Role::Client, GW, 1, "/a", &[], (100, 101, 145, 150));
            let sv = named(Role::Server, GW_S, 2, "/a-s", &[], (110, 111, 140, 141));
            let mut out = vec![];
            b.start(&RequestStart::of(&cl), 0, &mut out);
            b.start(&RequestStart::of(&sv), 0, &mut out);
            let (first, second) = if server_first { (sv, cl) } else { (cl, sv) };
            b.push(first, 0, &mut out);
            assert!(out.is_empty(), "held for its other end");
            b.push(second, 0, &mut out);
            assert_eq!(out.len(), 2, "both go out when the second finishes");
            let (c, s) = (span(&out, "/a"), span(&out, "/a-s"));
            assert_eq!(
                c.events,
                vec![("server_receive", 1_110), ("server_send", 1_141)]
            );
            assert_eq!(
                s.events,
                vec![("client_send", 1_100), ("client_receive", 1_150)]
            );
            assert!(c.start_ns <= s.start_ns && s.end_ns <= c.end_ns);
        }
    }

    #[test]
    fn a_held_span_goes_out_alone_when_its_window_ends() {
        let mut b = builder();
        let mut out = vec![];
        let cl = named(Role::Client, GW, 1, "/a", &[], (100, 101, 145, 150));
        let sv = named(Role::Server, GW_S, 2, "/a-s", &[], (110, 111, 140, 141));
        b.start(&RequestStart::of(&cl), 1_000, &mut out);
        b.start(&RequestStart::of(&sv), 1_000, &mut out);
        b.push(sv, 1_000, &mut out);
        // The builder's window is 100 ns.
        b.flush(1_099, &mut out);
        assert!(out.is_empty());
        b.flush(1_100, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].events.is_empty());
        // The other end, finishing late, still names its peer as parent.
        b.push(cl, 1_200, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].parent_span_id, Some(out[1].span_id));
    }

    #[test]
    fn a_child_follows_its_parents_sampling_decision() {
        let not_sampled = format!("00-{T}-{S}-00");
        // (sampler, incoming context, want exported)
        type Case<'a> = (Sampler, Vec<(&'a str, &'a str)>, bool);
        let cases: Vec<Case<'_>> = vec![
            (
                Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
                vec![],
                true,
            ),
            (
                Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
                vec![],
                false,
            ),
            (
                Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
                vec![("traceparent", &not_sampled)],
                false,
            ),
            (
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatio(0.5))),
                vec![],
                true,
            ),
        ];
        for (sampler, h, want) in cases {
            let ratio = matches!(&sampler, Sampler::ParentBased(r) if matches!(**r, Sampler::TraceIdRatio(_)));
            for _ in 0..if ratio { 40 } else { 1 } {
                let mut b = SpanBuilder::new(sampler.clone(), 1_000, 100);
                let out = run(
                    &mut b,
                    vec![
                        Start(named(
                            Role::Server,
                            GW_S,
                            7,
                            "/in",
                            &h,
                            (100, 101, 200, 201),
                        )),
                        Start(named(
                            Role::Client,
                            OUT,
                            7,
                            "/out",
                            &[],
                            (120, 121, 150, 151),
                        )),
                        Done(named(
                            Role::Client,
                            OUT,
                            7,
                            "/out",
                            &[],
                            (120, 121, 150, 151),
                        )),
                        Done(named(
                            Role::Server,
                            GW_S,
                            7,
                            "/in",
                            &h,
                            (100, 101, 200, 201),
                        )),
                    ],
                );
                if ratio {
                    assert!(
                        out.len() == 2 || out.is_empty(),
                        "never half a trace: {out:?}"
                    );
                } else {
                    assert_eq!(out.len(), if want { 2 } else { 0 });
                }
            }
        }
    }

    #[test]
    fn thread_link_most_recent_takes_the_newest_open_request() {
        let mut b = builder().with_thread_link(ThreadLink::MostRecent);
        let out = run(
            &mut b,
            vec![
                Start(named(
                    Role::Server,
                    GW_S,
                    7,
                    "/in1",
                    &[],
                    (100, 101, 200, 201),
                )),
                Start(named(
                    Role::Server,
                    GW2_S,
                    7,
                    "/in2",
                    &[],
                    (110, 111, 210, 211),
                )),
                Start(named(
                    Role::Client,
                    OUT,
                    7,
                    "/out",
                    &[],
                    (130, 131, 150, 151),
                )),
                Done(named(
                    Role::Client,
                    OUT,
                    7,
                    "/out",
                    &[],
                    (130, 131, 150, 151),
                )),
                Done(named(
                    Role::Server,
                    GW_S,
                    7,
                    "/in1",
                    &[],
                    (100, 101, 200, 201),
                )),
                Done(named(
                    Role::Server,
                    GW2_S,
                    7,
                    "/in2",
                    &[],
                    (110, 111, 210, 211),
                )),
            ],
        );
        assert_eq!(
            span(&out, "/out").parent_span_id,
            Some(span(&out, "/in2").span_id)
        );
        assert_eq!(b.counters.ambiguous_thread, 1);
    }

    #[test]
    fn requests_that_never_finish_stay_bounded() {
        let mut b = builder();
        let mut out = vec![];
        for i in 0..(MAX_OPEN as u64 + 5_000) {
            let mut e = named(Role::Server, GW_S, 7, "/in", &[], (i, i, i, i));
            e.conn.sock = i;
            b.start(&RequestStart::of(&e), 0, &mut out);
        }
        assert!(b.waiting() <= MAX_OPEN);
        assert_eq!(b.counters.evicted, 5_000);
        // Memory of the indexes follows the entries.
        assert!(b.by_request.len() <= MAX_OPEN && b.spans.len() <= MAX_OPEN);
        assert!(b.threads.values().map(|s| s.ids.len()).sum::<usize>() <= MAX_PER_INDEX);
        // And everything expires in time.
        b.flush(OPEN_MAX_AGE_NS, &mut out);
        assert_eq!(b.waiting(), 0);
        assert!(b.threads.values().all(|s| s.ids.is_empty() && s.crowded));
        assert!(b.traces.values().all(|s| s.ids.is_empty()) && b.mirror.is_empty());
    }

    #[test]
    fn status_and_sampling_table() {
        // (role, status, outcome, headers, want exported, want error)
        let deny = [(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )];
        type Case<'a> = (
            Role,
            Option<u16>,
            Outcome,
            &'a [(&'a str, &'a str)],
            bool,
            bool,
        );
        let cases: Vec<Case<'_>> = vec![
            (Role::Server, Some(200), Outcome::Complete, &[], true, false),
            (Role::Server, Some(404), Outcome::Complete, &[], true, false),
            (Role::Client, Some(404), Outcome::Complete, &[], true, true),
            (Role::Server, Some(503), Outcome::Complete, &[], true, true),
            (Role::Client, None, Outcome::Aborted, &[], true, true),
            (
                Role::Server,
                Some(200),
                Outcome::Complete,
                &deny,
                false,
                false,
            ),
            (
                Role::Server,
                Some(200),
                Outcome::Complete,
                &[("b3", "0")],
                false,
                false,
            ),
            (
                Role::Server,
                Some(200),
                Outcome::Complete,
                &[("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0")],
                false,
                false,
            ),
        ];
        for (i, (role, status, outcome, headers, exported, error)) in cases.into_iter().enumerate()
        {
            let mut b = builder();
            let mut out = vec![];
            let mut e = ex(role, "127.0.0.1:1", "127.0.0.1:2", headers, (1, 2, 3, 4));
            e.status = status;
            e.outcome = outcome;
            b.push(e, 0, &mut out);
            b.flush(u64::MAX, &mut out);
            assert_eq!(out.len(), usize::from(exported), "case {i}");
            if let Some(s) = out.first() {
                assert_eq!(matches!(s.status, Status::Error(_)), error, "case {i}");
            }
        }
    }

    #[test]
    fn url_helpers() {
        let paths = [
            ("/a?b=1", "/a"),
            ("/", "/"),
            ("http://h:1/x/y?z", "/x/y"),
            ("http://h", "/"),
            ("*", "*"),
            ("/p#f", "/p"),
        ];
        for (t, want) in paths {
            assert_eq!(url_path(t), want, "{t}");
        }
        assert_eq!(
            redacted_query("/a?b=1&Signature=s&sig=x&c"),
            Some("b=1&Signature=REDACTED&sig=REDACTED&c".into())
        );
        assert_eq!(redacted_query("/a"), None);
        assert_eq!(parse_host("[::1]:8080"), Some(("::1".into(), Some(8080))));
        assert_eq!(parse_host("h"), Some(("h".into(), None)));
        assert_eq!(parse_host("h:81"), Some(("h".into(), Some(81))));
        assert_eq!(normalize_method("FOO"), "_OTHER");
    }

    fn h2(
        mut e: HttpExchange,
        stream_id: u32,
        path: &str,
        grpc: Option<(&str, bool)>,
    ) -> HttpExchange {
        e.protocol = Protocol::Http2 { stream_id };
        e.method = "POST".into();
        e.target = path.into();
        e.request_headers = [
            (":authority", "svc:50051"),
            (":scheme", "http"),
            ("content-type", "application/grpc+proto"),
        ]
        .into_iter()
        .filter(|h| grpc.is_some() || h.0 != "content-type")
        .collect();
        if let Some((code, trailers_only)) = grpc {
            let t: Headers = [("grpc-status", code)].into_iter().collect();
            if trailers_only {
                e.response_headers = t;
            } else {
                e.trailers = t;
            }
        }
        e
    }

    #[test]
    fn http2_streams_pair_by_stream_id_on_one_connection() {
        let mut b = builder();
        let (c, s) = (GW, GW_S);
        let cl = |id, path, t| h2(ex(Role::Client, c.0, c.1, &[], t), id, path, None);
        let sv = |id, path, t| h2(ex(Role::Server, s.0, s.1, &[], t), id, path, None);
        // Two concurrent streams whose times overlap: only the stream id tells them apart.
        let out = run(
            &mut b,
            vec![
                Start(cl(1, "/a", (100, 101, 140, 141))),
                Start(cl(3, "/b", (102, 103, 142, 143))),
                Start(sv(3, "/b", (112, 113, 120, 121))),
                Start(sv(1, "/a", (110, 111, 130, 131))),
                Done(sv(3, "/b", (112, 113, 120, 121))),
                Done(sv(1, "/a", (110, 111, 130, 131))),
                Done(cl(1, "/a", (100, 101, 140, 141))),
                Done(cl(3, "/b", (102, 103, 142, 143))),
            ],
        );
        assert_eq!(out.len(), 4);
        for pair in out.chunks(2) {
            let (cl, sv) = (&pair[0], &pair[1]);
            assert_eq!((cl.kind, sv.kind), (SpanKind::Client, SpanKind::Server));
            assert_eq!(sv.parent_span_id, Some(cl.span_id));
            assert_eq!(cl.attr("url.path"), sv.attr("url.path"));
            assert_eq!(cl.attr("http2.stream.id"), sv.attr("http2.stream.id"));
        }
        assert_eq!(
            out[0].attr("network.protocol.version"),
            Some(&AttrValue::Str("2".into()))
        );
        assert_eq!(
            out[0].attr("server.address"),
            Some(&AttrValue::Str("svc".into()))
        );
        assert_eq!(out[0].attr("server.port"), Some(&AttrValue::Int(50051)));
    }

    #[test]
    fn grpc_names_attributes_and_status_table() {
        // (kind, grpc-status, trailers-only, legacy on, want error, want code name)
        type Case = (Role, &'static str, bool, bool, bool, &'static str);
        let cases: [Case; 8] = [
            (Role::Server, "0", false, true, false, "OK"),
            (Role::Client, "0", true, true, false, "OK"),
            (Role::Server, "5", true, true, false, "NOT_FOUND"),
            (Role::Client, "5", true, false, true, "NOT_FOUND"),
            (Role::Server, "13", false, true, true, "INTERNAL"),
            (Role::Server, "4", false, true, true, "DEADLINE_EXCEEDED"),
            (Role::Server, "16", false, true, false, "UNAUTHENTICATED"),
            (Role::Client, "99", false, true, true, "UNKNOWN"),
        ];
        for (i, (role, code, only, legacy, error, name)) in cases.into_iter().enumerate() {
            let mut b = builder().with_legacy_rpc_attributes(legacy);
            let mut out = vec![];
            let e = h2(
                ex(role, "127.0.0.1:1", "127.0.0.1:2", &[], (1, 2, 3, 4)),
                1,
                "/demo.v1.Echo/Unary",
                Some((code, only)),
            );
            b.push(e, 0, &mut out);
            b.flush(u64::MAX, &mut out);
            let s = &out[0];
            assert_eq!(s.name, "demo.v1.Echo/Unary", "case {i}");
            assert_eq!(
                s.attr("rpc.system.name"),
                Some(&AttrValue::Str("grpc".into())),
                "case {i}"
            );
            assert_eq!(
                s.attr("rpc.method"),
                Some(&AttrValue::Str("demo.v1.Echo/Unary".into())),
                "case {i}"
            );
            assert_eq!(
                s.attr("rpc.status_code"),
                Some(&AttrValue::Str(name.into())),
                "case {i}"
            );
            assert_eq!(s.attr("rpc.service").is_some(), legacy, "case {i}");
            if legacy {
                assert_eq!(
                    s.attr("rpc.service"),
                    Some(&AttrValue::Str("demo.v1.Echo".into())),
                    "case {i}"
                );
                assert_eq!(
                    s.attr("rpc.grpc.status_code"),
                    Some(&AttrValue::Int(code.parse().unwrap())),
                    "case {i}"
                );
            }
            assert_eq!(matches!(s.status, Status::Error(_)), error, "case {i}");
            assert_eq!(s.attr("error.type").is_some(), error, "case {i}");
            assert!(
                s.attr("http.request.method").is_none() && s.attr("url.path").is_none(),
                "case {i}"
            );
        }
    }
}
