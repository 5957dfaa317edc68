//! Embeds the kernel object that `cargo xtask build` produced, if there is one.
//! Without it the agent still builds (for unit tests and tooling) and says at
//! start-up how to get a working binary.
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(embedded_ebpf)");
    println!("cargo:rerun-if-env-changed=AGENT_EBPF_OBJECT");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let default = manifest.join("../target/bpf/bpfel-unknown-none/release/agent-ebpf");
    let path = std::env::var_os("AGENT_EBPF_OBJECT").map(PathBuf::from).unwrap_or(default);
    println!("cargo:rerun-if-changed={}", path.display());
    if path.is_file() {
        println!("cargo:rustc-env=AGENT_EBPF_OBJECT={}", path.display());
        println!("cargo:rustc-cfg=embedded_ebpf");
    } else {
        println!("cargo:warning=no eBPF object at {}; run `cargo xtask build`", path.display());
    }
}
