//! OTLP/JSON encoding (https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding):
//! lowerCamelCase field names, trace/span ids as lowercase hex, 64-bit integers as decimal
//! strings, enums as integers, `bytesValue` as base64. As in the proto3 JSON mapping, fields at
//! their default value are omitted, except a span's ids, name, kind and times, which are always
//! written.

use serde_json::{json, Map, Value};

use super::otlp::agent_scope;
use super::proto::opentelemetry::proto::common::v1::{
    any_value, AnyValue, EntityRef, InstrumentationScope, KeyValue,
};
use super::proto::opentelemetry::proto::resource::v1::Resource;
use super::proto::opentelemetry::proto::trace::v1::{span, Span, Status};

/// One span of `resource` as a complete OTLP/JSON export request:
/// `{"resourceSpans":[{"resource":{...},"scopeSpans":[{"scope":{...},"spans":[{...}]}]}]}`.
pub fn span_to_otlp_json(resource: &Resource, span: &Span) -> Value {
    json!({
        "resourceSpans": [{
            "resource": resource_json(resource),
            "scopeSpans": [{
                "scope": scope_json(&agent_scope()),
                "spans": [span_json(span)],
            }],
        }],
    })
}

/// Inserts `value` under `key` unless `skip` is true.
fn put(obj: &mut Map<String, Value>, key: &str, skip: bool, value: impl FnOnce() -> Value) {
    if !skip {
        obj.insert(key.to_string(), value());
    }
}

pub fn resource_json(resource: &Resource) -> Value {
    let mut o = Map::new();
    put(&mut o, "attributes", resource.attributes.is_empty(), || {
        attributes_json(&resource.attributes)
    });
    put(
        &mut o,
        "droppedAttributesCount",
        resource.dropped_attributes_count == 0,
        || json!(resource.dropped_attributes_count),
    );
    put(
        &mut o,
        "entityRefs",
        resource.entity_refs.is_empty(),
        || Value::Array(resource.entity_refs.iter().map(entity_ref_json).collect()),
    );
    Value::Object(o)
}

fn entity_ref_json(e: &EntityRef) -> Value {
    let mut o = Map::new();
    put(&mut o, "schemaUrl", e.schema_url.is_empty(), || {
        json!(e.schema_url)
    });
    put(&mut o, "type", e.r#type.is_empty(), || json!(e.r#type));
    put(&mut o, "idKeys", e.id_keys.is_empty(), || json!(e.id_keys));
    put(
        &mut o,
        "descriptionKeys",
        e.description_keys.is_empty(),
        || json!(e.description_keys),
    );
    Value::Object(o)
}

pub fn scope_json(scope: &InstrumentationScope) -> Value {
    let mut o = Map::new();
    put(&mut o, "name", scope.name.is_empty(), || json!(scope.name));
    put(&mut o, "version", scope.version.is_empty(), || {
        json!(scope.version)
    });
    put(&mut o, "attributes", scope.attributes.is_empty(), || {
        attributes_json(&scope.attributes)
    });
    put(
        &mut o,
        "droppedAttributesCount",
        scope.dropped_attributes_count == 0,
        || json!(scope.dropped_attributes_count),
    );
    Value::Object(o)
}

pub fn span_json(s: &Span) -> Value {
    let mut o = Map::new();
    o.insert("traceId".into(), json!(hex(&s.trace_id)));
    o.insert("spanId".into(), json!(hex(&s.span_id)));
    put(&mut o, "traceState", s.trace_state.is_empty(), || {
        json!(s.trace_state)
    });
    put(&mut o, "parentSpanId", s.parent_span_id.is_empty(), || {
        json!(hex(&s.parent_span_id))
    });
    put(&mut o, "flags", s.flags == 0, || json!(s.flags));
    o.insert("name".into(), json!(s.name));
    o.insert("kind".into(), json!(s.kind));
    o.insert(
        "startTimeUnixNano".into(),
        json!(s.start_time_unix_nano.to_string()),
    );
    o.insert(
        "endTimeUnixNano".into(),
        json!(s.end_time_unix_nano.to_string()),
    );
    put(&mut o, "attributes", s.attributes.is_empty(), || {
        attributes_json(&s.attributes)
    });
    put(
        &mut o,
        "droppedAttributesCount",
        s.dropped_attributes_count == 0,
        || json!(s.dropped_attributes_count),
    );
    put(&mut o, "events", s.events.is_empty(), || {
        Value::Array(s.events.iter().map(event_json).collect())
    });
    put(
        &mut o,
        "droppedEventsCount",
        s.dropped_events_count == 0,
        || json!(s.dropped_events_count),
    );
    put(&mut o, "links", s.links.is_empty(), || {
        Value::Array(s.links.iter().map(link_json).collect())
    });
    put(
        &mut o,
        "droppedLinksCount",
        s.dropped_links_count == 0,
        || json!(s.dropped_links_count),
    );
    if let Some(status) = &s.status {
        o.insert("status".into(), status_json(status));
    }
    Value::Object(o)
}

fn event_json(e: &span::Event) -> Value {
    let mut o = Map::new();
    o.insert("timeUnixNano".into(), json!(e.time_unix_nano.to_string()));
    o.insert("name".into(), json!(e.name));
    put(&mut o, "attributes", e.attributes.is_empty(), || {
        attributes_json(&e.attributes)
    });
    put(
        &mut o,
        "droppedAttributesCount",
        e.dropped_attributes_count == 0,
        || json!(e.dropped_attributes_count),
    );
    Value::Object(o)
}

fn link_json(l: &span::Link) -> Value {
    let mut o = Map::new();
    o.insert("traceId".into(), json!(hex(&l.trace_id)));
    o.insert("spanId".into(), json!(hex(&l.span_id)));
    put(&mut o, "traceState", l.trace_state.is_empty(), || {
        json!(l.trace_state)
    });
    put(&mut o, "attributes", l.attributes.is_empty(), || {
        attributes_json(&l.attributes)
    });
    put(
        &mut o,
        "droppedAttributesCount",
        l.dropped_attributes_count == 0,
        || json!(l.dropped_attributes_count),
    );
    put(&mut o, "flags", l.flags == 0, || json!(l.flags));
    Value::Object(o)
}

fn status_json(st: &Status) -> Value {
    let mut o = Map::new();
    put(&mut o, "message", st.message.is_empty(), || {
        json!(st.message)
    });
    put(&mut o, "code", st.code == 0, || json!(st.code));
    Value::Object(o)
}

pub fn attributes_json(attrs: &[KeyValue]) -> Value {
    Value::Array(attrs.iter().map(key_value_json).collect())
}

fn key_value_json(kv: &KeyValue) -> Value {
    let value = kv.value.as_ref().map_or_else(|| json!({}), any_value_json);
    json!({ "key": kv.key, "value": value })
}

pub fn any_value_json(v: &AnyValue) -> Value {
    use any_value::Value as V;
    match &v.value {
        None => json!({}),
        Some(V::StringValue(s)) => json!({ "stringValue": s }),
        Some(V::BoolValue(b)) => json!({ "boolValue": b }),
        Some(V::IntValue(i)) => json!({ "intValue": i.to_string() }),
        Some(V::DoubleValue(d)) => json!({ "doubleValue": double_json(*d) }),
        Some(V::ArrayValue(a)) => json!({
            "arrayValue": { "values": a.values.iter().map(any_value_json).collect::<Vec<_>>() }
        }),
        Some(V::KvlistValue(l)) => json!({
            "kvlistValue": { "values": l.values.iter().map(key_value_json).collect::<Vec<_>>() }
        }),
        Some(V::BytesValue(b)) => json!({ "bytesValue": base64(b) }),
    }
}

/// Proto3 JSON: finite doubles are numbers; NaN and infinities are the strings below.
fn double_json(d: f64) -> Value {
    if d.is_nan() {
        json!("NaN")
    } else if d == f64::INFINITY {
        json!("Infinity")
    } else if d == f64::NEG_INFINITY {
        json!("-Infinity")
    } else {
        json!(d)
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

/// Standard base64 with padding (RFC 4648), as the proto3 JSON mapping uses for `bytes`.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| ALPHABET[((n >> shift) & 0x3f) as usize] as char;
        s.push(sextet(18));
        s.push(sextet(12));
        s.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        s.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::proto::opentelemetry::proto::common::v1::{ArrayValue, KeyValueList};
    use crate::export::proto::opentelemetry::proto::trace::v1::status::StatusCode;

    fn kv(key: &str, v: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(v) }),
        }
    }

    #[test]
    fn full_span_encodes_to_otlp_json() {
        use any_value::Value as V;
        let resource = Resource {
            attributes: vec![kv("service.name", V::StringValue("checkout".into()))],
            dropped_attributes_count: 0,
            entity_refs: vec![],
        };
        let span = Span {
            trace_id: (0x01..=0x10).collect(),
            span_id: vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02, 0xff],
            trace_state: "vendor=x".into(),
            parent_span_id: vec![0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11],
            flags: 0x301,
            name: "GET /cart".into(),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: 1_700_000_000_123_456_789,
            end_time_unix_nano: 18_446_744_073_709_551_615,
            attributes: vec![
                kv("http.method", V::StringValue("GET".into())),
                kv("http.status_code", V::IntValue(-9_007_199_254_740_993)),
                kv("tls", V::BoolValue(true)),
                kv("ratio", V::DoubleValue(0.25)),
                kv("nan", V::DoubleValue(f64::NAN)),
                kv(
                    "ports",
                    V::ArrayValue(ArrayValue {
                        values: vec![
                            AnyValue {
                                value: Some(V::IntValue(80)),
                            },
                            AnyValue {
                                value: Some(V::StringValue("x".into())),
                            },
                        ],
                    }),
                ),
                kv(
                    "nested",
                    V::KvlistValue(KeyValueList {
                        values: vec![kv("a", V::BoolValue(false))],
                    }),
                ),
                kv("raw", V::BytesValue(b"hi!?".to_vec())),
                KeyValue {
                    key: "empty".into(),
                    value: None,
                },
            ],
            dropped_attributes_count: 2,
            events: vec![span::Event {
                time_unix_nano: 1_700_000_000_200_000_000,
                name: "retransmit".into(),
                attributes: vec![kv("seq", V::IntValue(42))],
                dropped_attributes_count: 0,
            }],
            dropped_events_count: 1,
            links: vec![span::Link {
                trace_id: vec![0xff; 16],
                span_id: vec![0x00; 8],
                trace_state: String::new(),
                attributes: vec![],
                dropped_attributes_count: 0,
                flags: 1,
            }],
            dropped_links_count: 0,
            status: Some(Status {
                message: "boom".into(),
                code: StatusCode::Error as i32,
            }),
        };

        let got = span_to_otlp_json(&resource, &span);
        let expected = json!({
            "resourceSpans": [{
                "resource": {
                    "attributes": [
                        {"key": "service.name", "value": {"stringValue": "checkout"}}
                    ]
                },
                "scopeSpans": [{
                    "scope": {"name": SCOPE_NAME_FOR_TEST, "version": env!("CARGO_PKG_VERSION")},
                    "spans": [{
                        "traceId": "0102030405060708090a0b0c0d0e0f10",
                        "spanId": "deadbeef000102ff",
                        "traceState": "vendor=x",
                        "parentSpanId": "0a0b0c0d0e0f1011",
                        "flags": 769,
                        "name": "GET /cart",
                        "kind": 2,
                        "startTimeUnixNano": "1700000000123456789",
                        "endTimeUnixNano": "18446744073709551615",
                        "attributes": [
                            {"key": "http.method", "value": {"stringValue": "GET"}},
                            {"key": "http.status_code", "value": {"intValue": "-9007199254740993"}},
                            {"key": "tls", "value": {"boolValue": true}},
                            {"key": "ratio", "value": {"doubleValue": 0.25}},
                            {"key": "nan", "value": {"doubleValue": "NaN"}},
                            {"key": "ports", "value": {"arrayValue": {"values": [
                                {"intValue": "80"}, {"stringValue": "x"}
                            ]}}},
                            {"key": "nested", "value": {"kvlistValue": {"values": [
                                {"key": "a", "value": {"boolValue": false}}
                            ]}}},
                            {"key": "raw", "value": {"bytesValue": "aGkhPw=="}},
                            {"key": "empty", "value": {}}
                        ],
                        "droppedAttributesCount": 2,
                        "events": [{
                            "timeUnixNano": "1700000000200000000",
                            "name": "retransmit",
                            "attributes": [{"key": "seq", "value": {"intValue": "42"}}]
                        }],
                        "droppedEventsCount": 1,
                        "links": [{
                            "traceId": "ffffffffffffffffffffffffffffffff",
                            "spanId": "0000000000000000",
                            "flags": 1
                        }],
                        "status": {"message": "boom", "code": 2}
                    }]
                }]
            }]
        });
        assert_eq!(got, expected, "got:\n{got:#}");
        // Each line of the console output is one of these: make sure it is single-line JSON.
        assert!(!got.to_string().contains('\n'));
    }

    const SCOPE_NAME_FOR_TEST: &str = env!("CARGO_PKG_NAME");

    #[test]
    fn minimal_span_omits_defaults_but_keeps_required_fields() {
        let span = Span {
            trace_id: vec![0xab; 16],
            span_id: vec![0xcd; 8],
            name: "x".into(),
            ..Default::default()
        };
        let got = span_to_otlp_json(&Resource::default(), &span);
        assert_eq!(got["resourceSpans"][0]["resource"], json!({}));
        assert_eq!(
            got["resourceSpans"][0]["scopeSpans"][0]["spans"][0],
            json!({
                "traceId": "abababababababababababababababab",
                "spanId": "cdcdcdcdcdcdcdcd",
                "name": "x",
                "kind": 0,
                "startTimeUnixNano": "0",
                "endTimeUnixNano": "0"
            })
        );
    }

    #[test]
    fn base64_and_special_doubles() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
        assert_eq!(double_json(f64::INFINITY), json!("Infinity"));
        assert_eq!(double_json(f64::NEG_INFINITY), json!("-Infinity"));
        assert_eq!(double_json(-1.5), json!(-1.5));
    }
}
