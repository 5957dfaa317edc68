//! Kernel/user ABI shared by the eBPF programs (`agent-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]`, `Copy`, explicitly padded and size-checked
//! at compile time, because both sides read the same bytes: a silent layout
//! change would make the agent misread every event. No `bool`, `Option` or
//! Rust enums appear in ABI fields; discriminants are plain integers with
//! named constants.
#![no_std]

/// Largest capture cap a user may configure, in bytes. A power of two so the
/// kernel side can bound copy lengths with a mask the verifier understands.
pub const MAX_CAPTURE: usize = 16384;
/// Default capture cap: bytes of payload copied per syscall.
pub const DEFAULT_CAPTURE: u32 = 4096;
/// iovecs walked per `readv`/`writev`/`sendmsg`/`recvmsg`; beyond this the
/// chunk is marked truncated (the byte count `len` stays exact).
pub const MAX_IOVECS: u32 = 32;
/// iovecs walked with `bpf_loop` (kernel >= 5.17, [`Config::iov_loop`]):
/// gRPC's C core batches several streams' frames into one `sendmsg` of more
/// than 32 slices, and a hole there costs the HPACK table of the connection.
pub const MAX_IOVECS_LOOP: u32 = 1024;
/// Most CPUs the per-CPU syscall slots are sized and searched for.
pub const MAX_CPUS: u32 = 512;
/// Length of a task's `comm`.
pub const COMM_LEN: usize = 16;

// ---- map and program names (the userspace loader uses the same constants) ----
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_SLOTS: &str = "SLOTS";
pub const MAP_SPILL: &str = "SPILL";
pub const MAP_SOCKS: &str = "SOCKS";
pub const MAP_CONNS: &str = "CONNS";
pub const MAP_SCRATCH: &str = "SCRATCH";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_FILTER_PIDS: &str = "FILTER_PIDS";
pub const MAP_FILTER_COMMS: &str = "FILTER_COMMS";
pub const MAP_FILTER_PORTS: &str = "FILTER_PORTS";
pub const MAP_PEER_AGENTS: &str = "PEER_AGENTS";
pub const MAP_MUTED: &str = "MUTED";
/// Entries of `PEER_AGENTS`: index 0 holds how many tgids follow it.
pub const PEER_AGENTS_LEN: u32 = 16;
pub const GLOBAL_CONFIG: &str = "CONFIG";

/// Tracepoint category and name of every program, as `(program, category,
/// tracepoint)`, in attach order: exits before entries, so that no entry is
/// saved that no exit program will take (calls already in flight when an
/// exit attaches only miss their capture).
pub const PROGRAMS: &[(&str, &str, &str)] = &[
    ("exit_read", "syscalls", "sys_exit_read"),
    ("exit_write", "syscalls", "sys_exit_write"),
    ("exit_readv", "syscalls", "sys_exit_readv"),
    ("exit_writev", "syscalls", "sys_exit_writev"),
    ("exit_recvfrom", "syscalls", "sys_exit_recvfrom"),
    ("exit_sendto", "syscalls", "sys_exit_sendto"),
    ("exit_recvmsg", "syscalls", "sys_exit_recvmsg"),
    ("exit_sendmsg", "syscalls", "sys_exit_sendmsg"),
    ("exit_sendfile", "syscalls", "sys_exit_sendfile64"),
    ("task_exit", "sched", "sched_process_exit"),
    ("sock_set_state", "sock", "inet_sock_set_state"),
    ("enter_close", "syscalls", "sys_enter_close"),
    ("enter_read", "syscalls", "sys_enter_read"),
    ("enter_write", "syscalls", "sys_enter_write"),
    ("enter_readv", "syscalls", "sys_enter_readv"),
    ("enter_writev", "syscalls", "sys_enter_writev"),
    ("enter_recvfrom", "syscalls", "sys_enter_recvfrom"),
    ("enter_sendto", "syscalls", "sys_enter_sendto"),
    ("enter_recvmsg", "syscalls", "sys_enter_recvmsg"),
    ("enter_sendmsg", "syscalls", "sys_enter_sendmsg"),
    ("enter_sendfile", "syscalls", "sys_enter_sendfile64"),
];

// ---- event kinds ----
/// Payload chunk of one send/recv syscall.
pub const KIND_DATA: u8 = 1;
/// The traced process closed its fd of a captured connection.
pub const KIND_CLOSE: u8 = 2;

// ---- directions ----
pub const DIR_EGRESS: u8 = 0;
pub const DIR_INGRESS: u8 = 1;

// ---- roles ----
/// Connection seen first mid-life (established before the agent started, or
/// its state-change record was evicted): userspace resolves the role.
pub const ROLE_UNKNOWN: u8 = 0;
/// Connection made by `connect` (SYN_SENT -> ESTABLISHED).
pub const ROLE_CLIENT: u8 = 1;
/// Connection made by `accept` (SYN_RECV -> ESTABLISHED).
pub const ROLE_SERVER: u8 = 2;

// ---- syscall kinds ----
pub const SYS_READ: u8 = 1;
pub const SYS_WRITE: u8 = 2;
pub const SYS_READV: u8 = 3;
pub const SYS_WRITEV: u8 = 4;
pub const SYS_RECVFROM: u8 = 5;
pub const SYS_SENDTO: u8 = 6;
pub const SYS_RECVMSG: u8 = 7;
pub const SYS_SENDMSG: u8 = 8;
pub const SYS_CLOSE: u8 = 9;
pub const SYS_SENDFILE: u8 = 10;
/// Not a syscall: the socket reached TCP_CLOSE while its record was still
/// open, so no traced close() ended it (the process exited or was killed with
/// the socket open, or passed the fd on). `pid` is the process of the
/// connection's first record, `tid` 0 and `fd` -1: the hook may run in
/// softirq, on whatever task was current.
pub const SYS_TCP_CLOSE: u8 = 11;

// ---- chunk flags ----
/// Fewer bytes captured than the syscall moved (cap, iovec limit or read fault).
pub const FLAG_TRUNCATED: u8 = 1;
/// The connection record was created at first data, not at connection setup.
pub const FLAG_LATE_CONN: u8 = 2;
/// `pos_end` and `peer_pos` are valid (the sock's sequence fields were read).
/// In `ConnInfo::flags`: the bases are valid.
pub const FLAG_HAS_POS: u8 = 4;
/// `ConnInfo::flags` only: the app shut down its sending side, so
/// `write_seq` counts the FIN's sequence number too.
pub const FLAG_FIN_SENT: u8 = 8;

// ---- `ConnInfo::mute` ----
/// Not yet looked up in `MUTED`.
pub const MUTE_UNCHECKED: u8 = 0;
/// Looked up at its first record: not an agent's connection.
pub const MUTE_NO: u8 = 1;
/// The other end is an agent's socket: no records.
pub const MUTE_YES: u8 = 2;

// ---- address families (as in the kernel) ----
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

// ---- counters (indexes of the per-CPU `COUNTERS` array) ----
/// Events written to the ring buffer.
pub const CNT_EVENTS: u32 = 0;
/// Events lost because the ring buffer was full.
pub const CNT_RINGBUF_FULL: u32 = 1;
/// Chunks whose payload was cut (cap, iovec limit, fault).
pub const CNT_TRUNCATED: u32 = 2;
/// Syscall exits of selected processes with no saved entry: calls already in
/// flight when the agent attached (expected, a few per blocked thread), or
/// entries lost in a race between CPUs or evicted from `SPILL`. Such a call
/// is not captured.
pub const CNT_NO_ENTRY: u32 = 3;
/// Connection records not stored because the insert failed.
pub const CNT_CONN_FULL: u32 = 4;
/// Payload reads from user memory that failed.
pub const CNT_READ_FAULT: u32 = 5;
/// Records not made because their connection is an agent's own (one end is
/// a socket an agent on this host reads or writes).
pub const CNT_MUTED: u32 = 6;
/// Connections ended by TCP_CLOSE rather than a traced close() (see
/// `SYS_TCP_CLOSE`): mostly processes that exited or were killed with
/// sockets open.
pub const CNT_SOCK_DIED: u32 = 7;
pub const NUM_COUNTERS: u32 = 8;
/// Names of the counters, indexed like `COUNTERS`.
pub const COUNTER_NAMES: [&str; NUM_COUNTERS as usize] = [
    "events",
    "ringbuf_full",
    "truncated",
    "no_entry",
    "conn_full",
    "read_fault",
    "muted",
    "sock_died",
];

// ---- filter flags (bits of `Config::filter`) ----
pub const FILTER_PID: u32 = 1;
pub const FILTER_COMM: u32 = 2;
pub const FILTER_PORT: u32 = 4;

/// Field offsets of kernel structures, read from the running kernel's BTF by
/// the agent at start-up. Rust eBPF has no CO-RE relocations, so this is how
/// one object walks `task_struct -> files -> fdtable -> file -> socket -> sock`
/// on any kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub task_group_leader: u32,
    pub task_comm: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub file_inode: u32,
    pub inode_mode: u32,
    pub socket_type: u32,
    pub socket_sk: u32,
    pub sock_protocol: u32,
    pub skc_family: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// `tcp_sock.write_seq`: sequence just past the last byte queued to send.
    /// `struct tcp_sock` starts with `struct sock`, so it is an offset from `sk`.
    pub tcp_write_seq: u32,
    /// `tcp_sock.copied_seq`: sequence just past the last byte read by the app.
    pub tcp_copied_seq: u32,
    /// `tcp_sock.rcv_nxt`: next sequence expected from the peer.
    pub tcp_rcv_nxt: u32,
    /// `sock_common.skc_flags` (`sk_flags`, an unsigned long of `SOCK_*` bits).
    pub skc_flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 96);

/// Read-only configuration, written into the object's `.rodata` by the loader
/// before the programs are verified, so the verifier sees constants.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// tgid of the agent itself, never traced.
    pub agent_tgid: u32,
    /// `FILTER_*` bits: which selection maps are active.
    pub filter: u32,
    /// Payload bytes copied per syscall (<= MAX_CAPTURE).
    pub capture_cap: u32,
    /// Possible CPUs (<= MAX_CPUS): the `SLOTS` map holds two per CPU.
    pub nr_cpus: u32,
    pub offsets: KernelOffsets,
    /// 1: walk iovecs with `bpf_loop` (up to MAX_IOVECS_LOOP); 0: the
    /// unrolled MAX_IOVECS loop (older kernels). A constant to the verifier,
    /// so the other path is dead code it never checks.
    pub iov_loop: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 120);

/// Connection 4-tuple. Addresses are in network byte order as the kernel
/// stores them (IPv4 in the first 4 bytes); ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnTuple {
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ConnTuple>() == 40);

/// Key of `MUTED`: a connection as one end sees it, addresses IPv6 or
/// IPv4-mapped (so that an IPv4 client of a dual-stack listener matches),
/// ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MuteKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}
const _: () = assert!(core::mem::size_of::<MuteKey>() == 36);

impl MuteKey {
    /// The key of `t`, or with `reverse` of its other end.
    #[inline(always)]
    pub fn of(t: &ConnTuple, reverse: bool) -> Self {
        let (mut local, mut remote) = (t.local_addr, t.remote_addr);
        if t.family == AF_INET {
            local = v4_mapped(&t.local_addr);
            remote = v4_mapped(&t.remote_addr);
        }
        let (mut lp, mut rp) = (t.local_port, t.remote_port);
        if reverse {
            (local, remote) = (remote, local);
            (lp, rp) = (rp, lp);
        }
        Self {
            local_addr: local,
            remote_addr: remote,
            local_port: lp,
            remote_port: rp,
        }
    }
}

#[inline(always)]
fn v4_mapped(a: &[u8; 16]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// Per-socket record in `CONNS`, keyed by the kernel `struct sock` address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnInfo {
    pub tuple: ConnTuple,
    /// Monotonic time the record was made; with the sock address it names one
    /// connection even when the kernel reuses the sock's memory.
    pub start_ns: u64,
    /// Next per-connection sequence number.
    pub seq: u64,
    /// `tcp_sock.write_seq` and `copied_seq` at the start of the stream (at
    /// ESTABLISHED, or for a late record the sequence of the first byte seen):
    /// records carry byte offsets from these. Valid with `FLAG_HAS_POS`.
    pub egress_base: u32,
    pub ingress_base: u32,
    pub role: u8,
    /// `FLAG_LATE_CONN` when made at first data; `FLAG_HAS_POS` when the
    /// bases were read.
    pub flags: u8,
    /// `MUTE_*`: whether the connection was checked against `MUTED`, and found.
    pub mute: u8,
    pub _pad: u8,
    /// Process of the first captured syscall (filled with `comm`): the owner
    /// a close made at TCP_CLOSE names, since that hook has no process.
    pub tgid: u32,
    /// Process name, filled at the first captured syscall (the record is often
    /// made in softirq, where there is no process): saves two kernel reads per
    /// event afterwards.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<ConnInfo>() == 88);

/// Syscall arguments saved at entry and consumed at exit, in the calling
/// CPU's slot (`SLOTS`), or in `SPILL` when another call needed the slot
/// first. `pid_tgid == 0` marks a free slot. In `SPILL`, `syscall == 0`
/// marks a tombstone: the thread's last lost entry, so that an entry moved
/// there later by a slow CPU is known to be stale.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SyscallArgs {
    /// User buffer, or the iovec array for vectored calls.
    pub buf: u64,
    /// Buffer length, or iovec count for vectored calls.
    pub count: u64,
    pub pid_tgid: u64,
    pub ts_enter_ns: u64,
    pub fd: i32,
    pub syscall: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<SyscallArgs>() == 40);

/// `SOCKS` value: what an fd of a process was when last looked up. `file` is
/// the kernel `struct file` address, checked against the fd table on every
/// use, so an fd closed or replaced behind our back is looked up afresh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FdSock {
    pub file: u64,
    /// Kernel `struct sock` address when a TCP socket over IPv4/IPv6, else 0.
    pub sock: u64,
}
const _: () = assert!(core::mem::size_of::<FdSock>() == 16);

/// Fixed header of every ring-buffer record; `KIND_DATA` records are followed
/// by `captured` payload bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    pub ts_enter_ns: u64,
    pub ts_exit_ns: u64,
    /// Kernel `struct sock` address (connection identity with `conn_start_ns`).
    pub sock: u64,
    pub conn_start_ns: u64,
    /// Per-connection sequence, both directions.
    pub seq: u64,
    /// Bytes the syscall moved (its return value).
    pub len: u64,
    pub pid: u32,
    pub tid: u32,
    pub fd: i32,
    /// Payload bytes following this header.
    pub captured: u32,
    /// Byte offset, mod 2^32, just past this record's bytes in its own
    /// direction (for a close: the end of the egress stream), counted from
    /// the connection's base (`ConnInfo`). Valid with `FLAG_HAS_POS`.
    pub pos_end: u32,
    /// The other direction's byte offset (mod 2^32) at this record: the end
    /// of what was sent (ingress records) or read by the app (egress and close).
    pub peer_pos: u32,
    pub kind: u8,
    pub direction: u8,
    pub role: u8,
    pub syscall: u8,
    pub flags: u8,
    pub _pad: [u8; 3],
    pub comm: [u8; COMM_LEN],
    pub tuple: ConnTuple,
}
pub const EVENT_HEADER_SIZE: usize = core::mem::size_of::<EventHeader>();
const _: () = assert!(EVENT_HEADER_SIZE == 136);

/// Per-CPU scratch where a record is assembled before `bpf_ringbuf_output`.
/// The payload area is twice the cap so `offset + len`, each masked to
/// `MAX_CAPTURE - 1`, always lies inside it: that is what the verifier checks.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scratch {
    pub header: EventHeader,
    pub data: [u8; 2 * MAX_CAPTURE],
}
const _: () = assert!(core::mem::size_of::<Scratch>() == EVENT_HEADER_SIZE + 2 * MAX_CAPTURE);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all these are repr(C), Copy, with explicit padding and no
    // invalid bit patterns.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::ConnTuple {}
    unsafe impl aya::Pod for super::ConnInfo {}
    unsafe impl aya::Pod for super::EventHeader {}
}
