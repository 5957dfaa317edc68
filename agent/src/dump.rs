//! `agent dump`: one JSON object per captured chunk, the user's view of what
//! the agent sees.

use std::io::Write;

use serde::Serialize;

use crate::capture::{Chunk, ChunkKind, ConnMap, Direction};

/// Open connections a summary keeps before it reports them early.
const MAX_OPEN_SUMMARIES: usize = 65536;

/// Escapes a payload for display: printable ASCII as is, `\\`, `\r`, `\n`,
/// `\t` as those two-character escapes, every other byte as `\xHH`. The
/// result reads back unambiguously (Python: `codecs.escape_decode`).
pub fn escape_payload(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => s.push_str("\\\\"),
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            0x20..=0x7e => s.push(b as char),
            _ => {
                use std::fmt::Write as _;
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s
}

#[derive(Serialize)]
struct Line<'a> {
    ts_ns: i128,
    kind: &'static str,
    pid: u32,
    tid: u32,
    comm: &'a str,
    fd: i32,
    role: &'static str,
    direction: &'static str,
    local: String,
    remote: String,
    len: u64,
    captured: usize,
    truncated: bool,
    conn: String,
    seq: u64,
    /// `null` when the kernel could not read the sock's sequences.
    pos: Option<u64>,
    peer_pos: Option<u64>,
    syscall: &'static str,
    duration_ns: u64,
    payload: String,
}

fn syscall_name(s: u8) -> &'static str {
    use agent_common::*;
    match s {
        SYS_READ => "read",
        SYS_WRITE => "write",
        SYS_READV => "readv",
        SYS_WRITEV => "writev",
        SYS_RECVFROM => "recvfrom",
        SYS_SENDTO => "sendto",
        SYS_RECVMSG => "recvmsg",
        SYS_SENDMSG => "sendmsg",
        SYS_SENDFILE => "sendfile",
        SYS_CLOSE => "close",
        SYS_TCP_CLOSE => "tcp_close",
        _ => "unknown",
    }
}

/// One JSON line for a chunk; `epoch_offset_ns` turns kernel monotonic time
/// into Unix time.
pub fn to_json(c: &Chunk, epoch_offset_ns: i128) -> String {
    let line = Line {
        ts_ns: c.ts_exit_ns as i128 + epoch_offset_ns,
        kind: match c.kind {
            ChunkKind::Data => "data",
            ChunkKind::Close => "close",
        },
        pid: c.pid,
        tid: c.tid,
        comm: &c.comm,
        fd: c.fd,
        role: c.role.as_str(),
        direction: c.direction.as_str(),
        local: c.local.to_string(),
        remote: c.remote.to_string(),
        len: c.len,
        captured: c.payload.len(),
        truncated: c.truncated,
        conn: c.conn.to_string(),
        seq: c.seq,
        pos: c.has_pos.then_some(c.pos),
        peer_pos: c.has_pos.then_some(c.peer_pos),
        syscall: syscall_name(c.syscall),
        duration_ns: c.ts_exit_ns.saturating_sub(c.ts_enter_ns),
        payload: escape_payload(&crate::redact::active().http1_text(&c.payload)),
    };
    serde_json::to_string(&line).unwrap_or_default()
}

/// Writes each chunk as a line; returns false when stdout is gone.
pub fn write_batch(out: &mut impl Write, batch: &[Chunk], epoch_offset_ns: i128) -> bool {
    for c in batch {
        if writeln!(out, "{}", to_json(c, epoch_offset_ns)).is_err() {
            return false;
        }
    }
    out.flush().is_ok()
}

/// One line per connection for `dump --format summary`: what was moved each
/// way, reported when the traced process closes it (or at exit).
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ConnSummary {
    pub conn: String,
    pub pid: u32,
    pub comm: String,
    pub role: &'static str,
    pub local: String,
    pub remote: String,
    pub first_ns: u64,
    pub last_ns: u64,
    pub closed: bool,
    pub egress_chunks: u64,
    pub egress_bytes: u64,
    pub ingress_chunks: u64,
    pub ingress_bytes: u64,
    pub truncated_chunks: u64,
}

/// Aggregates chunks per connection.
#[derive(Default)]
pub struct Summaries {
    open: ConnMap<ConnSummary>,
}

impl Summaries {
    /// Adds a chunk; returns the finished summaries (its connection closed, or
    /// the open set overflowed its bound and is reported early).
    pub fn add(&mut self, c: &Chunk) -> Vec<ConnSummary> {
        let s = self.open.entry(c.conn).or_insert_with(|| ConnSummary {
            conn: c.conn.to_string(),
            pid: c.pid,
            comm: c.comm.to_string(),
            role: c.role.as_str(),
            local: c.local.to_string(),
            remote: c.remote.to_string(),
            first_ns: c.ts_exit_ns,
            last_ns: c.ts_exit_ns,
            closed: false,
            egress_chunks: 0,
            egress_bytes: 0,
            ingress_chunks: 0,
            ingress_bytes: 0,
            truncated_chunks: 0,
        });
        s.last_ns = c.ts_exit_ns;
        match (c.kind, c.direction) {
            (ChunkKind::Close, _) => {
                let done = self.open.remove(&c.conn).map(|mut s| {
                    s.closed = true;
                    s
                });
                return done.into_iter().collect();
            }
            (ChunkKind::Data, Direction::Egress) => {
                s.egress_chunks += 1;
                s.egress_bytes += c.len;
            }
            (ChunkKind::Data, Direction::Ingress) => {
                s.ingress_chunks += 1;
                s.ingress_bytes += c.len;
            }
        }
        s.truncated_chunks += u64::from(c.truncated);
        if self.open.len() > MAX_OPEN_SUMMARIES {
            return self.finish();
        }
        Vec::new()
    }

    /// Connections still open, reported as such.
    pub fn finish(&mut self) -> Vec<ConnSummary> {
        self.open.drain().map(|(_, s)| s).collect()
    }
}

/// Writes summaries as JSON lines; returns false when stdout is gone.
pub fn write_summaries(out: &mut impl Write, s: &[ConnSummary]) -> bool {
    for line in s {
        if serde_json::to_writer(&mut *out, line).is_err() || writeln!(out).is_err() {
            return false;
        }
    }
    out.flush().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::event::tests::{decode_one, header};
    use agent_common::KIND_DATA;

    #[test]
    fn escaping_table() {
        let cases: [(&[u8], &str); 5] = [
            (b"GET / HTTP/1.1\r\n", "GET / HTTP/1.1\\r\\n"),
            (b"a\\b", "a\\\\b"),
            (b"\x00\xff\t", "\\x00\\xff\\t"),
            (b"\"quoted\"", "\"quoted\""),
            (b"", ""),
        ];
        for (input, want) in cases {
            assert_eq!(escape_payload(input), want);
        }
    }

    #[test]
    fn json_line_has_the_documented_fields() {
        let c = decode_one(&header(KIND_DATA, 3, b"hi\n")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&to_json(&c, 1_000)).unwrap();
        assert_eq!(v["ts_ns"], 1_020);
        assert_eq!(v["comm"], "curl");
        assert_eq!(v["direction"], "ingress");
        assert_eq!(v["role"], "server");
        assert_eq!(v["local"], "127.0.0.1:8080");
        assert_eq!(v["remote"], "127.0.0.2:40000");
        assert_eq!(v["len"], 10);
        assert_eq!(v["captured"], 3);
        assert_eq!(v["payload"], "hi\\n");
        assert_eq!(v["syscall"], "read");
        assert_eq!(v["seq"], 3);
        assert_eq!(
            (v["pos"].as_u64(), v["peer_pos"].as_u64()),
            (Some(100), Some(50))
        );
        let mut c = c;
        c.has_pos = false;
        let v: serde_json::Value = serde_json::from_str(&to_json(&c, 0)).unwrap();
        assert!(v["pos"].is_null() && v["peer_pos"].is_null());
    }

    #[test]
    fn summaries_add_up_per_connection_and_report_at_close() {
        use agent_common::KIND_CLOSE;
        let mut sums = Summaries::default();
        let mut a = decode_one(&header(KIND_DATA, 0, b"abc")).unwrap();
        a.direction = Direction::Egress;
        let b = decode_one(&header(KIND_DATA, 1, b"de")).unwrap(); // ingress, truncated
        assert!(sums.add(&a).is_empty());
        assert!(sums.add(&b).is_empty());
        let done = sums.add(&decode_one(&header(KIND_CLOSE, 2, b"")).unwrap());
        assert_eq!(done.len(), 1);
        let s = &done[0];
        assert!(s.closed);
        assert_eq!((s.egress_chunks, s.egress_bytes), (1, 3 + 7));
        assert_eq!((s.ingress_chunks, s.ingress_bytes), (1, 2 + 7));
        assert_eq!(s.truncated_chunks, 2);
        assert!(sums.finish().is_empty());
        sums.add(&a);
        let open = sums.finish();
        assert_eq!(open.len(), 1);
        assert!(!open[0].closed);
    }
}
