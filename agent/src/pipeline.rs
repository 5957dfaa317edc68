//! The agent's main job: capture -> decode -> correlate -> export.
//!
//! Capture drains the ring buffer on its own thread and hands ordered chunks
//! over a bounded queue; this thread decodes HTTP/1, builds spans and feeds
//! the sink (the OTLP exporter's bounded queue, or the console). Every stage
//! counts what it drops; the counters are logged periodically and at exit.

use std::{
    collections::HashMap,
    io::Write,
    sync::{atomic::AtomicBool, mpsc, Arc},
    time::{Duration, Instant},
};

use crate::{
    capture::{self, Capture, CaptureConfig, ChunkKind},
    console::TreePrinter,
    correlate::{
        resource::{self, ProcessResource, Resources},
        sampling::Sampler,
        spans::SpanBuilder,
        SpanRecord,
    },
    decode::Decoder,
    export::{
        convert, json,
        otlp::{ExportCounters, OtlpConfig, OtlpExporter, OtlpResource},
        proto::opentelemetry::proto::resource::v1::Resource,
    },
};

/// Connections with no traffic for this long are forgotten by the decoder.
const IDLE_CONN: Duration = Duration::from_secs(300);
/// A console trace is printed once no span joined it for this long.
const CONSOLE_QUIET: Duration = Duration::from_secs(1);
/// Part of the shutdown timeout kept back from the exporter's flush: the
/// exporter's own grace for a stuck worker, and the final log lines.
const SHUTDOWN_RESERVE: Duration = Duration::from_millis(600);

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    #[error("starting the OTLP exporter: {0}")]
    Export(#[from] crate::export::otlp::ExportError),
    #[error("spawning the drain thread: {0}")]
    Thread(std::io::Error),
    #[error("the drain thread panicked")]
    DrainPanicked,
}

/// Where finished spans go.
pub enum SinkConfig {
    Otlp(OtlpConfig),
    ConsoleTree,
    ConsoleJson,
}

pub struct TraceOptions {
    pub capture: CaptureConfig,
    pub sampler: Sampler,
    pub sink: SinkConfig,
    pub service_names: HashMap<String, String>,
    /// How long a finished span waits for the other end of its request on this host.
    pub pair_window: Duration,
    /// CLIENT requests from a thread with several requests open.
    pub thread_link: crate::correlate::spans::ThreadLink,
    /// Also set the older gRPC attribute names (see `SpanBuilder`).
    pub legacy_rpc_attributes: bool,
    pub stats_every: Option<Duration>,
    /// Longest time from the stop signal to the end of `run_trace`.
    pub shutdown_timeout: Duration,
}

enum Sink {
    Otlp(OtlpExporter),
    Tree(TreePrinter),
    Json,
}

/// A process resource and its OTLP forms: the message (JSON output) and its encoding.
type ProtoEntry = (Arc<ProcessResource>, Arc<Resource>, Arc<OtlpResource>);

/// How often resources of exited processes are looked for.
const RESOURCE_SWEEP: Duration = Duration::from_secs(5);

/// Entries before `ProtoResources` drops the ones of forgotten processes:
/// twice what `Resources` keeps, so that a sweep frees about half.
const MAX_PROTO_RESOURCES: usize = 2 * resource::MAX_PROCESSES;

/// OTLP resources, made and encoded once per process resource (the
/// exporter groups spans by the resource's `Arc` identity).
#[derive(Default)]
pub struct ProtoResources(HashMap<u32, ProtoEntry, foldhash::fast::RandomState>);

impl ProtoResources {
    fn entry(&mut self, res: &Arc<ProcessResource>) -> &ProtoEntry {
        let fresh = !self
            .0
            .get(&res.pid)
            .is_some_and(|(r, _, _)| Arc::ptr_eq(r, res));
        if fresh {
            if self.0.len() >= MAX_PROTO_RESOURCES {
                // Keep the ones `Resources` (or a span in flight) still holds:
                // it bounds its cache, and entries of processes it forgot
                // would otherwise stay here forever (a host that runs a
                // process per request).
                self.0.retain(|_, (r, _, _)| Arc::strong_count(r) > 1);
            }
            let p = convert::resource(res);
            let e = Arc::new(OtlpResource::new(&p));
            self.0.insert(res.pid, (res.clone(), Arc::new(p), e));
        }
        &self.0[&res.pid]
    }

    /// Drops the entries of processes `Resources` forgot.
    pub fn sweep(&mut self) {
        self.0.retain(|_, (r, _, _)| Arc::strong_count(r) > 1);
    }

    /// The resource's OTLP message (for JSON output).
    pub fn get(&mut self, res: &Arc<ProcessResource>) -> Arc<Resource> {
        self.entry(res).1.clone()
    }

    /// The resource as the exporter sends it.
    pub fn encoded(&mut self, res: &Arc<ProcessResource>) -> Arc<OtlpResource> {
        self.entry(res).2.clone()
    }
}

impl Sink {
    /// Hands `spans` (emptied), each with its process's resource, to the sink.
    fn spans(
        &mut self,
        spans: &mut Vec<SpanRecord>,
        resources: &mut Resources,
        protos: &mut ProtoResources,
        out: &mut impl Write,
    ) {
        match self {
            Self::Otlp(exporter) => {
                // One hand-over per batch: the exporter's worker wakes once.
                let mut items = Vec::with_capacity(spans.len());
                for s in spans.drain(..) {
                    let res = resources.get(s.pid, &s.comm);
                    items.push((protos.encoded(&res), s));
                }
                exporter.send_all(&mut items);
            }
            Self::Tree(t) => {
                for s in spans.drain(..) {
                    let res = resources.get(s.pid, &s.comm);
                    let _ = t.push(s, res, out);
                }
            }
            Self::Json => {
                for s in spans.drain(..) {
                    let res = resources.get(s.pid, &s.comm);
                    let line = json::span_to_otlp_json(&protos.get(&res), &convert::span(&s));
                    let _ = writeln!(out, "{line}");
                }
            }
        }
    }

    fn tick(&mut self, out: &mut impl Write) {
        match self {
            Self::Tree(t) => {
                let _ = t.flush(Some(Instant::now()), out);
            }
            Self::Json => {
                let _ = out.flush();
            }
            Self::Otlp(_) => {}
        }
    }

    fn counters(&self) -> ExportCounters {
        match self {
            Self::Otlp(exporter) => exporter.counters(),
            _ => ExportCounters::default(),
        }
    }

    fn finish(self, out: &mut impl Write, deadline: Instant) -> ExportCounters {
        match self {
            Self::Otlp(exporter) => exporter.shutdown(deadline),
            Self::Tree(mut t) => {
                let _ = t.flush(None, out);
                ExportCounters::default()
            }
            Self::Json => {
                let _ = out.flush();
                ExportCounters::default()
            }
        }
    }
}

/// Runs until `stop` is set; flushes everything finished before returning.
pub fn run_trace(opts: TraceOptions, stop: Arc<AtomicBool>) -> Result<(), PipelineError> {
    let mut sink = match opts.sink {
        SinkConfig::Otlp(cfg) => {
            tracing::info!(endpoint = %cfg.traces_url, "exporting spans over OTLP/HTTP");
            Sink::Otlp(OtlpExporter::start(cfg)?)
        }
        SinkConfig::ConsoleTree => Sink::Tree(TreePrinter::new(CONSOLE_QUIET)),
        SinkConfig::ConsoleJson => Sink::Json,
    };
    let cap = Capture::start(&opts.capture)?;
    let (rx, drainer) =
        capture::spawn_drain(cap, opts.capture.drain_interval, stop, opts.stats_every)
            .map_err(PipelineError::Thread)?;

    let offset = capture::monotonic_to_unix_offset_ns();
    let mut decoder = Decoder::default().keep_starts();
    let mut builder = SpanBuilder::new(opts.sampler, offset, opts.pair_window.as_nanos() as u64)
        .with_legacy_rpc_attributes(opts.legacy_rpc_attributes)
        .with_thread_link(opts.thread_link);
    let mut resources = Resources::new(opts.service_names);
    let mut protos = ProtoResources::default();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut exchanges = Vec::new();
    let mut starts = Vec::new();
    let mut spans = Vec::new();
    let mut stats = Stats::default();
    let mut last_stats = Instant::now();
    let mut last_tick = Instant::now();
    let mut last_sweep = Instant::now();

    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(batch) => {
                for chunk in &batch {
                    stats.chunks += 1;
                    stats.bytes += chunk.payload.len() as u64;
                    decoder.push(chunk, &mut exchanges);
                    if chunk.kind == ChunkKind::Close {
                        stats.closes += 1;
                    }
                }
                let now = capture::monotonic_now_ns();
                decoder.take_starts(&mut starts);
                builder.push_batch(&mut starts, &mut exchanges, now, &mut spans);
                deliver(&mut spans, &mut sink, &mut resources, &mut protos, &mut out);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if last_tick.elapsed() >= Duration::from_millis(100) {
            let now = capture::monotonic_now_ns();
            builder.flush(now, &mut spans);
            decoder.expire(now, IDLE_CONN.as_nanos() as u64, &mut exchanges);
            for ex in exchanges.drain(..) {
                builder.push(ex, now, &mut spans);
            }
            deliver(&mut spans, &mut sink, &mut resources, &mut protos, &mut out);
            sink.tick(&mut out);
            last_tick = Instant::now();
        }
        if last_sweep.elapsed() >= RESOURCE_SWEEP {
            resources.sweep();
            protos.sweep();
            last_sweep = Instant::now();
        }
        if opts
            .stats_every
            .is_some_and(|every| last_stats.elapsed() >= every)
        {
            stats.log("pipeline counters", &decoder, &builder, sink.counters());
            last_stats = Instant::now();
        }
    }
    // The drain thread saw the stop flag within a drain interval.
    let deadline = Instant::now() + opts.shutdown_timeout.saturating_sub(SHUTDOWN_RESERVE);
    // Everything finished is flushed: pending pairs go out alone.
    builder.flush(u64::MAX, &mut spans);
    deliver(&mut spans, &mut sink, &mut resources, &mut protos, &mut out);
    let (kernel, user) = drainer.join().map_err(|_| PipelineError::DrainPanicked)?;
    let export = sink.finish(&mut out, deadline);
    let _ = out.flush();
    tracing::info!(%kernel, %user, "capture stopped");
    stats.log("agent stopped", &decoder, &builder, export);
    Ok(())
}

/// Hands finished spans, with their process's resource, to the sink.
fn deliver(
    spans: &mut Vec<SpanRecord>,
    sink: &mut Sink,
    resources: &mut Resources,
    protos: &mut ProtoResources,
    out: &mut impl Write,
) {
    if !spans.is_empty() {
        sink.spans(spans, resources, protos, out);
    }
}

#[derive(Default)]
struct Stats {
    chunks: u64,
    bytes: u64,
    closes: u64,
}

impl Stats {
    fn log(&self, what: &str, decoder: &Decoder, builder: &SpanBuilder, export: ExportCounters) {
        let all = decoder.counters();
        let (d, h2) = (all.http1, all.http2);
        let s = builder.counters;
        tracing::info!(
            chunks = self.chunks,
            bytes = self.bytes,
            closes = self.closes,
            exchanges = d.exchanges,
            non_http_connections = d.non_http_connections,
            http2_connections = d.http2_connections,
            parse_errors = d.parse_errors,
            resyncs = d.resyncs,
            holes_skipped = d.holes_skipped,
            lost_framing = d.lost_framing,
            ambiguous_lengths = d.ambiguous_lengths,
            after_ambiguous_bytes = d.after_ambiguous_bytes,
            oversized_heads = d.oversized_heads,
            dropped_connections = d.dropped_connections,
            orphan_responses = d.orphan_responses,
            gap_bytes = decoder.gap_bytes,
            h2_connections = h2.connections,
            h2_late_connections = h2.late_connections,
            h2_upgrades = h2.upgrades,
            h2_exchanges = h2.exchanges,
            h2_incomplete_exchanges = h2.incomplete_exchanges,
            h2_frames = h2.frames,
            h2_sync_lost = h2.sync_lost,
            h2_resyncs = h2.resyncs,
            h2_bytes_skipped = h2.bytes_skipped,
            h2_header_blocks_lost = h2.header_blocks_lost,
            h2_oversized_header_blocks = h2.oversized_header_blocks,
            h2_hpack_errors = h2.hpack_errors,
            h2_streams_damaged = h2.streams_damaged,
            h2_streams_over_limit = h2.streams_over_limit,
            h2_dropped_connections = h2.dropped_connections,
            h2_protocol_errors = h2.protocol_errors,
            spans = s.spans,
            server_spans = s.server_spans,
            client_spans = s.client_spans,
            paired = s.paired,
            linked_by_trace = s.linked_by_trace,
            linked_by_thread = s.linked_by_thread,
            sdk_parents = s.sdk_parents,
            ambiguous_trace = s.ambiguous_trace,
            ambiguous_thread = s.ambiguous_thread,
            overlapping_calls = s.overlapping_calls,
            overlapping_kept = s.overlapping_kept,
            late_pairs = s.late_pairs,
            late_starts = s.late_starts,
            links_evicted = s.evicted,
            sampled_out = s.sampled_out,
            unknown_role = s.unknown_role,
            context_w3c = s.context_w3c,
            context_b3 = s.context_b3,
            context_jaeger = s.context_jaeger,
            context_malformed = s.context_malformed,
            spans_exported = export.spans_exported,
            spans_dropped_queue_full = export.spans_dropped_queue_full,
            spans_dropped_failed = export.spans_dropped_failed,
            export_retries = export.retries,
            "{what}"
        );
    }
}
