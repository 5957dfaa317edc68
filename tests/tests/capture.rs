//! Capture layer, end to end: real programs loaded into the running kernel,
//! real third-party peers, assertions on `agent dump` output.

use std::{collections::HashSet, fs, process::Command};

use integration_tests::{
    counter, free_port, nginx, python, python_http_server, read_line, require_root, run_ok,
    write_line, Agent, ChunkExt,
};
use serde_json::Value;

fn data<'a>(chunks: &'a [Value], comm: &str, direction: &str) -> Vec<&'a Value> {
    chunks
        .iter()
        .filter(|c| c.s("kind") == "data" && c.s("comm") == comm && c.s("direction") == direction)
        .collect()
}

fn total_len(chunks: &[&Value]) -> u64 {
    chunks.iter().map(|c| c.n("len")).sum()
}

/// Concatenated captured payload of chunks in order.
fn stream(chunks: &[&Value]) -> Vec<u8> {
    chunks.iter().flat_map(|c| c.payload()).collect()
}

#[test]
fn curl_request_seen_on_both_ends_with_mirrored_addresses_and_exact_lengths() {
    if !require_root("curl_both_ends") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("hello.txt"),
        "hello from the traced server\n".repeat(30),
    )
    .unwrap();
    let port = free_port();
    let _server = python_http_server(dir.path(), port);
    let agent = Agent::start(&["--port", &port.to_string()]);
    // curl reports what it sent and received, to compare with the kernel's counts.
    let sizes = run_ok(Command::new("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{size_request} %{size_header} %{size_download} %{local_port}",
        &format!("http://127.0.0.1:{port}/hello.txt?x=1"),
    ]));
    let (chunks, log) = agent.stop();
    let v: Vec<u64> = sizes
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    let (sent, received, client_port) = (v[0], v[1] + v[2], v[3]);

    let client_out = data(&chunks, "curl", "egress");
    let client_in = data(&chunks, "curl", "ingress");
    let server_in = data(&chunks, "python3", "ingress");
    let server_out = data(&chunks, "python3", "egress");
    assert!(
        !client_out.is_empty()
            && !server_in.is_empty()
            && !server_out.is_empty()
            && !client_in.is_empty(),
        "{chunks:#?}"
    );

    assert!(stream(&client_out).starts_with(b"GET /hello.txt?x=1 HTTP/1.1\r\n"));
    assert_eq!(
        stream(&client_out),
        stream(&server_in),
        "request bytes equal on both ends"
    );
    assert!(stream(&server_out).starts_with(b"HTTP/1.0 200 OK\r\n"));
    assert_eq!(
        stream(&server_out),
        stream(&client_in),
        "response bytes equal on both ends"
    );
    assert_eq!(
        total_len(&client_out),
        sent,
        "client egress len = curl's size_request"
    );
    assert_eq!(total_len(&server_in), sent);
    assert_eq!(
        total_len(&client_in),
        received,
        "client ingress len = header + body curl received"
    );
    assert_eq!(total_len(&server_out), received);

    let client_local = format!("127.0.0.1:{client_port}");
    let server_local = format!("127.0.0.1:{port}");
    for c in client_out.iter().chain(&client_in) {
        assert_eq!(
            (c.s("role"), c.s("local"), c.s("remote")),
            ("client", client_local.as_str(), server_local.as_str())
        );
    }
    for c in server_in.iter().chain(&server_out) {
        assert_eq!(
            (c.s("role"), c.s("local"), c.s("remote")),
            ("server", server_local.as_str(), client_local.as_str())
        );
    }
    // Both ends saw their fd closed.
    for comm in ["curl", "python3"] {
        assert!(
            chunks
                .iter()
                .any(|c| c.s("kind") == "close" && c.s("comm") == comm),
            "close from {comm}"
        );
    }
    assert_eq!(counter(&log, "ringbuf_full"), 0);
    assert_eq!(counter(&log, "seq_gaps"), 0);
}

#[test]
fn one_mib_response_is_capped_with_exact_lengths_and_every_chunk_accounted_for() {
    if !require_root("one_mib") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let body: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    fs::write(dir.path().join("big.bin"), &body).unwrap();
    let port = free_port();
    let _server = python_http_server(dir.path(), port);
    let agent = Agent::start(&["--port", &port.to_string(), "--capture-bytes", "4096"]);
    let got = run_ok(Command::new("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{size_header} %{size_download}",
        &format!("http://127.0.0.1:{port}/big.bin"),
    ]));
    let (chunks, log) = agent.stop();
    let v: Vec<u64> = got.split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert_eq!(v[1], 1 << 20);
    let received = v[0] + v[1];

    for (comm, dir) in [("python3", "egress"), ("curl", "ingress")] {
        let side = data(&chunks, comm, dir);
        assert_eq!(
            total_len(&side),
            received,
            "{comm} {dir}: every byte accounted for"
        );
        for c in &side {
            assert_eq!(c.n("captured"), c.n("len").min(4096), "{c}");
            assert_eq!(c["truncated"].as_bool(), Some(c.n("len") > 4096), "{c}");
        }
        // Sequence numbers of one connection are gapless.
        let seqs: Vec<u64> = chunks
            .iter()
            .filter(|c| c.s("comm") == comm && c.s("kind") == "data")
            .map(|c| c.n("seq"))
            .collect();
        assert_eq!(
            seqs,
            (seqs[0]..seqs[0] + seqs.len() as u64).collect::<Vec<_>>(),
            "{comm}"
        );
    }
    // The first body bytes the server sent are captured exactly.
    let first_body = data(&chunks, "python3", "egress")
        .into_iter()
        .find(|c| !c.payload().starts_with(b"HTTP/"))
        .unwrap()
        .payload();
    assert_eq!(&first_body[..], &body[..first_body.len()]);
    assert!(counter(&log, "truncated") > 0);
    assert_eq!(counter(&log, "ringbuf_full"), 0);
}

const VECTORED: &str = r#"
import os, socket, sys, threading
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
port = srv.getsockname()[1]
def serve():
    conn, _ = srv.accept()
    a, b = bytearray(9), bytearray(100)
    n = os.readv(conn.fileno(), [a, b])
    os.writev(conn.fileno(), [b"HTTP/1.1 200 OK\r\n", b"Content-Length: 5\r\n\r\n", b"hello"])
    conn.close()
t = threading.Thread(target=serve); t.start()
print(port, flush=True); sys.stdin.readline()
c = socket.create_connection(("127.0.0.1", port))
c.sendmsg([b"GET /vec", b"tored HTTP/1.1\r\n", b"Host: x\r\n\r\n"])
buf = bytearray(200)
n = c.recvmsg_into([buf])[0]
assert bytes(buf[:n]).endswith(b"hello"), buf[:n]
c.close(); t.join()
print("done", flush=True)
"#;

#[test]
fn writev_readv_sendmsg_recvmsg_paths_are_captured() {
    if !require_root("vectored") {
        return;
    }
    let mut py = python(VECTORED, &[]);
    let port = read_line(&mut py);
    let agent = Agent::start(&["--port", &port]);
    write_line(&mut py, "go");
    assert_eq!(read_line(&mut py), "done");
    let _ = py.wait();
    let (chunks, _) = agent.stop();
    let by = |syscall: &str| -> Vec<&Value> {
        chunks
            .iter()
            .filter(|c| c.s("syscall") == syscall)
            .collect()
    };
    let request = b"GET /vectored HTTP/1.1\r\nHost: x\r\n\r\n";
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

    let sendmsg = by("sendmsg");
    assert_eq!(sendmsg.len(), 1, "{chunks:#?}");
    assert_eq!(sendmsg[0].payload(), request);
    assert_eq!(sendmsg[0].n("len"), request.len() as u64);
    assert_eq!(sendmsg[0].s("role"), "client");
    let readv = by("readv");
    assert_eq!(
        readv[0].payload(),
        request,
        "readv copies across both iovecs"
    );
    assert_eq!(readv[0].s("role"), "server");
    let writev = by("writev");
    assert_eq!(writev[0].payload(), response);
    assert_eq!(writev[0].n("len"), response.len() as u64);
    let recvmsg = by("recvmsg");
    assert_eq!(recvmsg[0].payload(), response);
    assert_eq!(recvmsg[0].s("direction"), "ingress");
}

const KEEPALIVE_CLIENT: &str = r#"
import socket, sys
port = int(sys.argv[1])
c = socket.create_connection(("127.0.0.1", port))
def get(path):
    c.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += c.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
    while len(body) < length:
        body += c.recv(65536)
get("/first")
print(c.getsockname()[1], flush=True)
sys.stdin.readline()
get("/second")
print("done", flush=True)
"#;

#[test]
fn keepalive_connection_opened_before_the_agent_is_identified() {
    if !require_root("keepalive_before_agent") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("second"), "second body").unwrap();
    let port = free_port();
    let _nginx = nginx(dir.path(), &root, port, 1);
    let mut client = python(KEEPALIVE_CLIENT, &[&port.to_string()]);
    let client_port = read_line(&mut client);
    let agent = Agent::start(&["--port", &port.to_string()]);
    write_line(&mut client, "go");
    assert_eq!(read_line(&mut client), "done");
    let (chunks, _) = agent.stop();
    let _ = client.wait();

    let client_local = format!("127.0.0.1:{client_port}");
    let server_local = format!("127.0.0.1:{port}");
    let req = data(&chunks, "python3", "egress");
    assert!(
        stream(&req).starts_with(b"GET /second HTTP/1.1\r\n"),
        "{chunks:#?}"
    );
    assert!(
        !stream(&req).windows(6).any(|w| w == b"/first"),
        "the request before the agent is not seen"
    );
    let at_server = data(&chunks, "nginx", "ingress");
    assert_eq!(stream(&at_server), stream(&req));
    let resp = data(&chunks, "nginx", "egress");
    assert!(stream(&resp).starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(stream(&data(&chunks, "python3", "ingress")).ends_with(b"second body"));
    // Late connections count from the first byte seen, in both directions.
    for (comm, first, other) in [
        ("python3", "egress", "ingress"),
        ("nginx", "ingress", "egress"),
    ] {
        assert_contiguous(&data(&chunks, comm, first), &format!("late {comm} {first}"));
        assert_contiguous(&data(&chunks, comm, other), &format!("late {comm} {other}"));
    }
    for c in chunks.iter().filter(|c| c.s("comm") == "python3") {
        assert_eq!(
            (c.s("role"), c.s("local"), c.s("remote")),
            ("client", client_local.as_str(), server_local.as_str()),
            "{c}"
        );
    }
    for c in chunks.iter().filter(|c| c.s("comm") == "nginx") {
        assert_eq!(
            (c.s("role"), c.s("local"), c.s("remote")),
            ("server", server_local.as_str(), client_local.as_str()),
            "{c}"
        );
    }
}

const SLEEPERS: &str = r#"
import os, socket, sys, threading, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(4)
print(srv.getsockname()[1], flush=True); sys.stdin.readline()
pairs = []
for _ in range(3):
    c = socket.create_connection(srv.getsockname()); s, _ = srv.accept(); pairs.append((c, s))
got = {}
def reader(name, sock, ids):
    os.sched_setaffinity(0, {0})
    ids.append(threading.get_native_id())
    got[name] = sock.recv(100)
def sleeper(name, sock):
    ids = []
    t = threading.Thread(target=reader, args=(name, sock, ids)); t.start()
    while not ids: time.sleep(0.01)
    time.sleep(0.3)  # now asleep in recv, entered on CPU 0
    return t, ids[0]
# 1: the reader wakes on CPU 1 and finds its entry in CPU 0's slot.
t, tid = sleeper("moved", pairs[0][1])
os.sched_setaffinity(tid, {1})
pairs[0][0].sendall(b"GET /moved HTTP/1.1\r\n\r\n"); t.join()
# 2: a receive on CPU 0 needs the slot first, so the sleeper's entry is moved out.
t, tid = sleeper("spilled", pairs[1][1])
pairs[2][0].sendall(b"x"); time.sleep(0.1)
os.sched_setaffinity(0, {0}); pairs[2][1].recv(1)
os.sched_setaffinity(tid, {1})
pairs[1][0].sendall(b"GET /spilled HTTP/1.1\r\n\r\n"); t.join()
print(got["moved"].split()[1].decode(), got["spilled"].split()[1].decode(), flush=True)
"#;

/// Entries live in a per-CPU slot from syscall entry to exit. A receive that
/// sleeps, moves CPU, and loses its slot to another call meanwhile still
/// returns with its own arguments and entry time.
#[test]
fn calls_that_sleep_and_move_cpu_keep_their_entry() {
    if !require_root("sleepers") {
        return;
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        assert!(std::env::var("CI").is_err(), "CI machines have two CPUs");
        eprintln!("skipping sleepers: needs two CPUs");
        return;
    }
    let mut py = python(SLEEPERS, &[]);
    let port = read_line(&mut py);
    let agent = Agent::start(&["--port", &port]);
    write_line(&mut py, "go");
    assert_eq!(read_line(&mut py), "/moved /spilled");
    let _ = py.wait();
    let (chunks, _) = agent.stop();
    for path in ["/moved", "/spilled"] {
        let want = format!("GET {path} HTTP/1.1\r\n\r\n");
        let c = chunks
            .iter()
            .find(|c| c.s("direction") == "ingress" && c.payload() == want.as_bytes())
            .unwrap_or_else(|| panic!("no receive of {path} in {chunks:#?}"));
        // Entered about 0.3 s before the bytes came: the entry found is its own.
        assert!(c.n("duration_ns") >= 250_000_000, "{c}");
        assert_eq!(c.s("role"), "server");
    }
}

const BURST: &str = r#"
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
ports = []
for i in range(n):
    c = socket.create_connection(("127.0.0.1", port))
    ports.append(c.getsockname()[1])
    c.sendall(b"GET /f HTTP/1.0\r\n\r\n")
    while c.recv(65536):
        pass
    c.close()
print(" ".join(map(str, ports)), flush=True)
"#;

#[test]
fn burst_of_1000_short_connections_every_one_identified() {
    if !require_root("burst_1000") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("f"), "x").unwrap();
    let port = free_port();
    let _nginx = nginx(dir.path(), &root, port, 1);
    let agent = Agent::start(&["--port", &port.to_string()]);
    let mut client = python(BURST, &[&port.to_string(), "1000"]);
    let ports: Vec<String> = read_line(&mut client)
        .split_whitespace()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let _ = client.wait();
    let (chunks, log) = agent.stop();
    assert_eq!(ports.len(), 1000);
    let server = format!("127.0.0.1:{port}");

    let client_conns: HashSet<&str> = chunks
        .iter()
        .filter(|c| {
            c.s("comm") == "python3" && c.s("kind") == "data" && c.s("direction") == "egress"
        })
        .filter(|c| {
            c.s("role") == "client"
                && c.s("remote") == server
                && c.payload().starts_with(b"GET /f ")
        })
        .map(|c| c.s("local"))
        .collect();
    let server_conns: HashSet<&str> = chunks
        .iter()
        .filter(|c| {
            c.s("comm") == "nginx" && c.s("kind") == "data" && c.s("direction") == "ingress"
        })
        .filter(|c| {
            c.s("role") == "server" && c.s("local") == server && c.payload().starts_with(b"GET /f ")
        })
        .map(|c| c.s("remote"))
        .collect();
    let responses = chunks
        .iter()
        .filter(|c| {
            c.s("comm") == "nginx"
                && c.s("direction") == "egress"
                && c.payload().starts_with(b"HTTP/1.1 200")
        })
        .count();
    let missing_client: Vec<_> = ports
        .iter()
        .filter(|p| !client_conns.contains(p.as_str()))
        .collect();
    let missing_server: Vec<_> = ports
        .iter()
        .filter(|p| !server_conns.contains(p.as_str()))
        .collect();
    assert!(
        missing_client.is_empty(),
        "client side missing {} connections: {:?}",
        missing_client.len(),
        &missing_client[..missing_client.len().min(5)]
    );
    assert!(
        missing_server.is_empty(),
        "server side missing {} connections: {:?}",
        missing_server.len(),
        &missing_server[..missing_server.len().min(5)]
    );
    assert_eq!(responses, 1000);
    assert_eq!(counter(&log, "ringbuf_full"), 0);
}

#[test]
fn comm_filter_selects_only_the_named_process() {
    if !require_root("comm_filter") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a"), "a").unwrap();
    let port = free_port();
    let _server = python_http_server(dir.path(), port);
    let agent = Agent::start(&["--comm", "curl"]);
    run_ok(Command::new("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        &format!("http://127.0.0.1:{port}/a"),
    ]));
    let (chunks, _) = agent.stop();
    assert!(chunks
        .iter()
        .any(|c| c.s("comm") == "curl" && c.s("remote") == format!("127.0.0.1:{port}")));
    let others: Vec<_> = chunks.iter().filter(|c| c.s("comm") != "curl").collect();
    assert!(
        others.is_empty(),
        "unselected processes captured: {others:#?}"
    );
}

#[test]
fn pid_filter_and_the_agent_never_traces_itself() {
    if !require_root("pid_filter") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a"), "a").unwrap();
    let port = free_port();
    let server = python_http_server(dir.path(), port);
    let server_pid = server.0.id();
    let agent = Agent::start(&["--pid", &server_pid.to_string()]);
    let agent_pid = agent.pid() as u64;
    for _ in 0..3 {
        run_ok(Command::new("curl").args([
            "-sS",
            "-o",
            "/dev/null",
            &format!("http://127.0.0.1:{port}/a"),
        ]));
    }
    let (chunks, _) = agent.stop();
    assert!(!chunks.is_empty());
    assert!(
        chunks.iter().all(|c| c.n("pid") == server_pid as u64),
        "only the selected pid"
    );
    assert!(chunks.iter().all(|c| c.n("pid") != agent_pid));
    assert_eq!(data(&chunks, "python3", "ingress").len(), 3);
}

/// Data chunks of one connection in one direction, in release order.
fn conn_data<'a>(chunks: &'a [Value], conn: &str, direction: &str) -> Vec<&'a Value> {
    chunks
        .iter()
        .filter(|c| c.s("kind") == "data" && c.s("conn") == conn && c.s("direction") == direction)
        .collect()
}

fn close_of<'a>(chunks: &'a [Value], conn: &str) -> Option<&'a Value> {
    chunks
        .iter()
        .find(|c| c.s("kind") == "close" && c.s("conn") == conn)
}

/// A chunk's accounting fields, for assertion messages (payloads are long).
fn brief(c: &Value) -> String {
    format!(
        "{} {} {} seq={} pos={} len={} peer_pos={}",
        c.s("comm"),
        c.s("kind"),
        c.s("direction"),
        c["seq"],
        c["pos"],
        c["len"],
        c["peer_pos"]
    )
}

/// Each chunk starts where the previous one of its direction ended, from 0.
fn assert_contiguous(side: &[&Value], what: &str) {
    let mut end = 0;
    for c in side {
        assert_eq!(
            c.n("pos"),
            end,
            "{what}: chunk starts where the previous ended: {}",
            brief(c)
        );
        end += c.n("len");
    }
}

#[test]
fn byte_positions_of_a_fresh_connection_start_at_zero_and_are_contiguous() {
    if !require_root("byte_positions") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(dir.path().join("f.bin"), &body).unwrap();
    let port = free_port();
    let _server = python_http_server(dir.path(), port);
    let agent = Agent::start(&["--port", &port.to_string()]);
    // A long header so the request is not one small write; the HTTP/1.0
    // server shuts its sending side down before close (a FIN in write_seq).
    let long = format!("X-Pad: {}", "p".repeat(5000));
    let sizes = run_ok(Command::new("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-H",
        &long,
        "-w",
        "%{size_request} %{size_header} %{size_download}",
        &format!("http://127.0.0.1:{port}/f.bin"),
    ]));
    let (chunks, log) = agent.stop();
    let v: Vec<u64> = sizes
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    let (request, response) = (v[0], v[1] + v[2]);

    for (comm, role, sent, received) in [
        ("curl", "client", request, response),
        ("python3", "server", response, request),
    ] {
        let any = chunks
            .iter()
            .find(|c| c.s("comm") == comm && c.s("kind") == "data")
            .unwrap_or_else(|| panic!("no {comm} chunk"));
        assert_eq!(
            any.s("role"),
            role,
            "a connection seen from its start (made by {role})"
        );
        let conn = any.s("conn");
        let out = conn_data(&chunks, conn, "egress");
        let inn = conn_data(&chunks, conn, "ingress");
        assert!(
            out.len() + inn.len() >= 3,
            "{comm}: several chunks: {chunks:#?}"
        );
        assert_contiguous(&out, &format!("{comm} egress"));
        assert_contiguous(&inn, &format!("{comm} ingress"));
        assert_eq!(total_len(&out), sent, "{comm}");
        assert_eq!(total_len(&inn), received, "{comm}");
        // The other direction's count: the client had sent its whole request
        // before reading the response; the server had read it all before answering.
        let (waits_on, answer) = if role == "client" {
            (&out, &inn)
        } else {
            (&inn, &out)
        };
        let whole = total_len(waits_on);
        for c in answer.iter() {
            assert_eq!(c.n("peer_pos"), whole, "{comm}: {}", brief(c));
        }
        for c in waits_on.iter() {
            assert!(
                c.n("peer_pos") <= c.n("pos"),
                "{comm}: nothing answered before the request ended: {}",
                brief(c)
            );
        }
        // The close: end of egress and of what was read, FINs not counted.
        let close = close_of(&chunks, conn).unwrap_or_else(|| panic!("{comm}: no close"));
        assert_eq!(
            (close.n("pos"), close.n("peer_pos")),
            (sent, received),
            "{comm}: {}",
            brief(close)
        );
    }
    assert_eq!(counter(&log, "stream_gaps"), 0);
    assert_eq!(counter(&log, "stream_gap_bytes"), 0);
}

const SLOW_CLOSE_CLIENT: &str = r#"
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
out = []
for i in range(n):
    c = socket.create_connection(("127.0.0.1", port))
    req = b"GET /big.bin HTTP/1.0\r\nX-N: %d\r\n\r\n" % i
    c.sendall(req)
    got = 0
    while True:
        d = c.recv(65536)
        if not d:
            break
        got += len(d)
    # Let the agent drain the full ring buffer before our close record.
    time.sleep(0.8)
    out.append("%d:%d:%d" % (c.getsockname()[1], len(req), got))
    c.close()
print(" ".join(out), flush=True)
"#;

/// A ring buffer far too small for the traffic loses records; the byte
/// positions of the chunks that do arrive tell exactly how many bytes each
/// hole holds, so lens plus holes add up to the true stream sizes.
#[test]
fn lost_records_leave_holes_that_positions_measure_exactly() {
    if !require_root("lost_records_positions") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let body: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 247) as u8).collect();
    fs::write(dir.path().join("big.bin"), &body).unwrap();
    let port = free_port();
    let _server = python_http_server(dir.path(), port);
    let agent = Agent::start(&[
        "--port",
        &port.to_string(),
        "--ringbuf-bytes",
        "4096",
        "--capture-bytes",
        "64",
        "--drain-interval-ms",
        "500",
    ]);
    let mut client = python(SLOW_CLOSE_CLIENT, &[&port.to_string(), "4"]);
    let conns: Vec<(String, u64, u64)> = read_line(&mut client)
        .split_whitespace()
        .map(|t| {
            let f: Vec<&str> = t.split(':').collect();
            (
                format!("127.0.0.1:{}", f[0]),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let _ = client.wait();
    let (chunks, log) = agent.stop();
    assert_eq!(conns.len(), 4);

    let mut holes_seen = 0;
    let mut closes_checked = 0;
    let ids: HashSet<&str> = chunks.iter().map(|c| c.s("conn")).collect();
    for id in ids {
        let close = close_of(&chunks, id);
        for direction in ["egress", "ingress"] {
            let side = conn_data(&chunks, id, direction);
            let (mut end, mut lens, mut holes) = (0, 0, 0);
            for c in &side {
                assert!(c.n("pos") >= end, "in order, no overlap: {}", brief(c));
                holes += c.n("pos") - end;
                lens += c.n("len");
                end = c.n("pos") + c.n("len");
            }
            // A close gives both directions' final ends, revealing lost tails.
            if let Some(cl) = close {
                let fin = if direction == "egress" {
                    cl.n("pos")
                } else {
                    cl.n("peer_pos")
                };
                assert!(fin >= end, "{}", brief(cl));
                holes += fin - end;
                end = fin;
            }
            assert_eq!(
                lens + holes,
                end,
                "{id} {direction}: lens + holes = stream size"
            );
            holes_seen += holes;
        }
        // The client's own numbers are the truth for connections whose close came.
        if let Some(cl) = close.filter(|c| c.s("comm") == "python3" && c.s("role") == "client") {
            let (_, sent, got) = conns
                .iter()
                .find(|(local, ..)| local == cl.s("local"))
                .expect("a client connection");
            assert_eq!(
                (cl.n("pos"), cl.n("peer_pos")),
                (*sent, *got),
                "{}",
                brief(cl)
            );
            closes_checked += 1;
        }
    }
    assert!(
        counter(&log, "ringbuf_full") > 0,
        "records were lost:\n{log}"
    );
    assert!(holes_seen > 0, "holes were measured");
    assert!(
        counter(&log, "stream_gaps") > 0 && counter(&log, "stream_gap_bytes") > 0,
        "{log}"
    );
    assert!(
        closes_checked > 0,
        "some client closes survived the losses:\n{log}"
    );
}
