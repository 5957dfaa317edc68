//! Resource attributes of traced processes: who a span belongs to.
//!
//! `service.name` is, in order: the user's mapping for the process name
//! (`--service-name COMM=NAME`), the process's own `OTEL_SERVICE_NAME`, a
//! `service.name` in its `OTEL_RESOURCE_ATTRIBUTES`, else the executable name.

use std::{collections::HashMap, sync::Arc};

use super::AttrValue;

/// Processes whose resource is remembered (least recently used ones go first).
pub const MAX_PROCESSES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessResource {
    pub service_name: String,
    /// Resource attributes, `service.name` first.
    pub attributes: Vec<(&'static str, AttrValue)>,
    pub pid: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MappingError {
    #[error("--service-name wants PROCESS=SERVICE, got {0:?}")]
    Syntax(String),
}

/// Parses `--service-name` values.
pub fn parse_mappings(values: &[String]) -> Result<HashMap<String, String>, MappingError> {
    values
        .iter()
        .map(|v| match v.split_once('=') {
            Some((c, s)) if !c.is_empty() && !s.is_empty() => Ok((c.to_string(), s.to_string())),
            _ => Err(MappingError::Syntax(v.clone())),
        })
        .collect()
}

/// Value of `key` in a NUL-separated environment block.
pub fn env_value(environ: &[u8], key: &str) -> Option<String> {
    environ.split(|&b| b == 0).find_map(|kv| {
        let kv = std::str::from_utf8(kv).ok()?;
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

/// `service.name` inside an `OTEL_RESOURCE_ATTRIBUTES` value (`k=v,k2=v2`, values percent-encoded).
pub fn service_from_resource_attributes(v: &str) -> Option<String> {
    v.split(',').find_map(|kv| {
        let (k, val) = kv.split_once('=')?;
        (k.trim() == "service.name")
            .then(|| percent_decode(val.trim()))
            .filter(|s| !s.is_empty())
    })
}

fn percent_decode(s: &str) -> String {
    String::from_utf8_lossy(&crate::redact::percent_decode(s.as_bytes())).into_owned()
}

/// Sweeps a process must miss (unused, and gone or replaced) before its
/// resource is dropped: its spans can still be held for trace assembly for a
/// few seconds after it exits.
const IDLE_SWEEPS: u64 = 3;

struct Cached {
    res: Arc<ProcessResource>,
    /// The kernel's name for the process when the resource was made: a pid
    /// reused by another program shows as a different name at once.
    comm: String,
    /// `starttime` from /proc/PID/stat (0 if unreadable): a pid reused by the
    /// same program shows there, at the next sweep.
    start: u64,
    /// Sweep generation of the last `get`.
    seen: u64,
}

/// Builds and caches resources per pid.
pub struct Resources {
    mappings: HashMap<String, String>,
    host_name: String,
    /// By pid: kernel-chosen keys, looked up per span, so a fast hash.
    cache: HashMap<u32, Cached, foldhash::fast::RandomState>,
    generation: u64,
}

impl Resources {
    pub fn new(mappings: HashMap<String, String>) -> Self {
        Self {
            mappings,
            host_name: host_name(),
            cache: HashMap::default(),
            generation: 0,
        }
    }

    /// Resource of `pid` (named `comm` by the kernel), read from /proc once.
    pub fn get(&mut self, pid: u32, comm: &str) -> Arc<ProcessResource> {
        let generation = self.generation;
        if let Some(c) = self.cache.get_mut(&pid) {
            if c.comm == comm {
                c.seen = generation;
                return c.res.clone();
            }
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| comm.to_string());
        let res = Arc::new(self.build(pid, comm, &exe, &environ));
        if self.cache.len() >= MAX_PROCESSES && !self.cache.contains_key(&pid) {
            self.sweep();
            if self.cache.len() >= MAX_PROCESSES {
                // All alive or recently used: drop the least recently used
                // quarter (one scan per MAX_PROCESSES / 4 new processes).
                let mut seen: Vec<u64> = self.cache.values().map(|c| c.seen).collect();
                let cut = seen.len() / 4;
                let (_, &mut oldest_kept, _) = seen.select_nth_unstable(cut);
                self.cache.retain(|_, c| c.seen >= oldest_kept);
            }
        }
        let cached = Cached {
            res: res.clone(),
            comm: comm.to_string(),
            start: process_start(pid).unwrap_or(0),
            seen: generation,
        };
        self.cache.insert(pid, cached);
        res
    }

    /// Drops the resources of processes that are gone (or whose pid now
    /// names another process) and were not used for `IDLE_SWEEPS` sweeps.
    /// Call every few seconds: it reads /proc/PID/stat of idle entries only.
    pub fn sweep(&mut self) {
        self.generation += 1;
        let generation = self.generation;
        self.cache.retain(|&pid, c| {
            generation < c.seen + IDLE_SWEEPS || process_start(pid).is_some_and(|s| s == c.start)
        });
    }

    /// Processes whose resource is cached.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    fn build(&self, pid: u32, comm: &str, exe: &str, environ: &[u8]) -> ProcessResource {
        let service_name = self
            .mappings
            .get(comm)
            .or_else(|| self.mappings.get(exe))
            .cloned()
            .or_else(|| env_value(environ, "OTEL_SERVICE_NAME").filter(|s| !s.is_empty()))
            .or_else(|| {
                env_value(environ, "OTEL_RESOURCE_ATTRIBUTES")
                    .and_then(|v| service_from_resource_attributes(&v))
            })
            .unwrap_or_else(|| exe.to_string());
        let s = |v: &str| AttrValue::Str(v.to_string().into());
        let attributes = vec![
            ("service.name", s(&service_name)),
            ("process.pid", AttrValue::Int(i64::from(pid))),
            ("process.executable.name", s(exe)),
            ("host.name", s(&self.host_name)),
            ("telemetry.sdk.name", s("ebpf-trace-agent")),
            ("telemetry.sdk.language", s("rust")),
            ("telemetry.sdk.version", s(env!("CARGO_PKG_VERSION"))),
        ];
        ProcessResource {
            service_name,
            attributes,
            pid,
        }
    }
}

/// `starttime` of `pid` (field 22 of /proc/PID/stat, clock ticks since
/// boot): with the pid, it names one process for the host's uptime.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    // The name (field 2) is in parentheses and may hold anything, `)` too.
    let after = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(stat.get(after + 1..)?).ok()?;
    // Fields 3.. follow: starttime is the 20th of them.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_name_precedence_table() {
        let env_both =
            b"A=1\0OTEL_SERVICE_NAME=checkout\0OTEL_RESOURCE_ATTRIBUTES=service.name=other\0";
        let env_attrs =
            b"OTEL_RESOURCE_ATTRIBUTES=deployment.environment=prod,service.name=cart%20svc\0";
        let env_none = b"PATH=/bin\0";
        let mapped = parse_mappings(&["python3=frontend".into()]).unwrap();
        // (mappings, comm, environ, expected service name)
        type Case<'a> = (&'a HashMap<String, String>, &'a str, &'a [u8], &'a str);
        let cases: [Case<'_>; 5] = [
            (&mapped, "python3", env_both, "frontend"),
            (&HashMap::new(), "python3", env_both, "checkout"),
            (&HashMap::new(), "python3", env_attrs, "cart svc"),
            (&HashMap::new(), "python3", env_none, "python3.11"),
            (&HashMap::new(), "python3", b"", "python3.11"),
        ];
        for (m, comm, env, want) in cases {
            let r = Resources::new(m.clone()).build(7, comm, "python3.11", env);
            assert_eq!(r.service_name, want);
            assert_eq!(
                r.attributes[0],
                ("service.name", AttrValue::Str(want.to_string().into()))
            );
            assert!(r.attributes.contains(&("process.pid", AttrValue::Int(7))));
            assert!(r.attributes.contains(&(
                "process.executable.name",
                AttrValue::Str("python3.11".into())
            )));
        }
    }

    /// A traced process's environment is untrusted input: any bytes give a
    /// name or none, never a panic (`%aé` sliced a `str` mid-character).
    #[test]
    fn resource_attributes_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("service.name=%aé", Some("%aé")),
            ("service.name=%é", Some("%é")),
            ("service.name=a%", Some("a%")),
            ("service.name=%41%42", Some("AB")),
            ("service.name=caf%C3%A9", Some("café")),
            ("service.name=%ff", Some("\u{fffd}")),
            ("service.name=", None),
            ("x=1, service.name = svc ", Some("svc")),
            ("service.name", None),
        ];
        for (v, want) in cases {
            assert_eq!(
                service_from_resource_attributes(v).as_deref(),
                *want,
                "{v:?}"
            );
        }
    }

    #[test]
    fn mapping_syntax() {
        assert!(parse_mappings(&["a=b".into(), "c=d=e".into()]).is_ok());
        for bad in ["ab", "=b", "a="] {
            assert_eq!(
                parse_mappings(&[bad.into()]),
                Err(MappingError::Syntax(bad.into()))
            );
        }
    }

    /// Resources of processes that exited go at the sweeps after their last
    /// use, those of live ones stay; a pid taken by another program gets a
    /// new resource at once.
    #[test]
    fn resources_of_exited_processes_are_dropped() {
        let mut r = Resources::new(HashMap::new());
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let gone = child.id();
        let a = r.get(me, "agent-test");
        r.get(gone, "sleep");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(process_start(gone).is_none());
        for sweep in 0..IDLE_SWEEPS {
            assert_eq!(r.len(), 2, "kept while recently used (sweep {sweep})");
            r.sweep();
        }
        assert_eq!(r.len(), 1, "the exited process's resource is dropped");
        assert!(Arc::ptr_eq(&a, &r.get(me, "agent-test")), "live one kept");
        let b = r.get(me, "other-name");
        assert!(
            !Arc::ptr_eq(&a, &b),
            "another program under the pid: rebuilt"
        );
    }

    #[test]
    fn reads_this_process_from_proc() {
        let mut r = Resources::new(HashMap::new());
        let me = r.get(std::process::id(), "agent-test");
        assert_eq!(me.pid, std::process::id());
        assert!(!me.service_name.is_empty());
        assert!(me
            .attributes
            .iter()
            .any(|(k, v)| *k == "host.name" && *v != AttrValue::Str("".into())));
    }
}
