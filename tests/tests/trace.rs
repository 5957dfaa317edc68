//! The tracing job end to end: real programs, real clients and servers, and a
//! real OTLP receiver (or the console), assertions on the spans.

use std::{collections::BTreeMap, fs, io::Read, process::Command, time::Duration};

use integration_tests::{
    counter_in, free_port,
    otlp_receiver::{ReceivedSpan, Receiver},
    python_env, python_http_server, read_line, require_root, run_ok, Agent,
};
use serde_json::Value;

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr<'a>(s: &'a ReceivedSpan, k: &str) -> &'a Value {
    s.attributes
        .get(k)
        .unwrap_or_else(|| panic!("span {} has no attribute {k}: {:?}", s.name, s.attributes))
}

fn attr_str<'a>(s: &'a ReceivedSpan, k: &str) -> &'a str {
    attr(s, k)
        .as_str()
        .unwrap_or_else(|| panic!("{k} is not a string: {:?}", attr(s, k)))
}

fn attr_int(s: &ReceivedSpan, k: &str) -> i64 {
    match attr(s, k) {
        Value::Number(n) => n.as_i64().expect("integer"),
        Value::String(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{k} is not an integer: {v}")),
        v => panic!("{k} is not an integer: {v}"),
    }
}

/// curl with extra headers and the query; returns curl's local port.
fn curl(port: u16, path: &str, headers: &[String]) -> u16 {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "/dev/null", "-w", "%{local_port}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(format!("http://127.0.0.1:{port}{path}"));
    run_ok(&mut cmd).trim().parse().expect("curl local port")
}

#[test]
fn trace_context_from_w3c_b3_and_jaeger_reaches_the_otlp_receiver() {
    if !require_root("contexts_to_otlp") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a"), "hello").unwrap();
    let port = free_port();
    let _server = python_http_server(dir.path(), port);
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    let agent = Agent::start_with(
        "trace",
        &[
            "--port",
            &port.to_string(),
            "--service-name",
            "python3=web-frontend",
        ],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    // (format, trace id, parent span id, headers)
    let mut cases: Vec<(&str, String, String, Vec<String>)> = Vec::new();
    for format in [
        "w3c",
        "b3-multi",
        "b3-single",
        "jaeger",
        "jaeger-urlencoded",
    ] {
        let (t, s) = (random_hex(16), random_hex(8));
        let headers = match format {
            "w3c" => vec![
                format!("traceparent: 00-{t}-{s}-03"),
                "tracestate: vendor=abc".into(),
            ],
            "b3-multi" => vec![
                format!("X-B3-TraceId: {t}"),
                format!("X-B3-SpanId: {s}"),
                "X-B3-Sampled: 1".into(),
            ],
            "b3-single" => vec![format!("b3: {t}-{s}-1")],
            "jaeger" => vec![format!("uber-trace-id: {t}:{s}:0:1")],
            _ => vec![format!("uber-trace-id: {t}%3A{s}%3A0%3A1")],
        };
        cases.push((format, t, s, headers));
    }
    let mut client_ports = BTreeMap::new();
    for (format, _, _, headers) in &cases {
        client_ports.insert(*format, curl(port, "/a?b=1", headers));
    }
    let want: Vec<String> = cases.iter().map(|c| c.1.clone()).collect();
    let spans = receiver.spans_until(Duration::from_secs(30), |spans| {
        want.iter()
            .all(|t| spans.iter().filter(|s| &s.trace_id == t).count() >= 2)
    });
    let (_, log) = agent.stop_raw();

    for (format, t, s, _) in &cases {
        let in_trace: Vec<&ReceivedSpan> = spans.iter().filter(|x| &x.trace_id == t).collect();
        assert_eq!(
            in_trace.len(),
            2,
            "{format}: want a CLIENT and a SERVER span in trace {t}, got {in_trace:#?}\n{log}"
        );
        let client = in_trace
            .iter()
            .find(|x| x.kind == "CLIENT")
            .unwrap_or_else(|| panic!("{format}: no CLIENT span"));
        let server = in_trace
            .iter()
            .find(|x| x.kind == "SERVER")
            .unwrap_or_else(|| panic!("{format}: no SERVER span"));
        // Whole traces: curl's span is the child of the header's span, the
        // server's span the child of curl's (the agent saw both ends).
        assert_eq!(
            &client.parent_span_id, s,
            "{format}: the CLIENT span's parent is the header's span id"
        );
        assert_eq!(
            server.parent_span_id, client.span_id,
            "{format}: the SERVER span's parent is the CLIENT span, whatever the header says"
        );
        for span in [client, server] {
            assert_eq!(span.name, "GET /a", "{format}");
            assert_eq!(attr_str(span, "http.request.method"), "GET");
            assert_eq!(attr_str(span, "url.path"), "/a");
            assert_eq!(attr_str(span, "url.query"), "b=1");
            assert_eq!(attr_str(span, "url.scheme"), "http");
            assert_eq!(attr_int(span, "http.response.status_code"), 200);
            assert_eq!(attr_str(span, "server.address"), "127.0.0.1");
            assert_eq!(attr_int(span, "server.port"), i64::from(port));
            assert_eq!(attr_str(span, "network.protocol.version"), "1.1");
            assert!(attr_str(span, "user_agent.original").starts_with("curl/"));
            assert_eq!(attr_int(span, "http.response.body.size"), 5);
            assert_eq!(span.status_code, "UNSET");
            assert!(span.end_ns > span.start_ns);
        }
        assert_eq!(client.service_name, "curl");
        assert_eq!(
            server.service_name, "web-frontend",
            "--service-name maps the process name"
        );
        assert_eq!(attr_str(server, "client.address"), "127.0.0.1");
        assert_eq!(
            attr_int(server, "client.port"),
            i64::from(client_ports[format])
        );
        assert_eq!(attr_int(client, "network.peer.port"), i64::from(port));
        assert!(
            client.start_ns <= server.start_ns && server.end_ns <= client.end_ns,
            "{format}: the CLIENT span contains the SERVER span: {client:#?} {server:#?}"
        );
        // Both ends were seen on this host: each span carries the other's moments.
        assert_eq!(
            client.events,
            vec!["server_receive", "server_send"],
            "{format}"
        );
        assert_eq!(
            server.events,
            vec!["client_send", "client_receive"],
            "{format}"
        );
        assert!(
            server.resource.contains_key("process.pid")
                && server.resource.contains_key("host.name")
        );
    }
    assert!(counter_in(&log, "agent stopped", "context_w3c") >= 1);
    assert!(counter_in(&log, "agent stopped", "context_b3") >= 2);
    assert!(counter_in(&log, "agent stopped", "context_jaeger") >= 2);
}

const SECRET_SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"ok"
        self.send_response(200)
        self.send_header("Set-Cookie", "session=S3CR3T-SETCOOKIE; HttpOnly")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

#[test]
fn secrets_never_leave_the_host_and_a_process_names_its_own_service() {
    if !require_root("secrets") {
        return;
    }
    // The server declares its service name the OpenTelemetry way, in its environment.
    let mut server = python_env(
        SECRET_SERVER,
        &[],
        &[("OTEL_SERVICE_NAME", "secret-keeper")],
    );
    let port: u16 = read_line(&mut server).parse().unwrap();
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    let agent = Agent::start_with(
        "trace",
        &["--port", &port.to_string()],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    let t = random_hex(16);
    curl(
        port,
        "/login?user=bob&token=S3CR3T-QUERY&password=S3CR3T-PW;code=S3CR3T-CODE&my_token=S3CR3T-MINE&pass%77ord=S3CR3T-ENC&accessToken=S3CR3T-AT",
        &[
            format!("traceparent: 00-{t}-{}-01", random_hex(8)),
            "Authorization: Bearer S3CR3T-BEARER".into(),
            "X-Api-Key: S3CR3T-APIKEY".into(),
            "X-Private-Token: S3CR3T-PRIVATE".into(),
            "Cookie: session=S3CR3T-COOKIE".into(),
            "Proxy-Authorization: Basic S3CR3T-PROXY".into(),
        ],
    );
    let spans = receiver.spans_until(Duration::from_secs(30), |s| {
        s.iter().filter(|x| x.trace_id == t).count() >= 2
    });
    let (_, log) = agent.stop_raw();
    let _ = server.kill();
    let mine: Vec<&ReceivedSpan> = spans.iter().filter(|x| x.trace_id == t).collect();
    assert_eq!(mine.len(), 2, "{spans:#?}");
    let everything = format!("{mine:?}{log}");
    assert!(
        !everything.contains("S3CR3T"),
        "a secret left the host: {everything}"
    );
    for s in &mine {
        assert_eq!(
            attr_str(s, "url.query"),
            "user=bob&token=REDACTED&password=REDACTED;code=REDACTED&my_token=REDACTED&pass%77ord=REDACTED&accessToken=REDACTED"
        );
    }
    let server_span = mine
        .iter()
        .find(|s| s.kind == "SERVER")
        .expect("SERVER span");
    assert_eq!(
        server_span.service_name, "secret-keeper",
        "OTEL_SERVICE_NAME read from /proc/PID/environ"
    );
}

#[test]
fn console_prints_readable_trace_trees() {
    if !require_root("console_tree") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a"), "hello").unwrap();
    let port = free_port();
    let _server = python_http_server(dir.path(), port);
    let agent = Agent::start_with("trace", &["--port", &port.to_string()], &[]);
    let t = random_hex(16);
    curl(
        port,
        "/a",
        &[format!("traceparent: 00-{t}-{}-01", random_hex(8))],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (out, log) = agent.stop_raw();
    let at = out
        .find(&format!("trace {t} (2 spans)"))
        .unwrap_or_else(|| panic!("no tree for {t} in:\n{out}\n{log}"));
    let tree: Vec<&str> = out[at..].lines().take(3).collect();
    assert!(
        tree[1].starts_with("├─ ") || tree[1].starts_with("└─ "),
        "{tree:?}"
    );
    let text = tree.join("\n");
    assert!(text.contains("curl CLIENT GET /a "), "{text}");
    assert!(text.contains(" SERVER GET /a "), "{text}");
    assert!(
        text.contains(" ms [ok]") || text.contains(" µs [ok]"),
        "durations and status: {text}"
    );
}

/// `--output json` lines: (trace id, kind) of each span.
fn json_spans(out: &str) -> Vec<(String, i64, String)> {
    out.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad OTLP-JSON line {l}: {e}"));
            let rs = &v["resourceSpans"][0];
            let service = rs["resource"]["attributes"]
                .as_array()
                .and_then(|a| a.iter().find(|kv| kv["key"] == "service.name"))
                .and_then(|kv| kv["value"]["stringValue"].as_str())
                .unwrap_or("")
                .to_string();
            let span = &rs["scopeSpans"][0]["spans"][0];
            (
                span["traceId"].as_str().unwrap_or("").to_string(),
                span["kind"].as_i64().unwrap_or(0),
                service,
            )
        })
        .collect()
}

#[test]
fn sampling_honours_the_caller_and_the_ratio() {
    if !require_root("sampling") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a"), "hello").unwrap();
    let port = free_port();
    let _server = python_http_server(dir.path(), port);
    // Ratio 0 for new traces: only requests whose caller decided "sampled" are kept.
    let agent = Agent::start_with(
        "trace",
        &[
            "--port",
            &port.to_string(),
            "--output",
            "json",
            "--sampler-ratio",
            "0",
        ],
        &[],
    );
    let (sampled, denied, debug, b3_deny) = (
        random_hex(16),
        random_hex(16),
        random_hex(16),
        random_hex(16),
    );
    curl(
        port,
        "/a",
        &[format!("traceparent: 00-{sampled}-{}-01", random_hex(8))],
    );
    curl(
        port,
        "/a",
        &[format!("traceparent: 00-{denied}-{}-00", random_hex(8))],
    );
    curl(
        port,
        "/a",
        &[
            format!("X-B3-TraceId: {debug}"),
            format!("X-B3-SpanId: {}", random_hex(8)),
            "X-B3-Flags: 1".into(),
        ],
    );
    curl(port, "/a", &[format!("b3: {b3_deny}-{}-0", random_hex(8))]);
    curl(port, "/a", &[]); // new trace, ratio 0
    curl(port, "/a", &["b3: 0".into()]); // lone deny
    std::thread::sleep(Duration::from_millis(800));
    let (out, log) = agent.stop_raw();
    let spans = json_spans(&out);
    let count = |t: &str| spans.iter().filter(|s| s.0 == t).count();
    assert_eq!(count(&sampled), 2, "{out}");
    assert_eq!(count(&debug), 2, "{out}");
    assert_eq!(count(&denied), 0);
    assert_eq!(count(&b3_deny), 0);
    assert_eq!(spans.len(), 4, "nothing else (ratio 0, lone deny): {out}");
    // 4 requests x 2 ends not exported.
    assert_eq!(counter_in(&log, "agent stopped", "sampled_out"), 8, "{log}");
}

const LUA_PATH: &str = "wrk.path = \"/f\"\n";

#[test]
fn wrk_keepalive_requests_each_give_one_server_span() {
    if !require_root("wrk_10000") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("f"), "x".repeat(100)).unwrap();
    let port = free_port();
    let nginx_dir = dir.path().join("nginx");
    fs::create_dir(&nginx_dir).unwrap();
    let access_log = nginx_dir.join("access.log");
    let _nginx = integration_tests::nginx_with_access_log(&nginx_dir, &root, port, &access_log);
    let agent = Agent::start_with(
        "trace",
        &[
            "--port",
            &port.to_string(),
            "--comm",
            "nginx",
            "--output",
            "json",
        ],
        &[],
    );
    let script = dir.path().join("path.lua");
    fs::write(&script, LUA_PATH).unwrap();
    let wrk = run_ok(
        Command::new("wrk")
            .args(["-t1", "-c8", "-d4s", "-s"])
            .arg(&script)
            .arg(format!("http://127.0.0.1:{port}/f")),
    );
    std::thread::sleep(Duration::from_millis(500));
    let (out, log) = agent.stop_raw();
    let handled = fs::read_to_string(&access_log).unwrap().lines().count();
    assert!(
        handled >= 10_000,
        "wrk made only {handled} requests:\n{wrk}"
    );
    let server_spans = json_spans(&out)
        .iter()
        .filter(|s| s.1 == 2 && s.2 == "nginx")
        .count();
    assert_eq!(
        server_spans, handled,
        "one SERVER span per request nginx logged, none lost\n{log}"
    );
    assert_eq!(counter_in(&log, "capture stopped", "ringbuf_full"), 0);
}

const BAD_PEERS: &str = r#"
import os, socket, sys, threading
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)
port = srv.getsockname()[1]
def serve():
    for _ in range(2):
        conn, _ = srv.accept()
        first = conn.recv(65536)
        if first.startswith(b"GET /abort"):
            # Promise 100 bytes, send 10, hang up: the exchange is aborted.
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        conn.close()
t = threading.Thread(target=serve); t.start()
print(port, flush=True); sys.stdin.readline()
g = socket.create_connection(("127.0.0.1", port))
g.sendall(os.urandom(3000))  # not HTTP at all
g.close()
c = socket.create_connection(("127.0.0.1", port))
c.sendall(b"GET /abort HTTP/1.1\r\nHost: x\r\n\r\n")
data = b""
while True:
    d = c.recv(65536)
    if not d:
        break
    data += d
c.close(); t.join()
print("done", flush=True)
"#;

#[test]
fn garbage_is_counted_and_an_aborted_exchange_is_an_error_span() {
    if !require_root("bad_peers") {
        return;
    }
    let mut py = python_env(BAD_PEERS, &[], &[]);
    let port = read_line(&mut py);
    let agent = Agent::start_with("trace", &["--port", &port, "--output", "json"], &[]);
    integration_tests::write_line(&mut py, "go");
    assert_eq!(read_line(&mut py), "done");
    let _ = py.wait();
    std::thread::sleep(Duration::from_millis(800));
    let (out, log) = agent.stop_raw();
    assert!(
        counter_in(&log, "agent stopped", "non_http_connections") >= 1,
        "garbage counted: {log}"
    );
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("OTLP-JSON line"))
        .collect();
    let spans: Vec<&Value> = lines
        .iter()
        .map(|v| &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0])
        .collect();
    assert_eq!(
        spans.len(),
        2,
        "only the aborted exchange's two ends, no span from garbage: {out}"
    );
    for s in &spans {
        assert_eq!(s["name"], "GET /abort", "{s}");
        let attrs = s["attributes"].as_array().expect("attributes");
        let error_type = attrs
            .iter()
            .find(|kv| kv["key"] == "error.type")
            .map(|kv| kv["value"]["stringValue"].clone());
        assert_eq!(error_type, Some(Value::from("aborted")), "{s}");
        assert_eq!(s["status"]["code"], 2, "ERROR status: {s}");
    }
}
