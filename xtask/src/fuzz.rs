//! `cargo xtask fuzz [TARGET] [--runs N] [--seconds S]`: coverage-guided
//! fuzzing of the agent's decoders with cargo-fuzz (libFuzzer).
//!
//! cargo-fuzz passes nightly-only rustc flags; `RUSTC_BOOTSTRAP=1` lets the
//! machine's stable toolchain accept them, so no nightly is needed. The
//! targets are safe Rust, so they build without a sanitizer (`-s none`, about
//! twice the speed) but with debug assertions, which turn arithmetic overflow
//! into a crash the fuzzer reports.
//!
//! Everything the fuzzer writes (the growing corpus, crash artifacts, the
//! build) goes under `target/fuzz/`; the committed seeds in
//! `agent/fuzz/corpus/TARGET/` are only read.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{output, run};

const FUZZ_DIR: &str = "agent/fuzz";
const CARGO_FUZZ_VERSION: &str = "0.13";

/// Fuzz targets: the files in `agent/fuzz/fuzz_targets/`.
pub fn targets(root: &Path) -> Result<Vec<String>> {
    let dir = root.join(FUZZ_DIR).join("fuzz_targets");
    let mut names = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "rs") {
            if let Some(stem) = path.file_stem() {
                names.push(stem.to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Installs cargo-fuzz unless a suitable one is present.
fn ensure_cargo_fuzz() -> Result<()> {
    let ok = output(Command::new("cargo").args(["fuzz", "--version"])).is_some_and(|v| {
        v.split_whitespace()
            .nth(1)
            .is_some_and(|v| v.starts_with(CARGO_FUZZ_VERSION))
    });
    if !ok {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            &format!("~{CARGO_FUZZ_VERSION}"),
        ]))?;
    }
    Ok(())
}

/// Runs one target until `runs` executions or `seconds` have passed (both may
/// be given; libFuzzer stops at the first). Fails if the fuzzer finds a crash.
pub fn fuzz(root: &Path, target: &str, runs: Option<u64>, seconds: Option<u64>) -> Result<()> {
    ensure_cargo_fuzz()?;
    if !targets(root)?.iter().any(|t| t == target) {
        bail!("no fuzz target `{target}` (have {:?})", targets(root)?);
    }
    let work = root.join("target/fuzz");
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    std::fs::create_dir_all(&artifacts)
        .with_context(|| format!("creating {}", artifacts.display()))?;
    let seeds: PathBuf = root.join(FUZZ_DIR).join("corpus").join(target);

    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args([
            "fuzz",
            "run",
            target,
            "--fuzz-dir",
            FUZZ_DIR,
            "-s",
            "none",
            "--debug-assertions",
        ])
        .arg("--target-dir")
        .arg(work.join("build"))
        // New inputs go to the first corpus directory, so the seeds stay clean.
        .arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1");
    if let Some(n) = runs {
        cmd.arg(format!("-runs={n}"));
    }
    if let Some(s) = seconds {
        cmd.arg(format!("-max_total_time={s}"));
    }
    cmd.env("RUSTC_BOOTSTRAP", "1");
    run(&mut cmd).with_context(|| {
        format!(
            "fuzz target `{target}` failed; crash inputs (if any) are in {}",
            artifacts.display()
        )
    })
}

/// Every fuzz target briefly, for `cargo xtask test`.
pub fn smoke(root: &Path) -> Result<()> {
    for t in targets(root)? {
        fuzz(root, &t, Some(200_000), Some(10))?;
    }
    Ok(())
}
