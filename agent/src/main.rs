use std::{
    io::Write,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use agent::{
    capture::{self, preflight, Capture},
    cli::{Cli, Command, DumpArgs, DumpFormat, Output, TraceArgs},
    correlate::{resource, sampling::Sampler},
    dump,
    export::otlp::OtlpConfig,
    pipeline::{self, SinkConfig, TraceOptions},
};
use anyhow::Context;
use clap::Parser;

/// Spans are built on the pipeline thread and freed on the exporter's: glibc's
/// allocator spent more time on that than the agent's own work did.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()),
        )
        .init();
    if let Err(e) = run(cli) {
        eprintln!("agent: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    agent::redact::configure(match &cli.command {
        Some(Command::Dump(d)) if d.no_redact => agent::redact::Redaction::off(),
        _ => agent::redact::Redaction::new(&cli.redact),
    });
    preflight::check()?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while shutting down exits at once.
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())
            .context("signal handler")?;
        signal_hook::flag::register(sig, stop.clone()).context("signal handler")?;
    }
    match cli.command.unwrap_or(Command::Trace) {
        Command::Trace => run_trace(&cli.capture, &cli.trace, stop),
        Command::Dump(args) => run_dump(&cli.capture, &args, stop),
    }
}

fn run_trace(
    cargs: &agent::cli::CaptureArgs,
    targs: &TraceArgs,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let env = |k: &str| std::env::var(k).ok();
    let sink = match OtlpConfig::resolve(targs.otlp_endpoint.as_deref(), env)
        .context("OTLP exporter configuration")?
    {
        Some(cfg) => SinkConfig::Otlp(cfg),
        None if targs.output == Output::Json => SinkConfig::ConsoleJson,
        None => SinkConfig::ConsoleTree,
    };
    let sampler = match targs.sampler_ratio {
        Some(r) => Sampler::ParentBased(Box::new(Sampler::TraceIdRatio(r))),
        None => Sampler::from_env_values(
            env("OTEL_TRACES_SAMPLER").as_deref(),
            env("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )
        .context("OTEL_TRACES_SAMPLER")?,
    };
    let opts = TraceOptions {
        capture: cargs.config(),
        sampler,
        sink,
        service_names: resource::parse_mappings(&targs.service_names)?,
        pair_window: Duration::from_millis(targs.assembly_window_ms),
        thread_link: targs.thread_link,
        legacy_rpc_attributes: !targs.no_legacy_rpc_attributes,
        stats_every: cargs.stats_every(),
        shutdown_timeout: Duration::from_millis(targs.shutdown_timeout_ms),
    };
    pipeline::run_trace(opts, stop).context("tracing")?;
    Ok(())
}

fn run_dump(
    cargs: &agent::cli::CaptureArgs,
    args: &DumpArgs,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let cfg = cargs.config();
    let cap = Capture::start(&cfg).context("starting capture")?;
    let (rx, drainer) =
        capture::spawn_drain(cap, cfg.drain_interval, stop.clone(), cargs.stats_every())
            .context("spawning drain thread")?;

    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let offset = capture::monotonic_to_unix_offset_ns();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut summaries = dump::Summaries::default();
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            stop.store(true, Ordering::Relaxed);
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(batch) => {
                let written = match args.format {
                    DumpFormat::Json => dump::write_batch(&mut out, &batch, offset),
                    DumpFormat::Summary => {
                        let done: Vec<_> = batch.iter().flat_map(|c| summaries.add(c)).collect();
                        dump::write_summaries(&mut out, &done)
                    }
                };
                if !written {
                    stop.store(true, Ordering::Relaxed); // stdout closed
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = dump::write_summaries(&mut out, &summaries.finish());
    let _ = out.flush();
    let (kernel, user) = drainer
        .join()
        .map_err(|_| anyhow::anyhow!("drain thread panicked"))?;
    tracing::info!(%kernel, %user, "capture stopped");
    Ok(())
}
