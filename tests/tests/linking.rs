//! Whole traces across processes on one host, through the real agent into a
//! real OTLP receiver: each linking path of the correlator with real peers.

use std::{thread, time::Duration};

use integration_tests::{
    counter_in,
    otlp_receiver::{ReceivedSpan, Receiver},
    require_root,
    topology::{drive, score, EventLoop, Topology},
    Agent,
};

fn trace_agent(ports: &[u16], receiver: &Receiver) -> Agent {
    let endpoint = receiver.endpoint();
    let mut args: Vec<String> = ports
        .iter()
        .flat_map(|p| ["--port".to_string(), p.to_string()])
        .collect();
    args.extend(["--otlp-endpoint".to_string(), endpoint]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start_with("trace", &args, &[])
}

/// 40 requests, 4 at a time, through gateway -> A -> B (gRPC), C (asyncio):
/// every trace must be exactly its expected tree of six spans when A forwards
/// the trace headers (links by propagated trace id), and all but a few when
/// it forwards nothing (links by the thread serving the request).
fn topology(forward: bool) {
    let receiver = Receiver::start();
    let topo = Topology::start(forward);
    let agent = trace_agent(&topo.services, &receiver);
    // A fresh grpcio channel writes its first calls from its own thread, not
    // the one that made them (those calls come out unlinked, never wrong):
    // a few calls first, outside the scored requests, as a service that has
    // been up a while would have made.
    let warm = 4;
    assert_eq!(drive(topo.gateway, warm, 1, "/warmup/"), warm, "warm-up");
    let n = 40;
    assert_eq!(topo.drive(n, 4), n, "every request answered");
    thread::sleep(Duration::from_millis(300));
    let (_, log) = agent.stop_raw();
    let spans = receiver.spans_until(Duration::from_secs(30), |s| {
        s.iter().filter(|s| !s.name.contains("/warmup/")).count() >= n * 6
    });
    let sc = score(&spans, n);
    let by_trace = counter_in(&log, "agent stopped", "linked_by_trace");
    let by_thread = counter_in(&log, "agent stopped", "linked_by_thread");
    let paired = counter_in(&log, "agent stopped", "paired");
    assert_eq!(
        paired,
        3 * (n + warm) as u64,
        "every SERVER span under its CLIENT span:\n{log}"
    );
    if forward {
        assert_eq!(sc.exact, n, "{sc:#?}");
        assert_eq!(
            by_trace,
            2 * (n + warm) as u64,
            "A's calls linked by trace id"
        );
    } else {
        // grpcio sometimes writes a call from one of its own threads, not
        // the one that made it: that call gets no parent (a split trace),
        // never a wrong one.
        assert!(sc.exact * 100 >= n * 85, "{sc:#?}");
        assert!(by_thread >= n as u64, "A's calls linked by thread:\n{log}");
        let wrong: Vec<_> = sc
            .failures
            .keys()
            .filter(|k| !k.starts_with("span missing"))
            .collect();
        assert!(
            wrong.is_empty(),
            "only unlinked calls, never wrong links: {sc:#?}"
        );
        assert_eq!(by_trace, 0);
    }
}

#[test]
fn linking_forwarded_headers_gives_whole_traces() {
    if !require_root("linking_forwarded_headers_gives_whole_traces") {
        return;
    }
    topology(true);
}

#[test]
fn linking_by_thread_gives_whole_traces_without_headers() {
    if !require_root("linking_by_thread_gives_whole_traces_without_headers") {
        return;
    }
    topology(false);
}

fn path_n(s: &ReceivedSpan) -> &str {
    s.name.rsplit('/').next().unwrap_or("")
}

/// An event loop (asyncio) calling out without context while several of its
/// requests are open: the agent never guesses a parent (and counts it), and
/// the calls it does link (one request open at the time) are under the
/// request that made them.
#[test]
fn linking_never_guesses_on_an_event_loop() {
    if !require_root("linking_never_guesses_on_an_event_loop") {
        return;
    }
    let receiver = Receiver::start();
    let el = EventLoop::start();
    let agent = trace_agent(&el.services, &receiver);
    let n = 40;
    assert_eq!(drive(el.port, n, 8, "/x/"), n);
    thread::sleep(Duration::from_millis(300));
    let (_, log) = agent.stop_raw();
    let spans = receiver.spans_until(Duration::from_secs(30), |s| s.len() >= n * 3);
    let ambiguous = counter_in(&log, "agent stopped", "ambiguous_thread");
    assert!(
        ambiguous > 0,
        "8 requests in flight on one loop thread:\n{log}"
    );
    let d_servers: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == "SERVER" && s.name.starts_with("GET /x/"))
        .collect();
    let calls: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == "CLIENT" && s.name.starts_with("GET /stock/"))
        .collect();
    assert_eq!((d_servers.len(), calls.len()), (n, n), "{spans:#?}");
    let mut unlinked = 0;
    for c in &calls {
        match d_servers.iter().find(|s| s.span_id == c.parent_span_id) {
            Some(parent) => {
                assert_eq!(path_n(parent), path_n(c), "a call under another request");
                assert_eq!(parent.trace_id, c.trace_id);
            }
            None => {
                assert_eq!(c.parent_span_id, "", "no parent rather than a wrong one");
                unlinked += 1;
            }
        }
    }
    assert_eq!(
        unlinked as u64, ambiguous,
        "each ambiguous call counted once"
    );
}
