//! 1. Embeds the kernel object that `cargo xtask build` produced, if there is
//!    one. Without it the agent still builds (for unit tests and tooling) and
//!    says at start-up how to get a working binary.
//! 2. Compiles the vendored OpenTelemetry protos (`../proto`, OTLP v1) into
//!    message types with prost-build, using protox (a pure-Rust protobuf
//!    compiler) so no system `protoc` is needed. No gRPC service code.
use std::path::{Path, PathBuf};

/// The vendored `.proto` tree, relative to this crate.
const PROTO_ROOT: &str = "../proto";
const PROTO_FILES: &[&str] = &[
    "opentelemetry/proto/common/v1/common.proto",
    "opentelemetry/proto/resource/v1/resource.proto",
    "opentelemetry/proto/trace/v1/trace.proto",
    "opentelemetry/proto/collector/trace/v1/trace_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    embed_ebpf_object();
    let root = Path::new(PROTO_ROOT);
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let fds = protox::compile(PROTO_FILES, [root])?;
    prost_build::Config::new()
        // This field's proto comment holds an indented example rustdoc would run as a doctest.
        .disable_comments(["opentelemetry.proto.trace.v1.Span.attributes"])
        .compile_fds(fds)?;
    Ok(())
}

fn embed_ebpf_object() {
    println!("cargo::rustc-check-cfg=cfg(embedded_ebpf)");
    println!("cargo:rerun-if-env-changed=AGENT_EBPF_OBJECT");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let default = manifest.join("../target/bpf/bpfel-unknown-none/release/agent-ebpf");
    let path = std::env::var_os("AGENT_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-changed={}", path.display());
    if path.is_file() {
        println!("cargo:rustc-env=AGENT_EBPF_OBJECT={}", path.display());
        println!("cargo:rustc-cfg=embedded_ebpf");
    } else {
        println!(
            "cargo:warning=no eBPF object at {}; run `cargo xtask build`",
            path.display()
        );
    }
}
