//! The agent's span model to OTLP protobuf messages.

use super::proto::opentelemetry::proto::{
    common::v1::{any_value, AnyValue, KeyValue},
    resource::v1::Resource,
    trace::v1::{span, status, Span, Status},
};
use crate::correlate::{
    resource::ProcessResource, AttrValue, SpanKind, SpanRecord, Status as SpanStatus,
};

/// OTLP `Span.flags` bits 8 and 9: whether the parent is known to be remote.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

pub(crate) fn kv(key: &str, v: &AttrValue) -> KeyValue {
    let value = match v {
        AttrValue::Str(s) => any_value::Value::StringValue(s.to_string()),
        AttrValue::Int(i) => any_value::Value::IntValue(*i),
        AttrValue::Bool(b) => any_value::Value::BoolValue(*b),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
    }
}

pub fn resource(r: &ProcessResource) -> Resource {
    Resource {
        attributes: r.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
        ..Default::default()
    }
}

pub fn span(s: &SpanRecord) -> Span {
    let remote = if s.remote_parent { FLAG_IS_REMOTE } else { 0 };
    let (code, message) = match &s.status {
        SpanStatus::Unset => (status::StatusCode::Unset, String::new()),
        SpanStatus::Error(m) => (status::StatusCode::Error, m.clone()),
    };
    Span {
        trace_id: s.trace_id.0.to_vec(),
        span_id: s.span_id.0.to_vec(),
        trace_state: s.trace_state.clone().unwrap_or_default(),
        parent_span_id: s.parent_span_id.map(|p| p.0.to_vec()).unwrap_or_default(),
        flags: u32::from(s.flags) | FLAG_HAS_IS_REMOTE | remote,
        name: s.name.clone(),
        kind: match s.kind {
            SpanKind::Server => span::SpanKind::Server as i32,
            SpanKind::Client => span::SpanKind::Client as i32,
        },
        start_time_unix_nano: s.start_ns,
        end_time_unix_nano: s.end_ns,
        attributes: s.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
        events: s
            .events
            .iter()
            .map(|(name, t)| span::Event {
                time_unix_nano: *t,
                name: name.to_string(),
                ..Default::default()
            })
            .collect(),
        status: Some(Status {
            code: code as i32,
            message,
        }),
        ..Default::default()
    }
}
