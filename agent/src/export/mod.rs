//! Span export: OTLP/HTTP protobuf exporter ([`otlp`]), OTLP/JSON encoding ([`json`]) and the
//! prost-generated OTLP v1 message types ([`proto`]).
pub mod convert;
pub mod json;
pub mod otlp;
pub mod proto;
pub mod wire;

pub use json::span_to_otlp_json;
pub use otlp::{ExportCounters, ExportError, OtlpConfig, OtlpExporter};
pub use proto::opentelemetry::proto::common::v1::{any_value, AnyValue, KeyValue};
pub use proto::opentelemetry::proto::resource::v1::Resource;
pub use proto::opentelemetry::proto::trace::v1::{span, status, Span, Status};
