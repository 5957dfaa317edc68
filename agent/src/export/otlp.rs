//! OTLP/HTTP protobuf span exporter (`POST {endpoint}/v1/traces`).
//!
//! A single worker thread owns the blocking HTTP client. [`OtlpExporter::send`] never blocks:
//! spans go into a bounded queue; when it is full the oldest are dropped (and counted), since
//! after an outage the newest spans are the ones worth having. The worker
//! batches spans by size and time, groups them by resource, encodes an
//! `ExportTraceServiceRequest`, optionally gzips it and POSTs it, retrying transient failures
//! with exponential backoff and jitter.

use std::collections::{hash_map::RandomState, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prost::Message;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE};

use super::proto::opentelemetry::proto::collector::trace::v1::ExportTraceServiceResponse;
use super::proto::opentelemetry::proto::common::v1::InstrumentationScope;
pub use super::proto::opentelemetry::proto::{resource::v1::Resource, trace::v1::Span};
pub use super::wire::{OtlpResource, RequestEncoder};
use crate::correlate::SpanRecord;

/// Default per-request timeout (OTEL_EXPORTER_OTLP_TIMEOUT default: 10 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default maximum number of spans per request.
pub const DEFAULT_MAX_BATCH_SPANS: usize = 512;
/// Default maximum time a span waits before its batch is sent.
pub const DEFAULT_BATCH_DELAY: Duration = Duration::from_secs(1);
/// Default bound of the span queue.
pub const DEFAULT_MAX_QUEUE_SPANS: usize = 32768;
/// Path appended to a base endpoint (OTEL_EXPORTER_OTLP_ENDPOINT / `--otlp-endpoint`).
pub const TRACES_PATH: &str = "/v1/traces";

/// First retry backoff.
const RETRY_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Backoff cap.
const RETRY_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Total time spent retrying one batch before it is dropped.
const RETRY_MAX_ELAPSED: Duration = Duration::from_secs(30);
/// Cap on a server-provided `Retry-After`.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(30);
/// A suppressed WARN is repeated at most this often (with the count of suppressed events).
const WARN_INTERVAL: Duration = Duration::from_secs(60);
/// Extra time `shutdown` waits for the worker beyond the deadline before detaching it.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Name of the instrumentation scope put on every exported `ScopeSpans`.
pub const SCOPE_NAME: &str = env!("CARGO_PKG_NAME");
/// Version of the instrumentation scope put on every exported `ScopeSpans`.
pub const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The instrumentation scope naming the agent.
pub fn agent_scope() -> InstrumentationScope {
    InstrumentationScope {
        name: SCOPE_NAME.to_string(),
        version: SCOPE_VERSION.to_string(),
        attributes: Vec::new(),
        dropped_attributes_count: 0,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// Full traces URL, e.g. http://127.0.0.1:4318/v1/traces
    pub traces_url: String,
    pub headers: Vec<(String, String)>,
    /// Per request, default 10 s.
    pub timeout: Duration,
    /// Default 512.
    pub max_batch_spans: usize,
    /// Default 1 s (max time a span waits before a batch is sent).
    pub batch_delay: Duration,
    /// Default 8192; beyond → drop + count.
    pub max_queue_spans: usize,
    /// Default false: the OTLP spec's default compression is none, and on a
    /// busy host deflate costs the agent more CPU than the bytes it saves on
    /// a local collector link (`OTEL_EXPORTER_OTLP_COMPRESSION=gzip` turns it on).
    pub gzip: bool,
}

impl OtlpConfig {
    /// A config for `traces_url` (used as is) with all other settings at their defaults.
    pub fn new(traces_url: impl Into<String>) -> Self {
        Self {
            traces_url: traces_url.into(),
            headers: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            max_batch_spans: DEFAULT_MAX_BATCH_SPANS,
            batch_delay: DEFAULT_BATCH_DELAY,
            max_queue_spans: DEFAULT_MAX_QUEUE_SPANS,
            gzip: false,
        }
    }

    /// Resolution per the OpenTelemetry spec: `flag_endpoint` (the CLI's --otlp-endpoint, a base
    /// URL like OTEL_EXPORTER_OTLP_ENDPOINT) wins over env; OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is
    /// used AS IS (a full URL); OTEL_EXPORTER_OTLP_ENDPOINT is a base URL to which "/v1/traces" is
    /// appended (handle a trailing slash); OTEL_EXPORTER_OTLP_HEADERS /
    /// OTEL_EXPORTER_OTLP_TRACES_HEADERS = "k=v,k2=v2" with URL-decoded values (both merged,
    /// traces-specific wins); OTEL_EXPORTER_OTLP_TIMEOUT / _TRACES_TIMEOUT in ms;
    /// OTEL_EXPORTER_OTLP_COMPRESSION / _TRACES_COMPRESSION ("gzip" | "none").
    ///
    /// Returns Ok(None) when no endpoint is configured anywhere. Empty values count as unset.
    /// An unusable endpoint URL is an error; unparsable header pairs, timeouts and compression
    /// values are ignored with a WARN (the spec's "warn and ignore" rule for env values).
    pub fn resolve(
        flag_endpoint: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ExportError> {
        let get = |key: &str| -> Option<String> {
            env(key)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let flag = flag_endpoint.map(str::trim).filter(|v| !v.is_empty());

        let traces_url = if let Some(base) = flag {
            validate_url(base)?;
            append_traces_path(base)
        } else if let Some(url) = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            url
        } else if let Some(base) = get("OTEL_EXPORTER_OTLP_ENDPOINT") {
            validate_url(&base)?;
            append_traces_path(&base)
        } else {
            return Ok(None);
        };
        validate_url(&traces_url)?;

        let mut cfg = Self::new(traces_url);

        // Headers: generic first, then traces-specific ones override by (case-insensitive) name.
        for var in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(raw) = get(var) {
                for (k, v) in parse_headers(var, &raw) {
                    cfg.headers.retain(|(old, _)| !old.eq_ignore_ascii_case(&k));
                    cfg.headers.push((k, v));
                }
            }
        }

        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ] {
            if let Some(raw) = get(var) {
                match raw.parse::<u64>() {
                    Ok(ms) if ms > 0 => {
                        cfg.timeout = Duration::from_millis(ms);
                        break;
                    }
                    _ => {
                        tracing::warn!(var, value = %raw, "ignoring invalid OTLP timeout (expected milliseconds > 0)")
                    }
                }
            }
        }

        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ] {
            if let Some(raw) = get(var) {
                match raw.to_ascii_lowercase().as_str() {
                    "gzip" => {
                        cfg.gzip = true;
                        break;
                    }
                    "none" => {
                        cfg.gzip = false;
                        break;
                    }
                    _ => {
                        tracing::warn!(var, value = %raw, "ignoring unsupported OTLP compression (expected gzip or none)")
                    }
                }
            }
        }

        // The batch span processor's standard variables size the queue and batches.
        let positive = |var: &str| -> Option<usize> {
            let raw = get(var)?;
            match raw.trim().parse::<usize>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    tracing::warn!(var, value = %raw, "ignoring invalid value (expected a whole number > 0)");
                    None
                }
            }
        };
        if let Some(n) = positive("OTEL_BSP_MAX_QUEUE_SIZE") {
            cfg.max_queue_spans = n;
        }
        if let Some(n) = positive("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
            cfg.max_batch_spans = n;
        }
        if let Some(ms) = positive("OTEL_BSP_SCHEDULE_DELAY") {
            cfg.batch_delay = Duration::from_millis(ms as u64);
        }
        // The spec: a batch is never larger than the queue.
        cfg.max_batch_spans = cfg.max_batch_spans.min(cfg.max_queue_spans);
        Ok(Some(cfg))
    }

    fn validate(&self) -> Result<(), ExportError> {
        validate_url(&self.traces_url)?;
        let bad = |reason: &str| Err(ExportError::InvalidConfig(reason.to_string()));
        if self.max_batch_spans == 0 {
            return bad("max_batch_spans must be > 0");
        }
        if self.max_queue_spans == 0 {
            return bad("max_queue_spans must be > 0");
        }
        if self.timeout.is_zero() {
            return bad("timeout must be > 0");
        }
        Ok(())
    }
}

fn append_traces_path(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with(TRACES_PATH) {
        tracing::warn!(
            endpoint = base,
            "OTLP base endpoint already ends with {TRACES_PATH}; appending it again as the spec requires \
             (use OTEL_EXPORTER_OTLP_TRACES_ENDPOINT for a full URL)"
        );
    }
    format!("{base}{TRACES_PATH}")
}

fn validate_url(url: &str) -> Result<(), ExportError> {
    let invalid = |reason: String| ExportError::InvalidEndpoint {
        url: url.to_string(),
        reason,
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => {
            return Err(invalid(format!(
                "unsupported scheme {other:?} (expected http or https)"
            )))
        }
    }
    // The URL parser is lenient ("http:///x" gets host "x"): require an explicit authority.
    let authority = url.split_once("://").map_or("", |(_, rest)| rest);
    if authority.is_empty()
        || authority.starts_with('/')
        || parsed.host_str().is_none_or(str::is_empty)
    {
        return Err(invalid("missing host".to_string()));
    }
    Ok(())
}

/// Parses `k=v,k2=v2` (W3C baggage-like; values percent-decoded). Bad pairs are skipped with a WARN.
fn parse_headers(var: &str, raw: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for pair in raw.split(',') {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let Some((k, v)) = pair.split_once('=') else {
            tracing::warn!(var, "ignoring OTLP header entry without '='");
            continue;
        };
        let key = k.trim();
        let Some(value) = percent_decode(v.trim()) else {
            tracing::warn!(
                var,
                header = key,
                "ignoring OTLP header with invalid percent-encoding"
            );
            continue;
        };
        let value = value.trim().to_string();
        if key.is_empty()
            || HeaderName::from_bytes(key.as_bytes()).is_err()
            || HeaderValue::from_str(&value).is_err()
        {
            // Don't log the value: it is usually a secret.
            tracing::warn!(var, header = key, "ignoring invalid OTLP header entry");
            continue;
        }
        out.retain(|(old, _): &(String, String)| !old.eq_ignore_ascii_case(key));
        out.push((key.to_string(), value));
    }
    out
}

/// Percent-decodes `s` (`+` is kept literally). None on a malformed escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hi = (hex[0] as char).to_digit(16)?;
            let lo = (hex[1] as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("invalid OTLP endpoint {url:?}: {reason}")]
    InvalidEndpoint { url: String, reason: String },
    #[error("invalid OTLP exporter config: {0}")]
    InvalidConfig(String),
    #[error("invalid OTLP header {name:?}")]
    InvalidHeader { name: String },
    #[error("cannot build OTLP HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    #[error("cannot start OTLP export thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("OTLP export thread exited during startup")]
    WorkerStartup,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExportCounters {
    /// Spans accepted into the queue.
    pub spans_queued: u64,
    /// Spans acknowledged by the collector (minus any it reported as rejected).
    pub spans_exported: u64,
    /// Queued spans dropped, oldest first, to make room for newer ones while
    /// the queue was full (and spans offered after shutdown began).
    pub spans_dropped_queue_full: u64,
    /// Queued spans that were not exported: permanent HTTP error, retries exhausted, rejected in a
    /// partial success, or still queued at the shutdown deadline.
    pub spans_dropped_failed: u64,
    /// Requests that got a 2xx answer.
    pub batches_sent: u64,
    /// Retry attempts (requests re-sent after a transient failure).
    pub retries: u64,
    /// Requests that failed (any non-2xx answer or transport error, including retried ones).
    pub requests_failed: u64,
}

#[derive(Default)]
struct AtomicCounters {
    spans_queued: AtomicU64,
    spans_exported: AtomicU64,
    spans_dropped_queue_full: AtomicU64,
    spans_dropped_failed: AtomicU64,
    batches_sent: AtomicU64,
    retries: AtomicU64,
    requests_failed: AtomicU64,
}

impl AtomicCounters {
    fn snapshot(&self) -> ExportCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExportCounters {
            spans_queued: g(&self.spans_queued),
            spans_exported: g(&self.spans_exported),
            spans_dropped_queue_full: g(&self.spans_dropped_queue_full),
            spans_dropped_failed: g(&self.spans_dropped_failed),
            batches_sent: g(&self.batches_sent),
            retries: g(&self.retries),
            requests_failed: g(&self.requests_failed),
        }
    }
}

fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// State shared by the exporter handle and its worker.
struct Shared {
    counters: AtomicCounters,
    state: Mutex<State>,
    /// Signalled on new spans, on close and on a new deadline.
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Spans handed over and not yet taken by the worker, in the batches
    /// they came in, oldest first.
    queue: VecDeque<Vec<Item>>,
    /// Spans in `queue`.
    queued: usize,
    /// No more spans will come (shutdown or drop).
    closed: bool,
    /// Set once by shutdown/drop: the instant after which nothing more is sent.
    deadline: Option<Instant>,
}

/// What the worker gets from the queue.
enum Pop {
    Items(Vec<Item>),
    Timeout,
    Closed,
}

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// No more spans come; nothing is sent after `deadline`.
    fn close(&self, deadline: Instant) {
        let mut guard = self.lock_state();
        guard.deadline = Some(guard.deadline.map_or(deadline, |d| d.min(deadline)));
        guard.closed = true;
        self.wake.notify_all();
    }

    fn deadline(&self) -> Option<Instant> {
        self.lock_state().deadline
    }

    /// Queues `items`, dropping the oldest queued spans beyond `max`; returns
    /// how many spans were dropped, and frees them outside the lock.
    fn push(&self, items: &mut Vec<Item>, max: usize) -> usize {
        let mut evicted: Vec<Vec<Item>> = Vec::new();
        let mut dropped = 0;
        {
            let mut st = self.lock_state();
            if st.closed {
                dropped = items.len();
                items.clear();
                return dropped;
            }
            if items.len() > max {
                dropped += items.len() - max;
                evicted.push(items.drain(..items.len() - max).collect());
            }
            let mut excess = (st.queued + items.len()).saturating_sub(max);
            while excess > 0 {
                let Some(front) = st.queue.front_mut() else {
                    break;
                };
                let k = excess.min(front.len());
                if k == front.len() {
                    if let Some(b) = st.queue.pop_front() {
                        evicted.push(b);
                    }
                } else {
                    evicted.push(front.drain(..k).collect());
                }
                st.queued -= k;
                dropped += k;
                excess -= k;
            }
            st.queued += items.len();
            st.queue.push_back(std::mem::take(items));
            self.wake.notify_one();
        }
        drop(evicted);
        dropped
    }

    /// The next batch of spans, waiting until `until` (forever with `None`).
    fn pop(&self, until: Option<Instant>) -> Pop {
        let mut st = self.lock_state();
        loop {
            if let Some(items) = st.queue.pop_front() {
                st.queued -= items.len();
                return Pop::Items(items);
            }
            if st.closed {
                return Pop::Closed;
            }
            st = match until {
                None => self.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(t) => {
                    let now = Instant::now();
                    if now >= t {
                        return Pop::Timeout;
                    }
                    self.wake
                        .wait_timeout(st, t - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    fn deadline_passed(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() >= d)
    }

    /// Sleeps until `until`, waking early when the shutdown deadline comes first (also one set
    /// while sleeping). Returns false if the shutdown deadline has been reached.
    fn sleep_until(&self, until: Instant) -> bool {
        let mut guard = self.lock_state();
        loop {
            let now = Instant::now();
            if guard.deadline.is_some_and(|d| now >= d) {
                return false;
            }
            let limit = guard.deadline.map_or(until, |d| d.min(until));
            if now >= limit {
                return true;
            }
            guard = self
                .wake
                .wait_timeout(guard, limit - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A span and its process's resource, as queued for export.
pub type Item = (Arc<OtlpResource>, SpanRecord);

pub struct OtlpExporter {
    /// Spans go over in the batches they were made in (`Shared::push`): one
    /// wake-up of the worker per batch, not per span (a lock and a context
    /// switch per span were a sixth of the agent's CPU under load).
    max_queue_spans: usize,
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    done_rx: Option<Receiver<()>>,
}

impl std::fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpExporter")
            .field("counters", &self.counters())
            .finish_non_exhaustive()
    }
}

impl OtlpExporter {
    /// Validates `cfg` and starts the worker thread (which builds the HTTP client, so the client is
    /// created and dropped outside any async runtime the caller may be in).
    pub fn start(cfg: OtlpConfig) -> Result<Self, ExportError> {
        cfg.validate()?;
        let mut default_headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            let invalid = || ExportError::InvalidHeader { name: k.clone() };
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| invalid())?;
            let mut value = HeaderValue::from_str(v).map_err(|_| invalid())?;
            value.set_sensitive(true);
            default_headers.insert(name, value);
        }

        let shared = Arc::new(Shared {
            counters: AtomicCounters::default(),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let max_queue_spans = cfg.max_queue_spans;
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), ExportError>>(1);
        let (done_tx, done_rx) = mpsc::sync_channel::<()>(1);
        let worker_shared = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name("otlp-export".to_string())
            .spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .timeout(cfg.timeout)
                    .default_headers(default_headers)
                    .user_agent(concat!(
                        env!("CARGO_PKG_NAME"),
                        "/",
                        env!("CARGO_PKG_VERSION")
                    ))
                    .build();
                let client = match client {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(ExportError::HttpClient(e)));
                        return;
                    }
                };
                Worker {
                    cfg,
                    encoder: RequestEncoder::new(agent_scope().encode_to_vec()),
                    client,
                    shared: worker_shared,
                    warn: WarnLimiter::default(),
                }
                .run();
                let _ = done_tx.send(());
            })
            .map_err(ExportError::Spawn)?;

        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = worker.join();
                return Err(e);
            }
            Err(_) => {
                let _ = worker.join();
                return Err(ExportError::WorkerStartup);
            }
        }
        Ok(Self {
            max_queue_spans,
            shared,
            worker: Some(worker),
            done_rx: Some(done_rx),
        })
    }

    /// Non-blocking: queues one span of `resource` (spans sharing the same Arc are
    /// grouped into one ResourceSpans per request, with one ScopeSpans whose scope names the
    /// agent). Full queue → dropped + counted.
    pub fn send(&self, resource: Arc<OtlpResource>, span: SpanRecord) {
        self.send_all(&mut vec![(resource, span)]);
    }

    /// Non-blocking: queues all of `items` (emptied); when the queue is
    /// full, the oldest queued spans are dropped and counted.
    pub fn send_all(&self, items: &mut Vec<Item>) {
        if items.is_empty() {
            return;
        }
        let c = &self.shared.counters;
        add(&c.spans_queued, items.len());
        let dropped = self.shared.push(items, self.max_queue_spans);
        if dropped > 0 {
            tracing::trace!(dropped, "OTLP export queue full, oldest spans dropped");
            add(&c.spans_dropped_queue_full, dropped);
        }
    }

    pub fn counters(&self) -> ExportCounters {
        self.shared.counters.snapshot()
    }

    /// Flushes everything queued (retrying as usual) until `deadline`, then stops the worker;
    /// returns final counters. Spans still unsent at the deadline count as `spans_dropped_failed`.
    /// If the worker is stuck past the deadline (plus a short grace) it is detached.
    pub fn shutdown(mut self, deadline: Instant) -> ExportCounters {
        self.stop(deadline);
        self.counters()
    }

    fn stop(&mut self, deadline: Instant) {
        // Closing the queue makes the worker flush what is left and exit.
        self.shared.close(deadline);
        let Some(worker) = self.worker.take() else {
            return;
        };
        let wait = deadline.saturating_duration_since(Instant::now()) + SHUTDOWN_GRACE;
        let finished = self
            .done_rx
            .take()
            .is_some_and(|rx| !matches!(rx.recv_timeout(wait), Err(RecvTimeoutError::Timeout)));
        if finished {
            if worker.join().is_err() {
                tracing::error!("OTLP export thread panicked");
            }
        } else {
            tracing::warn!(
                "OTLP export thread did not stop by the shutdown deadline; detaching it"
            );
        }
        // Whatever the worker did not take is lost now.
        let left = {
            let mut st = self.shared.lock_state();
            let n = st.queued;
            st.queue.clear();
            st.queued = 0;
            n
        };
        add(&self.shared.counters.spans_dropped_failed, left);
    }
}

impl Drop for OtlpExporter {
    /// Dropping without `shutdown` stops the worker promptly, dropping (and counting) what is queued.
    fn drop(&mut self) {
        if self.worker.is_some() {
            self.stop(Instant::now());
        }
    }
}

/// One WARN when export starts failing and one INFO when it recovers; drops
/// WARN at most once per [`WARN_INTERVAL`]; everything else goes to DEBUG.
#[derive(Default)]
struct WarnLimiter {
    last_warn: Option<Instant>,
    suppressed: u64,
    /// Since when requests fail, and the spans dropped meanwhile.
    failing_since: Option<Instant>,
    dropped_while_failing: u64,
}

impl WarnLimiter {
    /// A request failed (it may be retried).
    fn attempt_failed(&mut self, reason: &str) {
        if self.failing_since.is_none() {
            tracing::warn!("OTLP export failing, spans wait in the queue: {reason}");
            self.failing_since = Some(Instant::now());
        }
    }

    fn failure(&mut self, msg: &str, spans: usize) {
        self.attempt_failed(msg);
        self.dropped_while_failing += spans as u64;
        let now = Instant::now();
        if self
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= WARN_INTERVAL)
        {
            tracing::warn!(
                spans,
                suppressed_since_last_warning = self.suppressed,
                "OTLP export failed, spans dropped: {msg}"
            );
            self.last_warn = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
            tracing::debug!(spans, "OTLP export failed, spans dropped: {msg}");
        }
    }

    fn success(&mut self) {
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                failing_for_ms = since.elapsed().as_millis() as u64,
                spans_dropped = self.dropped_while_failing,
                "OTLP export recovered"
            );
            self.dropped_while_failing = 0;
        }
    }
}

enum Attempt {
    Success {
        rejected: u64,
        message: String,
    },
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
    },
    Permanent {
        reason: String,
    },
}

struct Worker {
    cfg: OtlpConfig,
    encoder: RequestEncoder,
    client: reqwest::blocking::Client,
    shared: Arc<Shared>,
    warn: WarnLimiter,
}

impl Worker {
    fn run(mut self) {
        let mut batch: Vec<Item> = Vec::with_capacity(self.cfg.max_batch_spans.min(4096));
        let mut first_at = Instant::now();
        loop {
            let until = (!batch.is_empty()).then(|| first_at + self.cfg.batch_delay);
            match self.shared.pop(until) {
                Pop::Items(items) => {
                    for item in items {
                        if batch.is_empty() {
                            first_at = Instant::now();
                        }
                        batch.push(item);
                        if batch.len() >= self.cfg.max_batch_spans {
                            self.flush(&mut batch);
                        }
                    }
                }
                Pop::Timeout => self.flush(&mut batch),
                Pop::Closed => {
                    self.flush(&mut batch);
                    break;
                }
            }
        }
        tracing::debug!(counters = ?self.shared.counters.snapshot(), "OTLP export thread stopped");
    }

    fn flush(&mut self, batch: &mut Vec<Item>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        if self.shared.deadline_passed() {
            add(&self.shared.counters.spans_dropped_failed, n);
            self.warn.failure("shutdown deadline reached", n);
            batch.clear();
            return;
        }
        let body = encode_batch(&mut self.encoder, batch, self.cfg.gzip);
        batch.clear();
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                add(&self.shared.counters.spans_dropped_failed, n);
                self.warn.failure(&format!("gzip encoding failed: {e}"), n);
                return;
            }
        };
        self.send_with_retry(body, n);
    }

    fn send_with_retry(&mut self, body: Vec<u8>, n: usize) {
        let c = &self.shared.counters;
        let started = Instant::now();
        let mut backoff = RETRY_INITIAL_BACKOFF;
        loop {
            match self.attempt(&body) {
                Attempt::Success { rejected, message } => {
                    add(&c.batches_sent, 1);
                    let rejected = (rejected as usize).min(n);
                    add(&c.spans_exported, n - rejected);
                    if rejected > 0 {
                        add(&c.spans_dropped_failed, rejected);
                        self.warn
                            .failure(&format!("collector rejected spans: {message}"), rejected);
                    } else {
                        if !message.is_empty() {
                            tracing::debug!("OTLP partial success message: {message}");
                        }
                        self.warn.success();
                    }
                    return;
                }
                Attempt::Permanent { reason } => {
                    add(&c.requests_failed, 1);
                    add(&c.spans_dropped_failed, n);
                    self.warn.failure(&reason, n);
                    return;
                }
                Attempt::Retryable {
                    reason,
                    retry_after,
                } => {
                    add(&c.requests_failed, 1);
                    self.warn.attempt_failed(&reason);
                    let jittered = jitter(backoff);
                    let delay = retry_after.map_or(jittered, |ra| ra.min(RETRY_AFTER_CAP));
                    backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
                    let until = Instant::now() + delay;
                    if until > started + RETRY_MAX_ELAPSED {
                        add(&c.spans_dropped_failed, n);
                        self.warn.failure(
                            &format!(
                                "giving up after retrying for {:?}: {reason}",
                                started.elapsed()
                            ),
                            n,
                        );
                        return;
                    }
                    if self.shared.deadline().is_some_and(|d| until > d) {
                        // The next attempt could only start after the shutdown deadline.
                        add(&c.spans_dropped_failed, n);
                        self.warn.failure(
                            &format!("shutdown deadline reached while retrying: {reason}"),
                            n,
                        );
                        return;
                    }
                    tracing::debug!(?delay, "OTLP export failed, will retry: {reason}");
                    if !self.shared.sleep_until(until) {
                        add(&c.spans_dropped_failed, n);
                        self.warn.failure(
                            &format!("shutdown deadline reached while retrying: {reason}"),
                            n,
                        );
                        return;
                    }
                    add(&c.retries, 1);
                }
            }
        }
    }

    fn attempt(&self, body: &[u8]) -> Attempt {
        let mut timeout = self.cfg.timeout;
        if let Some(d) = self.shared.deadline() {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Attempt::Permanent {
                    reason: "shutdown deadline reached".to_string(),
                };
            }
            timeout = timeout.min(left);
        }
        let mut req = self
            .client
            .post(&self.cfg.traces_url)
            .timeout(timeout)
            .header(CONTENT_TYPE, "application/x-protobuf")
            .body(body.to_vec());
        if self.cfg.gzip {
            req = req.header(CONTENT_ENCODING, "gzip");
        }
        let resp = match req.send() {
            Ok(r) => r,
            Err(e) if e.is_builder() => {
                return Attempt::Permanent {
                    reason: format!("cannot build request: {e}"),
                }
            }
            // Connection refused/reset, timeouts, and other transport errors are transient.
            Err(e) => {
                return Attempt::Retryable {
                    reason: format!("request error: {}", error_chain(&e)),
                    retry_after: None,
                }
            }
        };
        let status = resp.status();
        if status.is_success() {
            let (rejected, message) = match resp.bytes() {
                Ok(bytes) if !bytes.is_empty() => {
                    match ExportTraceServiceResponse::decode(bytes.as_ref()) {
                        Ok(r) => r
                            .partial_success
                            .map(|p| {
                                (
                                    u64::try_from(p.rejected_spans).unwrap_or(0),
                                    p.error_message,
                                )
                            })
                            .unwrap_or_default(),
                        Err(e) => {
                            tracing::debug!("cannot decode OTLP response body: {e}");
                            (0, String::new())
                        }
                    }
                }
                _ => (0, String::new()),
            };
            return Attempt::Success { rejected, message };
        }
        let code = status.as_u16();
        if matches!(code, 429 | 502 | 503 | 504) {
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Attempt::Retryable {
                reason: format!("HTTP {status}"),
                retry_after,
            };
        }
        let text = resp.text().unwrap_or_default();
        let snippet: String = text.chars().take(200).collect();
        Attempt::Permanent {
            reason: format!("HTTP {status}: {snippet}"),
        }
    }
}

/// The body of one export request: spans grouped by resource, protobuf,
/// gzip-compressed when `gzip`. Also what the replay benchmark measures.
pub fn encode_batch(
    enc: &mut RequestEncoder,
    items: &[Item],
    gzip: bool,
) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::with_capacity(items.len() * 600 + 256);
    enc.encode(items, &mut raw);
    if !gzip {
        return Ok(raw);
    }
    // The fast level: at the default one deflate was an eighth of the
    // agent's CPU under load, for a few percent smaller requests.
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    enc.write_all(&raw)?;
    enc.finish()
}

/// A delay uniformly drawn from [backoff/2, backoff].
fn jitter(backoff: Duration) -> Duration {
    let random = RandomState::new().build_hasher().finish();
    let half = backoff / 2;
    let half_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(random % half_nanos.saturating_add(1))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::{
        context::{SpanId, TraceId},
        SpanKind, Status as SpanStatus,
    };
    use crate::export::proto::opentelemetry::proto::collector::trace::v1::ExportTracePartialSuccess;
    use crate::export::proto::opentelemetry::proto::collector::trace::v1::ExportTraceServiceRequest;
    use crate::export::proto::opentelemetry::proto::common::v1::{any_value, AnyValue, KeyValue};
    use std::collections::VecDeque;
    use std::io::{BufRead, BufReader, Read};
    use std::net::{SocketAddr, TcpListener, TcpStream};

    // ---------- config resolution ----------

    fn resolve(
        flag: Option<&str>,
        vars: &[(&str, &str)],
    ) -> Result<Option<OtlpConfig>, ExportError> {
        let map: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OtlpConfig::resolve(flag, move |k| map.get(k).cloned())
    }

    fn url_of(flag: Option<&str>, vars: &[(&str, &str)]) -> Option<String> {
        resolve(flag, vars).expect("resolve").map(|c| c.traces_url)
    }

    const EP: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    const TEP: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

    #[test]
    fn endpoint_resolution_table() {
        type Case<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case] = &[
            // nothing configured
            (None, &[], None),
            (Some(""), &[(EP, ""), (TEP, "  ")], None),
            // base endpoint: /v1/traces appended, with and without trailing slash(es)
            (
                None,
                &[(EP, "http://c:4318")],
                Some("http://c:4318/v1/traces"),
            ),
            (
                None,
                &[(EP, "http://c:4318/")],
                Some("http://c:4318/v1/traces"),
            ),
            (
                None,
                &[(EP, "https://c/otlp//")],
                Some("https://c/otlp/v1/traces"),
            ),
            // traces endpoint used as is, and wins over the base endpoint
            (
                None,
                &[(TEP, "http://t:9/custom")],
                Some("http://t:9/custom"),
            ),
            (
                None,
                &[(TEP, "http://t:9/custom/"), (EP, "http://c:4318")],
                Some("http://t:9/custom/"),
            ),
            // the flag (a base URL) wins over both env vars
            (
                Some("http://flag:4318"),
                &[(TEP, "http://t:9/x"), (EP, "http://c:4318")],
                Some("http://flag:4318/v1/traces"),
            ),
            (
                Some("http://flag:4318/"),
                &[],
                Some("http://flag:4318/v1/traces"),
            ),
            // an empty flag counts as unset
            (
                Some(""),
                &[(EP, "http://c:4318")],
                Some("http://c:4318/v1/traces"),
            ),
        ];
        for (flag, vars, want) in cases {
            assert_eq!(
                url_of(*flag, vars).as_deref(),
                *want,
                "flag={flag:?} vars={vars:?}"
            );
        }
    }

    #[test]
    fn defaults_when_only_endpoint_is_set() {
        let cfg = resolve(None, &[(EP, "http://c:4318")]).unwrap().unwrap();
        assert_eq!(cfg, OtlpConfig::new("http://c:4318/v1/traces"));
        assert_eq!(cfg.timeout, Duration::from_secs(10));
        assert_eq!(cfg.max_batch_spans, 512);
        assert_eq!(cfg.batch_delay, Duration::from_secs(1));
        assert_eq!(cfg.max_queue_spans, 32768);
        assert!(!cfg.gzip);
        assert!(cfg.headers.is_empty());
    }

    #[test]
    fn invalid_endpoint_is_an_error() {
        for bad in [
            "not a url",
            "ftp://c:21",
            "localhost:4318",
            "http://",
            "http:///v1/traces",
        ] {
            for (flag, vars) in [
                (Some(bad), vec![]),
                (None, vec![(TEP, bad)]),
                (None, vec![(EP, bad)]),
            ] {
                let r = resolve(flag, &vars);
                assert!(
                    matches!(r, Err(ExportError::InvalidEndpoint { .. })),
                    "{bad}: {r:?}"
                );
            }
        }
    }

    #[test]
    fn headers_are_parsed_decoded_and_merged() {
        let cfg = resolve(
            None,
            &[
                (EP, "http://c:4318"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    " api-key = se%20cret%3D%2C , X-Tenant=a,novalue, =x,b@d=1,k2=%zz, k3 = a+b ,,",
                ),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                    "x-tenant=traces,Authorization=Basic%20dTpw",
                ),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            cfg.headers,
            vec![
                ("api-key".to_string(), "se cret=,".to_string()),
                ("k3".to_string(), "a+b".to_string()),
                ("x-tenant".to_string(), "traces".to_string()),
                ("Authorization".to_string(), "Basic dTpw".to_string()),
            ]
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("100%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%FF"), None); // not UTF-8
    }

    #[test]
    fn batch_processor_variables() {
        let c = |vars: &[(&str, &str)]| {
            let mut v = vec![(EP, "http://c:4318")];
            v.extend_from_slice(vars);
            let c = resolve(None, &v).unwrap().unwrap();
            (c.max_queue_spans, c.max_batch_spans, c.batch_delay)
        };
        let d = (
            DEFAULT_MAX_QUEUE_SPANS,
            DEFAULT_MAX_BATCH_SPANS,
            DEFAULT_BATCH_DELAY,
        );
        assert_eq!(c(&[]), d);
        assert_eq!(
            c(&[
                ("OTEL_BSP_MAX_QUEUE_SIZE", "1000"),
                ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "100"),
                ("OTEL_BSP_SCHEDULE_DELAY", "250")
            ]),
            (1000, 100, Duration::from_millis(250))
        );
        // A batch never exceeds the queue; invalid values keep the defaults.
        assert_eq!(
            c(&[("OTEL_BSP_MAX_QUEUE_SIZE", "100")]),
            (100, 100, DEFAULT_BATCH_DELAY)
        );
        assert_eq!(
            c(&[
                ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
                ("OTEL_BSP_SCHEDULE_DELAY", "x")
            ]),
            d
        );
    }

    #[test]
    fn timeout_resolution() {
        let t = |vars: &[(&str, &str)]| {
            let mut v = vec![(EP, "http://c:4318")];
            v.extend_from_slice(vars);
            resolve(None, &v).unwrap().unwrap().timeout
        };
        assert_eq!(
            t(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")]),
            Duration::from_millis(2500)
        );
        assert_eq!(
            t(&[
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "700")
            ]),
            Duration::from_millis(700)
        );
        // invalid traces-specific value falls back to the generic one, invalid everything to the default
        assert_eq!(
            t(&[
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "soon")
            ]),
            Duration::from_millis(2500)
        );
        assert_eq!(t(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "-1")]), DEFAULT_TIMEOUT);
        assert_eq!(t(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "0")]), DEFAULT_TIMEOUT);
    }

    #[test]
    fn compression_resolution() {
        let gz = |vars: &[(&str, &str)]| {
            let mut v = vec![(EP, "http://c:4318")];
            v.extend_from_slice(vars);
            resolve(None, &v).unwrap().unwrap().gzip
        };
        assert!(!gz(&[]));
        assert!(!gz(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "none")]));
        assert!(!gz(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "NONE")]));
        assert!(gz(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")]));
        assert!(gz(&[
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
        ]));
        assert!(!gz(&[
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none")
        ]));
        // unsupported values are ignored
        assert!(!gz(&[
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd")
        ]));
        assert!(!gz(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli")]));
        assert!(gz(&[
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "brotli")
        ]));
    }

    #[test]
    fn start_rejects_bad_config() {
        let mut cfg = OtlpConfig::new("http://127.0.0.1:1/v1/traces");
        cfg.max_batch_spans = 0;
        assert!(matches!(
            OtlpExporter::start(cfg),
            Err(ExportError::InvalidConfig(_))
        ));
        let mut cfg = OtlpConfig::new("http://127.0.0.1:1/v1/traces");
        cfg.headers = vec![("bad header".into(), "v".into())];
        assert!(matches!(
            OtlpExporter::start(cfg),
            Err(ExportError::InvalidHeader { .. })
        ));
        assert!(matches!(
            OtlpExporter::start(OtlpConfig::new("nope")),
            Err(ExportError::InvalidEndpoint { .. })
        ));
    }

    #[test]
    fn jitter_stays_in_range() {
        for ms in [1u64, 100, 5000] {
            let b = Duration::from_millis(ms);
            for _ in 0..200 {
                let j = jitter(b);
                assert!(j >= b / 2 && j <= b, "{j:?} for {b:?}");
            }
        }
    }

    // ---------- a tiny HTTP/1.1 collector ----------

    #[derive(Debug, Clone)]
    struct Recorded {
        method: String,
        path: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        at: Instant,
    }

    impl Recorded {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn decode(&self) -> ExportTraceServiceRequest {
            let raw = if self.header("content-encoding") == Some("gzip") {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&self.body[..])
                    .read_to_end(&mut out)
                    .expect("gunzip");
                out
            } else {
                self.body.clone()
            };
            ExportTraceServiceRequest::decode(&raw[..]).expect("protobuf decode")
        }

        fn span_count(&self) -> usize {
            self.decode()
                .resource_spans
                .iter()
                .flat_map(|rs| &rs.scope_spans)
                .map(|ss| ss.spans.len())
                .sum()
        }
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    fn reply(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: vec![],
        }
    }

    struct TestServer {
        addr: SocketAddr,
        requests: Arc<Mutex<Vec<Recorded>>>,
    }

    impl TestServer {
        /// Answers each request with the next scripted reply, then 200 forever.
        fn start(script: Vec<Reply>) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let requests = Arc::new(Mutex::new(Vec::new()));
            let recorded = Arc::clone(&requests);
            let mut script: VecDeque<Reply> = script.into();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let r = script.pop_front().unwrap_or_else(|| reply(200));
                    if let Some(req) = handle(stream, r) {
                        recorded.lock().unwrap().push(req);
                    }
                }
            });
            Self { addr, requests }
        }

        fn url(&self) -> String {
            format!("http://{}/v1/traces", self.addr)
        }

        fn requests(&self) -> Vec<Recorded> {
            self.requests.lock().unwrap().clone()
        }

        fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
            let end = Instant::now() + timeout;
            loop {
                let reqs = self.requests();
                if reqs.len() >= n || Instant::now() > end {
                    return reqs;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn handle(stream: TcpStream, r: Reply) -> Option<Recorded> {
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut reader = BufReader::new(stream.try_clone().ok()?);
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let mut parts = line.split_whitespace();
        let method = parts.next()?.to_string();
        let path = parts.next()?.to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).ok()?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':')?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).ok()?;
        let at = Instant::now();
        let mut out = format!(
            "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
            r.status,
            r.body.len()
        );
        for (k, v) in &r.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let mut w = stream;
        w.write_all(out.as_bytes()).ok()?;
        w.write_all(&r.body).ok()?;
        w.flush().ok()?;
        Some(Recorded {
            method,
            path,
            headers,
            body,
            at,
        })
    }

    fn proto_resource(name: &str) -> Resource {
        Resource {
            attributes: vec![KeyValue {
                key: "service.name".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(name.into())),
                }),
            }],
            ..Default::default()
        }
    }

    fn resource(name: &str) -> Arc<OtlpResource> {
        Arc::new(OtlpResource::new(&proto_resource(name)))
    }

    fn span(i: u8) -> SpanRecord {
        SpanRecord {
            trace_id: TraceId([i; 16]),
            span_id: SpanId([i; 8]),
            parent_span_id: None,
            remote_parent: false,
            trace_state: None,
            flags: 1,
            name: format!("s{i}"),
            kind: SpanKind::Server,
            start_ns: 1,
            end_ns: 2,
            attributes: Vec::new(),
            events: Vec::new(),
            status: SpanStatus::Unset,
            pid: 1,
            comm: "t".into(),
        }
    }

    fn test_cfg(url: String) -> OtlpConfig {
        OtlpConfig {
            batch_delay: Duration::from_millis(50),
            timeout: Duration::from_secs(5),
            ..OtlpConfig::new(url)
        }
    }

    /// A port with nothing listening on it.
    fn dead_url() -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        format!("http://{addr}/v1/traces")
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    // ---------- exporter ----------

    #[test]
    fn exports_grouped_gzipped_request_with_headers() {
        let server = TestServer::start(vec![]);
        let mut cfg = test_cfg(server.url());
        cfg.headers = vec![("x-api-key".into(), "s3cr3t".into())];
        cfg.gzip = true;
        let exp = OtlpExporter::start(cfg).unwrap();
        let (r1, r2) = (resource("a"), resource("b"));
        exp.send(Arc::clone(&r1), span(1));
        exp.send(Arc::clone(&r2), span(2));
        exp.send(Arc::clone(&r1), span(3));

        let reqs = server.wait_requests(1, Duration::from_secs(5));
        assert_eq!(reqs.len(), 1);
        let req = &reqs[0];
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/v1/traces");
        assert_eq!(req.header("content-type"), Some("application/x-protobuf"));
        assert_eq!(req.header("content-encoding"), Some("gzip"));
        assert_eq!(req.header("x-api-key"), Some("s3cr3t"));
        assert_eq!(&req.body[..2], &[0x1f, 0x8b], "gzip magic");

        let decoded = req.decode();
        assert_eq!(decoded.resource_spans.len(), 2);
        let rs_a = &decoded.resource_spans[0];
        let rs_b = &decoded.resource_spans[1];
        assert_eq!(rs_a.resource.as_ref(), Some(&proto_resource("a")));
        assert_eq!(rs_b.resource.as_ref(), Some(&proto_resource("b")));
        for rs in &decoded.resource_spans {
            assert_eq!(rs.scope_spans.len(), 1);
            let scope = rs.scope_spans[0].scope.as_ref().unwrap();
            assert_eq!(scope.name, SCOPE_NAME);
            assert_eq!(scope.version, SCOPE_VERSION);
        }
        let proto = |i| crate::export::convert::span(&span(i));
        assert_eq!(rs_a.scope_spans[0].spans, vec![proto(1), proto(3)]);
        assert_eq!(rs_b.scope_spans[0].spans, vec![proto(2)]);

        let c = exp.shutdown(soon());
        assert_eq!(
            c,
            ExportCounters {
                spans_queued: 3,
                spans_exported: 3,
                batches_sent: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn uncompressed_when_gzip_disabled_and_batches_split_by_size() {
        let server = TestServer::start(vec![]);
        let mut cfg = test_cfg(server.url());
        cfg.gzip = false;
        cfg.max_batch_spans = 2;
        cfg.batch_delay = Duration::from_secs(60); // only size (and shutdown) trigger sends
        let exp = OtlpExporter::start(cfg).unwrap();
        let r = resource("a");
        for i in 0..5 {
            exp.send(Arc::clone(&r), span(i));
        }
        let reqs = server.wait_requests(2, Duration::from_secs(5));
        assert_eq!(
            reqs.len(),
            2,
            "two full batches sent without waiting for batch_delay"
        );
        for req in &reqs {
            assert_eq!(req.header("content-encoding"), None);
            assert_eq!(req.span_count(), 2);
        }
        let c = exp.shutdown(soon());
        let reqs = server.requests();
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[2].span_count(), 1);
        assert_eq!((c.spans_exported, c.batches_sent), (5, 3));
    }

    #[test]
    fn batch_delay_sends_partial_batch() {
        let server = TestServer::start(vec![]);
        let mut cfg = test_cfg(server.url());
        cfg.batch_delay = Duration::from_millis(200);
        let exp = OtlpExporter::start(cfg).unwrap();
        let t0 = Instant::now();
        exp.send(resource("a"), span(1));
        let reqs = server.wait_requests(1, Duration::from_secs(5));
        assert_eq!(reqs.len(), 1);
        let waited = reqs[0].at - t0;
        assert!(
            waited >= Duration::from_millis(190),
            "sent after {waited:?}"
        );
        assert!(waited < Duration::from_secs(3), "sent after {waited:?}");
        drop(exp);
    }

    #[test]
    fn retries_on_503_then_succeeds() {
        let server = TestServer::start(vec![reply(503), reply(502), reply(200)]);
        let exp = OtlpExporter::start(test_cfg(server.url())).unwrap();
        exp.send(resource("a"), span(1));
        exp.send(resource("a"), span(2));
        let reqs = server.wait_requests(3, Duration::from_secs(10));
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[0].body, reqs[2].body, "same batch re-sent");
        // backoff between attempts: at least half the initial 100 ms, then half of 200 ms
        assert!(reqs[1].at - reqs[0].at >= Duration::from_millis(45));
        assert!(reqs[2].at - reqs[1].at >= Duration::from_millis(95));
        let c = exp.shutdown(soon());
        assert_eq!(c.retries, 2);
        assert_eq!(c.requests_failed, 2);
        assert_eq!(c.batches_sent, 1);
        assert_eq!(c.spans_exported, 2);
        assert_eq!(c.spans_dropped_failed, 0);
        assert_eq!(server.requests().len(), 3);
    }

    #[test]
    fn retry_after_is_honoured() {
        let mut r = reply(429);
        r.headers.push(("Retry-After".into(), "1".into()));
        let server = TestServer::start(vec![r]);
        let exp = OtlpExporter::start(test_cfg(server.url())).unwrap();
        exp.send(resource("a"), span(1));
        let reqs = server.wait_requests(2, Duration::from_secs(10));
        assert_eq!(reqs.len(), 2);
        let gap = reqs[1].at - reqs[0].at;
        assert!(gap >= Duration::from_millis(990), "retried after {gap:?}");
        assert!(gap < Duration::from_secs(4), "retried after {gap:?}");
        let c = exp.shutdown(soon());
        assert_eq!((c.retries, c.spans_exported), (1, 1));
    }

    #[test]
    fn bad_request_drops_without_retry() {
        let mut r = reply(400);
        r.body = b"bad payload".to_vec();
        let server = TestServer::start(vec![r]);
        let exp = OtlpExporter::start(test_cfg(server.url())).unwrap();
        for i in 0..3 {
            exp.send(resource("a"), span(i));
        }
        assert_eq!(server.wait_requests(1, Duration::from_secs(5)).len(), 1);
        // give a (wrong) retry every chance to happen
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(server.requests().len(), 1);
        let c = exp.shutdown(soon());
        assert_eq!(
            c,
            ExportCounters {
                spans_queued: 3,
                spans_dropped_failed: 3,
                requests_failed: 1,
                ..Default::default()
            }
        );
        // the exporter still works after a permanent failure
    }

    #[test]
    fn partial_success_counts_rejected_spans() {
        let resp = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 1,
                error_message: "too old".into(),
            }),
        };
        let mut r = reply(200);
        r.body = resp.encode_to_vec();
        r.headers
            .push(("Content-Type".into(), "application/x-protobuf".into()));
        let server = TestServer::start(vec![r]);
        let exp = OtlpExporter::start(test_cfg(server.url())).unwrap();
        exp.send(resource("a"), span(1));
        exp.send(resource("a"), span(2));
        assert_eq!(server.wait_requests(1, Duration::from_secs(5)).len(), 1);
        let c = exp.shutdown(soon());
        assert_eq!(
            (c.spans_exported, c.spans_dropped_failed, c.batches_sent),
            (1, 1, 1)
        );
    }

    #[test]
    fn connection_refused_retries_until_shutdown_deadline() {
        let exp = OtlpExporter::start(test_cfg(dead_url())).unwrap();
        let t0 = Instant::now();
        for i in 0..10 {
            exp.send(resource("a"), span(i));
        }
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "send blocked: {:?}",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(800));
        let mid = exp.counters();
        assert!(mid.retries >= 2, "{mid:?}");
        assert_eq!(mid.spans_exported, 0);

        let t1 = Instant::now();
        let c = exp.shutdown(Instant::now() + Duration::from_millis(700));
        let took = t1.elapsed();
        assert!(took < Duration::from_millis(1500), "shutdown took {took:?}");
        assert_eq!(c.spans_queued, 10);
        assert_eq!(c.spans_dropped_failed, 10);
        assert_eq!(c.spans_exported, 0);
        assert_eq!(c.batches_sent, 0);
        assert!(c.requests_failed >= 3, "{c:?}");
        assert_eq!(c.requests_failed, c.retries + 1, "{c:?}");
    }

    #[test]
    fn queue_is_bounded_while_collector_is_down() {
        let mut cfg = test_cfg(dead_url());
        cfg.max_queue_spans = 100;
        cfg.max_batch_spans = 10;
        let exp = OtlpExporter::start(cfg).unwrap();
        let t0 = Instant::now();
        for i in 0..300u32 {
            exp.send(resource("a"), span((i % 250) as u8));
        }
        let send_time = t0.elapsed();
        assert!(
            send_time < Duration::from_millis(200),
            "sends took {send_time:?}"
        );
        let c = exp.counters();
        assert_eq!(c.spans_queued, 300);
        // at most the queue plus the batch the worker holds are kept
        assert!(c.spans_dropped_queue_full >= 300 - 110, "{c:?}");

        // still bounded later on, while the worker is stuck retrying
        std::thread::sleep(Duration::from_millis(300));
        for i in 0..300u32 {
            exp.send(resource("a"), span((i % 250) as u8));
        }
        let c2 = exp.counters();
        assert_eq!(c2.spans_queued, 600);
        assert!(c2.spans_dropped_queue_full >= 600 - 110, "{c2:?}");

        let c3 = exp.shutdown(Instant::now());
        assert_eq!(
            c3.spans_dropped_failed + c3.spans_dropped_queue_full,
            c3.spans_queued,
            "{c3:?}"
        );
        assert_eq!(c3.spans_exported, 0);
    }

    #[test]
    fn after_an_outage_the_newest_spans_are_kept() {
        // Down for the first attempts: the worker retries its first batch
        // while the rest wait in the queue.
        let server = TestServer::start(vec![reply(503), reply(503), reply(503)]);
        let mut cfg = test_cfg(server.url());
        cfg.max_queue_spans = 100;
        cfg.max_batch_spans = 10;
        let exp = OtlpExporter::start(cfg).unwrap();
        exp.send(resource("a"), span(0));
        assert_eq!(server.wait_requests(1, Duration::from_secs(5)).len(), 1);
        let mut items: Vec<Item> = (1..250u8).map(|i| (resource("a"), span(i))).collect();
        exp.send_all(&mut items);
        let c = exp.shutdown(Instant::now() + Duration::from_secs(10));
        let mut got: Vec<u8> = server
            .requests()
            .iter()
            .filter(|r| !r.body.is_empty())
            .flat_map(|r| {
                r.decode()
                    .resource_spans
                    .into_iter()
                    .flat_map(|rs| rs.scope_spans)
                    .flat_map(|ss| ss.spans)
                    .map(|s| s.span_id[0])
                    .collect::<Vec<_>>()
            })
            .collect();
        got.sort_unstable();
        got.dedup();
        // The retried first span, then the newest 100.
        let want: Vec<u8> = std::iter::once(0).chain(150..250).collect();
        assert_eq!(got, want, "{c:?}");
        assert_eq!(
            (c.spans_queued, c.spans_exported, c.spans_dropped_queue_full),
            (250, 101, 149),
            "{c:?}"
        );
    }

    #[test]
    fn shutdown_flushes_queued_spans() {
        let server = TestServer::start(vec![]);
        let mut cfg = test_cfg(server.url());
        cfg.batch_delay = Duration::from_secs(60);
        cfg.max_batch_spans = 4;
        let exp = OtlpExporter::start(cfg).unwrap();
        for i in 0..10 {
            exp.send(resource("a"), span(i));
        }
        let t0 = Instant::now();
        let c = exp.shutdown(Instant::now() + Duration::from_secs(10));
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "shutdown took {:?}",
            t0.elapsed()
        );
        assert_eq!(c.spans_exported, 10, "{c:?}");
        assert_eq!(c.batches_sent, 3);
        let total: usize = server.requests().iter().map(Recorded::span_count).sum();
        assert_eq!(total, 10);
    }

    #[test]
    fn shutdown_retries_until_the_collector_recovers() {
        let server = TestServer::start(vec![reply(503), reply(503)]);
        let mut cfg = test_cfg(server.url());
        cfg.batch_delay = Duration::from_secs(60);
        let exp = OtlpExporter::start(cfg).unwrap();
        exp.send(resource("a"), span(1));
        let c = exp.shutdown(Instant::now() + Duration::from_secs(10));
        assert_eq!(
            (c.spans_exported, c.retries, c.spans_dropped_failed),
            (1, 2, 0),
            "{c:?}"
        );
    }

    #[test]
    fn request_timeout_is_retried() {
        // Accepts connections but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in listener.incoming().flatten() {
                held.push(s);
            }
        });
        let mut cfg = test_cfg(format!("http://{addr}/v1/traces"));
        cfg.timeout = Duration::from_millis(200);
        let exp = OtlpExporter::start(cfg).unwrap();
        exp.send(resource("a"), span(1));
        std::thread::sleep(Duration::from_millis(1200));
        let mid = exp.counters();
        assert!(mid.requests_failed >= 2 && mid.retries >= 1, "{mid:?}");
        let c = exp.shutdown(Instant::now() + Duration::from_millis(300));
        assert_eq!((c.spans_dropped_failed, c.spans_exported), (1, 0), "{c:?}");
    }

    #[test]
    fn drop_without_shutdown_does_not_hang() {
        let exp = OtlpExporter::start(test_cfg(dead_url())).unwrap();
        exp.send(resource("a"), span(1));
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        drop(exp);
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "drop took {:?}",
            t0.elapsed()
        );
    }
}
