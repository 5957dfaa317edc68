//! A real OTLP/HTTP receiver for integration tests: [otelite](https://crates.io/crates/otelite)
//! 0.1.156, run as a child process on loopback with its storage in a temp dir.
//!
//! Everything otelite-specific (command line, environment, how spans are read
//! back) lives in this file, behind [`Receiver`] and [`ReceivedSpan`].
//!
//! How it works:
//! * `otelite serve --addr 127.0.0.1:<api>` starts three listeners: the
//!   dashboard/REST API on `<api>`, OTLP/HTTP on `OTELITE_OTLP_HTTP_PORT` and
//!   OTLP/gRPC on `OTELITE_OTLP_GRPC_PORT`. All three get free loopback ports.
//! * OTLP/HTTP accepts `POST /v1/traces` with `application/x-protobuf` (or
//!   JSON), `Content-Encoding: gzip`/`deflate`/identity. A span is committed to
//!   SQLite before the 200 response, so it is queryable as soon as the export
//!   returned.
//! * Spans are read back with `GET /api/traces/export?format=json` (uncached,
//!   up to 10 000 spans, every field of otelite's span model).
//!
//! What otelite does to the data (see also `ReceivedSpan` docs):
//! * attribute values (span and resource) are stored as **strings**:
//!   int 200 -> "200", bool -> "true", double 0.25 -> "0.25", arrays
//!   "[a, b]". So every `attributes`/`resource` value here is a
//!   `serde_json::Value::String`; use [`ReceivedSpan::attr`] to compare
//!   receiver-independently.
//! * the instrumentation scope is folded into the span attributes as
//!   `otel.scope.name` / `otel.scope.version`; this module removes those two
//!   keys again (use [`ReceivedSpan::attributes`] for the span's own ones).
//! * SPAN_KIND_UNSPECIFIED is reported as INTERNAL.
//! * links, trace_state, flags, dropped_*_count and event attributes are not
//!   exposed; status message is not exposed by this API.
//! * a second span with the same (trace_id, span_id) is silently dropped
//!   (dedup on insert), so duplicate exports are NOT visible here.
//! * spans with an all-zero/mis-sized trace or span id are rejected
//!   (counted as `rejected_spans` in the HTTP response), never stored.
//! * the OTLP/HTTP response body is JSON (`{"status":"success",...}`), not a
//!   protobuf `ExportTraceServiceResponse`, even for protobuf requests.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Binary name, pinned version and install command for the project's setup step.
const BIN_NAME: &str = "otelite";
pub const RECEIVER_VERSION: &str = "0.1.156";
pub const INSTALL_HINT: &str =
    "run `cargo xtask setup` (it runs `cargo install otelite --version =0.1.156 --locked`) \
     or set OTLP_RECEIVER_BIN to an otelite 0.1.156 binary";

/// How long `start()` waits for the listeners to come up (per attempt).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts with fresh ports if a port got taken between picking and binding.
const START_ATTEMPTS: usize = 4;
/// Scope keys otelite folds into the span attributes.
const SCOPE_KEYS: [&str; 2] = ["otel.scope.name", "otel.scope.version"];

/// A real OTLP receiver on loopback for one test; killed on drop.
///
/// The child gets `PR_SET_PDEATHSIG(SIGKILL)`, so it also dies if the thread
/// that called `start()` exits without dropping it (e.g. the test process is
/// killed). Consequence: create and drop a `Receiver` on the same thread
/// (the normal case for a `#[test]`); don't park it in a global shared by tests.
pub struct Receiver {
    child: Child,
    dir: tempfile::TempDir,
    otlp_port: u16,
    api_port: u16,
}

/// One span as the receiver stored it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// 16 lowercase hex digits, "" for a root span (empty/invalid parent id in OTLP).
    pub parent_span_id: String,
    pub name: String,
    /// "INTERNAL" / "SERVER" / "CLIENT" / "PRODUCER" / "CONSUMER" (UNSPECIFIED -> "INTERNAL").
    pub kind: String,
    pub start_ns: u64,
    pub end_ns: u64,
    /// "UNSET" / "OK" / "ERROR".
    pub status_code: String,
    /// Span attributes (without otelite's `otel.scope.*`). otelite keeps only the
    /// string form, so values are always `Value::String` (200 -> "200").
    pub attributes: BTreeMap<String, Value>,
    /// Event names in the order they were sent.
    pub events: Vec<String>,
    /// Resource `service.name` ("" if absent).
    pub service_name: String,
    /// All resource attributes (including service.name), values as strings.
    pub resource: BTreeMap<String, Value>,
}

impl ReceivedSpan {
    /// Attribute value in string form, independent of how the receiver typed it:
    /// strings as-is, numbers/bools via their JSON text (`200`, `true`, `0.25`).
    pub fn attr(&self, key: &str) -> Option<String> {
        self.attributes.get(key).map(value_as_string)
    }

    /// Resource attribute in string form (see [`ReceivedSpan::attr`]).
    pub fn resource_attr(&self, key: &str) -> Option<String> {
        self.resource.get(key).map(value_as_string)
    }

    /// True if this span has no parent.
    pub fn is_root(&self) -> bool {
        self.parent_span_id.is_empty()
    }
}

fn value_as_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Receiver {
    /// Starts the receiver on a free loopback port and waits until it accepts OTLP/HTTP.
    /// Panics with a clear message if the binary is missing (name the xtask setup step).
    pub fn start() -> Receiver {
        let bin = receiver_binary();
        let mut last_err = String::new();
        for attempt in 1..=START_ATTEMPTS {
            match Self::try_start(&bin) {
                Ok(r) => return r,
                Err(e) => {
                    last_err = format!("attempt {attempt}: {e}");
                    eprintln!("otlp_receiver: {last_err}; retrying with new ports");
                }
            }
        }
        panic!(
            "otlp_receiver: could not start {} ({}): {last_err}",
            BIN_NAME,
            bin.display()
        );
    }

    fn try_start(bin: &Path) -> Result<Receiver, String> {
        let dir = tempfile::Builder::new()
            .prefix("otlp-receiver-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let data = dir.path().join("data");
        let home = dir.path().join("home");
        for d in [&data, &home] {
            std::fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        }
        let [api_port, otlp_port, grpc_port] = free_ports::<3>()?;
        let stdout = File::create(dir.path().join("stdout.log")).map_err(|e| e.to_string())?;
        let stderr = File::create(dir.path().join("stderr.log")).map_err(|e| e.to_string())?;

        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--addr")
            .arg(format!("127.0.0.1:{api_port}"))
            .arg("--storage-path")
            .arg(&data)
            .arg("--no-color")
            // Ports of the OTLP listeners (they bind on --addr's IP).
            .env("OTELITE_OTLP_HTTP_PORT", otlp_port.to_string())
            .env("OTELITE_OTLP_GRPC_PORT", grpc_port.to_string())
            .env("OTELITE_DATA_DIR", &data)
            // Never purge: tests may send spans with synthetic (old) timestamps.
            .env("OTELITE_AUTO_PURGE_ENABLED", "false")
            .env("OTELITE_STATS_MAINTENANCE_ENABLED", "false")
            // First run writes ~/.config/otelite/config.toml: keep it in the temp dir.
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            // otelite fetches LLM pricing JSON from GitHub in the background; make
            // that fail at once instead of reaching out from a test.
            .env("HTTPS_PROXY", "http://127.0.0.1:9")
            .env("https_proxy", "http://127.0.0.1:9")
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env_remove("OTELITE_ENDPOINT")
            .env_remove("OTELITE_RETENTION_DAYS")
            .env_remove("OTELITE_PURGE_SCHEDULE")
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let mut r = Receiver {
            child,
            dir,
            otlp_port,
            api_port,
        };

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = r.child.try_wait() {
                return Err(format!(
                    "{BIN_NAME} exited during startup ({status}):\n{}",
                    r.logs()
                ));
            }
            let otlp_ok = matches!(http_get(otlp_port, "/health"), Ok((200, _)));
            // /api/health reports the OTLP ports of the instance behind it: make sure it
            // is ours (another process could have grabbed a port we picked).
            let api_ok = otlp_ok
                && match http_get(api_port, "/api/health") {
                    Ok((200, body)) => {
                        serde_json::from_slice::<Value>(&body)
                            .ok()
                            .and_then(|v| v.get("otlp_http_port").and_then(Value::as_u64))
                            == Some(u64::from(otlp_port))
                    }
                    _ => false,
                };
            if otlp_ok && api_ok {
                if let Ok(Some(status)) = r.child.try_wait() {
                    return Err(format!(
                        "{BIN_NAME} exited during startup ({status}):\n{}",
                        r.logs()
                    ));
                }
                return Ok(r);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{BIN_NAME} not ready after {STARTUP_TIMEOUT:?} (otlp {otlp_port}, api {api_port}):\n{}",
                    r.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Base endpoint for OTEL_EXPORTER_OTLP_ENDPOINT, e.g. "http://127.0.0.1:PORT".
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_port)
    }

    /// Full traces URL (`{endpoint}/v1/traces`), for OTEL_EXPORTER_OTLP_TRACES_ENDPOINT.
    pub fn traces_endpoint(&self) -> String {
        format!("{}/v1/traces", self.endpoint())
    }

    /// All spans received so far, waiting up to `timeout` until `pred(&spans)` holds
    /// (poll every 100 ms); returns the last read set either way.
    ///
    /// Spans are sorted by (start_ns, trace_id, span_id).
    pub fn spans_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        let mut last = Vec::new();
        loop {
            match self.read_spans() {
                Ok(spans) => {
                    last = spans;
                    if pred(&last) {
                        return last;
                    }
                }
                Err(e) => self.assert_alive(&e),
            }
            if Instant::now() >= deadline {
                return last;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// All spans received so far (no waiting).
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans_until(Duration::ZERO, |_| true)
    }

    /// Process id of the receiver (e.g. to check it was killed).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The receiver's stdout+stderr so far (for assertion messages).
    pub fn logs(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            read("stdout.log"),
            read("stderr.log")
        )
    }

    fn assert_alive(&self, read_err: &str) {
        // try_wait needs &mut; check via /proc instead to keep &self.
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let dead = stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'));
        if dead {
            panic!(
                "otlp_receiver: {BIN_NAME} died ({read_err}):\n{}",
                self.logs()
            );
        }
    }

    fn read_spans(&self) -> Result<Vec<ReceivedSpan>, String> {
        let (status, body) = http_get(self.api_port, "/api/traces/export?format=json")?;
        if status != 200 {
            return Err(format!(
                "GET /api/traces/export: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| format!("bad JSON from {BIN_NAME}: {e}"))?;
        let arr = v
            .as_array()
            .ok_or_else(|| format!("expected a JSON array, got {v}"))?;
        let mut spans = arr.iter().map(parse_span).collect::<Result<Vec<_>, _>>()?;
        spans.sort_by(|a, b| {
            (a.start_ns, &a.trace_id, &a.span_id).cmp(&(b.start_ns, &b.trace_id, &b.span_id))
        });
        Ok(spans)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() && std::env::var_os("OTLP_RECEIVER_LOGS").is_some() {
            eprintln!("otlp_receiver logs:\n{}", self.logs());
        }
    }
}

/// `OTLP_RECEIVER_BIN`, else `$CARGO_HOME/bin/otelite`, else `~/.cargo/bin/otelite`.
fn receiver_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("OTLP_RECEIVER_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            panic!(
                "otlp_receiver: OTLP_RECEIVER_BIN={} does not exist; {INSTALL_HINT}",
                p.display()
            );
        }
        return p;
    }
    let mut tried = Vec::new();
    if let Some(ch) = std::env::var_os("CARGO_HOME") {
        tried.push(PathBuf::from(ch).join("bin").join(BIN_NAME));
    }
    if let Some(h) = std::env::var_os("HOME") {
        tried.push(PathBuf::from(h).join(".cargo").join("bin").join(BIN_NAME));
    }
    if let Some(p) = tried.iter().find(|p| p.is_file()) {
        return p.clone();
    }
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    panic!(
        "otlp_receiver: the OTLP receiver binary `{BIN_NAME}` {RECEIVER_VERSION} is not installed \
         (looked at: {}); {INSTALL_HINT}",
        tried.join(", ")
    );
}

/// N distinct free loopback ports (all held open while picking, then released).
fn free_ports<const N: usize>() -> Result<[u16; N], String> {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr().map_err(|e| e.to_string())?.port();
    }
    Ok(ports)
}

/// Minimal HTTP/1.1 GET on 127.0.0.1:port (Connection: close; handles chunked bodies).
fn http_get(port: u16, path: &str) -> Result<(u16, Vec<u8>), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.set_write_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send GET {path}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read GET {path}: {e}"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: malformed HTTP response"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let body = &raw[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("GET {path}: bad status line: {head}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk header")?;
        let size_txt = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_txt:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn str_field(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, Value> {
    v.and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

/// One element of otelite's `/api/traces/export` (its `SpanEntry`).
fn parse_span(v: &Value) -> Result<ReceivedSpan, String> {
    let ns = |key: &str| -> Result<u64, String> {
        v.get(key)
            .and_then(|t| t.as_u64().or_else(|| t.as_i64().map(|i| i.max(0) as u64)))
            .ok_or_else(|| format!("span without {key}: {v}"))
    };
    let mut attributes = string_map(v.get("attributes"));
    for k in SCOPE_KEYS {
        attributes.remove(k);
    }
    let resource = string_map(v.get("resource").and_then(|r| r.get("attributes")));
    let service_name = resource
        .get("service.name")
        .map(value_as_string)
        .unwrap_or_default();
    let events = v
        .get("events")
        .and_then(Value::as_array)
        .map(|es| es.iter().map(|e| str_field(e, "name")).collect())
        .unwrap_or_default();
    Ok(ReceivedSpan {
        trace_id: str_field(v, "trace_id").to_ascii_lowercase(),
        span_id: str_field(v, "span_id").to_ascii_lowercase(),
        parent_span_id: str_field(v, "parent_span_id").to_ascii_lowercase(),
        name: str_field(v, "name"),
        kind: str_field(v, "kind").to_ascii_uppercase(),
        start_ns: ns("start_time")?,
        end_ns: ns("end_time")?,
        status_code: v
            .get("status")
            .map(|s| str_field(s, "code").to_ascii_uppercase())
            .unwrap_or_else(|| "UNSET".into()),
        attributes,
        events,
        service_name,
        resource,
    })
}
