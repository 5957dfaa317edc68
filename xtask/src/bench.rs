//! `cargo xtask bench overhead`: what the agent costs a traced server.
//!
//! nginx (one worker) serves a small file to wrk over keep-alive connections,
//! alternately without the agent and with it in each mode, in one run so that
//! all see the same machine noise. Modes: `summary` (capture, decode and
//! per-connection accounting: the capture pipeline's own cost) and `json`
//! (`agent dump` printing every chunk). Prints requests/s, ratios, the agent's
//! CPU seconds per 100,000 requests, and every drop counter.

use std::{
    fs,
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Subcommand;

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
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listening on {port}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn start_nginx(dir: &Path, port: u16) -> Result<Killed> {
    let www = dir.join("www");
    fs::create_dir_all(&www)?;
    fs::write(www.join("index.html"), "<html><body>".to_string() + &"benchmark page ".repeat(40) + "</body></html>\n")?;
    let d = dir.display();
    let conf = format!(
        "daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 10000000;
  client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;
  server {{ listen 127.0.0.1:{port}; root {w}; }} }}
",
        w = www.display()
    );
    fs::write(dir.join("nginx.conf"), conf)?;
    let child = Command::new("nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning nginx")?;
    let k = Killed(child);
    wait_port(port)?;
    Ok(k)
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

struct AgentRun {
    proc: Killed,
    err: std::path::PathBuf,
}

fn start_agent(agent: &Path, dir: &Path, round: u32, mode: usize, args: &[&str]) -> Result<AgentRun> {
    let err = dir.join(format!("agent-{round}-{mode}.log"));
    let child = Command::new(agent)
        .args(["dump", "--stats-interval-s", "0"])
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err)?)
        .spawn()
        .context("spawning agent")?;
    let run = AgentRun { proc: Killed(child), err };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(&run.err).unwrap_or_default().contains("capture attached") {
        if Instant::now() > deadline {
            bail!("agent did not attach:\n{}", fs::read_to_string(&run.err).unwrap_or_default());
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(run)
}

/// Stops the agent; returns its final counter line.
fn stop_agent(mut run: AgentRun) -> Result<String> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(run.proc.0.id() as i32, libc::SIGINT) };
    run.proc.0.wait()?;
    let log = fs::read_to_string(&run.err)?;
    Ok(log.lines().rev().find(|l| l.contains("capture stopped")).unwrap_or("").to_string())
}

fn counter(line: &str, name: &str) -> u64 {
    let key = format!("{name}=");
    line.find(&key)
        .map(|at| line[at + key.len()..].chars().take_while(char::is_ascii_digit).collect::<String>())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Figures of one agent mode over all rounds.
#[derive(Default)]
struct Mode {
    rps: Vec<f64>,
    cpu_s: f64,
    requests: f64,
    events: u64,
    drops: Vec<u64>,
}

const DROP_NAMES: [&str; 7] =
    ["ringbuf_full", "args_full", "conn_full", "read_fault", "queue_full_chunks", "seq_gaps", "decode_errors"];

pub fn run(which: Which, agent: &Path) -> Result<()> {
    let Which::Overhead { rounds, seconds, connections } = which;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let _nginx = start_nginx(dir.path(), port)?;
    wrk(port, 1, connections)?; // warm-up
    // (label, agent arguments). wrk runs on the same host, so by default the
    // agent traces the load generator too; `--comm nginx` traces the server
    // alone, as on a host where the clients are elsewhere.
    let formats: [(&str, &[&str]); 3] = [
        ("summary, all processes", &["--format", "summary"]),
        ("summary, --comm nginx", &["--format", "summary", "--comm", "nginx"]),
        ("json, all processes", &["--format", "json"]),
    ];
    let mut without = Vec::new();
    let mut modes: Vec<Mode> = formats.iter().map(|_| Mode { drops: vec![0; DROP_NAMES.len()], ..Mode::default() }).collect();
    for round in 0..rounds {
        let (rps, _) = wrk(port, seconds, connections)?;
        println!("round {round}: without agent {:<20} {rps:>10.0} req/s", "");
        without.push(rps);
        for (i, ((format, args), mode)) in formats.iter().zip(modes.iter_mut()).enumerate() {
            let a = start_agent(agent, dir.path(), round, i, args)?;
            let pid = a.proc.0.id();
            let before = cpu_seconds(pid)?;
            let (rps, reqs) = wrk(port, seconds, connections)?;
            mode.cpu_s += cpu_seconds(pid)? - before;
            mode.requests += reqs;
            let line = stop_agent(a)?;
            println!("round {round}: agent ({format:<23}) {rps:>10.0} req/s");
            mode.rps.push(rps);
            mode.events += counter(&line, "events");
            for (d, name) in mode.drops.iter_mut().zip(DROP_NAMES) {
                *d += counter(&line, name);
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let base = mean(&without);
    println!();
    println!("requests/s without agent        : {base:.0}");
    for ((format, args), m) in formats.iter().zip(&modes) {
        let rps = mean(&m.rps);
        println!("--- {format}: agent dump {}", args.join(" "));
        println!("requests/s with agent           : {rps:.0}");
        println!("ratio with/without              : {:.3}", rps / base);
        println!("agent CPU s / 100k requests     : {:.3}", m.cpu_s / (m.requests / 100_000.0));
        println!("kernel events                   : {}", m.events);
        let drops: Vec<String> = DROP_NAMES.iter().zip(&m.drops).map(|(n, d)| format!("{n}={d}")).collect();
        println!("drops                           : {}", drops.join(" "));
    }
    Ok(())
}
