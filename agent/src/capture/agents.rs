//! Agents on one host: a second agent refuses to start unless allowed, and
//! allowed agents never trace each other.
//!
//! Each running agent has a file in a registry directory (`/run/agent` by
//! default), named by its tgid and holding its process start time (to tell a
//! live agent from a reused pid) and the id of its `PEER_AGENTS` map. A
//! starting agent takes the directory's lock, drops the files of agents that
//! are gone, refuses if any is left (unless allowed), and otherwise writes
//! its own tgid into every other agent's map (opened by id: no bpffs needed)
//! and theirs into its own, before any of its programs is attached. The
//! kernel programs then skip every agent's processes and mute the other ends
//! of their sockets (`MUTED`). The file goes when the agent stops; one left by
//! a killed agent is dropped by the next start.

use std::{
    fs::{self, File},
    io::{self, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use agent_common::PEER_AGENTS_LEN;
use aya::maps::{Array, Map, MapData};

/// Default registry directory.
pub const REGISTRY_DIR: &str = "/run/agent";

#[derive(Debug, thiserror::Error)]
pub enum AgentsError {
    #[error("agent registry {0}: {1}")]
    Io(PathBuf, io::Error),
    #[error(
        "another agent (pid {0}) is already tracing this host; stop it, or pass \
         --allow-other-agents to run both (they will not trace each other)"
    )]
    Running(u32),
    #[error("more than {} agents on this host", PEER_AGENTS_LEN - 1)]
    TooMany,
    #[error("agent map: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// A live agent found in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub tgid: u32,
    pub map_id: u32,
}

/// The registry, locked: at most one agent between its check and its
/// registration.
pub struct Registry {
    dir: PathBuf,
    lock: File,
}

/// This agent's entry; removed on drop.
#[derive(Debug)]
pub struct Registration {
    file: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.file);
    }
}

impl Registry {
    /// Opens and locks `dir`, waiting for an agent that is registering.
    pub fn lock(dir: &Path) -> Result<Self, AgentsError> {
        let err = |e| AgentsError::Io(dir.to_path_buf(), e);
        fs::create_dir_all(dir).map_err(err)?;
        let lock = File::create(dir.join("lock")).map_err(err)?;
        // SAFETY: flock on an fd this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            lock,
        })
    }

    /// Live agents other than this process; entries of dead ones are removed.
    pub fn peers(&self) -> Result<Vec<Peer>, AgentsError> {
        let own = std::process::id();
        let mut peers = vec![];
        let entries = fs::read_dir(&self.dir).map_err(|e| AgentsError::Io(self.dir.clone(), e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(tgid) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if tgid == own {
                continue;
            }
            let text = fs::read_to_string(&path).unwrap_or_default();
            match parse_entry(&text) {
                Some((start, map_id)) if start_time(tgid) == Some(start) => {
                    peers.push(Peer { tgid, map_id })
                }
                _ => {
                    tracing::debug!(tgid, "dropping the registry entry of a stopped agent");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        peers.sort_by_key(|p| p.tgid);
        Ok(peers)
    }

    /// Registers this agent, whose `PEER_AGENTS` map is `own`: each side's
    /// map gets the other's tgid. Peers whose map cannot be opened (they
    /// stopped meanwhile) are skipped.
    pub fn register(
        self,
        peers: &[Peer],
        own: &mut Array<&mut MapData, u32>,
        own_map_id: u32,
    ) -> Result<Registration, AgentsError> {
        let me = std::process::id();
        for p in peers {
            add_tgid(own, p.tgid)?;
            match MapData::from_id(p.map_id).and_then(Map::from_map_data) {
                Ok(Map::Array(data)) => {
                    let mut theirs: Array<MapData, u32> = Array::try_from(Map::Array(data))?;
                    add_tgid(&mut theirs, me)?;
                }
                Ok(_) => {
                    tracing::warn!(tgid = p.tgid, "agent registry names a map of another type")
                }
                Err(e) => tracing::debug!(tgid = p.tgid, error = %e, "agent's map is gone"),
            }
        }
        let start = start_time(me).ok_or_else(|| {
            AgentsError::Io(
                PathBuf::from("/proc/self/stat"),
                io::Error::other("no start time"),
            )
        })?;
        let file = self.dir.join(me.to_string());
        let write = || -> io::Result<()> {
            let tmp = self.dir.join(format!(".{me}.tmp"));
            let mut f = File::create(&tmp)?;
            writeln!(f, "{start} {own_map_id}")?;
            fs::rename(&tmp, &file)
        };
        write().map_err(|e| AgentsError::Io(file.clone(), e))?;
        drop(self.lock);
        Ok(Registration { file })
    }
}

/// Adds `tgid` to a `PEER_AGENTS` map (index 0: count), once.
fn add_tgid<T: std::borrow::BorrowMut<MapData>>(
    map: &mut Array<T, u32>,
    tgid: u32,
) -> Result<(), AgentsError> {
    let n = map.get(&0, 0)?;
    for i in 1..=n.min(PEER_AGENTS_LEN - 1) {
        if map.get(&i, 0)? == tgid {
            return Ok(());
        }
    }
    if n + 1 >= PEER_AGENTS_LEN {
        return Err(AgentsError::TooMany);
    }
    map.set(n + 1, tgid, 0)?;
    map.set(0, n + 1, 0)?;
    Ok(())
}

/// `START_TICKS MAP_ID` of a registry file.
fn parse_entry(text: &str) -> Option<(u64, u32)> {
    let mut it = text.split_whitespace();
    let start = it.next()?.parse().ok()?;
    let map_id = it.next()?.parse().ok()?;
    Some((start, map_id))
}

/// Start time of process `tgid` in clock ticks since boot (field 22 of
/// `/proc/PID/stat`), or `None` when there is no such process.
fn start_time(tgid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{tgid}/stat")).ok()?;
    parse_start_time(&stat)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // The name (field 2) is in parentheses and may hold spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 is the first after the name; field 22 is the 20th from there.
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_entries_and_stat_lines() {
        for (text, want) in [
            ("123 45\n", Some((123, 45))),
            ("123", None),
            ("x 45", None),
            ("", None),
        ] {
            assert_eq!(parse_entry(text), want, "{text:?}");
        }
        let tail = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21";
        for (stat, want) in [
            (format!("42 (agent) {tail}"), Some(987654)),
            (format!("42 (a b) c)) {tail}"), Some(987654)),
            ("42 (agent) S 1 2".to_string(), None),
            ("garbage".to_string(), None),
        ] {
            assert_eq!(parse_start_time(&stat), want, "{stat:?}");
        }
        // This process exists and has a start time.
        assert!(start_time(std::process::id()).is_some());
    }

    #[test]
    fn live_agents_are_found_and_stale_entries_dropped() {
        let dir = std::env::temp_dir().join(format!("agent-registry-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let live = child.id();
        let start = start_time(live).unwrap();
        let reg = Registry::lock(&dir).unwrap();
        let cases = [
            (live.to_string(), format!("{start} 77")),
            // Not an entry (the lock file, say): left alone.
            (format!("{live}x"), format!("{start} 77")),
            (u32::MAX.to_string(), "1 2".to_string()),
            // This process's own entry is never a peer.
            (std::process::id().to_string(), "1 2".to_string()),
        ];
        for (name, text) in &cases {
            fs::write(dir.join(name), text).unwrap();
        }
        let peers = reg.peers().unwrap();
        assert_eq!(
            peers,
            vec![Peer {
                tgid: live,
                map_id: 77
            }]
        );
        assert!(
            !dir.join(u32::MAX.to_string()).exists(),
            "dead agent's entry kept"
        );
        assert!(dir.join(format!("{live}x")).exists());
        // Same pid, another start time: the pid was reused.
        fs::write(dir.join(live.to_string()), format!("{} 77", start + 1)).unwrap();
        assert!(
            reg.peers().unwrap().is_empty(),
            "a reused pid taken for an agent"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        drop(reg);
        fs::remove_dir_all(&dir).unwrap();
    }
}
