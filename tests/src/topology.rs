//! The reference topology of the trace accuracy benchmark, and the check of
//! each exported trace against the tree it should be.
//!
//! ```text
//! driver -> gateway (nginx: a fresh traceparent per request)
//!             -> A  GET /order/N   thread-per-request HTTP/1 (Python ThreadingHTTPServer)
//!                  -> B  demo.Orders/Get   gRPC (grpcio)
//!                  -> C  GET /stock/N      asyncio HTTP/1, requests overlap on one thread
//! ```
//!
//! The agent traces the connections to A, B and C, so each request should
//! give one trace of six spans: the gateway's CLIENT span (child of the
//! header's span, which the gateway made up), A's SERVER span under it, A's
//! two CLIENT spans under that, and B's and C's SERVER spans under those.
//! A forwards the trace headers it received (`forward`) or nothing (`none`):
//! then A's calls can only be linked by the thread that serves the request.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    free_port,
    otlp_receiver::ReceivedSpan,
    peers::{script, venv_python, LineProc},
    Proc,
};

/// The span id the gateway puts in every traceparent it makes up.
pub const GATEWAY_SPAN: &str = "00f067aa0ba902b7";

pub struct Topology {
    pub gateway: u16,
    /// Ports of A, B and C: what the agent traces (`--port` each).
    pub services: [u16; 3],
    _nginx: Proc,
    _a: LineProc,
    _b: LineProc,
    _c: LineProc,
    _dir: tempfile::TempDir,
}

fn service(args: &[&str], what: &str) -> LineProc {
    let mut cmd = Command::new(venv_python());
    cmd.arg(script("topology.py")).args(args);
    let p = LineProc::spawn(cmd, what);
    p.expect_line("ready", Duration::from_secs(30));
    p
}

impl Topology {
    /// Starts B, C, A (forwarding trace headers or not) and the gateway.
    pub fn start(forward: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (g, a, b, c) = (free_port(), free_port(), free_port(), free_port());
        let _b = service(&["b", &b.to_string()], "service B (gRPC)");
        let _c = service(&["c", &c.to_string()], "service C (asyncio)");
        let mode = if forward { "forward" } else { "none" };
        let _a = service(
            &["a", &a.to_string(), &b.to_string(), &c.to_string(), mode],
            "service A",
        );
        let _nginx = gateway(dir.path(), g, a);
        Self {
            gateway: g,
            services: [a, b, c],
            _nginx,
            _a,
            _b,
            _c,
            _dir: dir,
        }
    }

    /// Sends GET /order/0.. `requests`, `concurrency` at a time; returns the
    /// number answered 200.
    pub fn drive(&self, requests: usize, concurrency: usize) -> usize {
        drive(self.gateway, requests, concurrency, "/order/")
    }
}

/// An asyncio server (D) calling C for each request without forwarding
/// anything: an event loop, whose calls the agent must not guess at.
pub struct EventLoop {
    /// D's port; C's is `services[1]`.
    pub port: u16,
    /// Ports of D and C (what the agent traces).
    pub services: [u16; 2],
    _d: LineProc,
    _c: LineProc,
}

impl EventLoop {
    pub fn start() -> Self {
        let (d, c) = (free_port(), free_port());
        let _c = service(&["c", &c.to_string()], "service C (asyncio)");
        let _d = service(
            &["d", &d.to_string(), &c.to_string()],
            "service D (asyncio, calls C)",
        );
        Self {
            port: d,
            services: [d, c],
            _d,
            _c,
        }
    }
}

/// Sends GET `prefix`0.. `requests` to `port`, `concurrency` at a time (one
/// keep-alive connection each); returns the number answered 200.
pub fn drive(port: u16, requests: usize, concurrency: usize, prefix: &str) -> usize {
    let out = Command::new(venv_python())
        .arg(script("topology.py"))
        .args([
            "drive",
            &port.to_string(),
            &requests.to_string(),
            &concurrency.to_string(),
            prefix,
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("run the topology driver");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("driver printed {text:?}"))
}

/// nginx proxying to A over keep-alive, starting a trace per request.
fn gateway(dir: &Path, port: u16, a: u16) -> Proc {
    let conf = format!(
        "daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream a {{ server 127.0.0.1:{a}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://a; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_set_header traceparent \"00-$request_id-{GATEWAY_SPAN}-01\";
    }}
  }}
}}
",
        d = dir.display()
    );
    crate::run_nginx(dir, &conf, port)
}

/// How the exported traces compare with the expected ones.
#[derive(Debug, Default)]
pub struct Score {
    pub requests: usize,
    /// Traces exactly as expected.
    pub exact: usize,
    /// Distinct trace ids among the exported spans.
    pub traces: usize,
    /// Why the others are not, by kind (a trace may have several).
    pub failures: BTreeMap<&'static str, usize>,
    /// One wrong trace, for a look.
    pub example: Option<String>,
}

impl Score {
    pub fn share(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.exact as f64 / self.requests as f64
        }
    }
}

/// (kind, name, parent's position in this list or None for the gateway span)
const EXPECTED: [(&str, &str, Option<usize>); 6] = [
    ("CLIENT", "GET /order/{n}", None),
    ("SERVER", "GET /order/{n}", Some(0)),
    ("CLIENT", "demo.Orders/Get", Some(1)),
    ("SERVER", "demo.Orders/Get", Some(2)),
    ("CLIENT", "GET /stock/{n}", Some(1)),
    ("SERVER", "GET /stock/{n}", Some(4)),
];

/// Compares the trace of each request 0..`requests` with its expected tree.
pub fn score(spans: &[ReceivedSpan], requests: usize) -> Score {
    let mut by_trace: HashMap<&str, Vec<&ReceivedSpan>> = HashMap::new();
    for s in spans {
        by_trace.entry(&s.trace_id).or_default().push(s);
    }
    let mut sc = Score {
        requests,
        traces: by_trace.len(),
        ..Score::default()
    };
    let gateway_spans: HashMap<String, &ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == "CLIENT" && s.name.starts_with("GET /order/"))
        .map(|s| (s.name.clone(), s))
        .collect();
    for n in 0..requests {
        let fail = |why: &'static str, sc: &mut Score, trace: &[&ReceivedSpan]| {
            *sc.failures.entry(why).or_default() += 1;
            if sc.example.is_none() {
                let lines: Vec<String> = trace
                    .iter()
                    .map(|s| {
                        format!(
                            "  {} {} {:?} span {} parent {}",
                            s.service_name, s.kind, s.name, s.span_id, s.parent_span_id
                        )
                    })
                    .collect();
                sc.example = Some(format!("request {n}: {why}\n{}", lines.join("\n")));
            }
        };
        let Some(g) = gateway_spans.get(&format!("GET /order/{n}")) else {
            fail("gateway span missing", &mut sc, &[]);
            continue;
        };
        let trace = by_trace
            .get(g.trace_id.as_str())
            .cloned()
            .unwrap_or_default();
        let mut found: Vec<Option<&ReceivedSpan>> = Vec::new();
        let mut ok = true;
        for (kind, name, parent) in EXPECTED {
            let name = name.replace("{n}", &n.to_string());
            let want_parent = match parent {
                None => GATEWAY_SPAN.to_string(),
                Some(i) => found[i].map_or_else(String::new, |p| p.span_id.clone()),
            };
            let candidates: Vec<&ReceivedSpan> = trace
                .iter()
                .copied()
                .filter(|s| s.kind == kind && s.name == name)
                .collect();
            let hit = candidates
                .iter()
                .copied()
                .find(|s| s.parent_span_id == want_parent);
            if hit.is_none() {
                ok = false;
                let why = if candidates.is_empty() {
                    "span missing from the trace (missing or split)"
                } else {
                    "wrong parent"
                };
                fail(why, &mut sc, &trace);
            }
            found.push(hit);
        }
        if trace.len() > EXPECTED.len() {
            ok = false;
            fail("extra spans in the trace (merged)", &mut sc, &trace);
        }
        if ok {
            sc.exact += 1;
        }
    }
    sc
}
