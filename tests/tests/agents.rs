//! The agent and its own traffic: it never traces its exports, not even
//! through a collector on this host, a second agent refuses to start unless
//! allowed, and allowed agents never trace each other.

use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    agent_bin, counter, curl_ok, free_port,
    otlp_receiver::{ReceivedSpan, Receiver},
    python_http_server, require_root, Agent,
};

/// Spans of anyone's OTLP export requests: what an agent tracing its own
/// exports (or another agent's) makes.
fn export_spans(spans: &[ReceivedSpan]) -> Vec<&ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.attr("url.path").as_deref() == Some("/v1/traces"))
        .collect()
}

/// Requests `/r0`.. `/r{n-1}` with pauses, so that the agents export in
/// several requests; waits until the receiver has each one's SERVER span,
/// then a while longer for spans of those exports to come back.
fn drive(receiver: &Receiver, port: u16, n: usize, tag: &str) -> Vec<ReceivedSpan> {
    let paths: Vec<String> = (0..n).map(|i| format!("/{tag}{i}")).collect();
    for p in &paths {
        curl_ok(port, p);
        std::thread::sleep(Duration::from_millis(300));
    }
    let served = |spans: &[ReceivedSpan]| {
        paths.iter().all(|p| {
            spans
                .iter()
                .any(|s| s.kind == "SERVER" && s.attr("url.path").as_deref() == Some(p.as_str()))
        })
    };
    let spans = receiver.spans_until(Duration::from_secs(30), served);
    assert!(served(&spans), "not every request was traced: {spans:#?}");
    // Each export above would have come back by now, and its own export too.
    std::thread::sleep(Duration::from_secs(3));
    receiver.spans()
}

#[test]
fn exports_to_a_collector_on_this_host_are_never_traced() {
    if !require_root("own_exports_untraced") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = python_http_server(dir.path(), port);
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    // No selection: the collector, a process of this host, is traced too.
    let agent = Agent::start_with(
        "trace",
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    let spans = drive(&receiver, port, 6, "own");
    let (_, log) = agent.stop_raw();
    let loops = export_spans(&spans);
    let first_request = spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
    assert!(
        loops.is_empty(),
        "{} spans of the agent's own exports (client port, ms after the first span): {:?}, e.g. {:#?}\n{log}",
        loops.len(),
        loops
            .iter()
            .map(|s| (s.attr("client.port"), (s.start_ns - first_request) / 1_000_000))
            .collect::<Vec<_>>(),
        loops.first()
    );
    // The collector's end of each export connection was seen and muted.
    assert!(counter(&log, "muted") > 0, "nothing muted:\n{log}");
}

#[test]
fn a_second_agent_refuses_and_allowed_agents_never_trace_each_other() {
    if !require_root("second_agent") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = python_http_server(dir.path(), port);
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
    let first = Agent::start_with("trace", &[], &env);

    // Not allowed: exits at once with a line naming the running agent.
    let started = Instant::now();
    let out = Command::new(agent_bin())
        .arg("trace")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .stdin(Stdio::null())
        .output()
        .expect("run a second agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second agent ran:\n{err}");
    assert!(
        err.contains(&format!("another agent (pid {})", first.pid())),
        "unclear refusal:\n{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));

    // Allowed: both run, and neither traces the other's exports.
    let second = Agent::start_with("trace", &["--allow-other-agents"], &env);
    assert!(
        second.stderr().contains("other agents on this host"),
        "{}",
        second.stderr()
    );
    let spans = drive(&receiver, port, 6, "two");
    let (first_pid, second_pid) = (first.pid().to_string(), second.pid().to_string());
    let (_, log2) = second.stop_raw();
    let (_, log1) = first.stop_raw();
    let loops = export_spans(&spans);
    assert!(
        loops.is_empty(),
        "{} spans of agents' exports, e.g. {:#?}",
        loops.len(),
        loops.first()
    );
    let of_agents: Vec<_> = spans
        .iter()
        .filter(|s| {
            let pid = s.resource_attr("process.pid");
            pid.as_deref() == Some(first_pid.as_str())
                || pid.as_deref() == Some(second_pid.as_str())
        })
        .collect();
    assert!(of_agents.is_empty(), "spans of an agent: {of_agents:#?}");
    // Both agents traced the requests (each exports its own copy).
    let served = spans
        .iter()
        .filter(|s| s.kind == "SERVER" && s.attr("url.path").as_deref() == Some("/two0"))
        .count();
    assert_eq!(served, 2, "one SERVER span of /two0 per agent");
    for log in [&log1, &log2] {
        assert!(counter(log, "muted") > 0, "nothing muted:\n{log}");
    }
    // The second agent's entry left the registry when it stopped.
    let entries: Vec<_> = fs::read_dir("/run/agent")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !entries
            .iter()
            .any(|n| n.to_str() == Some(second_pid.as_str())
                || n.to_str() == Some(first_pid.as_str())),
        "registry entries left: {entries:?}"
    );
}
