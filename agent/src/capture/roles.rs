//! Roles of connections the kernel saw first mid-life.
//!
//! Connections established while the agent runs get their role in the kernel
//! (from the TCP state change). For older ones the kernel only knows the
//! 4-tuple: a connection whose local port is a listening port is the server
//! end. Listening sockets come from `/proc/net/tcp{,6}` of the agent's network
//! namespace, re-read at most every `REFRESH` when a port is not found.
//! Remembered roles are forgotten at close, or after `reorder::IDLE` without
//! traffic (a process that dies never calls close).

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use super::{
    event::{Chunk, ChunkKind, ConnMap, Role},
    reorder::IDLE,
};

const REFRESH: Duration = Duration::from_millis(200);
const TCP_LISTEN: &str = "0A";

/// Parses `/proc/net/tcp` or `/proc/net/tcp6` text into listening (ip, port) pairs.
pub fn parse_listeners(text: &str) -> Vec<(IpAddr, u16)> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let mut fields = line.split_whitespace();
        let (Some(_sl), Some(local), Some(_rem), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if state != TCP_LISTEN {
            continue;
        }
        let Some((addr, port)) = local.split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port, 16) else {
            continue;
        };
        if let Some(ip) = parse_proc_ip(addr) {
            out.push((ip, port));
        }
    }
    out
}

/// `/proc/net/tcp*` prints addresses as host-order (little-endian) 32-bit words.
fn parse_proc_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_le_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(b);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

/// Fills in `Role::Unknown` on chunks, consistently per connection.
#[derive(Default)]
pub struct RoleResolver {
    listeners: HashSet<(IpAddr, u16)>,
    refreshed: Option<Instant>,
    /// Role and the last time the connection was seen.
    known: ConnMap<(Role, Instant)>,
    last_sweep: Option<Instant>,
}

impl RoleResolver {
    fn refresh(&mut self) {
        self.listeners.clear();
        for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(path) {
                self.listeners.extend(parse_listeners(&text));
            }
        }
        self.refreshed = Some(Instant::now());
    }

    fn is_listening(&self, ip: IpAddr, port: u16) -> bool {
        let any: [IpAddr; 2] = [Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()];
        self.listeners.contains(&(ip, port))
            || any.iter().any(|a| self.listeners.contains(&(*a, port)))
    }

    /// Role of a connection from its local address, given the listening set.
    fn classify(&mut self, ip: IpAddr, port: u16) -> Role {
        if self.is_listening(ip, port) {
            return Role::Server;
        }
        if self.refreshed.is_none_or(|t| t.elapsed() >= REFRESH) {
            self.refresh();
            if self.is_listening(ip, port) {
                return Role::Server;
            }
        }
        Role::Client
    }

    /// Sets the role of a chunk of a connection seen first mid-life; `now`
    /// is the current drain pass's start.
    pub fn resolve(&mut self, chunk: &mut Chunk, now: Instant) {
        if chunk.role == Role::Unknown {
            let role = match self.known.get_mut(&chunk.conn) {
                Some((r, seen)) => {
                    *seen = now;
                    *r
                }
                None => {
                    let r = self.classify(chunk.local.ip(), chunk.local.port());
                    self.known.insert(chunk.conn, (r, now));
                    r
                }
            };
            chunk.role = role;
        }
        if chunk.kind == ChunkKind::Close {
            self.known.remove(&chunk.conn);
        }
    }

    /// Forgets connections idle for `IDLE` (checked at most once a minute).
    pub fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(60))
        {
            return;
        }
        self.last_sweep = Some(now);
        self.known
            .retain(|_, (_, seen)| now.duration_since(*seen) < IDLE);
    }

    /// Connections currently remembered.
    pub fn tracked(&self) -> usize {
        self.known.len()
    }

    #[cfg(test)]
    fn with_listeners(l: &[(IpAddr, u16)]) -> Self {
        // Refreshed "in the future": the test never reads the real /proc.
        let refreshed = Some(Instant::now() + Duration::from_secs(3600));
        Self {
            listeners: l.iter().copied().collect(),
            refreshed,
            known: ConnMap::default(),
            last_sweep: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:1F41 00000000000000000000000000000000:0000 0A 00000000:00000000
   1: 0000000000000000FFFF00000100007F:2328 00000000000000000000000000000000:0000 0A 00000000:00000000
   2: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000
";

    #[test]
    fn parses_proc_net_tcp() {
        let l = parse_listeners(TCP);
        assert_eq!(
            l,
            vec![
                ("127.0.0.1".parse().unwrap(), 8080),
                ("0.0.0.0".parse().unwrap(), 80)
            ]
        );
        let l6 = parse_listeners(TCP6);
        assert_eq!(
            l6,
            vec![
                ("::".parse().unwrap(), 8001),
                ("127.0.0.1".parse().unwrap(), 9000),
                ("::1".parse().unwrap(), 22),
            ]
        );
        assert!(parse_listeners("garbage\n1: zz:zz 0A\n").is_empty());
    }

    #[test]
    fn roles_are_kept_per_connection_and_forgotten_when_idle() {
        use crate::capture::event::tests::{decode_one as decode, header};
        use agent_common::KIND_DATA;
        let mut r = RoleResolver::with_listeners(&[("127.0.0.1".parse().unwrap(), 8080)]);
        let mut c = decode(&header(KIND_DATA, 0, b"x")).unwrap();
        c.role = Role::Unknown;
        let t0 = Instant::now();
        r.resolve(&mut c, t0);
        assert_eq!(c.role, Role::Server, "local port 8080 listens");
        assert_eq!(r.tracked(), 1);
        r.sweep(t0 + IDLE / 2);
        assert_eq!(r.tracked(), 1);
        r.sweep(t0 + IDLE + Duration::from_secs(61));
        assert_eq!(r.tracked(), 0, "its process died without a close");
    }

    #[test]
    fn classifies_by_listening_port() {
        let mut r = RoleResolver::with_listeners(&[
            ("127.0.0.1".parse().unwrap(), 8080),
            ("::".parse().unwrap(), 80),
        ]);
        let cases: [(&str, u16, Role); 4] = [
            ("127.0.0.1", 8080, Role::Server),
            ("10.1.2.3", 80, Role::Server),    // wildcard listener
            ("127.0.0.2", 8080, Role::Client), // other address, same port
            ("127.0.0.1", 45000, Role::Client),
        ];
        for (ip, port, want) in cases {
            assert_eq!(r.classify(ip.parse().unwrap(), port), want, "{ip}:{port}");
        }
    }
}
