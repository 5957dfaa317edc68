//! Helpers for the privileged integration tests: the agent binary as a child
//! process, and real peers (python3 http.server, nginx, curl).
//!
//! Tests need root. Without it they print why and pass as skipped, except
//! under `CI=true`, where they fail: CI must run them.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod otlp_receiver;
pub mod peers;
pub mod topology;

/// True when the test may run; prints the reason and returns false to skip.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: privileged integration test needs root; CI=true, so failing instead of skipping");
    }
    eprintln!("SKIP {test}: needs root (loads eBPF programs)");
    false
}

/// The agent binary: `AGENT_BIN` (set by `cargo xtask test`) or the release build.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/agent"))
}

/// A child process stopped on drop: SIGTERM first, so that a master process
/// (nginx) takes its workers down with it instead of orphaning them, then
/// SIGKILL after 2 s.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        for _ in 0..200 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An unused loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits until something accepts on `port`.
pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listening on {port} after 20 s"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `python3 -m http.server` serving `dir` on loopback.
pub fn python_http_server(dir: &Path, port: u16) -> Proc {
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn python3 -m http.server");
    let p = Proc(child);
    wait_port(port);
    p
}

/// nginx (foreground) serving `root` on loopback with keep-alive.
pub fn nginx(dir: &Path, root: &Path, port: u16, workers: u32) -> Proc {
    start_nginx(dir, root, port, workers, None)
}

/// nginx with one worker that logs every request it handles to `access_log`.
pub fn nginx_with_access_log(dir: &Path, root: &Path, port: u16, access_log: &Path) -> Proc {
    start_nginx(dir, root, port, 1, Some(access_log))
}

/// Starts nginx (foreground) with configuration `conf` written into `dir`
/// and waits until it listens on `port`.
pub fn run_nginx(dir: &Path, conf: &str, port: u16) -> Proc {
    let path = dir.join("nginx.conf");
    fs::write(&path, conf).expect("write nginx.conf");
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nginx (installed by cargo xtask setup)");
    let p = Proc(child);
    wait_port(port);
    p
}

fn start_nginx(
    dir: &Path,
    root: &Path,
    port: u16,
    workers: u32,
    access_log: Option<&Path>,
) -> Proc {
    let log = access_log.map_or("off".to_string(), |p| p.display().to_string());
    let conf = format!(
        "daemon off; worker_processes {workers}; pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log {log};
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests 1000000; keepalive_timeout 60s;
  server {{ listen 127.0.0.1:{port}; root {r}; }}
}}
",
        d = dir.display(),
        r = root.display()
    );
    run_nginx(dir, &conf, port)
}

/// A running `agent dump` whose stdout goes to a file.
pub struct Agent {
    proc: Proc,
    out: PathBuf,
    err: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts `agent dump ARGS` and waits until its programs are attached.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with("dump", args, &[])
    }

    /// Starts `agent SUBCOMMAND ARGS` with extra environment variables.
    pub fn start_with(subcommand: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.jsonl");
        let err = dir.path().join("err.log");
        let child = Command::new(agent_bin())
            .arg(subcommand)
            .args(args)
            // Counter lines only at exit, unless the caller wants them.
            .args(if args.contains(&"--stats-interval-s") {
                &[][..]
            } else {
                &["--stats-interval-s", "0"][..]
            })
            .env("AGENT_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .envs(env.iter().copied())
            .stdout(fs::File::create(&out).expect("stdout file"))
            .stderr(fs::File::create(&err).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "spawn {}: {e} (build it with `cargo xtask build --release`)",
                    agent_bin().display()
                )
            });
        let mut agent = Self {
            proc: Proc(child),
            out,
            err,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = agent.stderr();
            if log.contains("capture attached") {
                break;
            }
            if let Ok(Some(status)) = agent.proc.0.try_wait() {
                panic!("agent exited with {status} before attaching:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "agent did not attach in 60 s:\n{log}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// What the agent wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// SIGINT, wait for a clean exit, and return the dumped chunks and the log.
    pub fn stop(self) -> (Vec<Value>, String) {
        let (text, log) = self.stop_raw();
        let chunks = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect();
        (chunks, log)
    }

    /// SIGINT, wait for a clean exit, and return stdout and the log as text.
    pub fn stop_raw(mut self) -> (String, String) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.proc.0.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.proc.0.try_wait().expect("wait agent") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit 30 s after SIGINT"
            );
            thread::sleep(Duration::from_millis(20));
        };
        let log = self.stderr();
        assert!(status.success(), "agent exited with {status}:\n{log}");
        let mut text = String::new();
        fs::File::open(&self.out)
            .and_then(|mut f| f.read_to_string(&mut text))
            .expect("read agent stdout");
        (text, log)
    }
}

/// Value of `name=N` in the agent's final capture counters line.
pub fn counter(log: &str, name: &str) -> u64 {
    counter_in(log, "capture stopped", name)
}

/// Value of `name=N` in the last log line containing `marker`.
pub fn counter_in(log: &str, marker: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} line in:\n{log}"));
    field(line, name).unwrap_or_else(|| panic!("no counter {name} in {line}"))
}

/// Value of `name=N` in a log line, where `name` starts a field: after a
/// space or an `=` (`kernel=events=3`), so `spans` does not match `server_spans`.
pub fn field(line: &str, name: &str) -> Option<u64> {
    let key = format!("{name}=");
    line.match_indices(&key).find_map(|(at, _)| {
        let before = line[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        line[at + key.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    })
}

/// Reverses `agent dump`'s payload escaping.
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'\\' => out.push(b'\\'),
                b'x' if i + 3 < b.len() => {
                    out.push(u8::from_str_radix(&s[i + 2..i + 4], 16).expect("hex escape"));
                    i += 2;
                }
                c => panic!("unknown escape \\{}", c as char),
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Field accessors for dump lines.
pub trait ChunkExt {
    fn s(&self, k: &str) -> &str;
    fn n(&self, k: &str) -> u64;
    fn payload(&self) -> Vec<u8>;
}

impl ChunkExt for Value {
    fn s(&self, k: &str) -> &str {
        self[k]
            .as_str()
            .unwrap_or_else(|| panic!("no string {k} in {self}"))
    }
    fn n(&self, k: &str) -> u64 {
        self[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no number {k} in {self}"))
    }
    fn payload(&self) -> Vec<u8> {
        unescape(self.s("payload"))
    }
}

/// Runs a command to completion, returning stdout; panics with stderr on failure.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A python3 child running `script`, with piped stdin/stdout for hand-shaking.
pub fn python(script: &str, args: &[&str]) -> Child {
    python_env(script, args, &[])
}

/// Like [`python`], with extra environment variables.
pub fn python_env(script: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn python3")
}

/// Reads one line from a child's stdout.
pub fn read_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("piped stdout"))
        .read_line(&mut line)
        .expect("read child line");
    line.trim().to_string()
}

/// Writes one line to a child's stdin.
pub fn write_line(child: &mut Child, s: &str) {
    let stdin = child.stdin.as_mut().expect("piped stdin");
    writeln!(stdin, "{s}")
        .and_then(|()| stdin.flush())
        .expect("write child line");
}

/// `curl` GET of `path` on loopback `port`; panics unless it succeeds.
pub fn curl_ok(port: u16, path: &str) {
    let ok = Command::new("curl")
        .args(["-sS", "-o", "/dev/null"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .status()
        .expect("curl")
        .success();
    assert!(ok, "curl {path} failed");
}
