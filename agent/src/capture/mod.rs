//! Capture stage: loads the kernel programs, attaches them, drains the ring
//! buffer on a timer and turns records into ordered [`Chunk`]s.

pub mod agents;
pub mod btf;
pub mod event;
pub mod preflight;
pub mod reorder;
pub mod roles;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{SyncSender, TrySendError},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use agent_common::{
    Config, COMM_LEN, COUNTER_NAMES, FILTER_COMM, FILTER_PID, FILTER_PORT, GLOBAL_CONFIG,
    MAP_COUNTERS, MAP_EVENTS, MAP_FILTER_COMMS, MAP_FILTER_PIDS, MAP_FILTER_PORTS, MAP_PEER_AGENTS,
    MAP_SCRATCH, MAP_SLOTS, MAX_CAPTURE, MAX_CPUS, NUM_COUNTERS, PROGRAMS,
};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
pub use event::{Chunk, ChunkKind, Comm, ConnId, ConnMap, Direction, Role};

/// The kernel object, built by `cargo xtask build` and embedded at compile time.
#[cfg(embedded_ebpf)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("AGENT_EBPF_OBJECT"));
#[cfg(not(embedded_ebpf))]
static OBJECT: &[u8] = &[];

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("this agent was built without its eBPF object; build it with `cargo xtask build`")]
    NoObject,
    #[error("capture cap {0} is out of range 1..={MAX_CAPTURE}")]
    Cap(u32),
    #[error("{0} possible CPUs: the capture supports 1..={MAX_CPUS}")]
    Cpus(u32),
    #[error("process name {0:?} is longer than {max} bytes", max = COMM_LEN - 1)]
    Comm(String),
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("eBPF program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF program {0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
    #[error(transparent)]
    Agents(#[from] agents::AgentsError),
}

/// What to capture and how.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// Only these processes (tgids); with `comms`, either matches.
    pub pids: Vec<u32>,
    /// Only processes with these names.
    pub comms: Vec<String>,
    /// Only connections with one of these local or remote ports.
    pub ports: Vec<u16>,
    /// Payload bytes copied per syscall.
    pub capture_bytes: u32,
    /// Ring buffer size in bytes (rounded up to a power of two of pages).
    pub ringbuf_bytes: u32,
    /// Time between ring-buffer drains.
    pub drain_interval: Duration,
    /// Start even when another agent runs on this host (neither traces the
    /// other).
    pub allow_other_agents: bool,
    /// Where running agents register (`agents::REGISTRY_DIR`).
    pub registry_dir: std::path::PathBuf,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            pids: vec![],
            comms: vec![],
            ports: vec![],
            capture_bytes: agent_common::DEFAULT_CAPTURE,
            ringbuf_bytes: 16 << 20,
            drain_interval: Duration::from_millis(10),
            allow_other_agents: false,
            registry_dir: agents::REGISTRY_DIR.into(),
        }
    }
}

impl CaptureConfig {
    /// The `.rodata` configuration the programs are verified with.
    pub fn kernel_config(
        &self,
        agent_tgid: u32,
        nr_cpus: u32,
        offsets: agent_common::KernelOffsets,
    ) -> Result<Config, CaptureError> {
        if nr_cpus == 0 || nr_cpus > MAX_CPUS {
            return Err(CaptureError::Cpus(nr_cpus));
        }
        if self.capture_bytes == 0 || self.capture_bytes as usize > MAX_CAPTURE {
            return Err(CaptureError::Cap(self.capture_bytes));
        }
        let mut filter = 0;
        if !self.pids.is_empty() {
            filter |= FILTER_PID;
        }
        if !self.comms.is_empty() {
            filter |= FILTER_COMM;
        }
        if !self.ports.is_empty() {
            filter |= FILTER_PORT;
        }
        Ok(Config {
            agent_tgid,
            filter,
            capture_cap: self.capture_bytes,
            nr_cpus,
            offsets,
            iov_loop: u32::from(kernel_at_least(5, 17)),
            _pad: 0,
        })
    }

    /// Process names as the kernel stores them: NUL padded, at most 15 bytes.
    pub fn comm_keys(&self) -> Result<Vec<[u8; COMM_LEN]>, CaptureError> {
        self.comms
            .iter()
            .map(|c| {
                if c.is_empty() || c.len() >= COMM_LEN {
                    return Err(CaptureError::Comm(c.clone()));
                }
                let mut k = [0u8; COMM_LEN];
                k[..c.len()].copy_from_slice(c.as_bytes());
                Ok(k)
            })
            .collect()
    }
}

/// Kernel-side counters summed over CPUs, in `COUNTER_NAMES` order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCounters(pub [u64; NUM_COUNTERS as usize]);

impl std::fmt::Display for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, v)) in COUNTER_NAMES.iter().zip(self.0).enumerate() {
            write!(f, "{}{name}={v}", if i == 0 { "" } else { " " })?;
        }
        Ok(())
    }
}

/// Userspace-side counters of the capture stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserCounters {
    pub records: u64,
    pub bytes: u64,
    pub decode_errors: u64,
    pub seq_gaps: u64,
    /// Holes in byte streams that chunk positions reveal, and their bytes.
    pub stream_gaps: u64,
    pub stream_gap_bytes: u64,
    pub late: u64,
    pub reordered: u64,
    /// Batches dropped because the next stage's queue was full.
    pub queue_full_chunks: u64,
}

impl std::fmt::Display for UserCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "records={} bytes={} decode_errors={} seq_gaps={} stream_gaps={} stream_gap_bytes={} late={} reordered={} queue_full_chunks={}",
            self.records,
            self.bytes,
            self.decode_errors,
            self.seq_gaps,
            self.stream_gaps,
            self.stream_gap_bytes,
            self.late,
            self.reordered,
            self.queue_full_chunks
        )
    }
}

/// Loaded and attached programs. Dropping it detaches everything.
pub struct Capture {
    _registration: agents::Registration,
    _ebpf: Ebpf,
    ring: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
    pub records: Records,
}

/// Size of each payload buffer chunks share.
const ARENA_BYTES: usize = 1 << 20;

/// Userspace half of the capture stage, apart from the ring buffer: kernel
/// records in, ordered chunks with their roles out. Also fed by the replay
/// benchmark, so it measures the code the agent runs.
#[derive(Default)]
pub struct Records {
    roles: roles::RoleResolver,
    reorder: reorder::Reorder,
    /// Payload bytes of chunks, copied out of the ring buffer.
    arena: bytes::BytesMut,
    pub user: UserCounters,
}

impl Records {
    /// Starts a drain pass at `now`.
    pub fn begin_pass(&mut self, now: Instant) {
        self.roles.sweep(now);
    }

    /// Decodes one kernel record; appends the chunks it releases to `out`.
    pub fn record(&mut self, item: &[u8], now: Instant, out: &mut Vec<Chunk>) {
        self.user.records += 1;
        // Room for one more record without reallocating per record: the
        // buffer is shared by chunks and freed with the last of them. Once
        // they are all gone it is taken back as it is: a fresh 1 MiB buffer
        // per pass cost page faults and page clearing (an eighth of the
        // agent's CPU under load).
        if self.arena.capacity() < MAX_CAPTURE && !self.arena.try_reclaim(ARENA_BYTES) {
            self.arena = bytes::BytesMut::with_capacity(ARENA_BYTES);
        }
        match event::decode(item, &mut self.arena) {
            Ok(mut c) => {
                self.user.bytes += c.payload.len() as u64;
                self.roles.resolve(&mut c, now);
                self.reorder.push(c, out);
            }
            Err(e) => {
                self.user.decode_errors += 1;
                tracing::trace!(error = %e, "undecodable record");
            }
        }
    }

    /// Ends a drain pass: releases what waited for this pass's records.
    pub fn end_pass(&mut self, out: &mut Vec<Chunk>) {
        self.reorder.end_pass(out);
        let s = self.reorder.stats;
        (self.user.seq_gaps, self.user.late, self.user.reordered) = (s.gaps, s.late, s.reordered);
        (self.user.stream_gaps, self.user.stream_gap_bytes) = (s.stream_gaps, s.stream_gap_bytes);
    }
}

impl Capture {
    /// Loads, configures and attaches the programs.
    pub fn start(cfg: &CaptureConfig) -> Result<Self, CaptureError> {
        if OBJECT.is_empty() {
            return Err(CaptureError::NoObject);
        }
        let offsets = btf::Btf::from_file(btf::VMLINUX_BTF)?.kernel_offsets()?;
        let cpus = aya::util::nr_cpus().map_or(256, |n| n as u32);
        let kcfg = cfg.kernel_config(std::process::id(), cpus, offsets)?;
        let comms = cfg.comm_keys()?;
        let registry = agents::Registry::lock(&cfg.registry_dir)?;
        let peers = registry.peers()?;
        if let (Some(p), false) = (peers.first(), cfg.allow_other_agents) {
            return Err(agents::AgentsError::Running(p.tgid).into());
        }
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_CONFIG, &kcfg, true)
            .map_max_entries(MAP_EVENTS, cfg.ringbuf_bytes.next_power_of_two().max(4096))
            .map_max_entries(MAP_SCRATCH, cpus)
            .map_max_entries(MAP_SLOTS, 2 * cpus)
            .load(OBJECT)?;

        fn map<'a>(
            ebpf: &'a mut Ebpf,
            name: &'static str,
        ) -> Result<&'a mut aya::maps::Map, CaptureError> {
            ebpf.map_mut(name).ok_or(CaptureError::MissingMap(name))
        }
        let mut pids: BpfHashMap<_, u32, u8> =
            BpfHashMap::try_from(map(&mut ebpf, MAP_FILTER_PIDS)?)
                .map_err(|e| CaptureError::Map(MAP_FILTER_PIDS, e))?;
        for p in &cfg.pids {
            pids.insert(p, 1, 0)
                .map_err(|e| CaptureError::Map(MAP_FILTER_PIDS, e))?;
        }
        let mut comm_map: BpfHashMap<_, [u8; COMM_LEN], u8> =
            BpfHashMap::try_from(map(&mut ebpf, MAP_FILTER_COMMS)?)
                .map_err(|e| CaptureError::Map(MAP_FILTER_COMMS, e))?;
        for c in &comms {
            comm_map
                .insert(c, 1, 0)
                .map_err(|e| CaptureError::Map(MAP_FILTER_COMMS, e))?;
        }
        let mut ports: BpfHashMap<_, u16, u8> =
            BpfHashMap::try_from(map(&mut ebpf, MAP_FILTER_PORTS)?)
                .map_err(|e| CaptureError::Map(MAP_FILTER_PORTS, e))?;
        for p in &cfg.ports {
            ports
                .insert(p, 1, 0)
                .map_err(|e| CaptureError::Map(MAP_FILTER_PORTS, e))?;
        }

        // Before any program is attached: no agent's socket is ever traced.
        let peer_map = map(&mut ebpf, MAP_PEER_AGENTS)?;
        let peer_map_id = match &*peer_map {
            aya::maps::Map::Array(data) => data
                .info()
                .map_err(|e| CaptureError::Map(MAP_PEER_AGENTS, e))?
                .id(),
            _ => return Err(CaptureError::MissingMap(MAP_PEER_AGENTS)),
        };
        let mut peer_array: aya::maps::Array<_, u32> = aya::maps::Array::try_from(peer_map)
            .map_err(|e| CaptureError::Map(MAP_PEER_AGENTS, e))?;
        let registration = registry.register(&peers, &mut peer_array, peer_map_id)?;
        if !peers.is_empty() {
            tracing::info!(
                others = peers.len(),
                "other agents on this host; none traces another"
            );
        }

        for (name, category, tp) in PROGRAMS {
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or(CaptureError::MissingProgram(name))?
                .try_into()
                .map_err(|e| CaptureError::Program(name, e))?;
            prog.load().map_err(|e| CaptureError::Program(name, e))?;
            prog.attach(category, tp)
                .map_err(|e| CaptureError::Program(name, e))?;
        }

        let ring = RingBuf::try_from(
            ebpf.take_map(MAP_EVENTS)
                .ok_or(CaptureError::MissingMap(MAP_EVENTS))?,
        )
        .map_err(|e| CaptureError::Map(MAP_EVENTS, e))?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(MAP_COUNTERS)
                .ok_or(CaptureError::MissingMap(MAP_COUNTERS))?,
        )
        .map_err(|e| CaptureError::Map(MAP_COUNTERS, e))?;
        tracing::info!(
            programs = PROGRAMS.len(),
            cap = cfg.capture_bytes,
            "capture attached"
        );
        Ok(Self {
            _registration: registration,
            _ebpf: ebpf,
            ring,
            counters,
            records: Records::default(),
        })
    }

    /// Reads everything in the ring buffer now; appends ordered chunks to `out`.
    pub fn drain(&mut self, out: &mut Vec<Chunk>) {
        let now = Instant::now();
        self.records.begin_pass(now);
        while let Some(item) = self.ring.next() {
            self.records.record(&item, now, out);
        }
        self.records.end_pass(out);
    }

    /// Kernel counters summed over CPUs.
    pub fn kernel_counters(&self) -> KernelCounters {
        let mut k = KernelCounters::default();
        for (i, slot) in k.0.iter_mut().enumerate() {
            if let Ok(per_cpu) = self.counters.get(&(i as u32), 0) {
                *slot = per_cpu.iter().sum();
            }
        }
        k
    }
}

/// Runs the drain loop on the current thread until `stop`, sending batches
/// into `tx` (dropping and counting when the queue is full). A last drain
/// after `stop` flushes what the kernel wrote before detaching.
fn run_drain_loop(
    mut cap: Capture,
    interval: Duration,
    tx: SyncSender<Vec<Chunk>>,
    stop: Arc<AtomicBool>,
    stats_every: Option<Duration>,
) -> (KernelCounters, UserCounters) {
    let mut last_stats = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let mut batch = Vec::new();
        cap.drain(&mut batch);
        if !batch.is_empty() {
            let n = batch.len() as u64;
            match tx.try_send(batch) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => cap.records.user.queue_full_chunks += n,
                Err(TrySendError::Disconnected(_)) => break,
            }
        }
        if let Some(every) = stats_every {
            if last_stats.elapsed() >= every {
                tracing::info!(kernel = %cap.kernel_counters(), user = %cap.records.user, "capture counters");
                last_stats = Instant::now();
            }
        }
        if stopping {
            break;
        }
        thread::sleep(interval);
    }
    (cap.kernel_counters(), cap.records.user)
}

/// The drain thread: its chunk queue, and its final counters when joined.
pub type Drain = (
    std::sync::mpsc::Receiver<Vec<Chunk>>,
    thread::JoinHandle<(KernelCounters, UserCounters)>,
);

/// Batches in flight between the drain thread and the next stage; beyond
/// this, batches are dropped and counted (`queue_full_chunks`).
pub const QUEUE_BATCHES: usize = 1024;

/// Spawns the drain loop on its own thread; chunks arrive on the returned
/// queue (bounded by `QUEUE_BATCHES`), which closes after the final drain.
pub fn spawn_drain(
    cap: Capture,
    interval: Duration,
    stop: Arc<AtomicBool>,
    stats_every: Option<Duration>,
) -> std::io::Result<Drain> {
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_BATCHES);
    let handle = thread::Builder::new()
        .name("drain".into())
        .spawn(move || run_drain_loop(cap, interval, tx, stop, stats_every))?;
    Ok((rx, handle))
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// CLOCK_MONOTONIC now, the clock of the kernel's timestamps.
pub fn monotonic_now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

/// Offset from CLOCK_MONOTONIC (kernel timestamps) to the Unix epoch.
pub fn monotonic_to_unix_offset_ns() -> i128 {
    let mono = clock_ns(libc::CLOCK_MONOTONIC);
    clock_ns(libc::CLOCK_REALTIME) - mono
}

/// Whether the running kernel's release is at least `major.minor` (from
/// uname; `bpf_loop` came in 5.17).
fn kernel_at_least(major: u32, minor: u32) -> bool {
    // SAFETY: uname fills the zeroed struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return false;
    }
    let release: String = u
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8 as char)
        .collect();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let num = |p: Option<&str>| p.and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    let (a, b) = (num(parts.next()), num(parts.next()));
    (a, b) >= (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        let off = agent_common::KernelOffsets::default();
        let mut c = CaptureConfig::default();
        assert_eq!(c.kernel_config(7, 2, off).unwrap().filter, 0);
        assert!(matches!(
            c.kernel_config(7, 0, off),
            Err(CaptureError::Cpus(0))
        ));
        assert!(matches!(
            c.kernel_config(7, MAX_CPUS + 1, off),
            Err(CaptureError::Cpus(_))
        ));
        c.pids = vec![1];
        c.ports = vec![80];
        let k = c.kernel_config(7, 2, off).unwrap();
        assert_eq!(
            (k.agent_tgid, k.filter, k.capture_cap),
            (7, FILTER_PID | FILTER_PORT, 4096)
        );
        c.comms = vec!["nginx".into()];
        assert_eq!(
            c.kernel_config(7, 2, off).unwrap().filter,
            FILTER_PID | FILTER_PORT | FILTER_COMM
        );
        let key = c.comm_keys().unwrap()[0];
        assert_eq!(&key[..6], b"nginx\0");
        for bad in [0, MAX_CAPTURE as u32 + 1] {
            c.capture_bytes = bad;
            assert!(matches!(
                c.kernel_config(7, 2, off),
                Err(CaptureError::Cap(_))
            ));
        }
        c.comms = vec!["a-very-long-process-name".into()];
        assert!(matches!(c.comm_keys(), Err(CaptureError::Comm(_))));
        c.comms = vec![String::new()];
        assert!(c.comm_keys().is_err());
    }
}
