//! The agent as a library: a staged pipeline of capture (kernel -> ring
//! buffer -> ordered chunks), decode (HTTP/1), correlate (spans and traces)
//! and export (OTLP/HTTP, console), plus `dump`, the view of what is captured.

pub mod capture;
pub mod cli;
pub mod console;
pub mod correlate;
pub mod decode;
pub mod dump;
pub mod export;
pub mod pipeline;
pub mod redact;
