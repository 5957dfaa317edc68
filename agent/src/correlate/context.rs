//! Trace-context extraction from plaintext HTTP request headers.
//!
//! The agent observes requests of unmodified services; when a request already
//! carries a trace context we must continue that trace (same trace id, the
//! caller's span as parent) instead of starting a new one. Four propagation
//! formats are understood:
//!
//! | Format            | Headers                                                    |
//! |-------------------|------------------------------------------------------------|
//! | [`Format::W3c`]      | `traceparent`, `tracestate` (W3C Trace Context Level 1/2)  |
//! | [`Format::B3Single`] | `b3` (openzipkin/b3-propagation single header)             |
//! | [`Format::B3Multi`]  | `x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`, `x-b3-sampled`, `x-b3-flags` |
//! | [`Format::Jaeger`]   | `uber-trace-id`                                            |
//!
//! # Precedence
//!
//! When several formats are present, the **first valid** one in this order wins:
//!
//! 1. W3C `traceparent` (with `tracestate` attached when valid)
//! 2. B3 single `b3`
//! 3. B3 multi `x-b3-*`
//! 4. Jaeger `uber-trace-id`
//!
//! A malformed higher-precedence header does not block the others: it is
//! ignored and the next format is tried. W3C comes first because it is the
//! standard and what OpenTelemetry emits by default; B3 single before multi
//! because the B3 spec says the single header is preferred when both exist.
//!
//! Every format that is present is parsed, so [`Extracted::malformed`] lists
//! *all* malformed formats (in precedence order), including ones of lower
//! precedence than the winner - they are "present but ignored" either way,
//! and the counters should not depend on which other headers happened to be
//! there.
//!
//! # Validation rules (summary)
//!
//! * All values are trimmed of optional whitespace (space / tab) first.
//! * Values longer than [`MAX_VALUE_LEN`] (tracestate: [`MAX_TRACESTATE_LEN`]
//!   combined) are rejected outright so a hostile request cannot make us do
//!   unbounded work.
//! * A header that appears more than once (except `tracestate`, whose
//!   instances are combined per the W3C spec) is malformed: we cannot know
//!   which instance the service itself will honour.
//! * `traceparent`: lowercase hex only; version `ff` invalid; version `00`
//!   must be exactly 55 chars; a higher version is accepted when its 55-char
//!   prefix parses and the next char, if any, is `-` (the rest is ignored).
//!   Any flags byte is accepted and kept verbatim; sampled = `flags & 0x01`.
//! * `tracestate`: validated per the W3C grammar (keys, values, max 32
//!   members, no duplicate keys, empty members skipped) and normalised to
//!   `k1=v1,k2=v2`. An invalid tracestate is dropped, the context stays valid
//!   and nothing is reported as malformed.
//! * B3 (single and multi): lowercase hex only; trace id 16 or 32 hex (16 is
//!   left-padded with zeros to 128 bits), span / parent ids 16 hex, all
//!   non-zero. Sampling `1` accept, `0` deny, `d` debug, absent → Defer.
//!   Multi: `x-b3-sampled` also accepts `true`/`false`; `x-b3-flags: 1` means
//!   debug and overrides `x-b3-sampled`.
//! * **B3 sampling-only** (`b3: 0|1|d` alone, or `x-b3-sampled`/`x-b3-flags`
//!   without ids) is valid B3 but carries no ids, so it yields **no context**
//!   and is **not** counted as malformed; the remaining formats are still
//!   tried. (Honouring a lone deny for a new root trace is deliberately not
//!   done: keep it simple, the sampler's root decision applies.)
//! * Jaeger: `trace:span:parent:flags`, `:` may be URL-encoded as `%3A`
//!   (case-insensitive). Ids are hex of either case (the Jaeger clients parse
//!   with `strconv.ParseUint(_, 16, _)`), may omit leading zeros and are
//!   left-padded (trace ≤ 32, span/parent ≤ 16 digits). Trace and span id
//!   must be non-zero; parent `0` means "no parent". Flags are one or two hex
//!   digits (Jaeger docs: "one byte bitmap, as one or two hex digits"); bit
//!   0x01 sampled, bit 0x02 debug. Per the Jaeger docs the debug flag is
//!   ignored unless the sampled flag is also set, so `2` → NotSampled,
//!   `3` → Debug.
//!
//! For B3 and Jaeger, [`RemoteContext::trace_flags`] is `0x01` when the
//! caller sampled (Sampled or Debug) and `0x00` otherwise (incl. Defer).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::decode::Headers;

/// Lowercase header names this module reads.
pub const CONTEXT_HEADERS: &[&str] = &[
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "uber-trace-id",
];

/// Upper bound for a single context header value (after trimming). Valid
/// values are < 100 bytes; future W3C versions may append fields, so leave
/// generous room while still refusing absurd input.
pub const MAX_VALUE_LEN: usize = 512;

/// Upper bound for the combined `tracestate` value. The grammar allows at most
/// 32 * (256 + 1 + 256) + 31 ≈ 16.4 KiB plus optional whitespace; anything
/// beyond 32 KiB is abuse, drop it without parsing.
pub const MAX_TRACESTATE_LEN: usize = 32 * 1024;

/// Maximum number of list members in a W3C tracestate.
const TRACESTATE_MAX_MEMBERS: usize = 32;

/// 128-bit trace id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// 64-bit span id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// A fresh random, non-zero trace id.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        fill_random_nonzero(&mut b);
        TraceId(b)
    }

    /// Lowercase hex (32 chars).
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// All-zero ids are invalid in every supported format.
    pub fn is_valid(&self) -> bool {
        self.0.iter().any(|&b| b != 0)
    }

    /// Parses exactly 32 lowercase hex digits (the W3C / OTLP text form).
    /// Returns `None` for anything else, including the all-zero id.
    pub fn from_hex(s: &str) -> Option<Self> {
        parse_hex_exact::<16>(s.as_bytes(), false)
            .map(TraceId)
            .filter(TraceId::is_valid)
    }
}

impl SpanId {
    /// A fresh random, non-zero span id.
    pub fn random() -> Self {
        let mut b = [0u8; 8];
        fill_random_nonzero(&mut b);
        SpanId(b)
    }

    /// Lowercase hex (16 chars).
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// All-zero ids are invalid in every supported format.
    pub fn is_valid(&self) -> bool {
        self.0.iter().any(|&b| b != 0)
    }

    /// Parses exactly 16 lowercase hex digits. `None` for anything else,
    /// including the all-zero id.
    pub fn from_hex(s: &str) -> Option<Self> {
        parse_hex_exact::<8>(s.as_bytes(), false)
            .map(SpanId)
            .filter(SpanId::is_valid)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Propagation format a context was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
    Jaeger,
}

/// The caller's sampling decision as carried by the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerSampling {
    Sampled,
    NotSampled,
    Debug,
    /// No decision carried (B3 without sampling state): the receiver decides.
    Defer,
}

impl CallerSampling {
    /// The W3C/OTLP flags byte equivalent (sampled → 0x01).
    fn as_flags(self) -> u8 {
        match self {
            CallerSampling::Sampled | CallerSampling::Debug => 0x01,
            CallerSampling::NotSampled | CallerSampling::Defer => 0x00,
        }
    }
}

/// A trace context received from the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteContext {
    pub format: Format,
    pub trace_id: TraceId,
    /// The caller's span id: the parent of the span we build for this request.
    pub span_id: SpanId,
    /// B3 X-B3-ParentSpanId / Jaeger parent, when present (informational).
    pub parent_span_id: Option<SpanId>,
    pub sampling: CallerSampling,
    /// W3C flags byte as received (kept for export: OTLP span flags); B3/Jaeger mapped (sampled → 0x01).
    pub trace_flags: u8,
    /// W3C tracestate, validated/normalised per the W3C spec (list members; max 32; invalid → dropped)
    pub trace_state: Option<String>,
}

/// Result of [`extract`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub context: Option<RemoteContext>,
    /// Formats present but malformed (ignored): for the agent's counters.
    pub malformed: Vec<Format>,
}

/// Extracts the first valid context by the documented precedence
/// (W3C, B3 single, B3 multi, Jaeger). See the module docs.
pub fn extract(headers: &Headers) -> Extracted {
    let mut out = Extracted::default();
    let parsed = [
        (Format::W3c, parse_w3c(headers)),
        (Format::B3Single, parse_b3_single(headers)),
        (Format::B3Multi, parse_b3_multi(headers)),
        (Format::Jaeger, parse_jaeger(headers)),
    ];
    for (format, result) in parsed {
        match result {
            Parsed::Valid(ctx) => {
                if out.context.is_none() {
                    out.context = Some(ctx);
                }
            }
            Parsed::Malformed => out.malformed.push(format),
            Parsed::Absent | Parsed::NoIds => {}
        }
    }
    out
}

/// Outcome of parsing one format.
enum Parsed {
    /// None of the format's headers are present.
    Absent,
    /// Well-formed, but carries only a sampling decision (B3), no ids.
    NoIds,
    Valid(RemoteContext),
    Malformed,
}

/// How often a header occurs.
enum Lookup<'a> {
    Absent,
    One(&'a str),
    /// More than once: ambiguous, treated as malformed.
    Many,
}

fn lookup<'a>(headers: &'a Headers, name: &str) -> Lookup<'a> {
    let mut found = Lookup::Absent;
    // Names should already be lowercase (decoder contract); comparing
    // case-insensitively costs nothing and keeps us robust.
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)) {
        found = match found {
            Lookup::Absent => Lookup::One(h.value),
            Lookup::One(_) | Lookup::Many => return Lookup::Many,
        };
    }
    found
}

/// Trims HTTP optional whitespace (SP / HTAB) - not all Unicode whitespace,
/// since anything else is part of a (then malformed) value.
fn trim_ows(s: &str) -> &str {
    s.trim_matches(|c| c == ' ' || c == '\t')
}

/// Trimmed value, or `None` when absurdly long.
fn bounded(value: &str) -> Option<&str> {
    let v = trim_ows(value);
    (v.len() <= MAX_VALUE_LEN).then_some(v)
}

// ---------------------------------------------------------------- W3C

fn parse_w3c(headers: &Headers) -> Parsed {
    let value = match lookup(headers, "traceparent") {
        Lookup::Absent => return Parsed::Absent,
        Lookup::Many => return Parsed::Malformed,
        Lookup::One(v) => v,
    };
    let Some((trace_id, span_id, flags)) = bounded(value).and_then(parse_traceparent) else {
        return Parsed::Malformed;
    };
    let states: Vec<&str> = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("tracestate"))
        .map(|h| h.value)
        .collect();
    Parsed::Valid(RemoteContext {
        format: Format::W3c,
        trace_id,
        span_id,
        parent_span_id: None,
        sampling: if flags & 0x01 != 0 {
            CallerSampling::Sampled
        } else {
            CallerSampling::NotSampled
        },
        trace_flags: flags,
        trace_state: parse_tracestate(&states),
    })
}

/// `version "-" trace-id "-" parent-id "-" trace-flags`, see module docs.
fn parse_traceparent(v: &str) -> Option<(TraceId, SpanId, u8)> {
    let b = v.as_bytes();
    // Shorter than the version-00 layout: unparseable for every version.
    if b.len() < 55 {
        return None;
    }
    let [version] = parse_hex_exact::<1>(&b[0..2], false)?;
    if version == 0xff {
        return None;
    }
    // Version 00 is fully specified: no trailing data allowed. Future
    // versions may append fields, but only after a '-' delimiter.
    if version == 0x00 && b.len() != 55 {
        return None;
    }
    if b.len() > 55 && b[55] != b'-' {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = TraceId(parse_hex_exact::<16>(&b[3..35], false)?);
    let span_id = SpanId(parse_hex_exact::<8>(&b[36..52], false)?);
    let [flags] = parse_hex_exact::<1>(&b[53..55], false)?;
    if !trace_id.is_valid() || !span_id.is_valid() {
        return None;
    }
    Some((trace_id, span_id, flags))
}

/// Combines all `tracestate` header instances (in order, as the spec
/// requires), validates and normalises them. Any violation drops the whole
/// tracestate: the spec forbids propagating a partially understood one.
fn parse_tracestate(values: &[&str]) -> Option<String> {
    let total: usize = values.iter().map(|v| v.len() + 1).sum();
    if total > MAX_TRACESTATE_LEN {
        return None;
    }
    let mut members: Vec<(&str, &str)> = Vec::new();
    for raw in values.iter().flat_map(|v| v.split(',')) {
        let member = trim_ows(raw);
        // Empty / whitespace-only list members are allowed and ignored.
        if member.is_empty() {
            continue;
        }
        let (key, value) = member.split_once('=')?;
        if !valid_tracestate_key(key) || !valid_tracestate_value(value) {
            return None;
        }
        if members.len() == TRACESTATE_MAX_MEMBERS || members.iter().any(|(k, _)| *k == key) {
            return None;
        }
        members.push((key, value));
    }
    if members.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(total);
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    Some(out)
}

fn is_key_char(c: u8) -> bool {
    matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/')
}

/// `simple-key = lcalpha 0*255(keychar)` or
/// `tenant-id "@" system-id` with `tenant-id = (lcalpha / DIGIT) 0*240(keychar)`
/// and `system-id = lcalpha 0*13(keychar)`.
fn valid_tracestate_key(key: &str) -> bool {
    let rest_ok = |s: &[u8]| s.iter().all(|&c| is_key_char(c));
    match key.split_once('@') {
        None => {
            let b = key.as_bytes();
            (1..=256).contains(&b.len()) && b[0].is_ascii_lowercase() && rest_ok(&b[1..])
        }
        Some((tenant, system)) => {
            let t = tenant.as_bytes();
            let s = system.as_bytes();
            (1..=241).contains(&t.len())
                && (t[0].is_ascii_lowercase() || t[0].is_ascii_digit())
                && rest_ok(&t[1..])
                && (1..=14).contains(&s.len())
                && s[0].is_ascii_lowercase()
                && rest_ok(&s[1..])
        }
    }
}

/// `value = 0*255(chr) nblk-chr`; chr = 0x20-0x7E except ',' and '=';
/// nblk-chr = chr without space (so non-empty, no trailing space).
fn valid_tracestate_value(value: &str) -> bool {
    let b = value.as_bytes();
    (1..=256).contains(&b.len())
        && b.iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
        && b.last() != Some(&b' ')
}

// ---------------------------------------------------------------- B3

fn b3_sampling_state(s: &str) -> Option<CallerSampling> {
    match s {
        "1" => Some(CallerSampling::Sampled),
        "0" => Some(CallerSampling::NotSampled),
        "d" => Some(CallerSampling::Debug),
        _ => None,
    }
}

/// B3 trace id: 16 or 32 lowercase hex; 64-bit ids are left-padded.
fn b3_trace_id(s: &str) -> Option<TraceId> {
    let b = s.as_bytes();
    let id = match b.len() {
        32 => TraceId(parse_hex_exact::<16>(b, false)?),
        16 => {
            let low = parse_hex_exact::<8>(b, false)?;
            let mut full = [0u8; 16];
            full[8..].copy_from_slice(&low);
            TraceId(full)
        }
        _ => return None,
    };
    id.is_valid().then_some(id)
}

/// B3 span / parent id: exactly 16 lowercase hex, non-zero.
fn b3_span_id(s: &str) -> Option<SpanId> {
    SpanId::from_hex(s)
}

fn b3_context(
    format: Format,
    trace_id: TraceId,
    span_id: SpanId,
    parent_span_id: Option<SpanId>,
    sampling: CallerSampling,
) -> RemoteContext {
    RemoteContext {
        format,
        trace_id,
        span_id,
        parent_span_id,
        sampling,
        trace_flags: sampling.as_flags(),
        trace_state: None,
    }
}

fn parse_b3_single(headers: &Headers) -> Parsed {
    let value = match lookup(headers, "b3") {
        Lookup::Absent => return Parsed::Absent,
        Lookup::Many => return Parsed::Malformed,
        Lookup::One(v) => v,
    };
    let Some(v) = bounded(value) else {
        return Parsed::Malformed;
    };
    let parts: Vec<&str> = v.split('-').collect();
    let parsed = match parts.as_slice() {
        // Sampling-only form: valid, but nothing to continue.
        [state] => return b3_sampling_state(state).map_or(Parsed::Malformed, |_| Parsed::NoIds),
        [t, s] => b3_trace_id(t)
            .zip(b3_span_id(s))
            .map(|(t, s)| (t, s, CallerSampling::Defer, None)),
        [t, s, st] => b3_trace_id(t)
            .zip(b3_span_id(s))
            .zip(b3_sampling_state(st))
            .map(|((t, s), st)| (t, s, st, None)),
        [t, s, st, p] => b3_trace_id(t)
            .zip(b3_span_id(s))
            .zip(b3_sampling_state(st))
            .zip(b3_span_id(p))
            .map(|(((t, s), st), p)| (t, s, st, Some(p))),
        _ => None,
    };
    match parsed {
        Some((t, s, st, p)) => Parsed::Valid(b3_context(Format::B3Single, t, s, p, st)),
        None => Parsed::Malformed,
    }
}

fn parse_b3_multi(headers: &Headers) -> Parsed {
    let get = |name| match lookup(headers, name) {
        Lookup::Absent => Ok(None),
        Lookup::One(v) => bounded(v).map(Some).ok_or(()),
        Lookup::Many => Err(()),
    };
    let (Ok(trace), Ok(span), Ok(parent), Ok(sampled), Ok(flags)) = (
        get("x-b3-traceid"),
        get("x-b3-spanid"),
        get("x-b3-parentspanid"),
        get("x-b3-sampled"),
        get("x-b3-flags"),
    ) else {
        return Parsed::Malformed;
    };

    // Sampling decision first: it is needed (and validated) in both the
    // with-ids and the sampling-only case.
    let sampled = match sampled {
        None => CallerSampling::Defer,
        Some("1") => CallerSampling::Sampled,
        Some("0") => CallerSampling::NotSampled,
        // Pre-spec instrumentation sent booleans.
        Some(s) if s.eq_ignore_ascii_case("true") => CallerSampling::Sampled,
        Some(s) if s.eq_ignore_ascii_case("false") => CallerSampling::NotSampled,
        Some(_) => return Parsed::Malformed,
    };
    let sampling = match flags {
        // Debug implies accept and overrides X-B3-Sampled.
        Some("1") => CallerSampling::Debug,
        None | Some("0") => sampled,
        Some(_) => return Parsed::Malformed,
    };

    if trace.is_none() && span.is_none() && parent.is_none() {
        return if sampled == CallerSampling::Defer && flags.is_none() {
            Parsed::Absent
        } else {
            Parsed::NoIds
        };
    }
    let (Some(trace_id), Some(span_id)) = (trace.and_then(b3_trace_id), span.and_then(b3_span_id))
    else {
        return Parsed::Malformed;
    };
    let parent_span_id = match parent {
        None => None,
        Some(p) => match b3_span_id(p) {
            Some(p) => Some(p),
            None => return Parsed::Malformed,
        },
    };
    Parsed::Valid(b3_context(
        Format::B3Multi,
        trace_id,
        span_id,
        parent_span_id,
        sampling,
    ))
}

// ---------------------------------------------------------------- Jaeger

fn parse_jaeger(headers: &Headers) -> Parsed {
    let value = match lookup(headers, "uber-trace-id") {
        Lookup::Absent => return Parsed::Absent,
        Lookup::Many => return Parsed::Malformed,
        Lookup::One(v) => v,
    };
    match bounded(value).and_then(parse_uber_trace_id) {
        Some(ctx) => Parsed::Valid(ctx),
        None => Parsed::Malformed,
    }
}

fn parse_uber_trace_id(v: &str) -> Option<RemoteContext> {
    // Some HTTP clients URL-encode the header value; only the separator can
    // legitimately need encoding (ids and flags are hex).
    let decoded = if v.contains('%') {
        v.replace("%3A", ":").replace("%3a", ":")
    } else {
        v.to_owned()
    };
    let parts: Vec<&str> = decoded.split(':').collect();
    let [t, s, p, f] = parts.as_slice() else {
        return None;
    };
    let trace_id = TraceId(parse_hex_padded::<16>(t.as_bytes())?);
    let span_id = SpanId(parse_hex_padded::<8>(s.as_bytes())?);
    if !trace_id.is_valid() || !span_id.is_valid() {
        return None;
    }
    // Parent is deprecated in Jaeger and `0` means "none".
    let parent = SpanId(parse_hex_padded::<8>(p.as_bytes())?);
    let parent_span_id = parent.is_valid().then_some(parent);
    if f.len() > 2 {
        return None;
    }
    let [flags] = parse_hex_padded::<1>(f.as_bytes())?;
    let sampling = match (flags & 0x01 != 0, flags & 0x02 != 0) {
        (true, true) => CallerSampling::Debug,
        (true, false) => CallerSampling::Sampled,
        // Jaeger docs: debug must be ignored unless sampled is set too.
        (false, _) => CallerSampling::NotSampled,
    };
    Some(RemoteContext {
        format: Format::Jaeger,
        trace_id,
        span_id,
        parent_span_id,
        sampling,
        trace_flags: sampling.as_flags(),
        trace_state: None,
    })
}

// ---------------------------------------------------------------- hex

fn hex_digit(c: u8, allow_upper: bool) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' if allow_upper => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Exactly `2 * N` hex digits into `N` bytes.
fn parse_hex_exact<const N: usize>(s: &[u8], allow_upper: bool) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (hex_digit(pair[0], allow_upper)? << 4) | hex_digit(pair[1], allow_upper)?;
    }
    Some(out)
}

/// 1..=`2 * N` hex digits of either case, left-padded with zeros (Jaeger
/// omits leading zeros).
fn parse_hex_padded<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.is_empty() || s.len() > 2 * N {
        return None;
    }
    let mut digits = [b'0'; 32];
    let width = 2 * N;
    // `width <= 32` holds for every N used here (1, 8, 16); get_mut keeps
    // this panic-free even if someone instantiates a larger N.
    digits.get_mut(width - s.len()..width)?.copy_from_slice(s);
    parse_hex_exact::<N>(digits.get(..width)?, true)
}

fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 0x0f)] as char);
    }
    s
}

// ---------------------------------------------------------------- random

/// Fills `buf` with random bytes, never all zero (an all-zero id is invalid
/// everywhere). Uses the OS CSPRNG; if that fails (e.g. seccomp-restricted
/// getrandom), falls back to std's per-process random hasher keys mixed with
/// time and a counter - ids need uniqueness, not cryptographic strength, and
/// the agent must not crash over it.
/// Bytes of OS randomness fetched at once: a getrandom syscall per id was a
/// visible share of the agent's CPU under load.
const RANDOM_POOL: usize = 4096;

thread_local! {
    /// (next unused offset, bytes from the OS CSPRNG).
    static POOL: std::cell::RefCell<(usize, Box<[u8; RANDOM_POOL]>)> =
        std::cell::RefCell::new((RANDOM_POOL, Box::new([0; RANDOM_POOL])));
}

/// Fills `buf` from the thread's pool; false when the OS gave no randomness.
fn fill_from_pool(buf: &mut [u8]) -> bool {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let (next, bytes) = &mut *pool;
        if *next + buf.len() > RANDOM_POOL {
            if getrandom::fill(&mut bytes[..]).is_err() {
                return false;
            }
            *next = 0;
        }
        buf.copy_from_slice(&bytes[*next..*next + buf.len()]);
        *next += buf.len();
        true
    })
}

fn fill_random_nonzero(buf: &mut [u8]) {
    if buf.len() <= RANDOM_POOL && fill_from_pool(buf) && buf.iter().any(|&b| b != 0) {
        return;
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    for chunk in buf.chunks_mut(8) {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(nanos);
        let word = h.finish().to_be_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    if buf.iter().all(|&b| b == 0) {
        if let Some(last) = buf.last_mut() {
            *last = 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Header;

    /// The extractor over a list of headers, as the decoders' `Headers` hold them.
    fn extract(headers: &[Header]) -> Extracted {
        super::extract(&headers.iter().collect())
    }

    #[test]
    fn random_ids_are_distinct_and_nonzero_across_pool_refills() {
        use std::collections::HashSet;
        // 10,000 trace ids (160 KB) and span ids refill the 4 KiB pool many times.
        let traces: HashSet<_> = (0..10_000).map(|_| TraceId::random()).collect();
        let spans: HashSet<_> = (0..10_000).map(|_| SpanId::random()).collect();
        assert_eq!((traces.len(), spans.len()), (10_000, 10_000));
        assert!(traces.iter().all(TraceId::is_valid) && spans.iter().all(SpanId::is_valid));
        // Every byte value shows up: the bytes are not stuck or patterned.
        let seen: HashSet<u8> = traces.iter().flat_map(|t| t.0).collect();
        assert_eq!(seen.len(), 256);
    }

    const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const S: &str = "00f067aa0ba902b7";
    const P: &str = "a2fb4a1d1a96d312";
    const T64: &str = "a3ce929d0e0e4736";
    const T64_PADDED: &str = "0000000000000000a3ce929d0e0e4736";
    const ZT: &str = "00000000000000000000000000000000";
    const ZS: &str = "0000000000000000";

    fn h(name: &str, value: &str) -> Header {
        Header {
            name: name.to_owned(),
            value: value.to_owned(),
        }
    }
    fn tid(s: &str) -> TraceId {
        TraceId::from_hex(s).unwrap()
    }
    fn sid(s: &str) -> SpanId {
        SpanId::from_hex(s).unwrap()
    }

    /// Expected outcome of parsing one format in isolation.
    #[derive(Debug)]
    enum Want {
        /// trace, span, parent, sampling, flags
        Ctx(
            &'static str,
            &'static str,
            Option<&'static str>,
            CallerSampling,
            u8,
        ),
        /// Well-formed but no ids: no context, nothing malformed.
        NoIds,
        Malformed,
    }
    use CallerSampling::{Debug as Dbg, Defer, NotSampled as No, Sampled as Yes};

    fn check(format: Format, name: &str, headers: &[Header], want: &Want) {
        let got = extract(headers);
        match want {
            Want::Ctx(t, s, p, sampling, flags) => {
                assert!(
                    got.malformed.is_empty(),
                    "{name}: unexpected malformed {:?}",
                    got.malformed
                );
                let ctx = got.context.unwrap_or_else(|| panic!("{name}: no context"));
                assert_eq!(ctx.format, format, "{name}");
                assert_eq!(ctx.trace_id, tid(t), "{name}: trace id");
                assert_eq!(ctx.span_id, sid(s), "{name}: span id");
                assert_eq!(ctx.parent_span_id, p.map(sid), "{name}: parent");
                assert_eq!(ctx.sampling, *sampling, "{name}: sampling");
                assert_eq!(ctx.trace_flags, *flags, "{name}: flags");
            }
            Want::NoIds => {
                assert_eq!(got, Extracted::default(), "{name}");
            }
            Want::Malformed => {
                assert_eq!(got.context, None, "{name}");
                assert_eq!(got.malformed, vec![format], "{name}");
            }
        }
    }

    #[test]
    fn w3c_traceparent_table() {
        let ok = |flags: u8, s: CallerSampling| Want::Ctx(T, S, None, s, flags);
        let long = format!("01-{T}-{S}-01-{}", "x".repeat(10_000));
        let cases: Vec<(&str, String, Want)> = vec![
            ("flags 01", format!("00-{T}-{S}-01"), ok(0x01, Yes)),
            ("flags 00", format!("00-{T}-{S}-00"), ok(0x00, No)),
            (
                "flags 03 kept verbatim",
                format!("00-{T}-{S}-03"),
                ok(0x03, Yes),
            ),
            (
                "flags 02 random bit only",
                format!("00-{T}-{S}-02"),
                ok(0x02, No),
            ),
            ("flags ff accepted", format!("00-{T}-{S}-ff"), ok(0xff, Yes)),
            ("OWS trimmed", format!(" \t00-{T}-{S}-01\t "), ok(0x01, Yes)),
            (
                "future version, exact",
                format!("01-{T}-{S}-01"),
                ok(0x01, Yes),
            ),
            (
                "future version, extra fields",
                format!("01-{T}-{S}-00-what-the-future-holds"),
                ok(0x00, No),
            ),
            (
                "future version cc",
                format!("cc-{T}-{S}-09-x"),
                ok(0x09, Yes),
            ),
            (
                "future version, no dash after flags",
                format!("01-{T}-{S}-01x"),
                Want::Malformed,
            ),
            (
                "version 00 with extra field",
                format!("00-{T}-{S}-01-extra"),
                Want::Malformed,
            ),
            (
                "version 00 trailing dash",
                format!("00-{T}-{S}-01-"),
                Want::Malformed,
            ),
            ("version ff", format!("ff-{T}-{S}-01"), Want::Malformed),
            (
                "version uppercase",
                format!("0A-{T}-{S}-01"),
                Want::Malformed,
            ),
            ("version non-hex", format!("0g-{T}-{S}-01"), Want::Malformed),
            (
                "uppercase trace id",
                format!("00-{}-{S}-01", T.to_uppercase()),
                Want::Malformed,
            ),
            (
                "uppercase parent id",
                format!("00-{T}-{}-01", "00F067AA0BA902B7"),
                Want::Malformed,
            ),
            ("uppercase flags", format!("00-{T}-{S}-0F"), Want::Malformed),
            ("zero trace id", format!("00-{ZT}-{S}-01"), Want::Malformed),
            ("zero parent id", format!("00-{T}-{ZS}-01"), Want::Malformed),
            (
                "short trace id",
                format!("00-{}-{S}-01", &T[1..]),
                Want::Malformed,
            ),
            ("long trace id", format!("00-{T}0-{S}-01"), Want::Malformed),
            (
                "short parent id",
                format!("00-{T}-{}-01", &S[1..]),
                Want::Malformed,
            ),
            ("one-digit flags", format!("00-{T}-{S}-1"), Want::Malformed),
            ("wrong separator", format!("00_{T}_{S}_01"), Want::Malformed),
            (
                "non-hex trace id",
                format!("00-{}x-{S}-01", &T[1..]),
                Want::Malformed,
            ),
            ("missing flags", format!("00-{T}-{S}"), Want::Malformed),
            ("empty", String::new(), Want::Malformed),
            (
                "inner whitespace",
                format!("00 -{T}-{S}-01"),
                Want::Malformed,
            ),
            (
                "multibyte at 55 bytes",
                format!("01-{T}-{S}-0é"),
                Want::Malformed,
            ),
            (
                "multibyte in id",
                format!("00-{}é-{S}-01", &T[2..]),
                Want::Malformed,
            ),
            ("absurdly long future", long, Want::Malformed),
        ];
        for (name, value, want) in &cases {
            check(Format::W3c, name, &[h("traceparent", value)], want);
        }
    }

    #[test]
    fn w3c_multiple_traceparent_is_malformed() {
        let tp = format!("00-{T}-{S}-01");
        let got = extract(&[h("traceparent", &tp), h("traceparent", &tp)]);
        assert_eq!(got.context, None);
        assert_eq!(got.malformed, vec![Format::W3c]);
    }

    #[test]
    fn tracestate_table() {
        let n_members = |n: usize| {
            (0..n)
                .map(|i| format!("k{i}=v{i}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let v256 = "v".repeat(256);
        let k256 = format!("k{}", "e".repeat(255));
        let ok_256_value = format!("a={v256}");
        let bad_257_value = format!("a={v256}x");
        let ok_256_key = format!("{k256}=1");
        let bad_257_key = format!("{k256}e=1");
        let tenant241 = format!("t{}@sys=1", "e".repeat(240));
        let tenant242 = format!("t{}@sys=1", "e".repeat(241));
        let m32 = n_members(32);
        let m33 = n_members(33);
        let (m16a, m16b) = (
            n_members(16),
            (16..32)
                .map(|i| format!("k{i}=v{i}"))
                .collect::<Vec<_>>()
                .join(","),
        );
        let m17b = format!("{m16b},extra=1");
        let huge = format!("a={}", "b".repeat(MAX_TRACESTATE_LEN));
        let cases: Vec<(&str, Vec<&str>, Option<&str>)> = vec![
            (
                "single member",
                vec!["congo=t61rcWkgMzE"],
                Some("congo=t61rcWkgMzE"),
            ),
            (
                "two members",
                vec!["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"],
                Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
            ),
            (
                "OWS normalised",
                vec![" rojo=1 ,\tcongo=2 "],
                Some("rojo=1,congo=2"),
            ),
            (
                "empty members skipped",
                vec!["rojo=1,, ,congo=2,"],
                Some("rojo=1,congo=2"),
            ),
            ("inner space in value", vec!["a=b c"], Some("a=b c")),
            ("key charset", vec!["a0_-*/=x"], Some("a0_-*/=x")),
            ("value punctuation", vec!["a=!\"#~<>"], Some("a=!\"#~<>")),
            (
                "multi-tenant key",
                vec!["fw529a3039@dt=abc"],
                Some("fw529a3039@dt=abc"),
            ),
            (
                "multi-tenant digit tenant",
                vec!["0tenant@sys=1"],
                Some("0tenant@sys=1"),
            ),
            (
                "multi-tenant system starts with digit",
                vec!["t@1sys=1"],
                None,
            ),
            (
                "multi-tenant system 14 chars",
                vec!["t@abcdefghijklmn=1"],
                Some("t@abcdefghijklmn=1"),
            ),
            (
                "multi-tenant system 15 chars",
                vec!["t@abcdefghijklmno=1"],
                None,
            ),
            ("multi-tenant empty tenant", vec!["@sys=1"], None),
            ("multi-tenant two @", vec!["a@b@c=1"], None),
            (
                "tenant 241 chars",
                vec![&tenant241],
                Some(tenant241.as_str()),
            ),
            ("tenant 242 chars", vec![&tenant242], None),
            ("uppercase key", vec!["Rojo=1"], None),
            ("key starting with digit", vec!["1rojo=1"], None),
            ("key with space before =", vec!["rojo =1"], None),
            ("value with =", vec!["a=b=c"], None),
            ("empty value", vec!["a="], None),
            ("empty key", vec!["=1"], None),
            ("no =", vec!["abc"], None),
            ("DEL in value", vec!["a=b\u{7f}"], None),
            ("non-ASCII value", vec!["a=é"], None),
            ("one bad member drops all", vec!["rojo=1,BAD=2"], None),
            (
                "value 256 chars",
                vec![&ok_256_value],
                Some(ok_256_value.as_str()),
            ),
            ("value 257 chars", vec![&bad_257_value], None),
            (
                "key 256 chars",
                vec![&ok_256_key],
                Some(ok_256_key.as_str()),
            ),
            ("key 257 chars", vec![&bad_257_key], None),
            ("32 members", vec![&m32], Some(m32.as_str())),
            ("33 members", vec![&m33], None),
            ("duplicate key", vec!["a=1,a=2"], None),
            (
                "combined two headers",
                vec!["rojo=1", "congo=2"],
                Some("rojo=1,congo=2"),
            ),
            (
                "combined with empty header",
                vec!["", "congo=2"],
                Some("congo=2"),
            ),
            ("combined 16+16", vec![&m16a, &m16b], Some(m32.as_str())),
            ("combined 16+17", vec![&m16a, &m17b], None),
            ("duplicate across headers", vec!["a=1", "a=2"], None),
            ("empty header", vec![""], None),
            ("whitespace only", vec!["  , \t"], None),
            ("absurdly long", vec![&huge], None),
            ("absent", vec![], None),
        ];
        let tp = format!("00-{T}-{S}-01");
        for (name, states, want) in &cases {
            let mut headers = vec![h("traceparent", &tp)];
            headers.extend(states.iter().map(|s| h("tracestate", s)));
            let got = extract(&headers);
            // A bad tracestate never invalidates the context nor counts as malformed.
            assert!(got.malformed.is_empty(), "{name}");
            let ctx = got.context.unwrap_or_else(|| panic!("{name}: no context"));
            assert_eq!(ctx.trace_state.as_deref(), *want, "{name}");
        }
    }

    #[test]
    fn tracestate_value_grammar_direct() {
        // Through `extract` a trailing space is OWS and gets trimmed, so the
        // "no trailing space" rule of the grammar is only observable here.
        assert!(!valid_tracestate_value("a "));
        assert!(valid_tracestate_value(" a"));
        assert!(!valid_tracestate_value("a\tb"));
        assert!(!valid_tracestate_value(""));
    }

    #[test]
    fn tracestate_ignored_without_valid_traceparent() {
        let got = extract(&[h("tracestate", "a=1")]);
        assert_eq!(got, Extracted::default());
        let got = extract(&[h("traceparent", "garbage"), h("tracestate", "a=1")]);
        assert_eq!(got.context, None);
        assert_eq!(got.malformed, vec![Format::W3c]);
    }

    #[test]
    fn b3_single_table() {
        let cases: Vec<(&str, String, Want)> = vec![
            (
                "4-part",
                format!("{T}-{S}-1-{P}"),
                Want::Ctx(T, S, Some(P), Yes, 0x01),
            ),
            (
                "2-part defers",
                format!("{T}-{S}"),
                Want::Ctx(T, S, None, Defer, 0x00),
            ),
            (
                "3-part deny",
                format!("{T}-{S}-0"),
                Want::Ctx(T, S, None, No, 0x00),
            ),
            (
                "3-part accept",
                format!("{T}-{S}-1"),
                Want::Ctx(T, S, None, Yes, 0x01),
            ),
            (
                "3-part debug",
                format!("{T}-{S}-d"),
                Want::Ctx(T, S, None, Dbg, 0x01),
            ),
            (
                "4-part debug",
                format!("{T}-{S}-d-{P}"),
                Want::Ctx(T, S, Some(P), Dbg, 0x01),
            ),
            (
                "64-bit trace id padded",
                format!("{T64}-{S}-1"),
                Want::Ctx(T64_PADDED, S, None, Yes, 0x01),
            ),
            (
                "OWS trimmed",
                format!(" {T}-{S}-1\t"),
                Want::Ctx(T, S, None, Yes, 0x01),
            ),
            ("lone 1", "1".into(), Want::NoIds),
            ("lone 0", "0".into(), Want::NoIds),
            ("lone d", "d".into(), Want::NoIds),
            ("lone bad state", "x".into(), Want::Malformed),
            ("lone true", "true".into(), Want::Malformed),
            ("empty", String::new(), Want::Malformed),
            (
                "bad sampling state 2",
                format!("{T}-{S}-2"),
                Want::Malformed,
            ),
            (
                "bad sampling state true",
                format!("{T}-{S}-true"),
                Want::Malformed,
            ),
            (
                "bad sampling state D",
                format!("{T}-{S}-D"),
                Want::Malformed,
            ),
            ("empty sampling state", format!("{T}-{S}-"), Want::Malformed),
            (
                "parent without state",
                format!("{T}-{S}--{P}"),
                Want::Malformed,
            ),
            (
                "trailing dash after parent",
                format!("{T}-{S}-1-{P}-"),
                Want::Malformed,
            ),
            ("5 parts", format!("{T}-{S}-1-{P}-{P}"), Want::Malformed),
            (
                "uppercase trace id",
                format!("{}-{S}-1", T.to_uppercase()),
                Want::Malformed,
            ),
            (
                "uppercase span id",
                format!("{T}-{}-1", S.to_uppercase()),
                Want::Malformed,
            ),
            (
                "trace id 20 hex",
                format!("{}-{S}-1", &T[..20]),
                Want::Malformed,
            ),
            (
                "span id 15 hex",
                format!("{T}-{}-1", &S[1..]),
                Want::Malformed,
            ),
            ("zero trace id", format!("{ZT}-{S}-1"), Want::Malformed),
            (
                "zero 64-bit trace id",
                format!("{ZS}-{S}-1"),
                Want::Malformed,
            ),
            ("zero span id", format!("{T}-{ZS}-1"), Want::Malformed),
            ("zero parent id", format!("{T}-{S}-1-{ZS}"), Want::Malformed),
            (
                "parent id 15 hex",
                format!("{T}-{S}-1-{}", &P[1..]),
                Want::Malformed,
            ),
            (
                "non-hex span",
                format!("{T}-{}z-1", &S[1..]),
                Want::Malformed,
            ),
            (
                "absurdly long",
                format!("{T}-{S}-1-{}", "a".repeat(100_000)),
                Want::Malformed,
            ),
        ];
        for (name, value, want) in &cases {
            check(Format::B3Single, name, &[h("b3", value)], want);
        }
    }

    #[test]
    fn b3_multi_table() {
        let tr = |v: &str| h("x-b3-traceid", v);
        let sp = |v: &str| h("x-b3-spanid", v);
        let pa = |v: &str| h("x-b3-parentspanid", v);
        let sa = |v: &str| h("x-b3-sampled", v);
        let fl = |v: &str| h("x-b3-flags", v);
        let cases: Vec<(&str, Vec<Header>, Want)> = vec![
            (
                "ids only defer",
                vec![tr(T), sp(S)],
                Want::Ctx(T, S, None, Defer, 0x00),
            ),
            (
                "sampled 1",
                vec![tr(T), sp(S), sa("1")],
                Want::Ctx(T, S, None, Yes, 0x01),
            ),
            (
                "sampled 0",
                vec![tr(T), sp(S), sa("0")],
                Want::Ctx(T, S, None, No, 0x00),
            ),
            (
                "sampled true",
                vec![tr(T), sp(S), sa("true")],
                Want::Ctx(T, S, None, Yes, 0x01),
            ),
            (
                "sampled false",
                vec![tr(T), sp(S), sa("false")],
                Want::Ctx(T, S, None, No, 0x00),
            ),
            (
                "flags 1 debug",
                vec![tr(T), sp(S), fl("1")],
                Want::Ctx(T, S, None, Dbg, 0x01),
            ),
            (
                "flags 1 overrides sampled 0",
                vec![tr(T), sp(S), sa("0"), fl("1")],
                Want::Ctx(T, S, None, Dbg, 0x01),
            ),
            (
                "flags 0 no debug",
                vec![tr(T), sp(S), sa("1"), fl("0")],
                Want::Ctx(T, S, None, Yes, 0x01),
            ),
            (
                "parent",
                vec![tr(T), sp(S), pa(P), sa("1")],
                Want::Ctx(T, S, Some(P), Yes, 0x01),
            ),
            (
                "64-bit trace id padded",
                vec![tr(T64), sp(S)],
                Want::Ctx(T64_PADDED, S, None, Defer, 0x00),
            ),
            (
                "OWS trimmed",
                vec![tr(&format!(" {T} ")), sp(&format!("\t{S}")), sa(" 1")],
                Want::Ctx(T, S, None, Yes, 0x01),
            ),
            ("sampled only", vec![sa("0")], Want::NoIds),
            ("flags only", vec![fl("1")], Want::NoIds),
            ("bad sampled alone", vec![sa("yes")], Want::Malformed),
            ("trace only", vec![tr(T), sa("1")], Want::Malformed),
            ("span only", vec![sp(S)], Want::Malformed),
            ("parent only", vec![pa(P)], Want::Malformed),
            (
                "bad sampled",
                vec![tr(T), sp(S), sa("yes")],
                Want::Malformed,
            ),
            (
                "bad sampled d",
                vec![tr(T), sp(S), sa("d")],
                Want::Malformed,
            ),
            ("bad flags", vec![tr(T), sp(S), fl("2")], Want::Malformed),
            (
                "uppercase trace",
                vec![tr(&T.to_uppercase()), sp(S)],
                Want::Malformed,
            ),
            (
                "trace id 24 hex",
                vec![tr(&T[..24]), sp(S)],
                Want::Malformed,
            ),
            ("zero trace", vec![tr(ZT), sp(S)], Want::Malformed),
            ("zero span", vec![tr(T), sp(ZS)], Want::Malformed),
            ("zero parent", vec![tr(T), sp(S), pa(ZS)], Want::Malformed),
            ("bad parent", vec![tr(T), sp(S), pa("xyz")], Want::Malformed),
            (
                "duplicate trace id",
                vec![tr(T), tr(T), sp(S)],
                Want::Malformed,
            ),
            (
                "duplicate sampled",
                vec![tr(T), sp(S), sa("1"), sa("1")],
                Want::Malformed,
            ),
        ];
        for (name, headers, want) in &cases {
            check(Format::B3Multi, name, headers, want);
        }
    }

    #[test]
    fn jaeger_table() {
        let cases: Vec<(&str, String, Want)> = vec![
            (
                "plain",
                format!("{T}:{S}:0:1"),
                Want::Ctx(T, S, None, Yes, 0x01),
            ),
            (
                "with parent",
                format!("{T}:{S}:{P}:1"),
                Want::Ctx(T, S, Some(P), Yes, 0x01),
            ),
            (
                "url-encoded",
                format!("{T}%3A{S}%3A0%3A1"),
                Want::Ctx(T, S, None, Yes, 0x01),
            ),
            (
                "url-encoded lowercase",
                format!("{T}%3a{S}%3a{P}%3a1"),
                Want::Ctx(T, S, Some(P), Yes, 0x01),
            ),
            (
                "short ids padded",
                "abc:def:0:1".into(),
                Want::Ctx(
                    "00000000000000000000000000000abc",
                    "0000000000000def",
                    None,
                    Yes,
                    0x01,
                ),
            ),
            (
                "64-bit trace id",
                format!("{T64}:{S}:0:1"),
                Want::Ctx(T64_PADDED, S, None, Yes, 0x01),
            ),
            (
                "17-hex trace id",
                format!("1{T64}:{S}:0:1"),
                Want::Ctx("0000000000000001a3ce929d0e0e4736", S, None, Yes, 0x01),
            ),
            (
                "uppercase accepted",
                format!("{}:{}:0:1", T.to_uppercase(), S.to_uppercase()),
                Want::Ctx(T, S, None, Yes, 0x01),
            ),
            (
                "flags 0",
                format!("{T}:{S}:0:0"),
                Want::Ctx(T, S, None, No, 0x00),
            ),
            (
                "flags 2 debug without sampled",
                format!("{T}:{S}:0:2"),
                Want::Ctx(T, S, None, No, 0x00),
            ),
            (
                "flags 3 debug",
                format!("{T}:{S}:0:3"),
                Want::Ctx(T, S, None, Dbg, 0x01),
            ),
            (
                "flags 03",
                format!("{T}:{S}:0:03"),
                Want::Ctx(T, S, None, Dbg, 0x01),
            ),
            (
                "flags f hex",
                format!("{T}:{S}:0:f"),
                Want::Ctx(T, S, None, Dbg, 0x01),
            ),
            (
                "parent all zeros",
                format!("{T}:{S}:{ZS}:1"),
                Want::Ctx(T, S, None, Yes, 0x01),
            ),
            (
                "OWS trimmed",
                format!(" {T}:{S}:0:1 "),
                Want::Ctx(T, S, None, Yes, 0x01),
            ),
            ("zero trace", format!("0:{S}:0:1"), Want::Malformed),
            ("zero trace long", format!("{ZT}:{S}:0:1"), Want::Malformed),
            ("zero span", format!("{T}:0:0:1"), Want::Malformed),
            ("trace 33 hex", format!("0{T}:{S}:0:1"), Want::Malformed),
            ("span 17 hex", format!("{T}:0{S}:0:1"), Want::Malformed),
            ("parent 17 hex", format!("{T}:{S}:0{P}:1"), Want::Malformed),
            ("3 parts", format!("{T}:{S}:1"), Want::Malformed),
            ("5 parts", format!("{T}:{S}:0:1:x"), Want::Malformed),
            ("empty span", format!("{T}::0:1"), Want::Malformed),
            ("empty parent", format!("{T}:{S}::1"), Want::Malformed),
            ("empty flags", format!("{T}:{S}:0:"), Want::Malformed),
            ("flags non-hex", format!("{T}:{S}:0:x"), Want::Malformed),
            ("flags 3 digits", format!("{T}:{S}:0:100"), Want::Malformed),
            ("non-hex id", format!("{T}:xyz:0:1"), Want::Malformed),
            (
                "other escape",
                format!("{T}%3B{S}%3B0%3B1"),
                Want::Malformed,
            ),
            (
                "signed id",
                format!("{T}:+{}:0:1", &S[1..]),
                Want::Malformed,
            ),
            ("dash separators", format!("{T}-{S}-0-1"), Want::Malformed),
            ("empty", String::new(), Want::Malformed),
            (
                "absurdly long",
                format!("{T}:{S}:0:1{}", "0".repeat(100_000)),
                Want::Malformed,
            ),
        ];
        for (name, value, want) in &cases {
            check(Format::Jaeger, name, &[h("uber-trace-id", value)], want);
        }
        let tp = format!("{T}:{S}:0:1");
        check(
            Format::Jaeger,
            "duplicate header",
            &[h("uber-trace-id", &tp), h("uber-trace-id", &tp)],
            &Want::Malformed,
        );
    }

    // Four distinct valid contexts, one per format, so the winner is identifiable.
    const T_W3C: &str = "11111111111111111111111111111111";
    const T_B3S: &str = "22222222222222222222222222222222";
    const T_B3M: &str = "33333333333333333333333333333333";
    const T_JAE: &str = "44444444444444444444444444444444";

    fn all_four(w3c: bool, b3s: bool, b3m: bool, jae: bool) -> Vec<Header> {
        // `false` → a malformed instance of that format.
        vec![
            h(
                "traceparent",
                &if w3c {
                    format!("00-{T_W3C}-{S}-01")
                } else {
                    format!("00-{T_W3C}-{ZS}-01")
                },
            ),
            h("tracestate", "a=1"),
            h(
                "b3",
                &if b3s {
                    format!("{T_B3S}-{S}-1")
                } else {
                    format!("{T_B3S}-{S}-x")
                },
            ),
            h("x-b3-traceid", T_B3M),
            h("x-b3-spanid", if b3m { S } else { ZS }),
            h("x-b3-sampled", "1"),
            h(
                "uber-trace-id",
                &if jae {
                    format!("{T_JAE}:{S}:0:1")
                } else {
                    format!("{T_JAE}:{S}:0")
                },
            ),
        ]
    }

    /// name, headers, expected winner (format, trace id), expected malformed.
    type PrecedenceCase = (
        &'static str,
        Vec<Header>,
        Option<(Format, &'static str)>,
        Vec<Format>,
    );

    #[test]
    fn precedence_table() {
        use Format::*;
        let cases: Vec<PrecedenceCase> = vec![
            (
                "all valid: W3C wins",
                all_four(true, true, true, true),
                Some((W3c, T_W3C)),
                vec![],
            ),
            (
                "W3C malformed falls to B3 single",
                all_four(false, true, true, true),
                Some((B3Single, T_B3S)),
                vec![W3c],
            ),
            (
                "W3C+B3 single malformed falls to B3 multi",
                all_four(false, false, true, true),
                Some((B3Multi, T_B3M)),
                vec![W3c, B3Single],
            ),
            (
                "only Jaeger valid",
                all_four(false, false, false, true),
                Some((Jaeger, T_JAE)),
                vec![W3c, B3Single, B3Multi],
            ),
            (
                "nothing valid",
                all_four(false, false, false, false),
                None,
                vec![W3c, B3Single, B3Multi, Jaeger],
            ),
            (
                "lower-precedence malformed still counted",
                all_four(true, true, false, false),
                Some((W3c, T_W3C)),
                vec![B3Multi, Jaeger],
            ),
            (
                "B3 single beats multi and Jaeger",
                all_four(true, true, true, true)
                    .into_iter()
                    .filter(|x| x.name != "traceparent")
                    .collect(),
                Some((B3Single, T_B3S)),
                vec![],
            ),
            (
                "lone b3 deny falls through to Jaeger",
                vec![
                    h("b3", "0"),
                    h("uber-trace-id", &format!("{T_JAE}:{S}:0:1")),
                ],
                Some((Jaeger, T_JAE)),
                vec![],
            ),
            (
                "lone b3 deny alone: no context",
                vec![h("b3", "0")],
                None,
                vec![],
            ),
            ("no headers", vec![], None, vec![]),
            (
                "unrelated headers",
                vec![h("host", "x"), h("x-request-id", T)],
                None,
                vec![],
            ),
        ];
        for (name, headers, want, malformed) in &cases {
            let got = extract(headers);
            assert_eq!(got.malformed, *malformed, "{name}");
            assert_eq!(
                got.context.as_ref().map(|c| (c.format, c.trace_id)),
                want.map(|(f, t)| (f, tid(t))),
                "{name}"
            );
        }
        // tracestate travels only with the W3C winner.
        let got = extract(&all_four(true, true, true, true));
        assert_eq!(
            got.context.and_then(|c| c.trace_state).as_deref(),
            Some("a=1")
        );
        let got = extract(&all_four(false, true, true, true));
        assert_eq!(got.context.and_then(|c| c.trace_state), None);
    }

    #[test]
    fn header_names_case_insensitive() {
        let got = extract(&[h("TraceParent", &format!("00-{T}-{S}-01"))]);
        assert_eq!(got.context.map(|c| c.format), Some(Format::W3c));
    }

    #[test]
    fn context_headers_lists_exactly_what_is_read() {
        let expected = [
            "traceparent",
            "tracestate",
            "b3",
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-parentspanid",
            "x-b3-sampled",
            "x-b3-flags",
            "uber-trace-id",
        ];
        let mut got: Vec<&str> = CONTEXT_HEADERS.to_vec();
        got.sort_unstable();
        let mut want = expected.to_vec();
        want.sort_unstable();
        assert_eq!(got, want);
        assert!(CONTEXT_HEADERS.iter().all(|n| *n == n.to_ascii_lowercase()));
        // Every header of the all-formats fixture is in the list, and each
        // listed header influences extraction: removing it changes the result.
        let mut full = all_four(true, true, true, true);
        full.push(h("x-b3-parentspanid", P));
        full.push(h("x-b3-flags", "1"));
        for hd in &full {
            assert!(
                CONTEXT_HEADERS.contains(&hd.name.as_str()),
                "{} not listed",
                hd.name
            );
        }
        // Headers outside the list are ignored.
        let mut noisy = full.clone();
        noisy.push(h("x-b3-traceid-extra", T));
        noisy.push(h("traceparent2", "junk"));
        assert_eq!(extract(&noisy), extract(&full));
    }

    #[test]
    fn ids() {
        let t = TraceId::random();
        let s = SpanId::random();
        assert!(t.is_valid() && s.is_valid());
        assert_ne!(TraceId::random(), t);
        assert_ne!(SpanId::random(), s);
        assert_eq!(t.to_hex().len(), 32);
        assert_eq!(s.to_hex().len(), 16);
        assert_eq!(TraceId::from_hex(&t.to_hex()), Some(t));
        assert_eq!(SpanId::from_hex(&s.to_hex()), Some(s));
        assert_eq!(tid(T).to_hex(), T);
        assert_eq!(tid(T).to_string(), T);
        assert_eq!(sid(S).to_string(), S);
        let mixed = TraceId([
            0xab, 0xcd, 0xef, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0f,
        ]);
        assert_eq!(mixed.to_hex(), "abcdef0100000000000000000000000f");
        assert!(!TraceId([0; 16]).is_valid());
        assert!(!SpanId([0; 8]).is_valid());
        assert!(SpanId([0, 0, 0, 0, 0, 0, 0, 1]).is_valid());
        assert_eq!(TraceId::from_hex(ZT), None);
        assert_eq!(TraceId::from_hex(&T.to_uppercase()), None);
        assert_eq!(SpanId::from_hex(&S[1..]), None);
        for _ in 0..1000 {
            assert!(TraceId::random().is_valid());
            assert!(SpanId::random().is_valid());
        }
    }
}
