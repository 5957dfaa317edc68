//! Sockets that die with their process: state is freed when the kernel closes
//! them (no close() call comes), and requests cut short are reported.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use integration_tests::{counter, counter_in, free_port, nginx, require_root, Agent, Proc};
use serde_json::Value;

/// An OTLP/HTTP collector on loopback that answers every request with an
/// empty success and keeps nothing; stops when dropped.
struct Discard {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Discard {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        thread::spawn(move || serve(s));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { port, stop }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Discard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Answers keep-alive OTLP requests until the client goes.
fn serve(s: std::net::TcpStream) {
    let _ = s.set_nonblocking(false);
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    loop {
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = line.to_ascii_lowercase();
            if let Some(v) = l.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let resp =
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// Forks `children` processes, `parallel` at a time; each opens `per`
/// connections to `port`, makes one request on each, and exits with all of
/// them open (`os._exit`: no close(), the kernel closes them).
fn exiting_clients(port: u16, children: u32, per: u32, parallel: u32) {
    let script = r#"
import os, socket, sys
port, children, per, parallel = map(int, sys.argv[1:5])
req = b"GET /f HTTP/1.1\r\nHost: soak\r\n\r\n"
def child():
    keep = []
    for _ in range(per):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(req)
        got = b""
        while not got.endswith(b"ok\n"):
            d = s.recv(4096)
            if not d:
                os._exit(3)
            got += d
        keep.append(s)
    os._exit(0)
running = failed = 0
for _ in range(children):
    if running >= parallel:
        _, st = os.wait()
        running -= 1
        failed += st != 0
    if os.fork() == 0:
        try:
            child()
        except Exception:
            os._exit(4)
    running += 1
while running:
    _, st = os.wait()
    running -= 1
    failed += st != 0
print(failed)
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .args([u32::from(port), children, per, parallel].map(|v| v.to_string()))
        .stderr(Stdio::inherit())
        .output()
        .expect("python3");
    assert!(out.status.success(), "client script failed");
    let failed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(failed.trim(), "0", "client processes that failed");
}

/// Waits until the agent's periodic counters show `spans` of at least `want`.
fn wait_spans(agent: &Agent, want: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let log = agent.stderr();
        let n = log
            .lines()
            .rev()
            .find(|l| l.contains("pipeline counters"))
            .and_then(|l| integration_tests::field(l, "spans"))
            .unwrap_or(0);
        if n >= want || Instant::now() > deadline {
            return n;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// 100,000 connections whose processes exit without closing them: the
/// agent's memory stays flat, because each connection's state goes when TCP
/// closes it (`sock_died`) rather than after the idle timeout.
#[test]
fn connections_of_exiting_processes_free_their_state() {
    if !require_root("connections_of_exiting_processes_free_their_state") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("f"), "ok\n").unwrap();
    let port = free_port();
    let _server: Proc = nginx(dir.path(), &root, port, 1);
    let collector = Discard::start();
    let agent = Agent::start_with(
        "trace",
        &[
            "--port",
            &port.to_string(),
            "--otlp-endpoint",
            &collector.endpoint(),
            "--stats-interval-s",
            "1",
        ],
        &[],
    );
    // Warm up: buffers, maps and the allocator reach their working size.
    let (per, parallel) = (10, 4);
    exiting_clients(port, 1_000, per, parallel);
    let warm = wait_spans(&agent, 2 * 10_000, Duration::from_secs(30));
    thread::sleep(Duration::from_secs(2));
    let start = rss_kib(agent.pid());
    let t = Instant::now();
    exiting_clients(port, 10_000, per, parallel);
    let made = wait_spans(&agent, warm + 2 * 100_000, Duration::from_secs(60));
    thread::sleep(Duration::from_secs(2));
    let busy = rss_kib(agent.pid());
    let secs = t.elapsed().as_secs_f64();
    // Idle: the resources of the exited processes go after three 5 s sweeps.
    thread::sleep(Duration::from_secs(17));
    let end = rss_kib(agent.pid());
    let (_, log) = agent.stop_raw();
    let died = counter(&log, "sock_died");
    eprintln!(
        "100,000 connections in {secs:.1} s: agent RSS {start} KiB -> {busy} KiB right after, \
         {end} KiB idle ({:+.1} %), spans {made} (after warm-up {warm}), sock_died {died}",
        (end as f64 / start as f64 - 1.0) * 100.0
    );
    // Each client socket reaches TCP_CLOSE without a close(); nginx's ends
    // are closed by nginx.
    assert!(
        died >= 110_000 * 95 / 100,
        "sock_died {died} of 110,000 client connections"
    );
    assert!(
        end <= start + start / 10,
        "agent RSS grew from {start} KiB to {end} KiB over 100,000 connections"
    );
    let evicted = counter_in(&log, "agent stopped", "dropped_connections");
    assert_eq!(
        evicted, 0,
        "decoder evicted connections: state was not freed"
    );
}

/// A client killed while its request is in flight: its CLIENT span is
/// exported as cut short (an error), not lost.
#[test]
fn a_killed_clients_request_in_flight_is_reported() {
    if !require_root("a_killed_clients_request_in_flight_is_reported") {
        return;
    }
    // A server that answers after 3 s, long after the client is killed.
    let port = free_port();
    let server = r#"
import socket, sys, time
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1]))); l.listen(8)
print("ready", flush=True)
while True:
    c, _ = l.accept()
    c.recv(4096)
    time.sleep(3)
    try:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    except OSError:
        pass
    c.close()
"#;
    let mut srv = Command::new("python3")
        .args(["-c", server, &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 server");
    let mut line = String::new();
    BufReader::new(srv.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready");
    let _srv = Proc(srv);
    let agent = Agent::start_with(
        "trace",
        &["--port", &port.to_string(), "--output", "json"],
        &[],
    );
    // The client sends and waits; SIGKILL comes while it waits.
    let client = Command::new("python3")
        .args([
            "-c",
            "import socket,sys,time\n\
             s=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n\
             s.sendall(b'GET /slow HTTP/1.1\\r\\nHost: k\\r\\n\\r\\n')\n\
             time.sleep(30)",
            &port.to_string(),
        ])
        .spawn()
        .expect("python3 client");
    let mut client = Proc(client);
    thread::sleep(Duration::from_millis(800));
    client.0.kill().expect("kill client");
    let _ = client.0.wait();
    // While the agent runs (at its stop, everything still open is flushed
    // as cut short anyway). The span waits for its peer's SERVER span, which
    // ends when the server answers, 3 s after the request; without the
    // socket's death the request would stay pending until the idle timeout.
    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans: Vec<Value> = agent
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["resourceSpans"][0]["scopeSpans"][0]["spans"][0].clone())
            .collect();
        if spans.iter().any(|s| s["kind"] == 3) || Instant::now() > deadline {
            break spans;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let (_, log) = agent.stop_raw();
    let client_spans: Vec<&Value> = spans.iter().filter(|s| s["kind"] == 3).collect();
    assert_eq!(
        client_spans.len(),
        1,
        "one CLIENT span for the killed client's request: {spans:?}\n{log}"
    );
    let s = client_spans[0];
    assert_eq!(s["name"], "GET /slow", "{s}");
    assert_eq!(s["status"]["code"], 2, "cut short is an error: {s}");
    assert!(counter(&log, "sock_died") >= 1, "{log}");
}
