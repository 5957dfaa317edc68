//! Command line.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::capture::CaptureConfig;
use crate::correlate::spans::ThreadLink;

#[derive(Debug, Parser)]
#[command(
    name = "agent",
    version,
    about = "eBPF-based, zero-instrumentation tracing agent"
)]
pub struct Cli {
    #[command(flatten)]
    pub capture: CaptureArgs,
    #[command(flatten)]
    pub trace: TraceArgs,
    /// Log filter (tracing's EnvFilter syntax), e.g. `info`, `agent=debug`.
    #[arg(long, env = "AGENT_LOG", default_value = "info", global = true)]
    pub log: String,
    /// A header field or query parameter name whose value never leaves the
    /// host, in addition to the built-in list (repeatable; compared like
    /// those: case-insensitively, percent-decoded, ignoring `-`, `_`, `.`).
    #[arg(long = "redact", value_name = "NAME", global = true)]
    pub redact: Vec<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace HTTP traffic and export spans (the default).
    Trace,
    /// Print what the agent captures: one JSON object per chunk (or per connection).
    Dump(DumpArgs),
}

/// Options of the tracing job (also accepted without the `trace` subcommand).
#[derive(Debug, Args, Default)]
pub struct TraceArgs {
    /// OTLP/HTTP endpoint, a base URL like OTEL_EXPORTER_OTLP_ENDPOINT (spans go to
    /// {URL}/v1/traces). Without it or the OTEL_EXPORTER_OTLP_* variables, traces
    /// are printed on the console.
    #[arg(long, value_name = "URL", global = true)]
    pub otlp_endpoint: Option<String>,
    /// Console format: `tree` (readable traces) or `json` (one OTLP-JSON span per line).
    #[arg(long, value_enum, default_value_t = Output::Tree, global = true)]
    pub output: Output,
    /// Service name for a process name (repeatable), e.g. `python3=frontend`.
    #[arg(long = "service-name", value_name = "PROCESS=SERVICE", global = true)]
    pub service_names: Vec<String>,
    /// Sample new traces with this probability (parent-based trace-id ratio);
    /// overrides OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG.
    #[arg(long, value_name = "RATIO", value_parser = parse_ratio, global = true)]
    pub sampler_ratio: Option<f64>,
    /// Trace assembly window (ms): how long a finished span is held for the
    /// other end of its request on this host, and how long a finished request
    /// is remembered for links that resolve late.
    #[arg(long, alias = "pair-window-ms", default_value_t = 2000, global = true)]
    pub assembly_window_ms: u64,
    /// A CLIENT request without trace context, sent by a thread that has
    /// several received requests open (an event loop): `none` gives it no
    /// parent (never a wrong one), `most-recent` the newest of them.
    #[arg(long, value_enum, default_value_t = ThreadLink::None, global = true)]
    pub thread_link: ThreadLink,
    /// Leave out the pre-2026 gRPC attributes (`rpc.system`, `rpc.service`,
    /// `rpc.grpc.status_code`) and keep only the current conventions' ones.
    #[arg(long, global = true)]
    pub no_legacy_rpc_attributes: bool,
    /// Longest time (ms) from SIGTERM/SIGINT to exit, whatever the collector
    /// does; spans not exported by then are dropped and counted.
    #[arg(long, default_value_t = 5000, global = true,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub shutdown_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Tree,
    Json,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a ratio between 0 and 1")),
    }
}

#[derive(Debug, Args, Default)]
pub struct DumpArgs {
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// `json`: a line per chunk; `summary`: a line per connection, at close.
    #[arg(long, value_enum, default_value_t = DumpFormat::Json)]
    pub format: DumpFormat,
    /// Print payloads as captured, credentials included (by default the
    /// values of sensitive HTTP/1 header lines and query parameters are
    /// replaced, as in spans).
    #[arg(long)]
    pub no_redact: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum DumpFormat {
    #[default]
    Json,
    Summary,
}

#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// Trace only this process id (repeatable). With --comm, either matches.
    #[arg(long = "pid", value_name = "PID", global = true)]
    pub pids: Vec<u32>,
    /// Trace only processes with this name (repeatable, at most 15 bytes).
    #[arg(long = "comm", value_name = "NAME", global = true)]
    pub comms: Vec<String>,
    /// Trace only connections with this local or remote port (repeatable).
    #[arg(long = "port", value_name = "PORT", global = true)]
    pub ports: Vec<u16>,
    /// Payload bytes captured per syscall (1..=16384).
    #[arg(long, default_value_t = agent_common::DEFAULT_CAPTURE, global = true,
          value_parser = clap::value_parser!(u32).range(1..=agent_common::MAX_CAPTURE as i64))]
    pub capture_bytes: u32,
    /// Ring buffer size in bytes (rounded up to a power of two).
    #[arg(long, default_value_t = 16 << 20, global = true)]
    pub ringbuf_bytes: u32,
    /// Milliseconds between ring-buffer drains.
    #[arg(long, default_value_t = 10, global = true,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub drain_interval_ms: u64,
    /// Seconds between counter log lines (0: only at exit).
    #[arg(long, default_value_t = 10, global = true)]
    pub stats_interval_s: u64,
    /// Start even when another agent runs on this host. Agents never trace
    /// each other's processes or the other ends of their sockets.
    #[arg(long, global = true)]
    pub allow_other_agents: bool,
    /// Directory where the agents of this host register.
    #[arg(long, value_name = "DIR", default_value = crate::capture::agents::REGISTRY_DIR,
          global = true)]
    pub registry_dir: std::path::PathBuf,
}

impl CaptureArgs {
    pub fn config(&self) -> CaptureConfig {
        CaptureConfig {
            pids: self.pids.clone(),
            comms: self.comms.clone(),
            ports: self.ports.clone(),
            capture_bytes: self.capture_bytes,
            ringbuf_bytes: self.ringbuf_bytes,
            drain_interval: Duration::from_millis(self.drain_interval_ms),
            allow_other_agents: self.allow_other_agents,
            registry_dir: self.registry_dir.clone(),
        }
    }

    pub fn stats_every(&self) -> Option<Duration> {
        (self.stats_interval_s > 0).then(|| Duration::from_secs(self.stats_interval_s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_flags_parse() {
        let cli = Cli::try_parse_from([
            "agent",
            "dump",
            "--pid",
            "10",
            "--pid",
            "11",
            "--comm",
            "nginx",
            "--port",
            "8080",
            "--capture-bytes",
            "16384",
        ])
        .unwrap();
        let c = cli.capture.config();
        assert_eq!(c.pids, vec![10, 11]);
        assert_eq!(c.comms, vec!["nginx"]);
        assert_eq!(c.ports, vec![8080]);
        assert_eq!(c.capture_bytes, 16384);
        assert!(matches!(cli.command, Some(Command::Dump(_))));
    }

    #[test]
    fn trace_flags_work_with_and_without_the_subcommand() {
        for args in [
            &[
                "agent",
                "--otlp-endpoint",
                "http://h:4318",
                "--sampler-ratio",
                "0.25",
                "--service-name",
                "a=b",
            ][..],
            &[
                "agent",
                "trace",
                "--otlp-endpoint",
                "http://h:4318",
                "--sampler-ratio",
                "0.25",
                "--service-name",
                "a=b",
            ],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert_eq!(cli.trace.otlp_endpoint.as_deref(), Some("http://h:4318"));
            assert_eq!(cli.trace.sampler_ratio, Some(0.25));
            assert_eq!(cli.trace.service_names, vec!["a=b"]);
            assert_eq!(cli.trace.output, Output::Tree);
        }
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for args in [
            &["agent", "--capture-bytes", "16385"][..],
            &["agent", "--capture-bytes", "0"],
            &["agent", "--port", "70000"],
            &["agent", "--drain-interval-ms", "0"],
            &["agent", "--sampler-ratio", "1.5"],
            &["agent", "--output", "xml"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
