//! `cargo xtask setup|build|run|test|bench`: the project's build entry points.
//!
//! The kernel crate needs nightly features and `core` source, which rustup
//! cannot download here; Debian's rustc-web (registered as the rustup
//! toolchain `bpf-web`) with `RUSTC_BOOTSTRAP=1` and `-Z build-std=core`
//! builds it, linked by bpf-linker against Debian's LLVM 22.

mod bench;
mod fuzz;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

const BPF_TOOLCHAIN: &str = "bpf-web";
const BPF_TARGET: &str = "bpfel-unknown-none";
const BPF_LINKER_VERSION: &str = "0.13";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The real OTLP receiver the integration tests export to (crates.io, pinned).
const OTLP_RECEIVER: &str = "otelite";
const OTLP_RECEIVER_VERSION: &str = "0.1.156";
/// Debian packages: the kernel-crate toolchain, and the third-party programs
/// the integration tests and benchmarks drive.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "curl",
    "nginx-light",
    "wrk",
    // h2load and nghttp: HTTP/2 load and client for the HTTP/2 tests and bench.
    "nghttp2-client",
    "iproute2",
    "procps",
    "build-essential",
    "pkg-config",
    "libssl-dev",
];

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install (idempotently) everything the build and tests need.
    Setup,
    /// Build the kernel object and the agent that embeds it.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build (release) and run the agent: `cargo xtask run -- ARGS`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests, then the privileged integration tests.
    Test {
        /// Extra arguments for the test harness (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: `overhead` (nginx + wrk with and without the agent).
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// Fuzz a decoder (cargo-fuzz on stable); without a target, every one briefly.
    Fuzz {
        target: Option<String>,
        #[arg(long)]
        runs: Option<u64>,
        #[arg(long)]
        seconds: Option<u64>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::Build { release } => build(release).map(drop),
        Cmd::Run { args } => {
            setup()?;
            let agent = build(true)?;
            let status = Command::new(&agent)
                .args(&args)
                .status()
                .with_context(|| format!("running {}", agent.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Test { args } => test(&args),
        Cmd::Bench { which } => {
            setup()?;
            let agent = build(true)?;
            bench::run(which, &agent)
        }
        Cmd::Fuzz {
            target: Some(t),
            runs,
            seconds,
        } => fuzz::fuzz(&root(), &t, runs, seconds),
        Cmd::Fuzz { target: None, .. } => fuzz::smoke(&root()),
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root");
        }
        eprintln!("xtask: installing {missing:?}");
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let linked = output(Command::new("rustup").args(["toolchain", "list"])).is_some_and(|s| {
        s.lines()
            .any(|l| l.split_whitespace().next() == Some(BPF_TOOLCHAIN))
    });
    if !linked {
        eprintln!("xtask: linking /usr as rustup toolchain {BPF_TOOLCHAIN}");
        run(Command::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]))?;
    }
    let linker_ok = output(Command::new("bpf-linker").arg("--version")).is_some_and(|v| {
        v.split_whitespace()
            .nth(1)
            .is_some_and(|v| v.starts_with(BPF_LINKER_VERSION))
    });
    if !linker_ok {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22)");
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                &format!("~{BPF_LINKER_VERSION}"),
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX))?;
    }
    // `--version` prints `otelite 0.1.156 (<git sha or unknown>)`.
    let receiver_ok = output(Command::new(OTLP_RECEIVER).arg("--version"))
        .is_some_and(|v| v.starts_with(&format!("{OTLP_RECEIVER} {OTLP_RECEIVER_VERSION} ")));
    if !receiver_ok {
        eprintln!("xtask: installing {OTLP_RECEIVER} {OTLP_RECEIVER_VERSION} (OTLP receiver for the integration tests; ~10 min)");
        run(Command::new("cargo").args([
            "install",
            OTLP_RECEIVER,
            "--locked",
            "--version",
            &format!("={OTLP_RECEIVER_VERSION}"),
        ]))?;
    }
    setup_peers()
}

/// The HTTP/2 and gRPC test peers that are not Debian packages, pinned in
/// `tests/peers/`: a Python venv (grpcio, hypercorn) at `target/peers/venv`
/// and @grpc/grpc-js at `target/peers/node`, each in the checkout's own
/// target dir. Each is (re)made only when its pin file differs from the copy
/// stored with the last successful install.
fn setup_peers() -> Result<()> {
    let pins = root().join("tests/peers");
    let dest = root().join("target/peers");
    let requirements = std::fs::read_to_string(pins.join("requirements.txt"))?;
    let venv = dest.join("venv");
    let stamp = venv.join(".requirements.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(requirements.as_str()) {
        eprintln!("xtask: making the Python peers' venv at {}", venv.display());
        if venv.exists() {
            std::fs::remove_dir_all(&venv)?;
        }
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(venv.join("bin/python3"))
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--no-input",
                "--only-binary",
                ":all:",
                "-r",
            ])
            .arg(pins.join("requirements.txt")))?;
        std::fs::write(&stamp, &requirements)?;
    }
    let lock = std::fs::read_to_string(pins.join("package-lock.json"))?;
    let node = dest.join("node");
    let stamp = node.join(".package-lock.json");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(lock.as_str())
        || !node.join("node_modules/@grpc/grpc-js").is_dir()
    {
        eprintln!(
            "xtask: installing the Node peers' modules at {}",
            node.display()
        );
        std::fs::create_dir_all(&node)?;
        for f in ["package.json", "package-lock.json"] {
            std::fs::copy(pins.join(f), node.join(f))?;
        }
        run(Command::new("npm").current_dir(&node).args([
            "ci",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ]))?;
        std::fs::write(&stamp, &lock)?;
    }
    Ok(())
}

/// Path of the built kernel object.
fn ebpf_object() -> PathBuf {
    root()
        .join("target/bpf")
        .join(BPF_TARGET)
        .join("release/agent-ebpf")
}

fn build_ebpf() -> Result<PathBuf> {
    // A separate target dir: the host build runs another rustc, and sharing
    // one would rebuild both sides' dependencies every time.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .arg(format!("+{BPF_TOOLCHAIN}"))
        .args([
            "build",
            "-p",
            "agent-ebpf",
            "--release",
            "-Z",
            "build-std=core",
            "--target",
            BPF_TARGET,
        ])
        .env("RUSTC_BOOTSTRAP", "1")
        // BTF in the object: the kernel needs its func_info for the
        // `bpf_loop` callback (and it names the programs' types in bpftool).
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env("CARGO_TARGET_DIR", root().join("target/bpf"))
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    run(&mut cmd).context("building the kernel programs (is `cargo xtask setup` done?)")?;
    Ok(ebpf_object())
}

/// Builds both halves; returns the agent binary.
fn build(release: bool) -> Result<PathBuf> {
    let obj = build_ebpf()?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["build", "-p", "agent"])
        .env("AGENT_EBPF_OBJECT", &obj);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("agent"))
}

/// Quality gates of a full run: formatting and clippy on the host crates
/// (warnings are errors).
fn gates() -> Result<()> {
    run(Command::new("cargo")
        .current_dir(root())
        .args(["fmt", "--all", "--check"]))
    .context("cargo fmt --check: run `cargo fmt --all`")?;
    run(Command::new("cargo")
        .current_dir(root())
        .args([
            "clippy",
            "-p",
            "agent",
            "-p",
            "xtask",
            "-p",
            "integration-tests",
            "--all-targets",
            "--release",
            "--",
            "-D",
            "warnings",
        ])
        .env("AGENT_EBPF_OBJECT", ebpf_object()))
    .context("cargo clippy -D warnings")
}

fn test(args: &[String]) -> Result<()> {
    setup()?;
    let agent = build(true)?;
    if args.is_empty() {
        gates()?;
    }
    // Unit tests of every host crate.
    run(Command::new("cargo")
        .current_dir(root())
        .args([
            "test",
            "--workspace",
            "--exclude",
            "agent-ebpf",
            "--exclude",
            "integration-tests",
        ])
        .env("AGENT_EBPF_OBJECT", ebpf_object()))?;
    // Every fuzz target briefly (a filtered run is for one test, so skips it).
    if args.is_empty() {
        fuzz::smoke(&root())?;
    }
    // Privileged integration tests with the real programs and real peers.
    // One at a time: they share the kernel's tracepoints and loopback ports.
    run(Command::new("cargo")
        .current_dir(root())
        .args([
            "test",
            "-p",
            "integration-tests",
            "--release",
            "--",
            "--test-threads=1",
        ])
        .args(args)
        .env("AGENT_BIN", &agent))
}
