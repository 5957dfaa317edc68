//! Kernel side of the agent: captures the payload of every plaintext TCP
//! send/recv of the selected processes, with connection identity and timing.
//!
//! Hooks: syscall tracepoints (`syscalls:sys_{enter,exit}_*`). This kernel has
//! no kprobes and refuses fentry/fexit (EPERM), and syscall tracepoints are a
//! stable ABI with the user buffer pointers we need; entry only saves the
//! arguments in a per-CPU slot (it runs for every read and write of a traced
//! process, sockets or not), exit copies `min(ret, cap)` bytes. `sock:inet_sock_set_state` gives each connection its
//! role (client/server) and 4-tuple at the moment it is established, which is
//! right even for connections that live under a millisecond.
//!
//! The syscall tracepoints only give an fd. At exit, for calls that moved
//! bytes, we walk `current->files->fdt->fd[fd]->private_data(socket)->sk` with
//! field offsets that userspace reads from the kernel's BTF (Rust eBPF has no
//! CO-RE); what the fd's file turned out to be is cached per process and fd,
//! so pipes, files and unix sockets are rejected with one lookup.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The license the kernel reads from the object's `license` section. The
/// programs call GPL-only helpers (`bpf_probe_read_kernel`, `bpf_loop`'s
/// callers' reads), which the verifier allows only to GPL-compatible code;
/// the kernel side is offered under the GPL as well as the workspace's
/// licenses for that reason.
#[cfg(target_arch = "bpf")]
#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
