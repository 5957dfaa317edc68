//! `cargo xtask bench pipeline`: the agent's userspace pipeline on replayed
//! capture records, single-threaded, with no kernel and no network.
//!
//! Kernel records are generated as the eBPF programs write them (header +
//! payload, per-connection sequence numbers and byte positions): nginx-like
//! HTTP/1 keep-alive exchanges on 32 connections, one drain pass per 10 ms of
//! traffic at a fixed request rate. Each pass goes through the same calls as
//! `pipeline::run_trace`: capture's record decoding and ordering
//! ([`Records`]), HTTP decoding, span building and linking, and the OTLP
//! exporter's conversion and encoding (batches of 512, the exporter's
//! default), whose bytes are then thrown away. Printed per variant and stage:
//! nanoseconds, heap allocations and heap bytes per span (a counting
//! allocator around mimalloc, the agent's allocator), against the 2 µs per
//! span target. Record generation is outside the measured calls.
//!
//! Variants: nginx alone traced; both ends traced (the client's records on
//! the mirrored connection, so every SERVER span pairs with a CLIENT span);
//! both ends with a W3C `traceparent` on every request. The run fails when
//! a variant does not make the spans and pairs its traffic implies, so a
//! fast but broken pipeline cannot print a good figure.
//!
//! Arguments: `--requests N` per variant (default 200,000), `--gzip`.

use std::{
    alloc::{GlobalAlloc, Layout},
    collections::HashMap,
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Instant,
};

use agent::{
    capture::{ChunkKind, Records},
    correlate::{resource::Resources, sampling::Sampler, spans::SpanBuilder},
    decode::Decoder,
    export::otlp,
    pipeline::ProtoResources,
};
use agent_common::{
    ConnTuple, EventHeader, AF_INET, DIR_EGRESS, DIR_INGRESS, EVENT_HEADER_SIZE, FLAG_HAS_POS,
    KIND_DATA, ROLE_CLIENT, ROLE_SERVER, SYS_READ, SYS_WRITEV,
};
use prost::Message;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to mimalloc unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(new_size as u64, Relaxed);
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Requests per 10 ms drain pass (12,800 requests/s, about what nginx
/// serves here under `bench overhead`).
const PER_PASS: usize = 128;
const PASS_NS: u64 = 10_000_000;
const CONNECTIONS: usize = 32;
const BATCH: usize = 512;
const TARGET_NS: f64 = 2000.0;

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    ServerOnly,
    BothEnds,
    BothEndsContext,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::ServerOnly => "HTTP/1, nginx alone traced",
            Self::BothEnds => "HTTP/1, both ends traced",
            Self::BothEndsContext => "HTTP/1, both ends, traceparent",
        }
    }
}

/// One traced end of a connection, as the kernel's `CONNS` record has it.
struct End {
    sock: u64,
    start_ns: u64,
    seq: u64,
    egress: u32,
    ingress: u32,
    tuple: ConnTuple,
    pid: u32,
    fd: i32,
    role: u8,
    comm: [u8; 16],
}

impl End {
    fn new(sock: u64, pid: u32, role: u8, comm: &str, local: u16, remote: u16) -> Self {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        let lo = [127, 0, 0, 1];
        let mut tuple = ConnTuple {
            family: AF_INET,
            local_port: local,
            remote_port: remote,
            ..ConnTuple::default()
        };
        tuple.local_addr[..4].copy_from_slice(&lo);
        tuple.remote_addr[..4].copy_from_slice(&lo);
        Self {
            sock,
            start_ns: 1_000,
            seq: 0,
            egress: 0,
            ingress: 0,
            tuple,
            pid,
            fd: 10 + (sock & 0xff) as i32,
            role,
            comm: c,
        }
    }

    /// Appends one data record, framed as the ring buffer hands it over.
    fn record(&mut self, out: &mut PassRecords, dir: u8, enter: u64, exit: u64, payload: &[u8]) {
        let len = payload.len() as u32;
        let (pos_end, peer_pos) = if dir == DIR_EGRESS {
            self.egress = self.egress.wrapping_add(len);
            (self.egress, self.ingress)
        } else {
            self.ingress = self.ingress.wrapping_add(len);
            (self.ingress, self.egress)
        };
        let h = EventHeader {
            ts_enter_ns: enter,
            ts_exit_ns: exit,
            sock: self.sock,
            conn_start_ns: self.start_ns,
            seq: self.seq,
            len: payload.len() as u64,
            pid: self.pid,
            tid: self.pid,
            fd: self.fd,
            captured: len,
            pos_end,
            peer_pos,
            kind: KIND_DATA,
            direction: dir,
            role: self.role,
            syscall: if dir == DIR_EGRESS {
                SYS_WRITEV
            } else {
                SYS_READ
            },
            flags: FLAG_HAS_POS,
            _pad: [0; 3],
            comm: self.comm,
            tuple: self.tuple,
        };
        self.seq += 1;
        let start = out.bytes.len();
        // SAFETY: EventHeader is repr(C) plain data; its bytes are what the kernel writes.
        let raw = unsafe {
            std::slice::from_raw_parts((&h as *const EventHeader).cast::<u8>(), EVENT_HEADER_SIZE)
        };
        out.bytes.extend_from_slice(raw);
        out.bytes.extend_from_slice(payload);
        out.ranges.push((start, out.bytes.len()));
    }
}

/// One pass's kernel records, back to back.
#[derive(Default)]
struct PassRecords {
    bytes: Vec<u8>,
    ranges: Vec<(usize, usize)>,
}

/// Generates the traffic of one variant, pass by pass.
struct Traffic {
    variant: Variant,
    servers: Vec<End>,
    clients: Vec<End>,
    next: u64,
    request: Vec<u8>,
    response: Vec<u8>,
}

impl Traffic {
    fn new(variant: Variant) -> Self {
        let server_pid = std::process::id();
        // SAFETY: getppid has no preconditions.
        let client_pid = unsafe { libc::getppid() } as u32;
        let mut servers = Vec::new();
        let mut clients = Vec::new();
        for i in 0..CONNECTIONS {
            let eph = 40_000 + i as u16;
            servers.push(End::new(
                0xffff_0000_0000 + i as u64 * 0x1000,
                server_pid,
                ROLE_SERVER,
                "nginx",
                8080,
                eph,
            ));
            clients.push(End::new(
                0xffff_8000_0000 + i as u64 * 0x1000,
                client_pid,
                ROLE_CLIENT,
                "wrk",
                eph,
                8080,
            ));
        }
        let body = vec![b'x'; 615];
        let mut response =
            b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 10:00:00 GMT\r\n\
Content-Type: text/html\r\nContent-Length: 615\r\nLast-Modified: Tue, 01 Dec 2026 08:00:00 GMT\r\n\
Connection: keep-alive\r\nETag: \"656a1b80-267\"\r\nAccept-Ranges: bytes\r\n\r\n"
                .to_vec();
        response.extend_from_slice(&body);
        Self {
            variant,
            servers,
            clients,
            next: 0,
            request: Vec::with_capacity(512),
            response,
        }
    }

    /// The records of pass `p`; returns the pass's end (the drain moment).
    fn pass(&mut self, p: u64, out: &mut PassRecords) -> u64 {
        out.bytes.clear();
        out.ranges.clear();
        let base = 1_000_000_000 + p * PASS_NS;
        let gap = PASS_NS / PER_PASS as u64;
        for k in 0..PER_PASS as u64 {
            let n = self.next;
            self.next += 1;
            let c = (n as usize) % CONNECTIONS;
            let t = base + k * gap;
            self.request.clear();
            self.request.extend_from_slice(b"GET /api/items/");
            self.request
                .extend_from_slice((n % 1000).to_string().as_bytes());
            self.request.extend_from_slice(
                b" HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk/4.2\r\nAccept: */*\r\n",
            );
            if self.variant == Variant::BothEndsContext {
                let tp = format!(
                    "traceparent: 00-{:032x}-{:016x}-01\r\n",
                    0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_0000u128 + u128::from(n),
                    0x00f0_67aa_0ba9_0000u64 + n
                );
                self.request.extend_from_slice(tp.as_bytes());
            }
            self.request.extend_from_slice(b"\r\n");
            let traced_client = self.variant != Variant::ServerOnly;
            if traced_client {
                self.clients[c].record(out, DIR_EGRESS, t, t + 2_000, &self.request);
            }
            self.servers[c].record(out, DIR_INGRESS, t + 8_000, t + 9_000, &self.request);
            self.servers[c].record(out, DIR_EGRESS, t + 40_000, t + 42_000, &self.response);
            if traced_client {
                self.clients[c].record(out, DIR_INGRESS, t + 50_000, t + 51_000, &self.response);
            }
        }
        base + PASS_NS
    }
}

#[derive(Default, Clone, Copy)]
struct Cost {
    ns: u64,
    allocs: u64,
    bytes: u64,
}

/// Runs `f`, adding its time and allocations to `cost`.
fn measure<T>(cost: &mut Cost, f: impl FnOnce() -> T) -> T {
    let (a, b) = (ALLOCS.load(Relaxed), BYTES.load(Relaxed));
    let t = Instant::now();
    let r = f();
    cost.ns += t.elapsed().as_nanos() as u64;
    cost.allocs += ALLOCS.load(Relaxed) - a;
    cost.bytes += BYTES.load(Relaxed) - b;
    r
}

struct Outcome {
    spans: u64,
    paired: u64,
    exported_bytes: u64,
    stages: [Cost; 4],
}

fn run(variant: Variant, requests: usize, gzip: bool) -> Outcome {
    let mut traffic = Traffic::new(variant);
    let mut recs = PassRecords::default();
    let mut records = Records::default();
    let mut decoder = Decoder::default().keep_starts();
    let offset = agent::capture::monotonic_to_unix_offset_ns();
    let mut builder = SpanBuilder::new(
        Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        offset,
        2_000_000_000,
    );
    let mut resources = Resources::new(HashMap::new());
    let mut protos = ProtoResources::default();
    let (mut chunks, mut exchanges, mut starts, mut spans) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut batch: Vec<otlp::Item> = Vec::with_capacity(BATCH);
    let mut encoder = otlp::RequestEncoder::new(otlp::agent_scope().encode_to_vec());
    let mut stages = [Cost::default(); 4];
    let (mut spans_out, mut exported_bytes) = (0u64, 0u64);
    let passes = requests.div_ceil(PER_PASS) as u64;
    let mut last_flush = 0;
    for p in 0..=passes {
        let now = if p < passes {
            traffic.pass(p, &mut recs)
        } else {
            // Everything left goes out, as at the agent's exit.
            recs.bytes.clear();
            recs.ranges.clear();
            u64::MAX
        };
        let clock = Instant::now();
        measure(&mut stages[0], || {
            records.begin_pass(clock);
            for &(a, b) in &recs.ranges {
                records.record(&recs.bytes[a..b], clock, &mut chunks);
            }
            records.end_pass(&mut chunks);
        });
        measure(&mut stages[1], || {
            for chunk in chunks.drain(..) {
                decoder.push(&chunk, &mut exchanges);
                black_box(chunk.kind == ChunkKind::Close);
            }
            decoder.take_starts(&mut starts);
        });
        measure(&mut stages[2], || {
            builder.push_batch(&mut starts, &mut exchanges, now, &mut spans);
            if now == u64::MAX || now - last_flush >= 100_000_000 {
                builder.flush(now, &mut spans);
                decoder.expire(now, 300_000_000_000, &mut exchanges);
                for ex in exchanges.drain(..) {
                    builder.push(ex, now, &mut spans);
                }
                last_flush = now;
            }
        });
        measure(&mut stages[3], || {
            for s in spans.drain(..) {
                spans_out += 1;
                let res = resources.get(s.pid, &s.comm);
                batch.push((protos.encoded(&res), s));
                if batch.len() >= BATCH {
                    exported_bytes += encode(&mut encoder, &mut batch, gzip);
                }
            }
            if now == u64::MAX && !batch.is_empty() {
                exported_bytes += encode(&mut encoder, &mut batch, gzip);
            }
        });
    }
    Outcome {
        spans: spans_out,
        paired: builder.counters.paired,
        exported_bytes,
        stages,
    }
}

/// Encodes and discards one export request; returns its size.
fn encode(enc: &mut otlp::RequestEncoder, batch: &mut Vec<otlp::Item>, gzip: bool) -> u64 {
    let body = otlp::encode_batch(enc, batch, gzip);
    batch.clear();
    match body {
        Ok(body) => black_box(body).len() as u64,
        Err(e) => {
            eprintln!("encoding failed: {e}");
            0
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let requests = args
        .iter()
        .position(|a| a == "--requests")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(200_000);
    let gzip = args.iter().any(|a| a == "--gzip");
    let requests = requests.div_ceil(PER_PASS) * PER_PASS;
    println!(
        "replay: {requests} requests per variant, {PER_PASS} per 10 ms drain pass, {CONNECTIONS} keep-alive connections, OTLP batches of {BATCH}, gzip {}",
        if gzip { "on" } else { "off" }
    );
    println!(
        "{:<32} {:>8} {:>8} | {:>27} | {:>27} | {:>27} | {:>27} | {:>8}",
        "variant",
        "spans",
        "paired",
        "capture ns/allocs/B",
        "decode ns/allocs/B",
        "correlate ns/allocs/B",
        "export ns/allocs/B",
        "total ns"
    );
    let mut failed = false;
    for v in [
        Variant::ServerOnly,
        Variant::BothEnds,
        Variant::BothEndsContext,
    ] {
        let o = run(v, requests, gzip);
        let n = o.spans.max(1) as f64;
        let cell = |c: Cost| {
            format!(
                "{:>7.0} {:>7.2} {:>9.0}",
                c.ns as f64 / n,
                c.allocs as f64 / n,
                c.bytes as f64 / n
            )
        };
        let total: Cost = o.stages.iter().fold(Cost::default(), |a, c| Cost {
            ns: a.ns + c.ns,
            allocs: a.allocs + c.allocs,
            bytes: a.bytes + c.bytes,
        });
        println!(
            "{:<32} {:>8} {:>8} | {} | {} | {} | {} | {:>8.0}",
            v.name(),
            o.spans,
            o.paired,
            cell(o.stages[0]),
            cell(o.stages[1]),
            cell(o.stages[2]),
            cell(o.stages[3]),
            total.ns as f64 / n
        );
        println!(
            "{:<32} per request: {:.0} ns, {:.1} allocations, {:.0} OTLP bytes per span; target {TARGET_NS:.0} ns per span: {}",
            "",
            total.ns as f64 / (o.spans as f64 / if v == Variant::ServerOnly { 1.0 } else { 2.0 }).max(1.0),
            total.allocs as f64 / n,
            o.exported_bytes as f64 / n,
            if (total.ns as f64 / n) <= TARGET_NS { "met" } else { "NOT met" }
        );
        let (want_spans, want_pairs) = match v {
            Variant::ServerOnly => (requests as u64, 0),
            _ => (2 * requests as u64, requests as u64),
        };
        if o.spans != want_spans || o.paired != want_pairs {
            eprintln!(
                "{}: made {} spans and {} pairs, the traffic implies {want_spans} and {want_pairs}",
                v.name(),
                o.spans,
                o.paired
            );
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
}
