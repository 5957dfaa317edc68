//! A collector that is down, refuses or never answers: the agent says when
//! export starts failing and when it recovers, and stops within its shutdown
//! timeout whatever the collector does.

use std::{
    io::{Read, Write},
    net::TcpListener,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use integration_tests::{counter_in, curl_ok, free_port, python_http_server, require_root, Agent};

/// Accepts connections and never answers; stops accepting when dropped.
struct Silent {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Silent {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { port, stop }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A minimal OTLP/HTTP collector: 200 with an empty body to every request.
fn answering_collector(listener: TcpListener) {
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + 4 + len {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + 4 + len);
                    let reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
                    if s.write_all(reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn wait_log(agent: &Agent, what: &str, timeout: Duration) -> String {
    let end = Instant::now() + timeout;
    loop {
        let log = agent.stderr();
        if log.contains(what) {
            return log;
        }
        assert!(Instant::now() < end, "no {what:?} in {timeout:?}:\n{log}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn shutdown_is_bounded_when_the_collector_never_answers() {
    if !require_root("shutdown_silent_collector") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = python_http_server(dir.path(), port);
    let collector = Silent::start();
    let endpoint = format!("http://127.0.0.1:{}", collector.port);
    // (extra arguments, longest shutdown allowed)
    for (args, limit) in [
        (vec![], Duration::from_millis(6000)),
        (
            vec!["--shutdown-timeout-ms", "1500"],
            Duration::from_millis(2500),
        ),
    ] {
        let mut all = vec!["--port".to_string(), port.to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let agent = Agent::start_with(
            "trace",
            &all,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
        );
        for i in 0..3 {
            curl_ok(port, &format!("/silent{i}"));
        }
        // The first export is in flight (1 s batch delay), never answered.
        thread::sleep(Duration::from_millis(2000));
        for i in 3..6 {
            curl_ok(port, &format!("/silent{i}"));
        }
        let t0 = Instant::now();
        let (_, log) = agent.stop_raw();
        let took = t0.elapsed();
        assert!(took < limit, "{args:?}: shutdown took {took:?}:\n{log}");
        let dropped = counter_in(&log, "agent stopped", "spans_dropped_failed");
        let exported = counter_in(&log, "agent stopped", "spans_exported");
        assert_eq!(exported, 0, "{log}");
        assert!(dropped >= 6, "{args:?}: {dropped} dropped:\n{log}");
        eprintln!("{args:?}: shutdown in {took:?}, {dropped} spans dropped");
    }
}

#[test]
fn export_failing_and_recovering_is_logged() {
    if !require_root("export_outage_logged") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = python_http_server(dir.path(), port);
    // Nothing listens there yet: connections are refused.
    let collector_port = free_port();
    let endpoint = format!("http://127.0.0.1:{collector_port}");
    let agent = Agent::start_with(
        "trace",
        &["--port", &port.to_string()],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    curl_ok(port, "/down");
    let log = wait_log(&agent, "OTLP export failing", Duration::from_secs(10));
    assert!(!log.contains("OTLP export recovered"), "{log}");
    answering_collector(TcpListener::bind(("127.0.0.1", collector_port)).expect("bind collector"));
    let log = wait_log(&agent, "OTLP export recovered", Duration::from_secs(15));
    assert_eq!(log.matches("OTLP export failing").count(), 1, "{log}");
    curl_ok(port, "/up");
    thread::sleep(Duration::from_millis(1500));
    let (_, log) = agent.stop_raw();
    let exported = counter_in(&log, "agent stopped", "spans_exported");
    // The retried span and the one after the recovery.
    assert!(exported >= 2, "{exported} exported:\n{log}");
    assert_eq!(
        counter_in(&log, "agent stopped", "spans_dropped_failed"),
        0,
        "{log}"
    );
}
