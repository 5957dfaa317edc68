//! Userspace form of the kernel's ring-buffer records.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Bytes, BytesMut};

use agent_common::{
    ConnTuple, EventHeader, AF_INET, AF_INET6, COMM_LEN, DIR_EGRESS, DIR_INGRESS,
    EVENT_HEADER_SIZE, FLAG_HAS_POS, FLAG_LATE_CONN, FLAG_TRUNCATED, KIND_CLOSE, KIND_DATA,
    ROLE_CLIENT, ROLE_SERVER,
};

/// One connection: the kernel `struct sock` address plus the time its record
/// was made, so a sock whose memory is reused for a new connection is a new id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub sock: u64,
    pub start_ns: u64,
}

/// Map keyed by connection. Keys are kernel addresses and timestamps, not
/// chosen by any peer, so a fast hash is safe; SipHash was a tenth of the
/// drain thread's time.
pub type ConnMap<V> = std::collections::HashMap<ConnId, V, foldhash::fast::RandomState>;

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}-{:x}", self.sock, self.start_ns)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Egress => "egress",
            Self::Ingress => "ingress",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Unknown,
    Client,
    Server,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Bytes moved by one syscall.
    Data,
    /// The traced process closed its fd.
    Close,
}

/// A process name as the kernel keeps it (at most 15 bytes, NUL padded),
/// held inline: a `String` per chunk cost an allocation, a free and a UTF-8
/// check on every record.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm([u8; COMM_LEN]);

impl Comm {
    pub fn new(raw: [u8; COMM_LEN]) -> Self {
        Self(raw)
    }

    /// The name up to its first NUL; invalid UTF-8 (names are bytes to the
    /// kernel) ends it at the last valid character.
    pub fn as_str(&self) -> &str {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        match std::str::from_utf8(&self.0[..end]) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&self.0[..e.valid_up_to()]).unwrap_or_default(),
        }
    }
}

impl std::ops::Deref for Comm {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<&str> for Comm {
    /// Test and config helper: the first 15 bytes of `s`.
    fn from(s: &str) -> Self {
        let mut raw = [0u8; COMM_LEN];
        let n = s.len().min(COMM_LEN - 1);
        raw[..n].copy_from_slice(&s.as_bytes()[..n]);
        Self(raw)
    }
}

/// One captured syscall (or close) on a TCP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub conn: ConnId,
    pub kind: ChunkKind,
    /// Per-connection order, both directions.
    pub seq: u64,
    /// CLOCK_MONOTONIC at syscall entry and exit.
    pub ts_enter_ns: u64,
    pub ts_exit_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: Comm,
    pub fd: i32,
    pub role: Role,
    pub direction: Direction,
    pub syscall: u8,
    /// Bytes the syscall moved.
    pub len: u64,
    /// Offset of this chunk's first byte in its direction of the connection:
    /// 0 is the first byte after ESTABLISHED (for a late connection, the
    /// first byte of the chunk that made its record). A close chunk gives the
    /// end of the egress stream. Bytes between one chunk's end and the next
    /// one's `pos` were moved but never captured. The kernel sends offsets
    /// mod 2^32: [`decode`] leaves only those low bits, the reorder stage
    /// extends them as it releases the connection's chunks in order.
    pub pos: u64,
    /// The other direction's byte count at this chunk (same base): bytes the
    /// app had read (egress and close chunks) or sent (ingress chunks).
    pub peer_pos: u64,
    /// `pos` and `peer_pos` are known (the kernel read the sock's sequences).
    pub has_pos: bool,
    /// Fewer bytes captured than moved.
    pub truncated: bool,
    /// The connection predates the agent (or its record was evicted).
    pub late_conn: bool,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Captured bytes: a slice of the drain pass's shared buffer, so a chunk
    /// costs no allocation of its own.
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than the header")]
    Short(usize),
    #[error("record says {captured} payload bytes but carries {available}")]
    PayloadOutOfRange { captured: usize, available: usize },
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("unknown direction {0}")]
    Direction(u8),
    #[error("unknown address family {0}")]
    Family(u16),
}

fn ip(family: u16, raw: &[u8; 16]) -> Result<IpAddr, DecodeError> {
    match family {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        AF_INET6 => {
            let v6 = Ipv6Addr::from(*raw);
            // Dual-stack sockets see IPv4 peers as ::ffff:a.b.c.d; show them as
            // IPv4 so both ends of one connection print the same addresses.
            Ok(match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            })
        }
        other => Err(DecodeError::Family(other)),
    }
}

/// Local and remote socket addresses of a kernel tuple.
pub fn addrs(t: &ConnTuple) -> Result<(SocketAddr, SocketAddr), DecodeError> {
    Ok((
        SocketAddr::new(ip(t.family, &t.local_addr)?, t.local_port),
        SocketAddr::new(ip(t.family, &t.remote_addr)?, t.remote_port),
    ))
}

/// Decodes one ring-buffer record, copying its payload to the end of `arena`.
pub fn decode(record: &[u8], arena: &mut BytesMut) -> Result<Chunk, DecodeError> {
    if record.len() < EVENT_HEADER_SIZE {
        return Err(DecodeError::Short(record.len()));
    }
    // SAFETY: length checked; EventHeader is plain data valid for any bits.
    let h: EventHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    let captured = h.captured as usize;
    let payload = record
        .get(EVENT_HEADER_SIZE..EVENT_HEADER_SIZE + captured)
        .ok_or(DecodeError::PayloadOutOfRange {
            captured,
            available: record.len() - EVENT_HEADER_SIZE,
        })?;
    let kind = match h.kind {
        KIND_DATA => ChunkKind::Data,
        KIND_CLOSE => ChunkKind::Close,
        k => return Err(DecodeError::Kind(k)),
    };
    let direction = match h.direction {
        DIR_EGRESS => Direction::Egress,
        DIR_INGRESS => Direction::Ingress,
        d => return Err(DecodeError::Direction(d)),
    };
    let role = match h.role {
        ROLE_CLIENT => Role::Client,
        ROLE_SERVER => Role::Server,
        _ => Role::Unknown,
    };
    let (local, remote) = addrs(&h.tuple)?;
    Ok(Chunk {
        conn: ConnId {
            sock: h.sock,
            start_ns: h.conn_start_ns,
        },
        kind,
        seq: h.seq,
        ts_enter_ns: h.ts_enter_ns,
        ts_exit_ns: h.ts_exit_ns,
        pid: h.pid,
        tid: h.tid,
        comm: Comm::new(h.comm),
        fd: h.fd,
        role,
        direction,
        syscall: h.syscall,
        len: h.len,
        // The start mod 2^32; the end may have wrapped past the start.
        pos: u64::from(h.pos_end.wrapping_sub(h.len as u32)),
        peer_pos: u64::from(h.peer_pos),
        has_pos: h.flags & FLAG_HAS_POS != 0,
        truncated: h.flags & FLAG_TRUNCATED != 0,
        late_conn: h.flags & FLAG_LATE_CONN != 0,
        local,
        remote,
        payload: {
            arena.extend_from_slice(payload);
            arena.split().freeze()
        },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use agent_common::{SYS_READ, SYS_WRITE};

    pub(crate) fn decode_one(record: &[u8]) -> Result<Chunk, DecodeError> {
        decode(record, &mut BytesMut::new())
    }

    pub(crate) fn header(kind: u8, seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut t = ConnTuple {
            family: AF_INET,
            local_port: 8080,
            remote_port: 40000,
            ..Default::default()
        };
        t.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        t.remote_addr[..4].copy_from_slice(&[127, 0, 0, 2]);
        let mut c = [0u8; 16];
        c[..4].copy_from_slice(b"curl");
        let h = EventHeader {
            ts_enter_ns: 10,
            ts_exit_ns: 20,
            sock: 0xffff_8880_0000_1000,
            conn_start_ns: 5,
            seq,
            len: payload.len() as u64 + 7,
            pid: 42,
            tid: 43,
            fd: 3,
            captured: payload.len() as u32,
            pos_end: 100 + payload.len() as u32 + 7,
            peer_pos: 50,
            kind,
            direction: DIR_INGRESS,
            role: ROLE_SERVER,
            syscall: SYS_READ,
            flags: FLAG_TRUNCATED | FLAG_HAS_POS,
            _pad: [0; 3],
            comm: c,
            tuple: t,
        };
        let mut v = vec![0u8; EVENT_HEADER_SIZE];
        // SAFETY: v has room for one header.
        unsafe { std::ptr::write_unaligned(v.as_mut_ptr().cast(), h) };
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_a_data_record() {
        let c = decode_one(&header(KIND_DATA, 7, b"GET / HTTP/1.1\r\n")).unwrap();
        assert_eq!(c.kind, ChunkKind::Data);
        assert_eq!(c.seq, 7);
        assert_eq!(c.comm.as_str(), "curl");
        assert_eq!(&c.payload[..], b"GET / HTTP/1.1\r\n");
        assert_eq!(c.len, 16 + 7);
        assert!(c.truncated && !c.late_conn);
        assert_eq!((c.pos, c.peer_pos, c.has_pos), (100, 50, true));
        assert_eq!(c.local.to_string(), "127.0.0.1:8080");
        assert_eq!(c.remote.to_string(), "127.0.0.2:40000");
        assert_eq!((c.role, c.direction), (Role::Server, Direction::Ingress));
        assert_eq!(
            c.conn,
            ConnId {
                sock: 0xffff_8880_0000_1000,
                start_ns: 5
            }
        );
        assert_ne!(c.syscall, SYS_WRITE);
    }

    #[test]
    fn comm_stops_at_nul_and_at_invalid_utf8() {
        let mut raw = [0u8; COMM_LEN];
        raw[..5].copy_from_slice(b"nginx");
        assert_eq!(Comm::new(raw).as_str(), "nginx");
        raw[5] = 0xff;
        raw[6] = b'x';
        assert_eq!(Comm::new(raw).as_str(), "nginx");
        assert_eq!(Comm::new([b'a'; COMM_LEN]).as_str().len(), COMM_LEN);
        assert_eq!(
            Comm::from("a-very-long-process-name").as_str(),
            "a-very-long-pro"
        );
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode_one(&[0u8; 10]), Err(DecodeError::Short(10)));
        let mut r = header(KIND_DATA, 0, b"abcdef");
        r.truncate(r.len() - 2);
        assert_eq!(
            decode_one(&r),
            Err(DecodeError::PayloadOutOfRange {
                captured: 6,
                available: 4
            })
        );
        assert_eq!(decode_one(&header(9, 0, b"")), Err(DecodeError::Kind(9)));
    }

    #[test]
    fn v4_mapped_v6_addresses_print_as_v4() {
        let mut t = ConnTuple {
            family: AF_INET6,
            local_port: 1,
            remote_port: 2,
            ..Default::default()
        };
        t.local_addr = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets();
        t.remote_addr = Ipv6Addr::LOCALHOST.octets();
        let (l, r) = addrs(&t).unwrap();
        assert_eq!(l.to_string(), "127.0.0.1:1");
        assert_eq!(r.to_string(), "[::1]:2");
        t.family = 1;
        assert_eq!(addrs(&t), Err(DecodeError::Family(1)));
    }
}
