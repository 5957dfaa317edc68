//! Decode stage: per-connection byte streams -> protocol exchanges.
pub mod hpack;
pub mod http1;
pub use http1::{DecodeCounters, Http1Decoder, Limits};

use crate::capture::{ConnId, Role};
use std::net::SocketAddr;

/// A header kept for span building. Names lowercased; values lossy UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Request and final response both complete.
    Complete,
    /// Connection closed (or expired) before the response completed.
    Aborted,
    /// 101 Switching Protocols (or 2xx to CONNECT): the protocol after this is not HTTP/1.
    /// `protocol` is the lowercased Upgrade header value ("websocket", "h2c", ...) or "connect".
    Upgraded { protocol: String },
}

/// One HTTP/1 request/response exchange as ONE end of a connection saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpExchange {
    pub conn: ConnId,
    pub pid: u32,
    /// Thread that carried the first byte of the request.
    pub tid: u32,
    pub comm: String,
    /// Client: this process sent the request. Server: it received it.
    pub role: Role,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub method: String,
    /// Request-target exactly as sent, e.g. "/a?b=1" (or absolute-form for proxies).
    pub target: String,
    /// 0 or 1 for HTTP/1.0 / HTTP/1.1.
    pub version_minor: u8,
    /// Request headers in order, WITHOUT sensitive ones.
    pub request_headers: Vec<Header>,
    /// Final (non-1xx) status; None when no final response head was seen.
    /// A 101 that switched protocols is reported here too (Outcome::Upgraded).
    pub status: Option<u16>,
    pub response_headers: Vec<Header>,
    /// Body bytes (after de-chunking: the payload bytes; holes counted too).
    pub request_body_bytes: u64,
    pub response_body_bytes: u64,
    /// Kernel monotonic ns of the first and last chunk carrying the message:
    /// for bytes this process SENT (egress) the syscall's entry (handed to the
    /// kernel), for bytes it RECEIVED (ingress) its exit (in the process). So a
    /// peer never receives before the sender's moment, on one clock.
    pub request_first_ns: u64,
    pub request_last_ns: u64,
    /// First and last byte of the FINAL response (1xx interim heads ignored).
    pub response_first_ns: Option<u64>,
    pub response_last_ns: Option<u64>,
    pub outcome: Outcome,
}
