//! `agent dump`: one JSON object per captured chunk, the user's view of what
//! the agent sees.

use std::io::Write;

use serde::Serialize;

use crate::capture::{Chunk, ChunkKind};

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
        syscall: syscall_name(c.syscall),
        duration_ns: c.ts_exit_ns.saturating_sub(c.ts_enter_ns),
        payload: escape_payload(&c.payload),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::event::{decode, tests::header};
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
        let c = decode(&header(KIND_DATA, 3, b"hi\n")).unwrap();
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
    }
}
