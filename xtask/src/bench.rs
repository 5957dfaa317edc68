//! `cargo xtask bench overhead`: what the agent costs a traced server.
//!
//! nginx (one worker) serves a small file to wrk over keep-alive connections,
//! alternately without the agent and with it in each mode, in one run so that
//! all see the same machine noise. Modes: capture alone (`dump --format
//! summary`: kernel capture, ordering and per-connection accounting), and the
//! full job (`trace`: HTTP decoding, spans, OTLP export to a real receiver,
//! otelite, on this host, or a discarding one), tracing every process or nginx
//! alone. The peers are the integration tests' own (same nginx, same receiver). Prints
//! requests/s, ratios, the agent's CPU seconds per 100,000 requests, spans
//! made and exported, and every drop counter.
//!
//! `cargo xtask bench pipeline`: the userspace pipeline alone, on replayed
//! capture records (see `agent/benches/pipeline.rs`).
//!
//! `cargo xtask bench h2`: the same for HTTP/2: nginx with h2c (one worker)
//! and h2load (`-c` connections x `-m` concurrent streams), without the agent
//! and with it (capture alone; trace with OTLP to the discarding sink).

use std::{fs, path::Path, process::Command, thread};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use integration_tests::{agent_bin, free_port, nginx, otlp_receiver::Receiver, Agent};

#[derive(Subcommand, Clone, Copy)]
pub enum Which {
    /// nginx + wrk, with and without the agent.
    Overhead {
        /// Alternating rounds (each one run without and one with the agent).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// wrk connections.
        #[arg(long, default_value_t = 32)]
        connections: u32,
    },
    /// nginx h2c + h2load, with and without the agent.
    H2 {
        /// Alternating rounds (each one run without and one with each agent mode).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Seconds per h2load run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// h2load connections.
        #[arg(long, default_value_t = 10)]
        connections: u32,
        /// h2load concurrent streams per connection.
        #[arg(long, default_value_t = 10)]
        streams: u32,
    },
    /// The userspace pipeline on replayed capture records (no kernel, no
    /// network): ns, heap allocations and bytes per span, per stage.
    Pipeline {
        /// Requests per variant.
        #[arg(long, default_value_t = 200_000)]
        requests: usize,
        /// Compress export requests (the exporter's `gzip` setting).
        #[arg(long)]
        gzip: bool,
    },
    /// Whole-trace accuracy on the reference topology (gateway -> A -> B, C).
    Accuracy {
        /// Requests per variant.
        #[arg(long, default_value_t = 500)]
        requests: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
}

/// Runs wrk; returns (requests/s, requests).
fn wrk(port: u16, seconds: u32, connections: u32) -> Result<(f64, f64)> {
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .arg(format!("http://127.0.0.1:{port}/index.html"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let reqs = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    Ok((rps, reqs))
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat; `after` starts at field 3.
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// A collector that accepts every OTLP/HTTP request and discards it, so the
/// figures show the agent's cost of building and exporting spans rather than
/// a receiver's storage cost on the same two cores. Returns its endpoint and
/// a counter of export requests received.
fn start_discarding_collector() -> Result<(String, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let requests = Arc::new(AtomicU64::new(0));
    let counted = requests.clone();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let counted = counted.clone();
            thread::spawn(move || {
                let mut writer = match conn.try_clone() {
                    Ok(w) => w,
                    Err(_) => return,
                };
                let mut reader = BufReader::new(conn);
                loop {
                    // One request: head, then a Content-Length body; keep-alive.
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).map_or(true, |n| n == 0) {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    counted.fetch_add(1, Ordering::Relaxed);
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
                    if writer.write_all(ok).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((endpoint, requests))
}

/// `name=N` from the last log line containing `marker` (0 when absent).
fn counter(log: &str, marker: &str, name: &str) -> u64 {
    let line = log.lines().rev().find(|l| l.contains(marker)).unwrap_or("");
    integration_tests::field(line, name).unwrap_or(0)
}

/// Figures of one agent mode over all rounds.
#[derive(Default)]
struct Mode {
    rps: Vec<f64>,
    cpu_s: f64,
    requests: f64,
    events: u64,
    spans: u64,
    exported: u64,
    drops: Vec<u64>,
}

/// (log line marker, counter) of every drop the agent counts.
const DROPS: [(&str, &str); 10] = [
    ("capture stopped", "ringbuf_full"),
    ("capture stopped", "no_entry"),
    ("capture stopped", "conn_full"),
    ("capture stopped", "read_fault"),
    ("capture stopped", "queue_full_chunks"),
    ("capture stopped", "seq_gaps"),
    ("capture stopped", "decode_errors"),
    ("agent stopped", "spans_dropped_queue_full"),
    ("agent stopped", "spans_dropped_failed"),
    ("agent stopped", "dropped_connections"),
];

pub fn run(which: Which, agent: &Path) -> Result<()> {
    // The agent runs through the integration tests' harness, which finds the
    // release build where `build` put it.
    if agent_bin().canonicalize().ok() != agent.canonicalize().ok() {
        bail!(
            "the harness would run {}, not the agent just built at {}",
            agent_bin().display(),
            agent.display()
        );
    }
    match which {
        Which::Overhead {
            rounds,
            seconds,
            connections,
        } => overhead(rounds, seconds, connections),
        Which::H2 {
            rounds,
            seconds,
            connections,
            streams,
        } => h2(rounds, seconds, connections, streams),
        Which::Accuracy {
            requests,
            concurrency,
        } => accuracy(requests, concurrency),
        Which::Pipeline { requests, gzip } => pipeline(requests, gzip),
    }
}

/// `cargo xtask bench pipeline`: `agent/benches/pipeline.rs`, which prints
/// its own table and fails when the replayed traffic does not make the spans
/// and pairs it implies.
fn pipeline(requests: usize, gzip: bool) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args(["bench", "-p", "agent", "--bench", "pipeline", "--"])
        .args(["--requests", &requests.to_string()]);
    if gzip {
        cmd.arg("--gzip");
    }
    let status = cmd.status().context("running cargo bench")?;
    if !status.success() {
        bail!("the pipeline benchmark failed ({status})");
    }
    Ok(())
}

/// `cargo xtask bench accuracy`: the reference topology of
/// `integration_tests::topology` in both variants (A forwards trace headers,
/// or nothing), traced by the agent into a real OTLP receiver; each
/// request's exported trace is compared with its expected tree.
fn accuracy(requests: usize, concurrency: usize) -> Result<()> {
    use integration_tests::topology::{score, Topology};
    let mut rows = Vec::new();
    for (variant, forward, target) in [
        ("headers forwarded", true, 0.99),
        ("nothing forwarded", false, 0.95),
    ] {
        let receiver = Receiver::start();
        let endpoint = receiver.endpoint();
        // The services connect to each other at the first request, after the
        // agent attached: every connection is new to it.
        let topo = Topology::start(forward);
        let args: Vec<String> = topo
            .services
            .iter()
            .flat_map(|p| ["--port".to_string(), p.to_string()])
            .chain(["--otlp-endpoint".to_string(), endpoint.clone()])
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = Agent::start_with("trace", &args, &[]);
        let ok = topo.drive(requests, concurrency);
        if ok != requests {
            bail!("{variant}: only {ok} of {requests} requests were answered");
        }
        thread::sleep(std::time::Duration::from_millis(500));
        let (_, log) = agent.stop_raw();
        let want = requests * 6;
        let spans = receiver.spans_until(std::time::Duration::from_secs(30), |s| s.len() >= want);
        let sc = score(&spans, requests);
        if let Some(path) = std::env::var_os("ACCURACY_DUMP") {
            let path = std::path::PathBuf::from(path).with_extension(if forward {
                "forward"
            } else {
                "none"
            });
            fs::write(&path, format!("{spans:#?}\n{log}"))?;
        }
        println!("--- {variant}");
        println!(
            "requests / spans / traces       : {} / {} / {}",
            requests,
            spans.len(),
            sc.traces
        );
        println!(
            "exactly correct traces          : {} ({:.1} %, target >= {:.0} %)",
            sc.exact,
            sc.share() * 100.0,
            target * 100.0
        );
        for (why, n) in &sc.failures {
            println!("  {why:<45}: {n}");
        }
        let links: Vec<String> = [
            "paired",
            "linked_by_trace",
            "linked_by_thread",
            "sdk_parents",
            "ambiguous_trace",
            "ambiguous_thread",
            "overlapping_calls",
            "overlapping_kept",
            "late_pairs",
            "late_starts",
            "links_evicted",
            "h2_late_connections",
            "h2_incomplete_exchanges",
            "h2_hpack_errors",
            "h2_header_blocks_lost",
        ]
        .iter()
        .map(|n| format!("{n}={}", counter(&log, "agent stopped", n)))
        .collect();
        println!("agent link counters             : {}", links.join(" "));
        if let Some(e) = &sc.example {
            println!("first wrong trace:\n{e}");
        }
        rows.push((variant, sc.share(), target));
    }
    println!();
    for (variant, share, target) in rows {
        let verdict = if share >= target { "meets" } else { "BELOW" };
        println!(
            "{variant:<20}: {:.1} % exactly correct ({verdict} the {:.0} % target)",
            share * 100.0,
            target * 100.0
        );
    }
    Ok(())
}

/// Runs h2load for `seconds` against nginx h2c; returns (requests/s, requests done).
fn h2load(port: u16, seconds: u32, connections: u32, streams: u32) -> Result<(f64, f64)> {
    let out = Command::new("h2load")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-m{streams}"),
            &format!("-D{seconds}"),
        ])
        .arg(format!("http://127.0.0.1:{port}/index.html"))
        .output()
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let r = integration_tests::peers::parse_h2load(&text);
    if r.done == 0 || r.failed > 0 || r.errored > 0 {
        bail!("h2load did not succeed:\n{text}");
    }
    Ok((r.rps, r.done as f64))
}

/// `cargo xtask bench h2`: nginx (one worker, h2c) serving a small file to
/// h2load (`-c` connections x `-m` streams), without the agent and with it.
fn h2(rounds: u32, seconds: u32, connections: u32, streams: u32) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let www = dir.path().join("www");
    fs::create_dir_all(&www)?;
    fs::write(
        www.join("index.html"),
        "<html><body>".to_string() + &"benchmark page ".repeat(40) + "</body></html>\n",
    )?;
    let port = free_port();
    let _nginx = integration_tests::peers::nginx_h2c(dir.path(), &www, port);
    h2load(port, 1, connections, streams)?; // warm-up
    let (discard, export_requests) = start_discarding_collector()?;
    let formats: [(&str, Vec<&str>); 2] = [
        (
            "capture only, all processes",
            vec!["dump", "--format", "summary"],
        ),
        (
            "trace, OTLP to a discarding sink",
            vec!["trace", "--otlp-endpoint", &discard],
        ),
    ];
    let mut without = Vec::new();
    let mut modes: Vec<Mode> = formats
        .iter()
        .map(|_| Mode {
            drops: vec![0; DROPS.len()],
            ..Mode::default()
        })
        .collect();
    for round in 0..rounds {
        let (rps, _) = h2load(port, seconds, connections, streams)?;
        println!("round {round}: without agent {:<29} {rps:>10.0} req/s", "");
        without.push(rps);
        for ((format, args), mode) in formats.iter().zip(modes.iter_mut()) {
            let a = Agent::start_with(args[0], &args[1..], &[]);
            let pid = a.pid();
            let before = cpu_seconds(pid)?;
            let (rps, reqs) = h2load(port, seconds, connections, streams)?;
            mode.cpu_s += cpu_seconds(pid)? - before;
            mode.requests += reqs;
            let (_, log) = a.stop_raw();
            println!("round {round}: agent ({format:<32}) {rps:>10.0} req/s");
            mode.rps.push(rps);
            mode.events += counter(&log, "capture stopped", "events");
            mode.spans += counter(&log, "agent stopped", "spans");
            mode.exported += counter(&log, "agent stopped", "spans_exported");
            for (d, (marker, name)) in mode.drops.iter_mut().zip(DROPS) {
                *d += counter(&log, marker, name);
            }
        }
    }
    println!(
        "export requests the discarding sink took: {}",
        export_requests.load(std::sync::atomic::Ordering::Relaxed)
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let base = mean(&without);
    println!();
    println!("h2load -c {connections} -m {streams}, {seconds} s runs, nginx h2c (1 worker)");
    println!("requests/s without agent        : {base:.0}");
    for ((format, args), m) in formats.iter().zip(&modes) {
        let rps = mean(&m.rps);
        println!("--- {format}: agent {}", args.join(" "));
        println!("requests/s with agent           : {rps:.0}");
        println!("ratio with/without              : {:.3}", rps / base);
        println!(
            "agent CPU µs / stream           : {:.2}",
            m.cpu_s * 1e6 / m.requests.max(1.0)
        );
        println!("kernel events                   : {}", m.events);
        println!(
            "streams / spans made / exported : {} / {} / {}",
            m.requests, m.spans, m.exported
        );
        let drops: Vec<String> = DROPS
            .iter()
            .zip(&m.drops)
            .map(|((_, n), d)| format!("{n}={d}"))
            .collect();
        println!("drops                           : {}", drops.join(" "));
    }
    Ok(())
}

fn overhead(rounds: u32, seconds: u32, connections: u32) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let www = dir.path().join("www");
    fs::create_dir_all(&www)?;
    fs::write(
        www.join("index.html"),
        "<html><body>".to_string() + &"benchmark page ".repeat(40) + "</body></html>\n",
    )?;
    let port = free_port();
    let _nginx = nginx(dir.path(), &www, port, 1);
    wrk(port, 1, connections)?; // warm-up
    let receiver = Receiver::start();
    let otelite = receiver.endpoint();
    let (discard, export_requests) = start_discarding_collector()?;
    // (label, agent arguments). wrk runs on the same host, so by default the
    // agent traces the load generator too; `--comm nginx` traces the server
    // alone, as on a host where the clients are elsewhere.
    let formats: [(&str, Vec<&str>); 4] = [
        (
            "capture only, all processes",
            vec!["dump", "--format", "summary"],
        ),
        (
            "trace, OTLP to a discarding sink",
            vec!["trace", "--otlp-endpoint", &discard],
        ),
        (
            "trace, OTLP discard, nginx only",
            vec!["trace", "--otlp-endpoint", &discard, "--comm", "nginx"],
        ),
        (
            "trace, OTLP to otelite",
            vec!["trace", "--otlp-endpoint", &otelite],
        ),
    ];
    let mut without = Vec::new();
    let mut modes: Vec<Mode> = formats
        .iter()
        .map(|_| Mode {
            drops: vec![0; DROPS.len()],
            ..Mode::default()
        })
        .collect();
    for round in 0..rounds {
        let (rps, _) = wrk(port, seconds, connections)?;
        println!("round {round}: without agent {:<29} {rps:>10.0} req/s", "");
        without.push(rps);
        for ((format, args), mode) in formats.iter().zip(modes.iter_mut()) {
            let a = Agent::start_with(args[0], &args[1..], &[]);
            let pid = a.pid();
            let before = cpu_seconds(pid)?;
            let (rps, reqs) = wrk(port, seconds, connections)?;
            mode.cpu_s += cpu_seconds(pid)? - before;
            mode.requests += reqs;
            let (_, log) = a.stop_raw();
            println!("round {round}: agent ({format:<32}) {rps:>10.0} req/s");
            mode.rps.push(rps);
            mode.events += counter(&log, "capture stopped", "events");
            mode.spans += counter(&log, "agent stopped", "spans");
            mode.exported += counter(&log, "agent stopped", "spans_exported");
            for (d, (marker, name)) in mode.drops.iter_mut().zip(DROPS) {
                *d += counter(&log, marker, name);
            }
        }
    }
    println!(
        "export requests the discarding sink took: {}",
        export_requests.load(std::sync::atomic::Ordering::Relaxed)
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let base = mean(&without);
    println!();
    println!("requests/s without agent        : {base:.0}");
    for ((format, args), m) in formats.iter().zip(&modes) {
        let rps = mean(&m.rps);
        println!("--- {format}: agent {}", args.join(" "));
        println!("requests/s with agent           : {rps:.0}");
        println!("ratio with/without              : {:.3}", rps / base);
        println!(
            "agent CPU s / 100k requests     : {:.3}",
            m.cpu_s / (m.requests / 100_000.0)
        );
        println!("kernel events                   : {}", m.events);
        println!(
            "spans made / exported           : {} / {}",
            m.spans, m.exported
        );
        let drops: Vec<String> = DROPS
            .iter()
            .zip(&m.drops)
            .map(|((_, n), d)| format!("{n}={d}"))
            .collect();
        println!("drops                           : {}", drops.join(" "));
    }
    Ok(())
}
