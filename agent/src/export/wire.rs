//! OTLP protobuf written straight from the agent's span type.
//!
//! Going through prost's generated `Span` first cost two or three heap
//! allocations per attribute (key and value copied into the message), and a
//! second walk to size every nested message; under load that was a third of
//! the export stage. Here each span is written once into a reused buffer,
//! nested lengths computed from the span's own fields, and each process's
//! resource is encoded once, when first seen ([`OtlpResource`]). The
//! generated messages stay the reference: the tests decode what this writes
//! with them and compare it with what they would have encoded.

use std::sync::Arc;

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message;

use super::otlp::Item;
use super::proto::opentelemetry::proto::resource::v1::Resource;
use crate::correlate::{AttrValue, SpanKind, SpanRecord, Status};

/// OTLP `Span.flags` bits 8 and 9: whether the parent is known to be remote.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;
/// `Span.SpanKind` values.
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
/// `Status.StatusCode::Error`.
const STATUS_ERROR: u64 = 2;

/// A process's OTLP resource, encoded once.
#[derive(Debug)]
pub struct OtlpResource {
    encoded: Vec<u8>,
}

impl OtlpResource {
    pub fn new(r: &Resource) -> Self {
        Self {
            encoded: r.encode_to_vec(),
        }
    }
}

fn key_len(tag: u32) -> usize {
    encoded_len_varint(u64::from(tag << 3))
}

/// Size of a length-delimited field holding `n` bytes.
fn delimited_len(tag: u32, n: usize) -> usize {
    key_len(tag) + encoded_len_varint(n as u64) + n
}

fn delimited_head(tag: u32, n: usize, buf: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(n as u64, buf);
}

fn bytes_field(tag: u32, b: &[u8], buf: &mut Vec<u8>) {
    delimited_head(tag, b.len(), buf);
    buf.extend_from_slice(b);
}

/// A proto3 string or bytes field: absent when empty.
fn opt_bytes_field(tag: u32, b: &[u8], buf: &mut Vec<u8>) {
    if !b.is_empty() {
        bytes_field(tag, b, buf);
    }
}

fn opt_bytes_len(tag: u32, n: usize) -> usize {
    if n == 0 {
        0
    } else {
        delimited_len(tag, n)
    }
}

fn fixed64_field(tag: u32, v: u64, buf: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::SixtyFourBit, buf);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

fn varint_field(tag: u32, v: u64, buf: &mut Vec<u8>) {
    if v != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v, buf);
    }
}

/// `AnyValue`: a oneof, so written even when zero or empty.
fn any_value_len(v: &AttrValue) -> usize {
    match v {
        AttrValue::Str(s) => delimited_len(1, s.len()),
        AttrValue::Bool(_) => key_len(2) + 1,
        AttrValue::Int(i) => key_len(3) + encoded_len_varint(*i as u64),
    }
}

fn any_value(v: &AttrValue, buf: &mut Vec<u8>) {
    match v {
        AttrValue::Str(s) => bytes_field(1, s.as_bytes(), buf),
        AttrValue::Bool(b) => {
            encode_key(2, WireType::Varint, buf);
            buf.push(u8::from(*b));
        }
        AttrValue::Int(i) => {
            encode_key(3, WireType::Varint, buf);
            encode_varint(*i as u64, buf);
        }
    }
}

/// `KeyValue` as field `tag` of its parent.
fn key_value(tag: u32, k: &str, v: &AttrValue, buf: &mut Vec<u8>) {
    let value = any_value_len(v);
    delimited_head(
        tag,
        opt_bytes_len(1, k.len()) + delimited_len(2, value),
        buf,
    );
    opt_bytes_field(1, k.as_bytes(), buf);
    delimited_head(2, value, buf);
    any_value(v, buf);
}

/// Appends the body of one OTLP `Span` message (fields in tag order).
pub fn span(s: &SpanRecord, buf: &mut Vec<u8>) {
    bytes_field(1, &s.trace_id.0, buf);
    bytes_field(2, &s.span_id.0, buf);
    opt_bytes_field(3, s.trace_state.as_deref().unwrap_or("").as_bytes(), buf);
    if let Some(p) = s.parent_span_id {
        bytes_field(4, &p.0, buf);
    }
    opt_bytes_field(5, s.name.as_bytes(), buf);
    let kind = match s.kind {
        SpanKind::Server => KIND_SERVER,
        SpanKind::Client => KIND_CLIENT,
    };
    varint_field(6, kind, buf);
    fixed64_field(7, s.start_ns, buf);
    fixed64_field(8, s.end_ns, buf);
    for (k, v) in &s.attributes {
        key_value(9, k, v, buf);
    }
    for (name, t) in &s.events {
        let len = if *t != 0 { key_len(1) + 8 } else { 0 } + opt_bytes_len(2, name.len());
        delimited_head(11, len, buf);
        fixed64_field(1, *t, buf);
        opt_bytes_field(2, name.as_bytes(), buf);
    }
    let (message, code) = match &s.status {
        Status::Unset => ("", 0),
        Status::Error(m) => (m.as_str(), STATUS_ERROR),
    };
    let code_len = if code != 0 {
        key_len(3) + encoded_len_varint(code)
    } else {
        0
    };
    delimited_head(15, opt_bytes_len(2, message.len()) + code_len, buf);
    opt_bytes_field(2, message.as_bytes(), buf);
    varint_field(3, code, buf);
    let remote = if s.remote_parent { FLAG_IS_REMOTE } else { 0 };
    let flags = u32::from(s.flags) | FLAG_HAS_IS_REMOTE | remote;
    encode_key(16, WireType::ThirtyTwoBit, buf);
    buf.extend_from_slice(&flags.to_le_bytes());
}

/// Reused buffers for encoding export requests.
#[derive(Default)]
pub struct RequestEncoder {
    scope: Vec<u8>,
    spans: Vec<u8>,
    one: Vec<u8>,
}

impl RequestEncoder {
    /// `scope`: the encoded `InstrumentationScope` every span is under.
    pub fn new(scope: Vec<u8>) -> Self {
        Self {
            scope,
            ..Self::default()
        }
    }

    /// Appends an `ExportTraceServiceRequest` to `out`: one `ResourceSpans`
    /// per resource (by `Arc` identity, in order of first appearance), each
    /// with one `ScopeSpans`.
    pub fn encode(&mut self, items: &[Item], out: &mut Vec<u8>) {
        // (resource, indexes of its spans in `items`)
        let mut groups: Vec<(&Arc<OtlpResource>, Vec<usize>)> = Vec::new();
        for (i, (r, _)) in items.iter().enumerate() {
            match groups.iter_mut().find(|(x, _)| Arc::ptr_eq(x, r)) {
                Some((_, members)) => members.push(i),
                None => groups.push((r, vec![i])),
            }
        }
        for (resource, members) in &groups {
            self.spans.clear();
            for &i in members {
                self.one.clear();
                span(&items[i].1, &mut self.one);
                bytes_field(2, &self.one, &mut self.spans);
            }
            let resource = &resource.encoded;
            let scope_spans = delimited_len(1, self.scope.len()) + self.spans.len();
            let resource_spans = delimited_len(1, resource.len()) + delimited_len(2, scope_spans);
            delimited_head(1, resource_spans, out);
            bytes_field(1, resource, out);
            delimited_head(2, scope_spans, out);
            bytes_field(1, &self.scope, out);
            out.extend_from_slice(&self.spans);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::context::{SpanId, TraceId};
    use crate::export::{
        convert,
        otlp::agent_scope,
        proto::opentelemetry::proto::{
            collector::trace::v1::ExportTraceServiceRequest,
            trace::v1::{ResourceSpans, ScopeSpans},
        },
    };

    fn record(name: &str) -> SpanRecord {
        SpanRecord {
            trace_id: TraceId([7; 16]),
            span_id: SpanId([9; 8]),
            parent_span_id: None,
            remote_parent: false,
            trace_state: None,
            flags: 1,
            name: name.into(),
            kind: SpanKind::Server,
            start_ns: 1_700_000_000_000_000_000,
            end_ns: 1_700_000_000_000_500_000,
            attributes: Vec::new(),
            events: Vec::new(),
            status: Status::Unset,
            pid: 1,
            comm: "x".into(),
        }
    }

    /// Every field the agent sets, each in its edge cases, against prost's
    /// encoding of `convert::span`.
    #[test]
    fn spans_decode_as_prost_encodes_them() {
        let table: Vec<(&str, SpanRecord)> = vec![
            ("minimal", record("GET /")),
            ("empty name, zero times", {
                let mut s = record("");
                (s.start_ns, s.end_ns) = (0, 0);
                s
            }),
            ("client, remote parent, trace state", {
                let mut s = record("POST /x");
                s.kind = SpanKind::Client;
                s.parent_span_id = Some(SpanId([3; 8]));
                s.remote_parent = true;
                s.trace_state = Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".into());
                s.flags = 0;
                s
            }),
            ("attributes of every type and size", {
                let mut s = record("GET /a");
                s.attributes = vec![
                    ("http.request.method", AttrValue::Str("GET".into())),
                    ("empty", AttrValue::Str("".into())),
                    ("long", AttrValue::Str("v".repeat(300).into())),
                    ("http.response.status_code", AttrValue::Int(200)),
                    ("zero", AttrValue::Int(0)),
                    ("negative", AttrValue::Int(-5)),
                    ("big", AttrValue::Int(i64::MAX)),
                    ("t", AttrValue::Bool(true)),
                    ("f", AttrValue::Bool(false)),
                    ("", AttrValue::Str("no key".into())),
                ];
                s
            }),
            ("events and error status", {
                let mut s = record("GET /e");
                s.events = vec![("client_send", 5), ("client_receive", 0)];
                s.status = Status::Error("boom".into());
                s
            }),
            ("error status without message", {
                let mut s = record("GET /e");
                s.status = Status::Error(String::new());
                s
            }),
        ];
        for (what, s) in table {
            let mut buf = Vec::new();
            span(&s, &mut buf);
            let got = super::super::proto::opentelemetry::proto::trace::v1::Span::decode(&buf[..])
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(got, convert::span(&s), "{what}");
        }
    }

    #[test]
    fn requests_group_by_resource_in_order_of_first_appearance() {
        let res = |name: &str| {
            let mut r = Resource::default();
            r.attributes.push(convert::kv(
                "service.name",
                &AttrValue::Str(name.to_string().into()),
            ));
            r
        };
        let (ra, rb) = (res("a"), res("b"));
        let (a, b) = (
            Arc::new(OtlpResource::new(&ra)),
            Arc::new(OtlpResource::new(&rb)),
        );
        let items = [
            (b.clone(), record("1")),
            (a.clone(), record("2")),
            (b.clone(), record("3")),
        ];
        let scope = agent_scope();
        let mut enc = RequestEncoder::new(scope.encode_to_vec());
        let mut out = Vec::new();
        for round in 0..2 {
            out.clear();
            enc.encode(&items, &mut out);
            let got = ExportTraceServiceRequest::decode(&out[..]).expect("decodes");
            let group = |r: &Resource, names: &[&str]| ResourceSpans {
                resource: Some(r.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope.clone()),
                    spans: names.iter().map(|n| convert::span(&record(n))).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            };
            let want = ExportTraceServiceRequest {
                resource_spans: vec![group(&rb, &["1", "3"]), group(&ra, &["2"])],
            };
            assert_eq!(got, want, "round {round}");
        }
    }
}
