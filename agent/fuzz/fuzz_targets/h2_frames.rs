//! Fuzzes the decode stage as the pipeline drives it: protocol dispatch, the
//! HTTP/2 frame parser with its HPACK decoders, and HTTP/1, over one
//! connection's chunks in both directions, with capture holes and lost bytes
//! between chunks. No input may panic, hang or grow state without bound.
//!
//! Input: one config byte (role, joined mid-way), then records of
//! `[direction | flags] [len: u16 BE] [extra: u16 BE]` followed by `len`
//! payload bytes; `extra` bytes were moved but not captured (a hole at the
//! chunk's end), or, with flag 0x80, lost before the chunk (a gap in the
//! positions).
#![no_main]

use agent::{
    capture::{Chunk, ChunkKind, ConnId, Direction, Role},
    decode::{Decoder, HttpExchange},
};
use libfuzzer_sys::fuzz_target;

fn chunk(
    role: Role,
    late: bool,
    dir: Direction,
    payload: &[u8],
    len: u64,
    pos: u64,
    peer: u64,
    t: u64,
) -> Chunk {
    let (a, b) = (
        "127.0.0.1:40000".parse().unwrap(),
        "127.0.0.1:8080".parse().unwrap(),
    );
    let (local, remote) = if role == Role::Server { (b, a) } else { (a, b) };
    Chunk {
        conn: ConnId {
            sock: 1,
            start_ns: 1,
        },
        kind: ChunkKind::Data,
        seq: 0,
        ts_enter_ns: t,
        ts_exit_ns: t + 1,
        pid: 1,
        tid: 1,
        comm: "fuzz".into(),
        fd: 3,
        role,
        direction: dir,
        syscall: 1,
        len,
        truncated: len > payload.len() as u64,
        late_conn: late,
        local,
        remote,
        pos,
        peer_pos: peer,
        has_pos: true,
        payload: bytes::Bytes::copy_from_slice(payload),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, mut rest)) = data.split_first() else {
        return;
    };
    let role = match cfg & 3 {
        0 => Role::Client,
        1 => Role::Server,
        _ => Role::Unknown,
    };
    let late = cfg & 4 != 0;
    let mut dec = Decoder::default();
    let mut out: Vec<HttpExchange> = Vec::new();
    let mut at = [0u64; 2];
    let mut t = 1000;
    while rest.len() >= 5 {
        let flags = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        let extra = u64::from(u16::from_be_bytes([rest[3], rest[4]]));
        rest = &rest[5..];
        let payload = &rest[..len.min(rest.len())];
        rest = &rest[payload.len()..];
        let (d, me, peer) = if flags & 1 == 0 {
            (Direction::Egress, 0, 1)
        } else {
            (Direction::Ingress, 1, 0)
        };
        let (len, hole) = if flags & 0x80 != 0 {
            (payload.len() as u64, 0)
        } else {
            (payload.len() as u64 + extra, extra)
        };
        if flags & 0x80 != 0 {
            at[me] += extra;
        }
        t += 10;
        let c = chunk(role, late, d, payload, len, at[me], at[peer], t);
        at[me] += payload.len() as u64 + hole;
        dec.push(&c, &mut out);
        assert!(dec.tracked() <= 1);
        for ex in out.drain(..) {
            assert!(
                ex.request_headers.bytes() <= 64 * 1024 + 4096,
                "header bytes bounded"
            );
            assert!(ex.response_first_ns.is_none_or(|r| r >= 1000));
        }
    }
    let mut close = chunk(role, late, Direction::Egress, b"", 0, at[0], at[1], t + 10);
    close.kind = ChunkKind::Close;
    dec.push(&close, &mut out);
    assert_eq!(dec.tracked(), 0, "a close frees the connection");
});
