use core::{ffi::c_void, ptr::addr_of};

use agent_common::{
    Config, ConnInfo, ConnTuple, EventHeader, FdSock, KernelOffsets, MuteKey, Scratch, SyscallArgs,
    AF_INET, AF_INET6, CNT_CONN_FULL, CNT_EVENTS, CNT_MUTED, CNT_NO_ENTRY, CNT_READ_FAULT,
    CNT_RINGBUF_FULL, CNT_SOCK_DIED, CNT_TRUNCATED, COMM_LEN, DEFAULT_CAPTURE, DIR_EGRESS,
    DIR_INGRESS, EVENT_HEADER_SIZE, FILTER_COMM, FILTER_PID, FILTER_PORT, FLAG_FIN_SENT,
    FLAG_HAS_POS, FLAG_LATE_CONN, FLAG_TRUNCATED, KIND_CLOSE, KIND_DATA, MAX_CAPTURE, MAX_CPUS,
    MAX_IOVECS, MAX_IOVECS_LOOP, MUTE_NO, MUTE_UNCHECKED, MUTE_YES, NUM_COUNTERS, PEER_AGENTS_LEN,
    ROLE_CLIENT, ROLE_SERVER, ROLE_UNKNOWN, SYS_CLOSE, SYS_READ, SYS_READV, SYS_RECVFROM,
    SYS_RECVMSG, SYS_SENDFILE, SYS_SENDMSG, SYS_SENDTO, SYS_TCP_CLOSE, SYS_WRITE, SYS_WRITEV,
};
use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel, generated,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext,
};

// ---------------------------------------------------------------- config ----

/// Written by the loader into `.rodata` before verification (name:
/// `agent_common::GLOBAL_CONFIG`), so the verifier sees constants.
#[no_mangle]
static CONFIG: Config = Config {
    agent_tgid: 0,
    filter: 0,
    capture_cap: DEFAULT_CAPTURE,
    nr_cpus: 1,
    offsets: KernelOffsets {
        task_files: 0,
        task_group_leader: 0,
        task_comm: 0,
        files_fdt: 0,
        fdtable_max_fds: 0,
        fdtable_fd: 0,
        file_private_data: 0,
        file_inode: 0,
        inode_mode: 0,
        socket_type: 0,
        socket_sk: 0,
        sock_protocol: 0,
        skc_family: 0,
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_dport: 0,
        skc_num: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        tcp_write_seq: 0,
        tcp_copied_seq: 0,
        tcp_rcv_nxt: 0,
        skc_flags: 0,
        _pad: 0,
    },
    iov_loop: 0,
    _pad: 0,
};

/// Reads one field of `CONFIG` through a volatile load: without it the
/// compiler would fold the zero initialiser into the code.
macro_rules! cfg {
    ($($field:ident).+) => {
        unsafe { core::ptr::read_volatile(addr_of!(CONFIG.$($field).+)) }
    };
}

// ------------------------------------------------------------------ maps ----
// Map names are the static identifiers; userspace refers to them through the
// `agent_common::MAP_*` constants.

/// Captured records to userspace. Submits never wake the reader (it drains on
/// a timer), so no wake-up cost lands on the traced app. Size set by the loader.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Arguments of the send (index `2 * cpu + DIR_EGRESS`) and receive
/// (`2 * cpu + DIR_INGRESS`) in
/// flight on each CPU, from syscall entry to exit. Nearly every call returns
/// on the CPU it entered on with no other call in between, so a slot per CPU
/// replaces a per-thread hash: no hashing, locking or allocation at entry,
/// which runs for every read and write of the selected processes. A call
/// that finds its slot taken moves the occupant (a call that sleeps, or that
/// moved CPU) to `SPILL`; an exit that misses its own CPU's slot searches the
/// other CPUs' slots, then `SPILL`. Sized by the loader; never evicted.
#[map]
static SLOTS: Array<SyscallArgs> = Array::with_max_entries(2, 0);

/// key: pid_tgid; value: that thread's entry moved out of `SLOTS` (or a
/// tombstone, see `SyscallArgs`). Only calls that sleep and lose their slot
/// come here; removed at exit and thread exit; LRU evicts the rest.
#[map]
static SPILL: LruHashMap<u64, SyscallArgs> = LruHashMap::with_max_entries(16384, 0);

/// key: tgid << 32 | fd; value: the `struct file` behind it and its TCP sock
/// (0 for anything else). Saves the second half of the fd walk (file ->
/// inode -> socket -> sock checks) on every read and write; the first half
/// (task -> fd table -> file) still runs to check the entry. Removed when the
/// process closes the fd; LRU evicts the rest.
#[map]
static SOCKS: LruHashMap<u64, FdSock> = LruHashMap::with_max_entries(65536, 0);

/// key: kernel `struct sock` address; value: 4-tuple, role, sequence, the
/// stream bases byte offsets count from.
/// Made when TCP reaches ESTABLISHED (or at first data for older sockets),
/// removed when the traced process closes the fd; LRU evicts the rest.
#[map]
static CONNS: LruHashMap<u64, ConnInfo> = LruHashMap::with_max_entries(65536, 0);

/// One record-assembly area per CPU (index: CPU id). A plain array because a
/// per-CPU map value may not exceed 32 KiB; the loader sizes it to the CPUs.
#[map]
static SCRATCH: Array<Scratch> = Array::with_max_entries(1, 0);

/// Per-CPU event and drop counters, indexed by `agent_common::CNT_*`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

/// Selection maps, filled by userspace before attaching; never evicted.
/// key: tgid.
#[map]
static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);
/// key: process name (`comm` of the thread-group leader), NUL padded.
#[map]
static FILTER_COMMS: HashMap<[u8; COMM_LEN], u8> = HashMap::with_max_entries(256, 0);
/// key: TCP port, local or remote.
#[map]
static FILTER_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// tgids of the other agents on this host: index 0 holds how many follow.
/// Written by this agent's loader (agents already running) and by agents
/// that start later (through the map's id, see `capture::agents`); never
/// evicted. An agent's own sockets are never traced by any agent.
#[map]
static PEER_AGENTS: Array<u32> = Array::with_max_entries(PEER_AGENTS_LEN, 0);

/// key: a connection as its other end sees it; value: unused. Put here when
/// an agent's process reads or writes a TCP socket, so that the other end (a
/// collector on this host, say) is not traced either: without it each export
/// request would come back as a span to export. Looked up once per traced
/// connection, at its first record; LRU evicts.
#[map]
static MUTED: LruHashMap<MuteKey, u8> = LruHashMap::with_max_entries(4096, 0);

// -------------------------------------------------------------- helpers ----

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: u16 = 1;
const IPPROTO_TCP: u16 = 6;
const MSG_PEEK: u64 = 2;
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const TCP_LAST_ACK: i32 = 9;
/// Bit of `enum sock_flags` in `sk_flags`: a FIN came in order (`tcp_fin`).
const SOCK_DONE: u64 = 1 << 1;
/// Bit of `enum sock_flags`: no file refers to the sock any more
/// (`sock_orphan`, at the last fd's release).
const SOCK_DEAD: u64 = 1;
/// Offset of the first syscall argument in a `sys_enter_*` record, and of
/// `ret` in a `sys_exit_*` record (see the tracepoints' `format` files).
const ARG0: usize = 16;
const RET: usize = 16;
const CAP_MASK: u64 = MAX_CAPTURE as u64 - 1;

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // Per-CPU slot: no other writer while this program runs here.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn read_kernel<T>(addr: u64) -> Option<T> {
    unsafe { bpf_probe_read_kernel(addr as *const T).ok() }
}

/// Plain load of a field of a BTF-typed kernel object.
#[inline(always)]
unsafe fn load<T: Copy>(base: *const u8, off: u32) -> T {
    core::ptr::read_volatile(base.add(off as usize) as *const T)
}

#[inline(always)]
fn read_ptr(addr: u64) -> Option<u64> {
    match read_kernel::<u64>(addr) {
        Some(0) | None => None,
        p => p,
    }
}

/// A u64 of the tracepoint record at `off` (>= 8), loaded directly: the
/// verifier allows plain loads from a tracepoint's context, which saves a
/// helper call per field over `read_at`.
#[inline(always)]
fn record_u64(ctx: &TracePointContext, off: usize) -> u64 {
    unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(off) as *const u64) }
}

#[inline(always)]
fn arg(ctx: &TracePointContext, i: usize) -> u64 {
    record_u64(ctx, ARG0 + 8 * i)
}

/// Name of the current process (the thread-group leader's `comm`), so that
/// threads that rename themselves still match `--comm`.
#[inline(always)]
fn process_comm() -> [u8; COMM_LEN] {
    let task = unsafe { bpf_get_current_task() };
    read_ptr(task + cfg!(offsets.task_group_leader) as u64)
        .and_then(|leader| read_kernel::<[u8; COMM_LEN]>(leader + cfg!(offsets.task_comm) as u64))
        .unwrap_or([0; COMM_LEN])
}

/// Is `tgid` this agent or another one? One compare and one (inlined) array
/// load when this agent is alone.
#[inline(always)]
fn is_agent(tgid: u32) -> bool {
    if tgid == cfg!(agent_tgid) {
        return true;
    }
    let n = match PEER_AGENTS.get(0) {
        Some(n) => *n,
        None => return false,
    };
    // Verifier: bounded by the map's length.
    for i in 1..PEER_AGENTS_LEN {
        if i > n {
            break;
        }
        if PEER_AGENTS.get(i) == Some(&tgid) {
            return true;
        }
    }
    false
}

/// An agent reads or writes `fd`: when it is a TCP socket, its other end is
/// muted. Agents make few such calls (one per export batch).
#[inline(always)]
fn mute_peer_of(tgid: u32, fd: i32) {
    let Some(sk) = tcp_sock_of_fd(tgid, fd) else {
        return;
    };
    let key = MuteKey::of(&tuple_of_sock(sk), true);
    if MUTED.get_ptr(&key).is_none() {
        let _ = MUTED.insert(&key, &1, 0);
    }
}

/// Should `conn` be recorded? Checked against `MUTED` at its first record
/// and remembered: an agent's first read or write on its end comes before
/// the other end sees any byte of it.
#[inline(always)]
fn unmuted(conn: *mut ConnInfo) -> bool {
    let mute = unsafe { (*conn).mute };
    if mute != MUTE_UNCHECKED {
        return mute == MUTE_NO;
    }
    let key = MuteKey::of(unsafe { &(*conn).tuple }, false);
    let mute = if MUTED.get_ptr(&key).is_some() {
        MUTE_YES
    } else {
        MUTE_NO
    };
    unsafe { (*conn).mute = mute };
    mute == MUTE_NO
}

/// Is this process traced? Agents never are. Cheap for the common default
/// (no filter): a compare and an array load.
#[inline(always)]
fn selected(tgid: u32) -> bool {
    !is_agent(tgid) && filter_selected(tgid)
}

/// Does the user's selection (`--pid`, `--comm`) take `tgid`?
#[inline(always)]
fn filter_selected(tgid: u32) -> bool {
    let filter = cfg!(filter);
    if filter & (FILTER_PID | FILTER_COMM) == 0 {
        return true;
    }
    if filter & FILTER_PID != 0 && unsafe { FILTER_PIDS.get(&tgid) }.is_some() {
        return true;
    }
    if filter & FILTER_COMM != 0 {
        let comm = process_comm();
        if unsafe { FILTER_COMMS.get(&comm) }.is_some() {
            return true;
        }
    }
    false
}

/// `struct file *` at `fd` in the current task's fd table.
#[inline(always)]
fn file_of_fd(fd: i32) -> Option<u64> {
    if fd < 0 {
        return None;
    }
    // Direct loads through the BTF-typed task pointer: the verifier knows the
    // types, and the offsets, read from frozen `.rodata`, are constants to it.
    // A faulting load reads 0 rather than failing, like a probe read would.
    let task = unsafe { generated::bpf_get_current_task_btf() } as *const u8;
    let (o_files, o_fdt) = (cfg!(offsets.task_files), cfg!(offsets.files_fdt));
    let (o_max, o_fd) = (cfg!(offsets.fdtable_max_fds), cfg!(offsets.fdtable_fd));
    let files = unsafe { load::<u64>(task, o_files) } as *const u8;
    if files.is_null() {
        return None;
    }
    let fdt = unsafe { load::<u64>(files, o_fdt) } as *const u8;
    if fdt.is_null() {
        return None;
    }
    let max_fds = unsafe { load::<u32>(fdt, o_max) };
    if fd as u32 >= max_fds {
        return None;
    }
    let fd_array = unsafe { load::<u64>(fdt, o_fd) };
    if fd_array == 0 {
        return None;
    }
    // The array of file pointers is untyped memory to the verifier.
    read_ptr(fd_array + 8 * fd as u64)
}

/// `struct sock *` of `file` when it is a TCP socket over IPv4/IPv6; `None`
/// for anything else (files, pipes, unix and UDP sockets).
#[inline(always)]
fn tcp_sock_of_file(file: u64) -> Option<u64> {
    let inode = read_ptr(file + cfg!(offsets.file_inode) as u64)?;
    let mode = read_kernel::<u16>(inode + cfg!(offsets.inode_mode) as u64)?;
    if mode & S_IFMT != S_IFSOCK {
        return None;
    }
    let socket = read_ptr(file + cfg!(offsets.file_private_data) as u64)?;
    if read_kernel::<u16>(socket + cfg!(offsets.socket_type) as u64)? != SOCK_STREAM {
        return None;
    }
    let sk = read_ptr(socket + cfg!(offsets.socket_sk) as u64)?;
    let family = read_kernel::<u16>(sk + cfg!(offsets.skc_family) as u64)?;
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    if read_kernel::<u16>(sk + cfg!(offsets.sock_protocol) as u64)? != IPPROTO_TCP {
        return None;
    }
    Some(sk)
}

#[inline(always)]
fn fd_key(tgid: u32, fd: i32) -> u64 {
    ((tgid as u64) << 32) | fd as u32 as u64
}

/// `struct sock *` behind `fd` of the current task (thread group `tgid`)
/// when it is a TCP socket, through the `SOCKS` cache.
#[inline(always)]
fn tcp_sock_of_fd(tgid: u32, fd: i32) -> Option<u64> {
    let file = file_of_fd(fd)?;
    let key = fd_key(tgid, fd);
    let sock = match unsafe { SOCKS.get(&key) } {
        Some(c) if c.file == file => c.sock,
        _ => {
            let sock = tcp_sock_of_file(file).unwrap_or(0);
            let _ = SOCKS.insert(&key, &FdSock { file, sock }, 0);
            sock
        }
    };
    if sock == 0 {
        None
    } else {
        Some(sock)
    }
}

/// 4-tuple read from a live `struct sock` (for sockets older than the agent).
#[inline(always)]
fn tuple_of_sock(sk: u64) -> ConnTuple {
    let mut t = ConnTuple::default();
    t.family = read_kernel::<u16>(sk + cfg!(offsets.skc_family) as u64).unwrap_or(0);
    t.local_port = read_kernel::<u16>(sk + cfg!(offsets.skc_num) as u64).unwrap_or(0);
    t.remote_port =
        u16::from_be(read_kernel::<u16>(sk + cfg!(offsets.skc_dport) as u64).unwrap_or(0));
    if t.family == AF_INET {
        let l = read_kernel::<[u8; 4]>(sk + cfg!(offsets.skc_rcv_saddr) as u64).unwrap_or([0; 4]);
        let r = read_kernel::<[u8; 4]>(sk + cfg!(offsets.skc_daddr) as u64).unwrap_or([0; 4]);
        t.local_addr[..4].copy_from_slice(&l);
        t.remote_addr[..4].copy_from_slice(&r);
    } else {
        t.local_addr =
            read_kernel::<[u8; 16]>(sk + cfg!(offsets.skc_v6_rcv_saddr) as u64).unwrap_or([0; 16]);
        t.remote_addr =
            read_kernel::<[u8; 16]>(sk + cfg!(offsets.skc_v6_daddr) as u64).unwrap_or([0; 16]);
    }
    t
}

#[inline(always)]
fn port_selected(sk: u64) -> bool {
    if cfg!(filter) & FILTER_PORT == 0 {
        return true;
    }
    let (local, remote) = match unsafe { CONNS.get(&sk) } {
        Some(c) => (c.tuple.local_port, c.tuple.remote_port),
        None => {
            let t = tuple_of_sock(sk);
            (t.local_port, t.remote_port)
        }
    };
    unsafe { FILTER_PORTS.get(&local).is_some() || FILTER_PORTS.get(&remote).is_some() }
}

/// Sequences of `sk` now, just past the last data byte the app queued to
/// send and the last it read: `tcp_sock.write_seq` and `copied_seq` without
/// the FINs, which take a sequence number each. Ours is in `write_seq` once
/// the app shut down sending (`fin_sent`); the peer's is in `copied_seq` once
/// a read ate it, which may be the read that returned the last data: a FIN
/// came (`SOCK_DONE`, so `rcv_nxt` is just past it) and all is read.
#[inline(always)]
fn stream_seqs(sk: u64, fin_sent: bool) -> Option<(u32, u32)> {
    let write = read_kernel::<u32>(sk + cfg!(offsets.tcp_write_seq) as u64)?;
    let mut copied = read_kernel::<u32>(sk + cfg!(offsets.tcp_copied_seq) as u64)?;
    let sk_flags = read_kernel::<u64>(sk + cfg!(offsets.skc_flags) as u64)?;
    if sk_flags & SOCK_DONE != 0
        && read_kernel::<u32>(sk + cfg!(offsets.tcp_rcv_nxt) as u64)? == copied
    {
        copied = copied.wrapping_sub(1);
    }
    Some((write.wrapping_sub(fin_sent as u32), copied))
}

/// The connection record for `sk`, made now (role unknown) if the socket was
/// established before the agent started. A record made here is made by the
/// exit of a call that moved `ret` bytes in `direction`: that call's first
/// byte is offset 0 of its direction, the other direction starts where it is.
#[inline(always)]
fn conn_of(sk: u64, direction: u8, ret: u64) -> Option<*mut ConnInfo> {
    if let Some(c) = CONNS.get_ptr_mut(&sk) {
        return Some(c);
    }
    let (mut flags, mut egress_base, mut ingress_base) = (FLAG_LATE_CONN, 0, 0);
    if let Some((write, copied)) = stream_seqs(sk, false) {
        // Sequence numbers wrap mod 2^32, so do the bases.
        (egress_base, ingress_base) = if direction == DIR_EGRESS {
            (write.wrapping_sub(ret as u32), copied)
        } else {
            (write, copied.wrapping_sub(ret as u32))
        };
        flags |= FLAG_HAS_POS;
    }
    let info = ConnInfo {
        tuple: tuple_of_sock(sk),
        start_ns: unsafe { bpf_ktime_get_ns() },
        seq: 0,
        egress_base,
        ingress_base,
        role: ROLE_UNKNOWN,
        flags,
        mute: MUTE_UNCHECKED,
        _pad: 0,
        tgid: 0,
        comm: [0; COMM_LEN],
    };
    if CONNS.insert(&sk, &info, 0).is_err() {
        count(CNT_CONN_FULL);
        return None;
    }
    CONNS.get_ptr_mut(&sk)
}

// ------------------------------------------------------- entry and exit ----

/// The slot of `cpu` for calls in `direction`.
#[inline(always)]
fn slot(cpu: u32, direction: u8) -> Option<*mut SyscallArgs> {
    SLOTS.get_ptr_mut(2 * cpu + direction as u32)
}

/// Common syscall entry: selection, save the arguments in this CPU's slot.
/// Whether the fd is a TCP socket is checked at exit, and only for calls that
/// moved bytes.
#[inline(always)]
fn save_entry(fd: i32, buf: u64, count_arg: u64, syscall: u8, direction: u8) {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if fd < 0 {
        return;
    }
    if is_agent(tgid) {
        // At entry: before the peer can see a byte of this call.
        mute_peer_of(tgid, fd);
        return;
    }
    if !filter_selected(tgid) {
        return;
    }
    let Some(s) = slot(unsafe { bpf_get_smp_processor_id() }, direction) else {
        return;
    };
    unsafe {
        if (*s).pid_tgid != 0 {
            // A call that entered here has not returned here: it sleeps, or
            // returned on another CPU without finding its entry.
            spill(&*s);
        }
        *s = SyscallArgs {
            buf,
            count: count_arg,
            pid_tgid: id,
            ts_enter_ns: bpf_ktime_get_ns(),
            fd,
            syscall,
            direction,
            _pad: [0; 2],
        };
    }
}

/// Moves a slot's entry to `SPILL`, unless the thread's tombstone there is
/// newer (then the entry's call already returned and gave it up).
#[inline(always)]
fn spill(entry: &SyscallArgs) {
    if let Some(old) = unsafe { SPILL.get(&entry.pid_tgid) } {
        if old.syscall == 0 && old.ts_enter_ns >= entry.ts_enter_ns {
            return;
        }
    }
    let _ = SPILL.insert(&entry.pid_tgid, entry, 0);
}

/// Takes thread `id`'s entry from the slot of `cpu` for `direction` when it
/// is there (for `syscall`, or any syscall when `syscall` is 0), freeing it.
#[inline(always)]
fn take_slot(cpu: u32, direction: u8, id: u64, syscall: u8) -> Option<SyscallArgs> {
    let s = slot(cpu, direction)?;
    unsafe {
        if (*s).pid_tgid != id || (syscall != 0 && (*s).syscall != syscall) {
            return None;
        }
        let entry = *s;
        (*s).pid_tgid = 0;
        Some(entry)
    }
}

/// Takes the entry of thread `id`'s `syscall` at its exit: from this CPU's
/// slot, else another CPU's (the thread moved while it slept), else `SPILL`.
#[inline(always)]
fn take_entry(id: u64, syscall: u8, direction: u8) -> Option<SyscallArgs> {
    let cpu = unsafe { bpf_get_smp_processor_id() };
    if let Some(entry) = take_slot(cpu, direction, id, syscall) {
        return Some(entry);
    }
    let cpus = cfg!(nr_cpus);
    for c in 0..MAX_CPUS {
        if c >= cpus {
            break;
        }
        if let Some(entry) = take_slot(c, direction, id, syscall) {
            return Some(entry);
        }
    }
    if let Some(e) = unsafe { SPILL.get(&id) } {
        let entry = *e;
        if entry.syscall == syscall {
            let _ = SPILL.remove(&id);
            return Some(entry);
        }
    }
    count(CNT_NO_ENTRY);
    let tombstone = SyscallArgs {
        pid_tgid: id,
        ts_enter_ns: unsafe { bpf_ktime_get_ns() },
        ..SyscallArgs::default()
    };
    let _ = SPILL.insert(&id, &tombstone, 0);
    None
}

/// Copies `len` (<= MAX_CAPTURE) bytes of user memory to `dst`; false on fault.
#[inline(always)]
fn copy_user(dst: *mut u8, len: u64, src: u64) -> bool {
    // Verifier: `len` is bounded by the compare, the destination has room for
    // MAX_CAPTURE bytes past any offset below MAX_CAPTURE.
    let len = if len > MAX_CAPTURE as u64 {
        MAX_CAPTURE as u64
    } else {
        len
    };
    unsafe {
        generated::bpf_probe_read_user(dst as *mut c_void, len as u32, src as *const c_void) == 0
    }
}

/// State of the `bpf_loop` iovec walk (on the caller's stack).
#[repr(C)]
struct IovWalk {
    iov: u64,
    iovcnt: u64,
    total: u64,
    off: u64,
}

/// One iovec of the `bpf_loop` walk: copies it to the per-CPU scratch at
/// `off`. Returns 1 to stop (done, or a fault), 0 to go on.
#[inline(never)]
extern "C" fn iov_step(i: u64, ctx: *mut c_void) -> i64 {
    let w = unsafe { &mut *(ctx as *mut IovWalk) };
    if i >= w.iovcnt || w.off >= w.total {
        return 1;
    }
    let Ok(v) =
        (unsafe { aya_ebpf::helpers::bpf_probe_read_user((w.iov + 16 * i) as *const [u64; 2]) })
    else {
        count(CNT_READ_FAULT);
        return 1;
    };
    let off = w.off;
    let mut n = v[1];
    if n > w.total - off {
        n = w.total - off;
    }
    if n == 0 {
        return 0;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(unsafe { bpf_get_smp_processor_id() }) else {
        return 1;
    };
    // Verifier: the mask keeps off below MAX_CAPTURE and copy_user clamps n
    // to MAX_CAPTURE, within the 2 * MAX_CAPTURE payload area.
    let dst = unsafe { (*scratch).data.as_mut_ptr().add((off & CAP_MASK) as usize) };
    if !copy_user(dst, n, v[0]) {
        count(CNT_READ_FAULT);
        return 1;
    }
    w.off = off + n;
    0
}

/// Walks the iovecs, copying `total` bytes; returns the bytes copied. With
/// `bpf_loop` (verified once, whatever the count) up to MAX_IOVECS_LOOP of
/// them, else an unrolled loop of MAX_IOVECS.
#[inline(always)]
fn copy_iovecs(data: *mut u8, iov: u64, iovcnt: u64, total: u64) -> u64 {
    if cfg!(iov_loop) != 0 {
        let mut w = IovWalk {
            iov,
            iovcnt,
            total,
            off: 0,
        };
        let n = if iovcnt < MAX_IOVECS_LOOP as u64 {
            iovcnt
        } else {
            MAX_IOVECS_LOOP as u64
        };
        unsafe {
            generated::bpf_loop(
                n as u32,
                iov_step as *mut c_void,
                &mut w as *mut IovWalk as *mut c_void,
                0,
            )
        };
        return w.off;
    }
    let mut off: u64 = 0;
    for i in 0..MAX_IOVECS as u64 {
        if i >= iovcnt || off >= total {
            break;
        }
        // struct iovec { void *iov_base; size_t iov_len; }
        let Ok(v) =
            (unsafe { aya_ebpf::helpers::bpf_probe_read_user((iov + 16 * i) as *const [u64; 2]) })
        else {
            count(CNT_READ_FAULT);
            break;
        };
        let mut n = v[1];
        if n > total - off {
            n = total - off;
        }
        if n == 0 {
            continue;
        }
        // Verifier: off < total <= MAX_CAPTURE, so the mask keeps its value and
        // proves off + n < 2 * MAX_CAPTURE, the size of the payload area.
        let dst = unsafe { data.add((off & CAP_MASK) as usize) };
        if !copy_user(dst, n, v[0]) {
            count(CNT_READ_FAULT);
            break;
        }
        off += n;
    }
    off
}

/// Copies `len` payload bytes (or none, for sendfile) into the per-CPU scratch,
/// fills the header and outputs the record.
#[inline(always)]
///
/// `VECTORED` is a compile-time switch so that only the four vectored exits
/// carry the iovec loop: the verifier walks every iteration of it, which costs
/// about half a second of load time per program.
fn emit_data<const VECTORED: bool>(
    args: &SyscallArgs,
    sk: u64,
    ret: u64,
    pid_tgid: u64,
) -> Option<()> {
    let conn = conn_of(sk, args.direction, ret)?;
    if !unmuted(conn) {
        count(CNT_MUTED);
        return None;
    }
    let scratch = SCRATCH.get_ptr_mut(unsafe { bpf_get_smp_processor_id() })?;
    let mut cap = cfg!(capture_cap) as u64;
    if cap > MAX_CAPTURE as u64 {
        cap = MAX_CAPTURE as u64;
    }
    let want = if ret < cap { ret } else { cap };
    let data = unsafe { (*scratch).data.as_mut_ptr() };
    let captured = if args.syscall == SYS_SENDFILE {
        0
    } else if VECTORED {
        copy_iovecs(data, args.buf, args.count, want)
    } else if copy_user(data, want, args.buf) {
        want
    } else {
        count(CNT_READ_FAULT);
        0
    };
    let mut flags = unsafe { (*conn).flags };
    if captured < ret {
        flags |= FLAG_TRUNCATED;
        count(CNT_TRUNCATED);
    }
    let header = unsafe { &mut (*scratch).header };
    fill_from_conn(header, conn, sk, pid_tgid, args.fd);
    flags = fill_pos(header, conn, sk, args.direction, flags);
    unsafe { (*conn).seq += 1 };
    header.ts_enter_ns = args.ts_enter_ns;
    header.ts_exit_ns = unsafe { bpf_ktime_get_ns() };
    header.len = ret;
    header.captured = captured as u32;
    header.kind = KIND_DATA;
    header.direction = args.direction;
    header.syscall = args.syscall;
    header.flags = flags;
    output(scratch, captured)
}

/// Header fields that come from the connection record and the calling thread.
/// The process name is read once per connection and kept in the record.
#[inline(always)]
fn fill_from_conn(header: &mut EventHeader, conn: *mut ConnInfo, sk: u64, pid_tgid: u64, fd: i32) {
    unsafe {
        if (*conn).comm[0] == 0 {
            (*conn).comm = process_comm();
            (*conn).tgid = (pid_tgid >> 32) as u32;
        }
        header.comm = (*conn).comm;
        header.seq = (*conn).seq;
        header.conn_start_ns = (*conn).start_ns;
        header.role = (*conn).role;
        header.tuple = (*conn).tuple;
    }
    header.sock = sk;
    header.pid = (pid_tgid >> 32) as u32;
    header.tid = pid_tgid as u32;
    header.fd = fd;
}

/// Byte offsets of a record, read from the sock after the call, so that
/// userspace sees exactly which bytes no record carried (lost records, lost
/// syscall entries). Returns `flags` with `FLAG_HAS_POS` set only when the
/// bases and both reads are valid. Two threads sending (or reading) on one
/// socket at once may each read the other's bytes into their end offset;
/// a send or a read is serialised by the socket lock, but our read after it
/// is not.
#[inline(always)]
fn fill_pos(
    header: &mut EventHeader,
    conn: *mut ConnInfo,
    sk: u64,
    direction: u8,
    flags: u8,
) -> u8 {
    let flags = flags & !(FLAG_HAS_POS | FLAG_FIN_SENT);
    let (egress_base, ingress_base, conn_flags) =
        unsafe { ((*conn).egress_base, (*conn).ingress_base, (*conn).flags) };
    let seqs = if conn_flags & FLAG_HAS_POS != 0 {
        stream_seqs(sk, conn_flags & FLAG_FIN_SENT != 0)
    } else {
        None
    };
    let Some((write, copied)) = seqs else {
        header.pos_end = 0;
        header.peer_pos = 0;
        return flags;
    };
    let (egress, ingress) = (
        write.wrapping_sub(egress_base),
        copied.wrapping_sub(ingress_base),
    );
    (header.pos_end, header.peer_pos) = if direction == DIR_INGRESS {
        (ingress, egress)
    } else {
        (egress, ingress)
    };
    flags | FLAG_HAS_POS
}

#[inline(always)]
fn output(scratch: *mut Scratch, captured: u64) -> Option<()> {
    // Verifier: the mask bounds the record inside the scratch value.
    let size = EVENT_HEADER_SIZE + (captured & (2 * MAX_CAPTURE as u64 - 1)) as usize;
    let bytes = unsafe { core::slice::from_raw_parts(scratch as *const u8, size) };
    match EVENTS.output::<[u8]>(bytes, BPF_RB_NO_WAKEUP as u64) {
        Ok(()) => count(CNT_EVENTS),
        Err(_) => count(CNT_RINGBUF_FULL),
    }
    Some(())
}

/// Common syscall exit: take the saved arguments, emit when bytes moved on
/// a TCP socket.
#[inline(always)]
fn handle_exit<const VECTORED: bool>(ctx: &TracePointContext, syscall: u8, direction: u8) {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if !selected(tgid) {
        return;
    }
    let Some(args) = take_entry(id, syscall, direction) else {
        return;
    };
    let ret = record_u64(ctx, RET) as i64;
    if ret <= 0 {
        return;
    }
    let Some(sk) = tcp_sock_of_fd(tgid, args.fd) else {
        return;
    };
    if !port_selected(sk) {
        return;
    }
    let _ = emit_data::<VECTORED>(&args, sk, ret as u64, id);
}

// ------------------------------------------------------------- programs ----

// read(fd, buf, count) / write(fd, buf, count): plain buffers; most HTTP/1
// servers and clients (curl, nginx for small heads) use these.
#[tracepoint]
pub fn enter_read(ctx: TracePointContext) -> u32 {
    save_entry(
        arg(&ctx, 0) as i32,
        arg(&ctx, 1),
        arg(&ctx, 2),
        SYS_READ,
        DIR_INGRESS,
    );
    0
}
#[tracepoint]
pub fn exit_read(ctx: TracePointContext) -> u32 {
    handle_exit::<false>(&ctx, SYS_READ, DIR_INGRESS);
    0
}
#[tracepoint]
pub fn enter_write(ctx: TracePointContext) -> u32 {
    save_entry(
        arg(&ctx, 0) as i32,
        arg(&ctx, 1),
        arg(&ctx, 2),
        SYS_WRITE,
        DIR_EGRESS,
    );
    0
}
#[tracepoint]
pub fn exit_write(ctx: TracePointContext) -> u32 {
    handle_exit::<false>(&ctx, SYS_WRITE, DIR_EGRESS);
    0
}

// readv/writev(fd, iov, iovcnt): nginx writes response heads with writev.
#[tracepoint]
pub fn enter_readv(ctx: TracePointContext) -> u32 {
    save_entry(
        arg(&ctx, 0) as i32,
        arg(&ctx, 1),
        arg(&ctx, 2),
        SYS_READV,
        DIR_INGRESS,
    );
    0
}
#[tracepoint]
pub fn exit_readv(ctx: TracePointContext) -> u32 {
    handle_exit::<true>(&ctx, SYS_READV, DIR_INGRESS);
    0
}
#[tracepoint]
pub fn enter_writev(ctx: TracePointContext) -> u32 {
    save_entry(
        arg(&ctx, 0) as i32,
        arg(&ctx, 1),
        arg(&ctx, 2),
        SYS_WRITEV,
        DIR_EGRESS,
    );
    0
}
#[tracepoint]
pub fn exit_writev(ctx: TracePointContext) -> u32 {
    handle_exit::<true>(&ctx, SYS_WRITEV, DIR_EGRESS);
    0
}

// recvfrom/sendto(fd, buf, len, flags, addr, addrlen): send()/recv() in libc.
// MSG_PEEK reads are skipped: the same bytes come again in a real read.
#[tracepoint]
pub fn enter_recvfrom(ctx: TracePointContext) -> u32 {
    if arg(&ctx, 3) & MSG_PEEK == 0 {
        save_entry(
            arg(&ctx, 0) as i32,
            arg(&ctx, 1),
            arg(&ctx, 2),
            SYS_RECVFROM,
            DIR_INGRESS,
        );
    }
    0
}
#[tracepoint]
pub fn exit_recvfrom(ctx: TracePointContext) -> u32 {
    handle_exit::<false>(&ctx, SYS_RECVFROM, DIR_INGRESS);
    0
}
#[tracepoint]
pub fn enter_sendto(ctx: TracePointContext) -> u32 {
    save_entry(
        arg(&ctx, 0) as i32,
        arg(&ctx, 1),
        arg(&ctx, 2),
        SYS_SENDTO,
        DIR_EGRESS,
    );
    0
}
#[tracepoint]
pub fn exit_sendto(ctx: TracePointContext) -> u32 {
    handle_exit::<false>(&ctx, SYS_SENDTO, DIR_EGRESS);
    0
}

/// Reads `msg_iov` and `msg_iovlen` of a user `struct msghdr` at entry, while
/// the pointer is known valid.
#[inline(always)]
fn msg_iov(msg: u64) -> (u64, u64) {
    // struct user_msghdr { name; namelen (padded); iov @16; iovlen @24; ... }
    match unsafe { aya_ebpf::helpers::bpf_probe_read_user((msg + 16) as *const [u64; 2]) } {
        Ok(v) => (v[0], v[1]),
        Err(_) => (0, 0),
    }
}

// recvmsg/sendmsg(fd, msg, flags): Python's socket.sendmsg, Go, and many
// async runtimes.
#[tracepoint]
pub fn enter_recvmsg(ctx: TracePointContext) -> u32 {
    if arg(&ctx, 2) & MSG_PEEK == 0 {
        let (iov, n) = msg_iov(arg(&ctx, 1));
        save_entry(arg(&ctx, 0) as i32, iov, n, SYS_RECVMSG, DIR_INGRESS);
    }
    0
}
#[tracepoint]
pub fn exit_recvmsg(ctx: TracePointContext) -> u32 {
    handle_exit::<true>(&ctx, SYS_RECVMSG, DIR_INGRESS);
    0
}
#[tracepoint]
pub fn enter_sendmsg(ctx: TracePointContext) -> u32 {
    let (iov, n) = msg_iov(arg(&ctx, 1));
    save_entry(arg(&ctx, 0) as i32, iov, n, SYS_SENDMSG, DIR_EGRESS);
    0
}
#[tracepoint]
pub fn exit_sendmsg(ctx: TracePointContext) -> u32 {
    handle_exit::<true>(&ctx, SYS_SENDMSG, DIR_EGRESS);
    0
}

// sendfile64(out_fd, in_fd, offset, count): nginx and others send file bodies
// without a user buffer. No payload is captured, but the byte count keeps the
// stream's accounting exact so decoders can skip the body by framing.
#[tracepoint]
pub fn enter_sendfile(ctx: TracePointContext) -> u32 {
    save_entry(
        arg(&ctx, 0) as i32,
        0,
        arg(&ctx, 3),
        SYS_SENDFILE,
        DIR_EGRESS,
    );
    0
}
#[tracepoint]
pub fn exit_sendfile(ctx: TracePointContext) -> u32 {
    handle_exit::<false>(&ctx, SYS_SENDFILE, DIR_EGRESS);
    0
}

// close(fd): ends the connection record while the fd still resolves (entry).
#[tracepoint]
pub fn enter_close(ctx: TracePointContext) -> u32 {
    let _ = try_enter_close(&ctx);
    0
}

#[inline(always)]
fn try_enter_close(ctx: &TracePointContext) -> Option<()> {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    let fd = arg(ctx, 0) as i32;
    let key = fd_key(tgid, fd);
    if is_agent(tgid) {
        // Its fds are in SOCKS too (see `mute_peer_of`). A kept entry would
        // name the old socket when a new one gets the fd and its `struct
        // file` the freed one's memory, and the new one's peer would not be
        // muted.
        let _ = SOCKS.remove(&key);
        return None;
    }
    if !filter_selected(tgid) {
        return None;
    }
    // Only fds a traced read or write met are in SOCKS: other closes (files
    // opened and closed per request) cost one lookup.
    let cached = unsafe { SOCKS.get(&key) }.copied()?;
    let _ = SOCKS.remove(&key);
    if cached.sock == 0 || file_of_fd(fd) != Some(cached.file) {
        return None;
    }
    end_conn(cached.sock, id, fd, SYS_CLOSE)
}

/// Ends `sk`'s connection record: a close record (unless the connection was
/// muted or never gave a record), then the record goes.
#[inline(always)]
fn end_conn(sk: u64, pid_tgid: u64, fd: i32, syscall: u8) -> Option<()> {
    let conn = CONNS.get_ptr_mut(&sk)?;
    if unsafe { (*conn).mute } != MUTE_NO {
        // Muted, or no record was ever made for it: nothing to close.
        let _ = CONNS.remove(&sk);
        return None;
    }
    let scratch = SCRATCH.get_ptr_mut(unsafe { bpf_get_smp_processor_id() })?;
    let now = unsafe { bpf_ktime_get_ns() };
    let header: &mut EventHeader = unsafe { &mut (*scratch).header };
    fill_from_conn(header, conn, sk, pid_tgid, fd);
    // A close is an egress record of length 0: `pos_end` is the end of the
    // egress stream, `peer_pos` the end of what the app read.
    header.flags = fill_pos(header, conn, sk, DIR_EGRESS, unsafe { (*conn).flags });
    header.ts_enter_ns = now;
    header.ts_exit_ns = now;
    header.len = 0;
    header.captured = 0;
    header.kind = KIND_CLOSE;
    header.direction = DIR_EGRESS;
    header.syscall = syscall;
    let _ = CONNS.remove(&sk);
    output(scratch, 0)
}

// sched:sched_process_exit: a thread killed inside a captured syscall never
// reaches the exit tracepoint; free its saved arguments here.
#[tracepoint]
pub fn task_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let _ = SPILL.remove(&id);
    let cpus = cfg!(nr_cpus);
    for c in 0..MAX_CPUS {
        if c >= cpus {
            break;
        }
        for direction in [DIR_EGRESS, DIR_INGRESS] {
            let _ = take_slot(c, direction, id, 0);
        }
    }
    0
}

// sock:inet_sock_set_state (kernel >= 4.16), on the move to ESTABLISHED:
// records role, 4-tuple and stream bases. Runs in softirq for most
// connections (no process to select), so it records every TCP connection;
// the LRU map bounds that. On the move to FIN_WAIT1 or LAST_ACK (the app shut
// down sending: a FIN is queued next) it marks the record, if any, so the FIN
// is not taken for data. On the move to CLOSE it ends a record no close()
// ended.
#[tracepoint]
pub fn sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_sock_set_state(&ctx);
    0
}

#[inline(always)]
fn try_sock_set_state(ctx: &TracePointContext) -> Option<()> {
    // Offsets from events/sock/inet_sock_set_state/format.
    let newstate = unsafe { ctx.read_at::<i32>(20) }.ok()?;
    if newstate != TCP_ESTABLISHED
        && newstate != TCP_FIN_WAIT1
        && newstate != TCP_LAST_ACK
        && newstate != TCP_CLOSE
    {
        return None;
    }
    if unsafe { ctx.read_at::<u16>(30) }.ok()? != IPPROTO_TCP {
        return None;
    }
    if newstate == TCP_CLOSE {
        // Every TCP socket gets here once it is done (after the FINs or a
        // reset). A record still open means no traced close() ended it: its
        // process died with it open (exit, SIGKILL: the kernel closes the
        // fds without a syscall), or handed the fd to a process we do not
        // trace. Without this the connection's state would wait for the LRU
        // here and the idle timeout in userspace, and its in-flight requests
        // would vanish uncounted. The task is arbitrary here (often softirq):
        // the record names the connection's owner, no thread and no fd.
        let sk = unsafe { ctx.read_at::<u64>(8) }.ok()?;
        // One lookup per closed TCP socket on the host; most find nothing
        // (close() removed the record).
        CONNS.get_ptr_mut(&sk)?;
        // Only orphans: a reset (or the FINs after a shutdown()) also closes
        // a socket whose owner still holds the fd and may still read what is
        // queued or be inside a call on it; its close() ends the record,
        // after its last data. A socket its process died with has no fd left.
        let sk_flags = read_kernel::<u64>(sk + cfg!(offsets.skc_flags) as u64)?;
        if sk_flags & SOCK_DEAD == 0 {
            return None;
        }
        let owner = unsafe { (*CONNS.get_ptr_mut(&sk)?).tgid };
        count(CNT_SOCK_DIED);
        return end_conn(sk, u64::from(owner) << 32, -1, SYS_TCP_CLOSE);
    }
    if newstate != TCP_ESTABLISHED {
        let sk = unsafe { ctx.read_at::<u64>(8) }.ok()?;
        // Usually no record: close() sends the FIN after its record went.
        if let Some(c) = CONNS.get_ptr_mut(&sk) {
            unsafe { (*c).flags |= FLAG_FIN_SENT };
        }
        return None;
    }
    let role = match unsafe { ctx.read_at::<i32>(16) }.ok()? {
        TCP_SYN_SENT => ROLE_CLIENT,
        TCP_SYN_RECV => ROLE_SERVER,
        _ => return None,
    };
    let sk = unsafe { ctx.read_at::<u64>(8) }.ok()?;
    let mut tuple = ConnTuple {
        family: unsafe { ctx.read_at::<u16>(28) }.ok()?,
        local_port: unsafe { ctx.read_at::<u16>(24) }.ok()?,
        remote_port: unsafe { ctx.read_at::<u16>(26) }.ok()?,
        ..ConnTuple::default()
    };
    if tuple.family == AF_INET {
        tuple.local_addr[..4].copy_from_slice(&unsafe { ctx.read_at::<[u8; 4]>(32) }.ok()?);
        tuple.remote_addr[..4].copy_from_slice(&unsafe { ctx.read_at::<[u8; 4]>(36) }.ok()?);
    } else {
        tuple.local_addr = unsafe { ctx.read_at::<[u8; 16]>(40) }.ok()?;
        tuple.remote_addr = unsafe { ctx.read_at::<[u8; 16]>(56) }.ok()?;
    }
    // At ESTABLISHED both sequences point at the first data byte of their
    // direction, past the SYNs: the client's copied_seq is set from rcv_nxt
    // before its move out of SYN_SENT, the server child's at its creation
    // in SYN_RECV (checked by the integration tests: first chunks at 0).
    let (flags, egress_base, ingress_base) = match stream_seqs(sk, false) {
        Some((write, copied)) => (FLAG_HAS_POS, write, copied),
        None => (0, 0, 0),
    };
    let info = ConnInfo {
        tuple,
        start_ns: unsafe { bpf_ktime_get_ns() },
        seq: 0,
        egress_base,
        ingress_base,
        role,
        flags,
        mute: MUTE_UNCHECKED,
        _pad: 0,
        tgid: 0,
        comm: [0; COMM_LEN],
    };
    // A new connection may reuse a freed sock's memory: overwrite.
    if CONNS.insert(&sk, &info, 0).is_err() {
        count(CNT_CONN_FULL);
    }
    Some(())
}
