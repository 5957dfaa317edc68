//! HTTP/2 and gRPC peers for the integration tests and the h2 benchmark: nginx
//! with h2c, curl and h2load (Debian), a hypercorn HTTP/2 server and grpcio
//! server and client (Python venv), @grpc/grpc-js client and server (Node).
//!
//! `cargo xtask setup` installs them: the Python and Node ones from the pins in
//! `tests/peers/` into `target/peers/`. Their scripts live in `tests/peers/`.
//! Every process is a [`Proc`] (stopped by pid on drop); servers are waited for
//! until they accept.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use crate::{run_ok, wait_port, Proc};

/// The repository root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where `cargo xtask setup` puts the Python venv and the Node modules.
pub fn peers_dir() -> PathBuf {
    repo().join("target/peers")
}

/// The peers' scripts (`tests/peers/*.py`, `*.js`).
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join(name)
}

/// The venv's python (grpcio, hypercorn).
pub fn venv_python() -> PathBuf {
    let p = peers_dir().join("venv/bin/python3");
    assert!(
        p.is_file(),
        "{} missing: run `cargo xtask setup` (makes the peers' venv)",
        p.display()
    );
    p
}

/// `node_modules` with @grpc/grpc-js (for `NODE_PATH`).
pub fn node_modules() -> PathBuf {
    let p = peers_dir().join("node/node_modules");
    assert!(
        p.join("@grpc/grpc-js").is_dir(),
        "{} missing: run `cargo xtask setup` (installs @grpc/grpc-js)",
        p.display()
    );
    p
}

/// A child whose stdout lines are read by a thread (none lost between reads),
/// with its stdin piped for commands.
pub struct LineProc {
    proc: Proc,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl LineProc {
    /// Spawns `cmd` with piped stdin/stdout (stderr inherited).
    pub fn spawn(mut cmd: Command, what: &str) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("spawn {what} ({cmd:?}): {e}; is `cargo xtask setup` done?")
            });
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line.trim().to_string()).is_err() {
                    break;
                }
            }
        });
        Self {
            proc: Proc(child),
            stdin,
            lines,
            what: what.to_string(),
        }
    }

    /// The next stdout line; panics after `timeout` or when the child closed stdout.
    pub fn line(&self, timeout: Duration) -> String {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("{}: no output line within {timeout:?} ({e})", self.what))
    }

    /// Every line printed so far, without waiting.
    pub fn pending(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Waits for the line `want`; panics on any other line first.
    pub fn expect_line(&self, want: &str, timeout: Duration) {
        let got = self.line(timeout);
        assert_eq!(got, want, "{}: unexpected output", self.what);
    }

    /// Writes a line to the child's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: write stdin: {e}", self.what));
    }

    pub fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// Waits up to `timeout` for the child to exit by itself (else it is
    /// stopped on drop as usual).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if matches!(self.proc.0.try_wait(), Ok(Some(_))) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

fn python_peer(script_name: &str, args: &[&str], service: &str) -> LineProc {
    let mut cmd = Command::new(venv_python());
    cmd.arg(script(script_name))
        .args(args)
        .env("OTEL_SERVICE_NAME", service)
        .env("PYTHONUNBUFFERED", "1");
    // Loopback only: no proxies.
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "grpc_proxy",
    ] {
        cmd.env_remove(v);
    }
    LineProc::spawn(cmd, script_name)
}

fn node_peer(script_name: &str, args: &[&str], service: &str) -> LineProc {
    let mut cmd = Command::new("node");
    cmd.arg(script(script_name))
        .args(args)
        .env("NODE_PATH", node_modules())
        .env("OTEL_SERVICE_NAME", service);
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "grpc_proxy",
    ] {
        cmd.env_remove(v);
    }
    LineProc::spawn(cmd, script_name)
}

const READY: Duration = Duration::from_secs(30);

/// Service names the Python and Node peers declare (`OTEL_SERVICE_NAME`).
pub const GRPC_SERVER_SERVICE: &str = "grpc-server";
pub const GRPC_CLIENT_SERVICE: &str = "grpc-client";
pub const NODE_GRPC_SERVER_SERVICE: &str = "node-grpc-server";
pub const NODE_GRPC_CLIENT_SERVICE: &str = "node-grpc-client";
pub const H2_SERVER_SERVICE: &str = "h2-server";

/// nginx (one worker, foreground) on `127.0.0.1:{port}` with h2c prior
/// knowledge (`listen ... http2`), serving `root` with keep-alive:
/// files under `root` answer 200, missing ones 404 (`/missing`), `/fail` 503.
pub fn nginx_h2c(dir: &Path, root: &Path, port: u16) -> Proc {
    nginx_paths(dir, root, port, true, None)
}

/// Like [`nginx_h2c`], `http2` choosing h2c or HTTP/1.1 on `port`; with an
/// access log of lines `{uri} {status} {protocol}`.
pub fn nginx_paths(
    dir: &Path,
    root: &Path,
    port: u16,
    http2: bool,
    access_log: Option<&Path>,
) -> Proc {
    let log = access_log.map_or("off".to_string(), |p| format!("{} paths", p.display()));
    let conf = format!(
        "daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log crit;
events {{ worker_connections 4096; }}
http {{
  log_format paths '$uri $status $server_protocol';
  access_log {log};
  log_not_found off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests 1000000; keepalive_timeout 60s;
  server {{
    listen 127.0.0.1:{port}{h2};
    root {r};
    location = /fail {{ return 503; }}
  }}
}}
",
        d = dir.display(),
        r = root.display(),
        h2 = if http2 { " http2" } else { "" },
    );
    crate::run_nginx(dir, &conf, port)
}

/// The hypercorn HTTP/2 server (`tests/peers/h2_server.py`): h2c with prior
/// knowledge and by HTTP/1.1 `Upgrade: h2c`; `/ok` 200 "hello h2" (8 bytes),
/// `/fail` 503, anything else 404. Service name [`H2_SERVER_SERVICE`].
pub fn h2_server(port: u16) -> LineProc {
    let p = python_peer("h2_server.py", &[&port.to_string()], H2_SERVER_SERVICE);
    p.expect_line("ready", READY);
    wait_port(port);
    p
}

/// Body of the hypercorn server's `/ok`.
pub const H2_SERVER_OK_BODY: &str = "hello h2";

/// The grpcio server (`tests/peers/grpc_server.py`): `demo.Echo` with Unary,
/// ServerStream (3 responses), ClientStream, Bidi, Fail (NOT_FOUND "nope"),
/// Crash (INTERNAL). Service name [`GRPC_SERVER_SERVICE`]. Read each call's
/// `(method, traceparent or "-")` with [`grpc_server_call`].
pub fn grpc_server(port: u16) -> LineProc {
    let p = python_peer("grpc_server.py", &[&port.to_string()], GRPC_SERVER_SERVICE);
    p.expect_line("ready", READY);
    p
}

/// The @grpc/grpc-js server (`tests/peers/grpc_server.js`): `demo.Echo` Unary
/// and Fail (NOT_FOUND). Service name [`NODE_GRPC_SERVER_SERVICE`].
pub fn node_grpc_server(port: u16) -> LineProc {
    let p = node_peer(
        "grpc_server.js",
        &[&port.to_string()],
        NODE_GRPC_SERVER_SERVICE,
    );
    p.expect_line("ready", READY);
    p
}

/// The next call a gRPC server peer logged: (method, traceparent or "-").
pub fn grpc_server_call(server: &LineProc) -> (String, String) {
    let line = server.line(Duration::from_secs(20));
    let (m, tp) = line
        .split_once(' ')
        .unwrap_or_else(|| panic!("bad server line {line:?}"));
    (m.to_string(), tp.to_string())
}

/// The grpcio client (`tests/peers/grpc_client.py`): ONE channel to
/// `127.0.0.1:{port}`, connected before this returns, open until drop.
pub struct GrpcClient(pub LineProc);

/// gRPC calls of [`GrpcClient::call`]: (command, demo.Echo method).
pub const GRPC_CALLS: [(&str, &str); 6] = [
    ("unary", "Unary"),
    ("sstream", "ServerStream"),
    ("cstream", "ClientStream"),
    ("bidi", "Bidi"),
    ("fail", "Fail"),
    ("crash", "Crash"),
];

impl GrpcClient {
    /// Starts the client; service name [`GRPC_CLIENT_SERVICE`].
    pub fn start(port: u16) -> Self {
        let p = python_peer("grpc_client.py", &[&port.to_string()], GRPC_CLIENT_SERVICE);
        p.expect_line("ready", READY);
        Self(p)
    }

    /// Makes one call (`unary`, `sstream`, `cstream`, `bidi`, `fail`, `crash`),
    /// with `traceparent` metadata if given; returns (status name, responses).
    pub fn call(&mut self, call: &str, traceparent: Option<&str>) -> (String, u32) {
        self.0
            .send(&format!("{call} {}", traceparent.unwrap_or("-")));
        let line = self.0.line(Duration::from_secs(20));
        let mut w = line.split_whitespace();
        let status = w.next().unwrap_or_default().to_string();
        let n = w
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("bad client line {line:?}"));
        (status, n)
    }
}

/// One unary call `demo.Echo/{method}` from a fresh @grpc/grpc-js client
/// process (`tests/peers/grpc_client.js`, service [`NODE_GRPC_CLIENT_SERVICE`]);
/// returns the status name.
pub fn node_grpc_call(port: u16, method: &str, traceparent: Option<&str>) -> String {
    let mut p = node_peer(
        "grpc_client.js",
        &[&port.to_string(), method, traceparent.unwrap_or("-")],
        NODE_GRPC_CLIENT_SERVICE,
    );
    let status = p.line(Duration::from_secs(30));
    p.wait_exit(Duration::from_secs(10));
    status
}

/// What one curl request did.
#[derive(Debug, Clone)]
pub struct CurlResult {
    pub status: u16,
    /// `%{http_version}`: "2" or "1.1".
    pub http_version: String,
    pub local_port: u16,
    /// Response body bytes.
    pub size_download: u64,
    /// Request body bytes.
    pub size_upload: u64,
}

/// curl over HTTP/2 cleartext: `prior_knowledge` (`--http2-prior-knowledge`)
/// or by Upgrade (`--http2`); extra `curl` arguments (e.g. `-H`, `-d`).
pub fn curl_h2(port: u16, path: &str, prior_knowledge: bool, args: &[&str]) -> CurlResult {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version} %{local_port} %{size_download} %{size_upload}",
    ])
    .arg(if prior_knowledge {
        "--http2-prior-knowledge"
    } else {
        "--http2"
    })
    .args(args)
    .arg(format!("http://127.0.0.1:{port}{path}"))
    .env_remove("http_proxy")
    .env_remove("HTTP_PROXY")
    .env_remove("all_proxy");
    let out = run_ok(&mut cmd);
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f.len(), 5, "curl -w output {out:?}");
    CurlResult {
        status: f[0].parse().expect("status"),
        http_version: f[1].to_string(),
        local_port: f[2].parse().expect("local port"),
        size_download: f[3].parse().expect("size_download"),
        size_upload: f[4].parse().expect("size_upload"),
    }
}

/// h2load's summary.
#[derive(Debug, Clone, Default)]
pub struct H2loadReport {
    pub total: u64,
    pub started: u64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    /// "2xx", "3xx", "4xx", "5xx" -> count.
    pub status: BTreeMap<String, u64>,
    /// Requests per second ("finished in ..., N req/s").
    pub rps: f64,
    pub text: String,
}

/// Runs `h2load ARGS` (add `--h1` for HTTP/1.1) and parses its summary;
/// panics with the output if it failed to run.
pub fn h2load(args: &[&str]) -> H2loadReport {
    let out = Command::new("h2load")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("spawn h2load: {e} (cargo xtask setup installs nghttp2-client)")
        });
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "h2load {args:?} failed: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_h2load(&text)
}

/// Parses h2load's summary lines.
pub fn parse_h2load(text: &str) -> H2loadReport {
    let mut r = H2loadReport {
        text: text.to_string(),
        ..Default::default()
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("requests:") {
            // "3000 total, 3000 started, 3000 done, 1000 succeeded, 2000 failed, 0 errored, 0 timeout"
            for part in rest.split(',') {
                let mut w = part.split_whitespace();
                let (Some(n), Some(k)) = (w.next().and_then(|n| n.parse().ok()), w.next()) else {
                    continue;
                };
                match k {
                    "total" => r.total = n,
                    "started" => r.started = n,
                    "done" => r.done = n,
                    "succeeded" => r.succeeded = n,
                    "failed" => r.failed = n,
                    "errored" => r.errored = n,
                    "timeout" => r.timeout = n,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            for part in rest.split(',') {
                let mut w = part.split_whitespace();
                if let (Some(n), Some(k)) = (w.next().and_then(|n| n.parse().ok()), w.next()) {
                    r.status.insert(k.to_string(), n);
                }
            }
        } else if let Some(rest) = line.strip_prefix("finished in") {
            r.rps = rest
                .split(',')
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
        }
    }
    r
}

/// Writes an h2load `-i` URI file: the first URI absolute (it fixes scheme,
/// host and port), the rest paths; each client cycles through them in order.
pub fn h2load_uri_file(path: &Path, port: u16, paths: &[&str]) {
    let mut text = String::new();
    for (i, p) in paths.iter().enumerate() {
        if i == 0 {
            text += &format!("http://127.0.0.1:{port}{p}\n");
        } else {
            text += &format!("{p}\n");
        }
    }
    fs::write(path, text).expect("write h2load uri file");
}

/// `{uri} {status}` -> count from an access log written by [`nginx_paths`].
pub fn access_log_counts(path: &Path) -> BTreeMap<(String, u16), u64> {
    let mut m = BTreeMap::new();
    for line in fs::read_to_string(path).unwrap_or_default().lines() {
        let mut w = line.split_whitespace();
        if let (Some(uri), Some(Ok(status))) = (w.next(), w.next().map(str::parse::<u16>)) {
            *m.entry((uri.to_string(), status)).or_insert(0) += 1;
        }
    }
    m
}
