//! Kernel side of the agent: captures the payload of every plaintext TCP
//! send/recv of the selected processes, with connection identity and timing.
//!
//! Hooks: syscall tracepoints (`syscalls:sys_{enter,exit}_*`). This kernel has
//! no kprobes, and syscall tracepoints are a stable ABI with the user buffer
//! pointers we need; entry saves the arguments per thread, exit copies
//! `min(ret, cap)` bytes. `sock:inet_sock_set_state` gives each connection its
//! role (client/server) and 4-tuple at the moment it is established, which is
//! right even for connections that live under a millisecond.
//!
//! The syscall tracepoints only give an fd. We walk
//! `current->files->fdt->fd[fd]->private_data(socket)->sk` with field offsets
//! that userspace reads from the kernel's BTF (Rust eBPF has no CO-RE), which
//! also rejects pipes, files and unix sockets with a few reads.
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
