//! Environment checks before loading: privileges, BTF, tracefs. Each failure
//! is one clear sentence for the user.

use std::path::Path;

use super::btf::VMLINUX_BTF;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error("the agent needs root or CAP_BPF and CAP_PERFMON (effective capabilities: {0:#x})")]
    Privileges(u64),
    #[error("the kernel has no BTF ({VMLINUX_BTF} is missing); Linux >= 5.8 built with CONFIG_DEBUG_INFO_BTF=y is required")]
    NoBtf,
    #[error("tracefs is not mounted and mounting it at {TRACEFS} failed: {0}")]
    NoTracefs(String),
}

/// Effective capability set from `/proc/self/status` text.
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Whether a capability set may load tracing programs and read kernel memory.
pub fn caps_sufficient(caps: u64) -> bool {
    let has = |c: u32| caps & (1u64 << c) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

fn tracefs_present() -> bool {
    [TRACEFS, DEBUGFS_TRACING]
        .iter()
        .any(|p| Path::new(p).join("events").is_dir())
}

fn mount_tracefs() -> Result<(), String> {
    let c = |s: &str| std::ffi::CString::new(s).map_err(|e| e.to_string());
    let (src, target, fstype) = (c("tracefs")?, c(TRACEFS)?, c("tracefs")?);
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// Runs all checks; mounts tracefs when it is missing.
pub fn check() -> Result<(), PreflightError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = effective_caps(&status).unwrap_or(0);
    if !caps_sufficient(caps) {
        return Err(PreflightError::Privileges(caps));
    }
    if !Path::new(VMLINUX_BTF).exists() {
        return Err(PreflightError::NoBtf);
    }
    if !tracefs_present() {
        mount_tracefs().map_err(PreflightError::NoTracefs)?;
        if !tracefs_present() {
            return Err(PreflightError::NoTracefs(
                "no events directory after mounting".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_table() {
        let cases: [(&str, Option<u64>, bool); 5] = [
            ("CapEff:\t000001ffffffffff\n", Some(0x1ff_ffff_ffff), true),
            ("CapEff:\t0000000000000000\n", Some(0), false),
            ("CapEff:\t000000c000000000\n", Some(0xc0_0000_0000), true), // BPF + PERFMON
            ("CapEff:\t0000008000000000\n", Some(0x80_0000_0000), false), // BPF only
            ("Name: x\n", None, false),
        ];
        for (status, caps, ok) in cases {
            assert_eq!(effective_caps(status), caps, "{status}");
            assert_eq!(caps_sufficient(caps.unwrap_or(0)), ok, "{status}");
        }
    }
}
