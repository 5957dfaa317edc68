//! Correlate stage: HTTP exchanges become spans, linked into traces by the
//! context the requests carry and by what the kernel shows (both ends of one
//! connection on this host).

pub mod context;
pub mod resource;
pub mod sampling;
pub mod spans;

pub use context::{SpanId, TraceId};

/// OpenTelemetry span kind (the two the agent makes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpanKind {
    Server,
    Client,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrValue {
    /// Mostly constants and names known at build time: borrowed, not copied.
    Str(std::borrow::Cow<'static, str>),
    Int(i64),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Unset,
    Error(String),
}

/// A finished span, before it is encoded for a sink.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRecord {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    /// The parent came from the request's headers (another process or host).
    pub remote_parent: bool,
    pub trace_state: Option<String>,
    /// W3C trace flags (bit 0: sampled).
    pub flags: u8,
    pub name: String,
    pub kind: SpanKind,
    /// Unix-epoch nanoseconds.
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// (name, Unix ns), in time order.
    pub events: Vec<(&'static str, u64)>,
    pub status: Status,
    /// Process the span belongs to (its resource).
    pub pid: u32,
    /// Process name, for resource detection.
    pub comm: String,
}

impl SpanRecord {
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}
