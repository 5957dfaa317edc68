//! Hostile HTTP/1 traffic against a real server: the agent's spans are the
//! requests the server served, never ones it did not.

use std::{fs, process::Command, time::Duration};

use integration_tests::{counter_in, free_port, nginx, require_root, Agent, Proc};
use serde_json::Value;

/// Sends `payload` on one connection and reads until the server closes it
/// (or 5 s pass); returns what came back.
fn raw_exchange(port: u16, payload: &str) -> String {
    let script = r#"
import socket, sys
port, payload = int(sys.argv[1]), sys.argv[2].encode().decode("unicode_escape").encode("latin-1")
c = socket.create_connection(("127.0.0.1", port)); c.settimeout(5)
c.sendall(payload)
data = b""
try:
    while True:
        d = c.recv(65536)
        if not d:
            break
        data += d
except socket.timeout:
    pass
c.close()
sys.stdout.write(data.decode("latin-1"))
"#;
    let out = Command::new("python3")
        .args(["-c", script, &port.to_string(), payload])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (name, status, kind) of every span the agent printed as OTLP-JSON lines.
fn spans(out: &str) -> Vec<(String, i64, i64)> {
    out.lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("OTLP-JSON line"))
        .map(|v| {
            let s = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
            let status = s["attributes"]
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|kv| kv["key"] == "http.response.status_code")
                        .and_then(|kv| kv["value"]["intValue"].as_str()?.parse().ok())
                })
                .unwrap_or(0);
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                status,
                s["kind"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

/// nginx (one worker) serving the file `name` with `content`, and an agent
/// tracing its port that prints spans as OTLP-JSON lines.
fn nginx_traced(name: &str, content: &str) -> (tempfile::TempDir, Proc, Agent, u16) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join(name), content).unwrap();
    let port = free_port();
    let server = nginx(dir.path(), &root, port, 1);
    let agent = Agent::start_with(
        "trace",
        &["--port", &port.to_string(), "--output", "json"],
        &[],
    );
    (dir, server, agent, port)
}

#[test]
fn a_smuggled_request_behind_content_length_and_chunked_gives_no_span() {
    if !require_root("smuggling") {
        return;
    }
    let (_dir, _nginx, agent, port) = nginx_traced("smuggled", "never served");
    // (request bytes, what the server answers first)
    let cases = [
        // Chunked body ends at once; by Content-Length the smuggled head
        // would be body. nginx refuses the request and closes.
        (
            "POST /a HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 4\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\nGET /smuggled HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n",
            "HTTP/1.1 400",
        ),
        (
            "POST /b HTTP/1.1\\r\\nHost: x\\r\\nTransfer-Encoding: chunked\\r\\nContent-Length: 50\\r\\n\\r\\n0\\r\\n\\r\\nGET /smuggled HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n",
            "HTTP/1.1 400",
        ),
    ];
    for (payload, want) in cases {
        let reply = raw_exchange(port, payload);
        assert!(reply.starts_with(want), "nginx answered {reply:?}");
        assert!(
            !reply.contains("never served"),
            "nginx served it: {reply:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(800));
    let (out, log) = agent.stop_raw();
    let got = spans(&out);
    assert!(
        got.iter().all(|(name, _, _)| !name.contains("smuggled")),
        "span of a request nginx never served: {got:?}"
    );
    // Each refused request: nginx's SERVER span and python's CLIENT span.
    for name in ["POST /a", "POST /b"] {
        let of: Vec<_> = got.iter().filter(|(n, _, _)| n == name).collect();
        assert_eq!(of.len(), 2, "{name}: {got:?}");
        assert!(of.iter().all(|(_, status, _)| *status == 400), "{got:?}");
    }
    assert!(
        counter_in(&log, "agent stopped", "ambiguous_lengths") >= 2,
        "{log}"
    );
}

#[test]
fn heads_servers_answer_give_spans_though_not_rfc_clean() {
    if !require_root("unclean_heads") {
        return;
    }
    let (_dir, _nginx, agent, port) = nginx_traced("a", "hello");
    // (path as the span names it, request bytes)
    let cases = [
        ("/a", "GET /a HTTP/1.1\\r\\nHost: x\\r\\nthis line has no colon\\r\\nConnection: close\\r\\n\\r\\n"),
        ("/a", "GET /a HTTP/1.1\\r\\nHost: x\\r\\nX-A: a\\x00b\\r\\nConnection: close\\r\\n\\r\\n"),
        ("/a", "GET /a HTTP/1.1\\r\\nHost: x\\r\\nX-A: a\\x1bb\\r\\nConnection: close\\r\\n\\r\\n"),
        ("/caf", "GET /caf\\xff HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n"),
    ];
    let mut answered = vec![];
    for (_, payload) in cases {
        let reply = raw_exchange(port, payload);
        let status: i64 = reply
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {reply:?}"));
        answered.push(status);
    }
    std::thread::sleep(Duration::from_millis(800));
    let (out, _log) = agent.stop_raw();
    let got = spans(&out);
    let mut server: Vec<i64> = got.iter().filter(|s| s.2 == 2).map(|s| s.1).collect();
    server.sort_unstable();
    answered.sort_unstable();
    assert_eq!(
        server, answered,
        "one SERVER span per answered request: {got:?}"
    );
    for (path, _) in cases {
        assert!(
            got.iter()
                .any(|(name, _, _)| name.starts_with(&format!("GET {path}"))),
            "{path}: {got:?}"
        );
    }
}
