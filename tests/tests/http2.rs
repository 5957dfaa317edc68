//! HTTP/2 and gRPC end to end: real programs on both ends (curl, h2load, nginx,
//! hypercorn, grpcio, @grpc/grpc-js), a real OTLP receiver or the console,
//! assertions on the spans of both ends.
//!
//! The span contract (README, HTTP/2 section): one span per stream and end;
//! plain HTTP/2 named `{METHOD} {path}` with the HTTP attributes and
//! `network.protocol.version` "2"; gRPC named `package.Service/Method` with the
//! `rpc.*` attributes; `http2.hpack.incomplete` when a header could not be
//! decoded, in which case its attribute may be missing but never wrong.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Read,
    path::Path,
    time::Duration,
};

use integration_tests::{
    counter_in, free_port,
    otlp_receiver::{ReceivedSpan, Receiver},
    peers::{self, GrpcClient},
    require_root, Agent,
};
use serde_json::Value;

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A W3C context: (traceparent, trace id, parent span id).
fn context() -> (String, String, String) {
    let (t, s) = (random_hex(16), random_hex(8));
    (format!("00-{t}-{s}-01"), t, s)
}

/// A span from the receiver or from the console's OTLP-JSON lines, attributes
/// in string form (200 -> "200", true -> "true").
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    /// "SERVER", "CLIENT", ...
    kind: String,
    /// "UNSET", "OK", "ERROR".
    status: String,
    service: String,
    start_ns: u64,
    end_ns: u64,
    attrs: BTreeMap<String, String>,
}

impl Span {
    fn from_received(s: &ReceivedSpan) -> Self {
        Span {
            trace_id: s.trace_id.clone(),
            span_id: s.span_id.clone(),
            parent: s.parent_span_id.clone(),
            name: s.name.clone(),
            kind: s.kind.clone(),
            status: s.status_code.clone(),
            service: s.service_name.clone(),
            start_ns: s.start_ns,
            end_ns: s.end_ns,
            attrs: s
                .attributes
                .keys()
                .map(|k| (k.clone(), s.attr(k).unwrap_or_default()))
                .collect(),
        }
    }

    /// One `--output json` line (an OTLP-JSON `TracesData` with one span).
    fn from_json_line(line: &str) -> Self {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("bad OTLP-JSON line {line}: {e}"));
        let rs = &v["resourceSpans"][0];
        let kv = |list: &Value| -> BTreeMap<String, String> {
            list.as_array()
                .map(|a| {
                    a.iter()
                        .map(|kv| {
                            let val = &kv["value"];
                            let s = if let Some(s) = val.get("stringValue").and_then(Value::as_str)
                            {
                                s.to_string()
                            } else if let Some(i) = val.get("intValue") {
                                i.as_str()
                                    .map(str::to_string)
                                    .unwrap_or_else(|| i.to_string())
                            } else if let Some(b) = val.get("boolValue") {
                                b.to_string()
                            } else if let Some(d) = val.get("doubleValue") {
                                d.to_string()
                            } else {
                                val.to_string()
                            };
                            (kv["key"].as_str().unwrap_or_default().to_string(), s)
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let resource = kv(&rs["resource"]["attributes"]);
        let span = &rs["scopeSpans"][0]["spans"][0];
        let ns = |k: &str| {
            span[k]
                .as_str()
                .and_then(|s| s.parse().ok())
                .or_else(|| span[k].as_u64())
                .unwrap_or(0)
        };
        let kind = match span["kind"].as_i64().unwrap_or(0) {
            1 => "INTERNAL",
            2 => "SERVER",
            3 => "CLIENT",
            4 => "PRODUCER",
            5 => "CONSUMER",
            _ => "UNSPECIFIED",
        };
        let status = match span["status"]["code"].as_i64().unwrap_or(0) {
            1 => "OK",
            2 => "ERROR",
            _ => "UNSET",
        };
        let hex = |k: &str| span[k].as_str().unwrap_or_default().to_ascii_lowercase();
        Span {
            trace_id: hex("traceId"),
            span_id: hex("spanId"),
            parent: hex("parentSpanId"),
            name: span["name"].as_str().unwrap_or_default().to_string(),
            kind: kind.to_string(),
            status: status.to_string(),
            service: resource.get("service.name").cloned().unwrap_or_default(),
            start_ns: ns("startTimeUnixNano"),
            end_ns: ns("endTimeUnixNano"),
            attrs: kv(&span["attributes"]),
        }
    }

    fn attr(&self, k: &str) -> Option<&str> {
        self.attrs.get(k).map(String::as_str)
    }

    /// The attribute, which must be present.
    fn need(&self, k: &str) -> &str {
        self.attr(k).unwrap_or_else(|| {
            panic!(
                "span {:?} ({} {}) has no attribute {k}: {self:#?}",
                self.name, self.service, self.kind
            )
        })
    }

    fn incomplete(&self) -> bool {
        self.attr("http2.hpack.incomplete") == Some("true")
    }
}

fn received(receiver: &Receiver, timeout: Duration, pred: impl Fn(&[Span]) -> bool) -> Vec<Span> {
    let spans = receiver.spans_until(timeout, |s| {
        pred(&s.iter().map(Span::from_received).collect::<Vec<_>>())
    });
    spans.iter().map(Span::from_received).collect()
}

fn json_spans(out: &str) -> Vec<Span> {
    out.lines()
        .filter(|l| l.starts_with('{'))
        .map(Span::from_json_line)
        .collect()
}

fn start_trace_agent(port: u16, receiver: &Receiver) -> Agent {
    let endpoint = receiver.endpoint();
    Agent::start_with(
        "trace",
        &["--port", &port.to_string()],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    )
}

/// Collects spans until `want` of them are in; then waits a little longer so
/// that duplicates or extras show too.
fn settle(receiver: &Receiver, want: usize, keep: impl Fn(&Span) -> bool) -> Vec<Span> {
    let keep = &keep;
    received(receiver, Duration::from_secs(30), |s| {
        s.iter().filter(|x| keep(x)).count() >= want
    });
    std::thread::sleep(Duration::from_millis(1500));
    received(receiver, Duration::ZERO, |_| true)
        .into_iter()
        .filter(keep)
        .collect()
}

// ---------------------------------------------------------------- plain HTTP/2

/// One HTTP/2 request a test made and what its spans must say.
struct H2Case {
    method: &'static str,
    path: &'static str,
    query: String,
    status: u16,
    /// (traceparent, trace id, span id) when the request carried one.
    ctx: Option<(String, String, String)>,
    response_bytes: u64,
    request_bytes: u64,
}

/// The HTTP/2 attributes of one end of `case`.
fn check_h2_span(span: &Span, case: &H2Case, port: u16, what: &str) {
    let ctx = format!(
        "{what}: {} {}?{} ({} span of {}): {span:#?}",
        case.method, case.path, case.query, span.kind, span.service
    );
    assert!(
        !span.incomplete(),
        "a fresh connection decodes completely: {ctx}"
    );
    assert_eq!(span.name, format!("{} {}", case.method, case.path), "{ctx}");
    assert_eq!(span.need("http.request.method"), case.method, "{ctx}");
    assert_eq!(span.need("url.path"), case.path, "{ctx}");
    assert_eq!(span.need("url.query"), case.query, "{ctx}");
    assert_eq!(span.need("url.scheme"), "http", "{ctx}");
    assert_eq!(
        span.need("http.response.status_code"),
        case.status.to_string(),
        "{ctx}"
    );
    assert_eq!(span.need("server.address"), "127.0.0.1", "{ctx}");
    assert_eq!(span.need("server.port"), port.to_string(), "{ctx}");
    assert_eq!(span.need("network.protocol.name"), "http", "{ctx}");
    assert_eq!(span.need("network.protocol.version"), "2", "{ctx}");
    assert!(
        span.need("user_agent.original").starts_with("curl/"),
        "{ctx}"
    );
    assert_eq!(
        span.need("http.response.body.size"),
        case.response_bytes.to_string(),
        "DATA payload bytes: {ctx}"
    );
    if case.request_bytes > 0 && span.kind == "CLIENT" {
        assert_eq!(
            span.need("http.request.body.size"),
            case.request_bytes.to_string(),
            "{ctx}"
        );
    } else if let Some(n) = span.attr("http.request.body.size") {
        assert_eq!(n, case.request_bytes.to_string(), "{ctx}");
    }
    let error = case.status >= 500 || (case.status >= 400 && span.kind == "CLIENT");
    assert_eq!(
        span.status,
        if error { "ERROR" } else { "UNSET" },
        "5xx on both ends, 4xx on CLIENT spans only: {ctx}"
    );
    assert!(span.end_ns > span.start_ns, "{ctx}");
}

/// Finds both ends of every case among `spans` and checks them: names,
/// attributes, statuses, and parents (the CLIENT span's is the header's span
/// id when the request carried a context; the SERVER span is always the
/// CLIENT span's child, since both ends are on this host).
fn check_h2_cases(
    spans: &[Span],
    cases: &[H2Case],
    port: u16,
    client_service: &str,
    server_service: &str,
    log: &str,
) {
    assert_eq!(
        spans.len(),
        cases.len() * 2,
        "one CLIENT and one SERVER span per request: {spans:#?}\n{log}"
    );
    let traces: BTreeSet<&str> = cases
        .iter()
        .filter_map(|c| c.ctx.as_ref().map(|x| x.1.as_str()))
        .collect();
    for case in cases {
        let what = format!("{} {}?{}", case.method, case.path, case.query);
        let (client, server) = match &case.ctx {
            Some((_, t, s)) => {
                let mine: Vec<&Span> = spans.iter().filter(|x| &x.trace_id == t).collect();
                assert_eq!(
                    mine.len(),
                    2,
                    "{what}: two spans in trace {t}: {spans:#?}\n{log}"
                );
                let client = *mine
                    .iter()
                    .find(|x| x.kind == "CLIENT")
                    .unwrap_or_else(|| panic!("{what}: no CLIENT span: {mine:#?}"));
                let server = *mine
                    .iter()
                    .find(|x| x.kind == "SERVER")
                    .unwrap_or_else(|| panic!("{what}: no SERVER span: {mine:#?}"));
                assert_eq!(
                    &client.parent, s,
                    "{what}: the CLIENT span's parent is the header's span id: {client:#?}"
                );
                assert_eq!(
                    server.parent, client.span_id,
                    "{what}: the SERVER span's parent is the CLIENT span that sent its request on this host: {server:#?}"
                );
                (client, server)
            }
            None => {
                let name = format!("{} {}", case.method, case.path);
                let clients: Vec<&Span> = spans
                    .iter()
                    .filter(|x| {
                        x.kind == "CLIENT"
                            && !traces.contains(x.trace_id.as_str())
                            && x.name == name
                    })
                    .collect();
                assert_eq!(clients.len(), 1, "{what}: one CLIENT span named {name:?} outside the given traces: {spans:#?}\n{log}");
                let client = clients[0];
                assert!(
                    client.parent.is_empty(),
                    "{what}: no context, the CLIENT span is a root: {client:#?}"
                );
                let server = spans
                    .iter()
                    .find(|x| x.kind == "SERVER" && x.parent == client.span_id)
                    .unwrap_or_else(|| panic!("{what}: no SERVER span whose parent is the CLIENT span {}: {spans:#?}\n{log}", client.span_id));
                assert_eq!(
                    server.trace_id, client.trace_id,
                    "{what}: SERVER in the CLIENT's trace"
                );
                (client, server)
            }
        };
        assert_eq!(client.service, client_service, "{what}: {client:#?}");
        assert_eq!(server.service, server_service, "{what}: {server:#?}");
        check_h2_span(client, case, port, &what);
        check_h2_span(server, case, port, &what);
        assert!(
            client.start_ns <= server.start_ns && server.end_ns <= client.end_ns,
            "{what}: the CLIENT span contains the SERVER span: {client:#?} {server:#?}"
        );
    }
}

/// Runs the cases with curl (prior knowledge) against `port`.
fn curl_cases(port: u16, plan: &[(&'static str, &'static str, u16, bool)]) -> Vec<H2Case> {
    let mut cases = Vec::new();
    for (i, &(method, path, status, with_ctx)) in plan.iter().enumerate() {
        let ctx = with_ctx.then(context);
        let query = format!("case={i}&ctx={with_ctx}");
        let mut args: Vec<String> = Vec::new();
        if let Some((tp, _, _)) = &ctx {
            args.extend(["-H".into(), format!("traceparent: {tp}")]);
        }
        match method {
            "POST" => args.extend(["-d".into(), "hello=world".into()]),
            "HEAD" => args.push("-I".into()),
            _ => {}
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = peers::curl_h2(port, &format!("{path}?{query}"), true, &args);
        assert_eq!(
            (r.status, r.http_version.as_str()),
            (status, "2"),
            "curl {method} {path}: precondition (without the agent's help)"
        );
        cases.push(H2Case {
            method,
            path,
            query,
            status,
            ctx,
            response_bytes: r.size_download,
            request_bytes: r.size_upload,
        });
    }
    cases
}

/// (method, path, expected status, with a traceparent) for nginx.
const NGINX_PLAN: [(&str, &str, u16, bool); 7] = [
    ("GET", "/ok.txt", 200, true),
    ("GET", "/ok.txt", 200, false),
    ("GET", "/missing", 404, true),
    ("GET", "/missing", 404, false),
    ("GET", "/fail", 503, true),
    ("GET", "/fail", 503, false),
    // A response without DATA.
    ("HEAD", "/ok.txt", 200, true),
];

fn www(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("www");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("ok.txt"), "hello nginx h2\n").unwrap();
    root
}

#[test]
fn curl_h2c_to_nginx_spans_both_ends_with_statuses_attributes_and_parents() {
    if !require_root("h2c_curl_nginx") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = www(dir.path());
    let port = free_port();
    let _nginx = peers::nginx_h2c(dir.path(), &root, port);
    let receiver = Receiver::start();
    let agent = start_trace_agent(port, &receiver);
    let cases = curl_cases(port, &NGINX_PLAN);
    let spans = settle(&receiver, cases.len() * 2, |_| true);
    let (_, log) = agent.stop_raw();
    check_h2_cases(&spans, &cases, port, "curl", "nginx", &log);
}

#[test]
fn curl_h2c_to_a_python_http2_server_spans_both_ends() {
    if !require_root("h2c_curl_hypercorn") {
        return;
    }
    let port = free_port();
    let _server = peers::h2_server(port);
    let receiver = Receiver::start();
    let agent = start_trace_agent(port, &receiver);
    let plan = [
        ("GET", "/ok", 200, true),
        ("GET", "/ok", 200, false),
        ("GET", "/missing", 404, true),
        ("GET", "/missing", 404, false),
        ("GET", "/fail", 503, true),
        ("GET", "/fail", 503, false),
        ("POST", "/ok", 200, true),
    ];
    let cases = curl_cases(port, &plan);
    assert_eq!(
        cases[0].response_bytes,
        peers::H2_SERVER_OK_BODY.len() as u64
    );
    let spans = settle(&receiver, cases.len() * 2, |_| true);
    let (_, log) = agent.stop_raw();
    check_h2_cases(&spans, &cases, port, "curl", peers::H2_SERVER_SERVICE, &log);
}

#[test]
fn an_h2c_upgrade_request_answered_on_stream_1_gives_one_span_per_end() {
    if !require_root("h2c_upgrade") {
        return;
    }
    let port = free_port();
    let _server = peers::h2_server(port);
    let receiver = Receiver::start();
    let agent = start_trace_agent(port, &receiver);
    let (tp, t, s) = context();
    let header = format!("traceparent: {tp}");
    // No prior knowledge: curl sends HTTP/1.1 with `Upgrade: h2c`; the server
    // answers 101 and then the response on HTTP/2 stream 1.
    let r = peers::curl_h2(port, "/ok?via=upgrade", false, &["-H", &header]);
    assert_eq!(
        (r.status, r.http_version.as_str()),
        (200, "2"),
        "precondition: curl upgraded to h2c"
    );
    let spans = settle(&receiver, 2, |x| x.trace_id == t);
    let (_, log) = agent.stop_raw();
    assert_eq!(spans.len(), 2, "one CLIENT and one SERVER span for the upgraded request (no extra 101 span): {spans:#?}\n{log}");
    let client = spans
        .iter()
        .find(|x| x.kind == "CLIENT")
        .unwrap_or_else(|| panic!("no CLIENT span: {spans:#?}"));
    for kind in ["CLIENT", "SERVER"] {
        let span = spans
            .iter()
            .find(|x| x.kind == kind)
            .unwrap_or_else(|| panic!("no {kind} span: {spans:#?}"));
        // The request began as HTTP/1 and finished as stream 1: both ends
        // are still one request, the SERVER span under curl's CLIENT span.
        let parent = if kind == "CLIENT" {
            &s
        } else {
            &client.span_id
        };
        assert_eq!(&span.parent, parent, "{span:#?}\n{log}");
        assert_eq!(span.name, "GET /ok", "{span:#?}");
        assert_eq!(span.need("http.request.method"), "GET");
        assert_eq!(span.need("url.path"), "/ok");
        assert_eq!(span.need("url.query"), "via=upgrade");
        assert_eq!(
            span.need("http.response.status_code"),
            "200",
            "the status of stream 1, not the 101: {span:#?}"
        );
        assert_eq!(span.status, "UNSET", "{span:#?}");
        if let Some(n) = span.attr("http.response.body.size") {
            assert_eq!(n, r.size_download.to_string(), "{span:#?}");
        }
    }
}

// ------------------------------------------------------------ h2load, no loss

/// Path -> status of the nginx peers.
fn nginx_status(path: &str) -> Option<u16> {
    match path {
        "/ok.txt" => Some(200),
        "/missing" => Some(404),
        "/fail" => Some(503),
        _ => None,
    }
}

const LOAD_PATHS: [&str; 3] = ["/ok.txt", "/missing", "/fail"];

#[test]
fn h2load_streams_against_nginx_each_give_one_span_per_end_none_lost() {
    if !require_root("h2load_2000") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = www(dir.path());
    let port = free_port();
    let access_log = dir.path().join("access.log");
    let _nginx = peers::nginx_paths(dir.path(), &root, port, true, Some(&access_log));
    let agent = Agent::start_with(
        "trace",
        &["--port", &port.to_string(), "--output", "json"],
        &[],
    );
    let uris = dir.path().join("uris");
    peers::h2load_uri_file(&uris, port, &LOAD_PATHS);
    let report = peers::h2load(&[
        "-n",
        "2000",
        "-c",
        "4",
        "-m",
        "10",
        "-i",
        uris.to_str().unwrap(),
    ]);
    assert_eq!(
        report.done, 2000,
        "precondition: h2load made 2000 requests:\n{}",
        report.text
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (out, log) = agent.stop_raw();
    let handled = peers::access_log_counts(&access_log);
    assert_eq!(
        handled.values().sum::<u64>(),
        2000,
        "nginx logged 2000 requests: {handled:?}"
    );
    let ringbuf_full = counter_in(&log, "capture stopped", "ringbuf_full");
    assert_eq!(
        ringbuf_full, 0,
        "no ring-buffer drops expected at this rate:\n{log}"
    );
    let spans = json_spans(&out);
    let servers: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == "SERVER" && s.service == "nginx")
        .collect();
    let clients: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == "CLIENT" && s.service == "h2load")
        .collect();
    assert_eq!(
        servers.len(),
        2000,
        "one SERVER span per stream nginx handled\n{log}"
    );
    assert_eq!(
        clients.len(),
        2000,
        "one CLIENT span per stream h2load sent\n{log}"
    );
    for (end, list) in [("SERVER", &servers), ("CLIENT", &clients)] {
        let mut counts: BTreeMap<(String, u16), u64> = BTreeMap::new();
        for s in list.iter() {
            assert!(!s.incomplete(), "{s:#?}");
            let path = s.need("url.path");
            let status: u16 = s
                .need("http.response.status_code")
                .parse()
                .expect("status code");
            assert_eq!(
                Some(status),
                nginx_status(path),
                "{end}: status matches the path: {s:#?}"
            );
            assert_eq!(s.name, format!("GET {path}"));
            assert_eq!(s.need("http.request.method"), "GET");
            assert_eq!(s.need("network.protocol.version"), "2");
            *counts.entry((path.to_string(), status)).or_insert(0) += 1;
        }
        assert_eq!(
            counts, handled,
            "{end}: spans per (path, status) = nginx's access log"
        );
    }
    let client_ids: BTreeSet<&str> = clients.iter().map(|s| s.span_id.as_str()).collect();
    let paired = servers
        .iter()
        .filter(|s| client_ids.contains(s.parent.as_str()))
        .count();
    assert_eq!(
        paired, 2000,
        "every SERVER span is the child of its CLIENT span (both ends on this host)"
    );
}

// ------------------------------------------------------------ forced loss

/// Runs h2load at full speed against nginx with a tiny ring buffer: drops
/// must happen and be counted, and no exported span may carry a status that
/// belongs to another request (a decoder that lost bytes must not pair a
/// request with the wrong response).
fn forced_loss(http2: bool) {
    let dir = tempfile::tempdir().unwrap();
    let root = www(dir.path());
    let port = free_port();
    let _nginx = peers::nginx_paths(dir.path(), &root, port, http2, None);
    let agent = Agent::start_with(
        "trace",
        &[
            "--port",
            &port.to_string(),
            "--output",
            "json",
            "--ringbuf-bytes",
            "65536",
            "--drain-interval-ms",
            "100",
        ],
        &[],
    );
    let uris = dir.path().join("uris");
    peers::h2load_uri_file(&uris, port, &LOAD_PATHS);
    let mut args = vec![
        "-n",
        "60000",
        "-c",
        "4",
        "-m",
        "10",
        "-i",
        uris.to_str().unwrap(),
    ];
    if !http2 {
        args.insert(0, "--h1");
    }
    let report = peers::h2load(&args);
    assert_eq!(
        report.done, 60000,
        "precondition: every request done:\n{}",
        report.text
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (out, log) = agent.stop_raw();
    let ringbuf_full = counter_in(&log, "capture stopped", "ringbuf_full");
    assert!(
        ringbuf_full > 0,
        "the test needs ring-buffer drops; none happened:\n{log}"
    );
    let spans = json_spans(&out);
    assert!(
        !spans.is_empty(),
        "some spans exported despite the drops\n{log}"
    );
    let version = if http2 { "2" } else { "1.1" };
    let mut checked = 0;
    for s in &spans {
        match (s.attr("url.path"), s.attr("http.response.status_code")) {
            (Some(path), Some(status)) => {
                let want = nginx_status(path).unwrap_or_else(|| panic!("a path nobody requested: {s:#?}"));
                assert_eq!(status, want.to_string(), "status belongs to this span's path: {s:#?}");
                checked += 1;
            }
            _ => assert!(
                http2 && s.incomplete(),
                "a span without path or status must be an HTTP/2 one marked http2.hpack.incomplete: {s:#?}"
            ),
        }
        if let Some(v) = s.attr("network.protocol.version") {
            assert_eq!(v, version, "{s:#?}");
        }
    }
    assert!(checked > 0, "some spans have both path and status");
    eprintln!(
        "forced loss ({version}): {} spans, {checked} checked, ringbuf_full={ringbuf_full}",
        spans.len()
    );
}

#[test]
fn forced_ring_buffer_loss_on_http2_never_pairs_a_stream_with_a_wrong_status() {
    if !require_root("h2_forced_loss") {
        return;
    }
    forced_loss(true);
}

#[test]
fn forced_ring_buffer_loss_on_http1_never_pairs_a_request_with_a_wrong_status() {
    if !require_root("h1_forced_loss") {
        return;
    }
    forced_loss(false);
}

// ------------------------------------------------------------------- gRPC

/// (status name, code) of a gRPC call.
fn grpc_code(name: &str) -> u32 {
    match name {
        "OK" => 0,
        "CANCELLED" => 1,
        "UNKNOWN" => 2,
        "INVALID_ARGUMENT" => 3,
        "DEADLINE_EXCEEDED" => 4,
        "NOT_FOUND" => 5,
        "ALREADY_EXISTS" => 6,
        "PERMISSION_DENIED" => 7,
        "RESOURCE_EXHAUSTED" => 8,
        "FAILED_PRECONDITION" => 9,
        "ABORTED" => 10,
        "OUT_OF_RANGE" => 11,
        "UNIMPLEMENTED" => 12,
        "INTERNAL" => 13,
        "UNAVAILABLE" => 14,
        "DATA_LOSS" => 15,
        "UNAUTHENTICATED" => 16,
        other => panic!("unknown gRPC status {other}"),
    }
}

/// Span status a gRPC status gives on `kind`'s end.
fn grpc_span_status(kind: &str, status: &str) -> &'static str {
    let server_errors = [
        "UNKNOWN",
        "DEADLINE_EXCEEDED",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
    ];
    let error = if kind == "SERVER" {
        server_errors.contains(&status)
    } else {
        status != "OK"
    };
    if error {
        "ERROR"
    } else {
        "UNSET"
    }
}

/// Expected status of each demo.Echo method.
fn method_status(method: &str) -> &'static str {
    match method {
        "Fail" => "NOT_FOUND",
        "Crash" => "INTERNAL",
        _ => "OK",
    }
}

/// The gRPC attributes of one end of a call of `demo.Echo/{method}`.
fn check_grpc_span(span: &Span, method: &str, status: &str, port: u16) {
    let ctx = format!(
        "demo.Echo/{method} -> {status} ({} span of {}): {span:#?}",
        span.kind, span.service
    );
    assert!(
        !span.incomplete(),
        "a connection seen from its start decodes completely: {ctx}"
    );
    assert_eq!(span.name, format!("demo.Echo/{method}"), "{ctx}");
    assert_eq!(span.need("rpc.system.name"), "grpc", "{ctx}");
    assert_eq!(
        span.need("rpc.method"),
        format!("demo.Echo/{method}"),
        "{ctx}"
    );
    assert_eq!(span.need("rpc.status_code"), status, "{ctx}");
    assert_eq!(span.need("rpc.system"), "grpc", "{ctx}");
    assert_eq!(span.need("rpc.service"), "demo.Echo", "{ctx}");
    assert_eq!(
        span.need("rpc.grpc.status_code"),
        grpc_code(status).to_string(),
        "{ctx}"
    );
    assert_eq!(span.need("network.protocol.version"), "2", "{ctx}");
    let want = grpc_span_status(&span.kind, status);
    assert_eq!(span.status, want, "{ctx}");
    if want == "ERROR" {
        assert_eq!(span.need("error.type"), status, "{ctx}");
    }
    if let Some(a) = span.attr("server.address") {
        assert_eq!(a, "127.0.0.1", "{ctx}");
    }
    if let Some(p) = span.attr("server.port") {
        assert_eq!(p, port.to_string(), "{ctx}");
    }
    assert!(span.end_ns > span.start_ns, "{ctx}");
}

/// One gRPC call a test made.
struct GrpcCase {
    method: &'static str,
    status: &'static str,
    ctx: Option<(String, String, String)>,
}

/// Finds and checks both ends of every call, as [`check_h2_cases`] does.
/// `client_service` may list several acceptable names (a short-lived
/// process's environment may be gone before the agent reads it).
fn check_grpc_cases(
    spans: &[Span],
    cases: &[GrpcCase],
    port: u16,
    client_services: &[&str],
    server_service: &str,
    log: &str,
) {
    assert_eq!(
        spans.len(),
        cases.len() * 2,
        "exactly one CLIENT and one SERVER span per call: {spans:#?}\n{log}"
    );
    let traces: BTreeSet<&str> = cases
        .iter()
        .filter_map(|c| c.ctx.as_ref().map(|x| x.1.as_str()))
        .collect();
    for case in cases {
        let what = format!(
            "demo.Echo/{} (context: {})",
            case.method,
            case.ctx.is_some()
        );
        let (client, server) = match &case.ctx {
            Some((_, t, s)) => {
                let mine: Vec<&Span> = spans.iter().filter(|x| &x.trace_id == t).collect();
                assert_eq!(
                    mine.len(),
                    2,
                    "{what}: two spans in trace {t}: {spans:#?}\n{log}"
                );
                let client = *mine
                    .iter()
                    .find(|x| x.kind == "CLIENT")
                    .unwrap_or_else(|| panic!("{what}: no CLIENT span: {mine:#?}"));
                let server = *mine
                    .iter()
                    .find(|x| x.kind == "SERVER")
                    .unwrap_or_else(|| panic!("{what}: no SERVER span: {mine:#?}"));
                assert_eq!(
                    &client.parent, s,
                    "{what}: the CLIENT span's parent is the traceparent's span id: {client:#?}"
                );
                assert_eq!(
                    server.parent, client.span_id,
                    "{what}: the SERVER span's parent is the CLIENT span that made the call on this host: {server:#?}"
                );
                (client, server)
            }
            None => {
                let name = format!("demo.Echo/{}", case.method);
                let clients: Vec<&Span> = spans
                    .iter()
                    .filter(|x| {
                        x.kind == "CLIENT"
                            && !traces.contains(x.trace_id.as_str())
                            && x.name == name
                    })
                    .collect();
                assert_eq!(clients.len(), 1, "{what}: one CLIENT span named {name} outside the given traces: {spans:#?}\n{log}");
                let client = clients[0];
                assert!(
                    client.parent.is_empty(),
                    "{what}: no context, the CLIENT span is a root: {client:#?}"
                );
                let server = spans
                    .iter()
                    .find(|x| x.kind == "SERVER" && x.parent == client.span_id)
                    .unwrap_or_else(|| panic!("{what}: no SERVER span whose parent is the CLIENT span: {spans:#?}\n{log}"));
                assert_eq!(server.trace_id, client.trace_id);
                (client, server)
            }
        };
        assert!(
            client_services.contains(&client.service.as_str()),
            "{what}: client service {client:#?}"
        );
        assert_eq!(server.service, server_service, "{what}: {server:#?}");
        check_grpc_span(client, case.method, case.status, port);
        check_grpc_span(server, case.method, case.status, port);
        assert!(
            client.start_ns <= server.start_ns && server.end_ns <= client.end_ns,
            "{what}: the CLIENT span contains the SERVER span: {client:#?} {server:#?}"
        );
    }
}

fn is_grpc_peer(s: &Span) -> bool {
    [
        peers::GRPC_CLIENT_SERVICE,
        peers::GRPC_SERVER_SERVICE,
        peers::NODE_GRPC_CLIENT_SERVICE,
        peers::NODE_GRPC_SERVER_SERVICE,
        "node",
    ]
    .contains(&s.service.as_str())
        || s.service.starts_with("python")
}

#[test]
fn grpc_python_unary_and_streaming_calls_each_give_one_span_per_end() {
    if !require_root("grpc_python") {
        return;
    }
    let port = free_port();
    let server = peers::grpc_server(port);
    let receiver = Receiver::start();
    let agent = start_trace_agent(port, &receiver);
    // The channel connects after the agent attached: it sees every header block.
    let mut client = GrpcClient::start(port);
    let mut cases = Vec::new();
    for with_ctx in [true, false] {
        for (call, method) in peers::GRPC_CALLS {
            let ctx = with_ctx.then(context);
            let (status, n) = client.call(call, ctx.as_ref().map(|c| c.0.as_str()));
            assert_eq!(status, method_status(method), "precondition: {call} status");
            let want_n = match (call, status.as_str()) {
                (_, s) if s != "OK" => 0,
                ("sstream" | "bidi", _) => 3,
                _ => 1,
            };
            assert_eq!(n, want_n, "precondition: {call} responses");
            let (got_method, tp) = peers::grpc_server_call(&server);
            assert_eq!(got_method, method, "precondition: the server ran the call");
            assert_eq!(
                tp,
                ctx.as_ref().map_or("-", |c| c.0.as_str()),
                "precondition: the server got the metadata"
            );
            cases.push(GrpcCase {
                method,
                status: method_status(method),
                ctx,
            });
        }
    }
    let spans = settle(&receiver, cases.len() * 2, is_grpc_peer);
    let (_, log) = agent.stop_raw();
    check_grpc_cases(
        &spans,
        &cases,
        port,
        &[peers::GRPC_CLIENT_SERVICE],
        peers::GRPC_SERVER_SERVICE,
        &log,
    );
}

#[test]
fn grpc_node_client_to_python_server_unary_and_failing_calls() {
    if !require_root("grpc_node_to_python") {
        return;
    }
    let port = free_port();
    let server = peers::grpc_server(port);
    let receiver = Receiver::start();
    let agent = start_trace_agent(port, &receiver);
    let mut cases = Vec::new();
    for (method, with_ctx) in [
        ("Unary", true),
        ("Fail", true),
        ("Unary", false),
        ("Fail", false),
    ] {
        let ctx = with_ctx.then(context);
        let status = peers::node_grpc_call(port, method, ctx.as_ref().map(|c| c.0.as_str()));
        assert_eq!(
            status,
            method_status(method),
            "precondition: node client status"
        );
        assert_eq!(peers::grpc_server_call(&server).0, method);
        cases.push(GrpcCase {
            method,
            status: method_status(method),
            ctx,
        });
    }
    let spans = settle(&receiver, cases.len() * 2, is_grpc_peer);
    let (_, log) = agent.stop_raw();
    check_grpc_cases(
        &spans,
        &cases,
        port,
        &[peers::NODE_GRPC_CLIENT_SERVICE, "node"],
        peers::GRPC_SERVER_SERVICE,
        &log,
    );
}

#[test]
fn grpc_python_client_to_node_server_unary_and_failing_calls() {
    if !require_root("grpc_python_to_node") {
        return;
    }
    let port = free_port();
    let server = peers::node_grpc_server(port);
    let receiver = Receiver::start();
    let agent = start_trace_agent(port, &receiver);
    let mut client = GrpcClient::start(port);
    let mut cases = Vec::new();
    for (call, method, with_ctx) in [
        ("unary", "Unary", true),
        ("fail", "Fail", true),
        ("unary", "Unary", false),
    ] {
        let ctx = with_ctx.then(context);
        let (status, _) = client.call(call, ctx.as_ref().map(|c| c.0.as_str()));
        assert_eq!(
            status,
            method_status(method),
            "precondition: python client status"
        );
        let (got, tp) = peers::grpc_server_call(&server);
        assert_eq!(got, method);
        assert_eq!(tp, ctx.as_ref().map_or("-", |c| c.0.as_str()));
        cases.push(GrpcCase {
            method,
            status: method_status(method),
            ctx,
        });
    }
    let spans = settle(&receiver, cases.len() * 2, is_grpc_peer);
    let (_, log) = agent.stop_raw();
    check_grpc_cases(
        &spans,
        &cases,
        port,
        &[peers::GRPC_CLIENT_SERVICE],
        peers::NODE_GRPC_SERVER_SERVICE,
        &log,
    );
}

#[test]
fn grpc_channel_opened_before_the_agent_gives_spans_that_are_never_wrong() {
    if !require_root("grpc_mid_connection") {
        return;
    }
    let port = free_port();
    let server = peers::grpc_server(port);
    let mut client = GrpcClient::start(port);
    // Warm the HPACK dynamic tables of both directions before the agent exists.
    for _ in 0..3 {
        assert_eq!(client.call("unary", None).0, "OK");
        assert_eq!(peers::grpc_server_call(&server).0, "Unary");
    }
    let receiver = Receiver::start();
    let agent = start_trace_agent(port, &receiver);
    let plan = [
        ("unary", "Unary", true),
        ("unary", "Unary", true),
        ("fail", "Fail", true),
        ("sstream", "ServerStream", true),
        ("unary", "Unary", true),
        ("crash", "Crash", true),
        ("unary", "Unary", false),
        ("fail", "Fail", true),
    ];
    let mut cases = Vec::new();
    for (call, method, with_ctx) in plan {
        let ctx = with_ctx.then(context);
        let (status, _) = client.call(call, ctx.as_ref().map(|c| c.0.as_str()));
        assert_eq!(status, method_status(method), "precondition: {call}");
        assert_eq!(peers::grpc_server_call(&server).0, method);
        cases.push(GrpcCase {
            method,
            status: method_status(method),
            ctx,
        });
    }
    let spans = settle(&receiver, cases.len() * 2, is_grpc_peer);
    let (_, log) = agent.stop_raw();
    let mut recovered = 0;
    let by_kind = |kind: &str| {
        let mut mine: Vec<&Span> = spans.iter().filter(|s| s.kind == kind).collect();
        mine.sort_by_key(|s| s.start_ns);
        mine
    };
    let clients = by_kind("CLIENT");
    for (kind, service) in [
        ("CLIENT", peers::GRPC_CLIENT_SERVICE),
        ("SERVER", peers::GRPC_SERVER_SERVICE),
    ] {
        let mine = by_kind(kind);
        assert_eq!(mine.len(), cases.len(), "one {kind} span per call made after the agent started (none for the warm-up calls): {spans:#?}\n{log}");
        // The calls ran one after another: the i-th span is the i-th call.
        for (i, (span, case)) in mine.iter().zip(&cases).enumerate() {
            let ctx = format!(
                "{kind} span of demo.Echo/{} -> {}: {span:#?}",
                case.method, case.status
            );
            assert_eq!(span.service, service, "{ctx}");
            if kind == "SERVER" {
                // Both ends are on this host: the stream's CLIENT span is the
                // parent, whatever the headers said or failed to say.
                let client = clients[i];
                assert_eq!(span.parent, client.span_id, "{ctx}");
                assert_eq!(span.trace_id, client.trace_id, "{ctx}");
            } else if let Some((_, t, s)) = &case.ctx {
                if &span.trace_id == t {
                    assert_eq!(&span.parent, s, "{ctx}");
                } else {
                    assert!(span.incomplete(), "not in the call's trace: only allowed when headers were undecodable: {ctx}");
                }
            }
            let full = format!("demo.Echo/{}", case.method);
            if let Some(after) = span.name.split("demo.Echo/").nth(1) {
                assert_eq!(after, case.method, "the name names the right method: {ctx}");
            }
            match span.attr("rpc.method") {
                Some(m) => {
                    assert_eq!(m, full, "{ctx}");
                    recovered += 1;
                }
                None => assert!(
                    span.incomplete(),
                    "rpc.method missing without http2.hpack.incomplete: {ctx}"
                ),
            }
            if let Some(p) = span.attr("url.path") {
                assert_eq!(p, format!("/{full}"), "{ctx}");
            }
            if let Some(svc) = span.attr("rpc.service") {
                assert_eq!(svc, "demo.Echo", "{ctx}");
            }
            match (
                span.attr("rpc.grpc.status_code"),
                span.attr("rpc.status_code"),
            ) {
                (None, None) => assert!(
                    span.incomplete(),
                    "gRPC status missing without http2.hpack.incomplete: {ctx}"
                ),
                (code, name) => {
                    if let Some(code) = code {
                        assert_eq!(code, grpc_code(case.status).to_string(), "{ctx}");
                    }
                    if let Some(name) = name {
                        assert_eq!(name, case.status, "{ctx}");
                    }
                    assert_eq!(span.status, grpc_span_status(kind, case.status), "{ctx}");
                }
            }
            if let Some(v) = span.attr("network.protocol.version") {
                assert_eq!(v, "2", "{ctx}");
            }
        }
    }
    assert!(recovered > 0, "no span after the attach named its method: the decoder never resynchronised\n{spans:#?}\n{log}");
}
