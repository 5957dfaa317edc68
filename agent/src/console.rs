//! The console sink, used when no OTLP endpoint is configured: finished
//! traces as indented trees (service, span name, kind, duration, status), or
//! with `--output json` one OTLP-JSON span per line.

use std::{
    collections::HashMap,
    io::Write,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::correlate::{resource::ProcessResource, SpanKind, SpanRecord, Status, TraceId};

/// Traces held before they are printed regardless (memory bound).
const MAX_TRACES: usize = 10_000;

struct Pending {
    spans: Vec<(SpanRecord, Arc<ProcessResource>)>,
    last: Instant,
}

/// Collects spans per trace and prints a trace once no span has joined it for `quiet`.
pub struct TreePrinter {
    quiet: Duration,
    traces: HashMap<TraceId, Pending>,
}

impl TreePrinter {
    pub fn new(quiet: Duration) -> Self {
        Self {
            quiet,
            traces: HashMap::new(),
        }
    }

    pub fn push(
        &mut self,
        span: SpanRecord,
        res: Arc<ProcessResource>,
        out: &mut impl Write,
    ) -> std::io::Result<()> {
        let now = Instant::now();
        let p = self.traces.entry(span.trace_id).or_insert_with(|| Pending {
            spans: Vec::new(),
            last: now,
        });
        p.spans.push((span, res));
        p.last = now;
        if self.traces.len() > MAX_TRACES {
            return self.flush(None, out);
        }
        Ok(())
    }

    /// Prints traces quiet since `now - quiet` (all of them with `None`).
    pub fn flush(&mut self, now: Option<Instant>, out: &mut impl Write) -> std::io::Result<()> {
        let quiet = self.quiet;
        let mut done: Vec<(TraceId, Pending)> = Vec::new();
        self.traces.retain(|id, p| {
            let ready = now.is_none_or(|n| n.duration_since(p.last) >= quiet);
            if ready {
                done.push((
                    *id,
                    std::mem::replace(
                        p,
                        Pending {
                            spans: Vec::new(),
                            last: p.last,
                        },
                    ),
                ));
            }
            !ready
        });
        done.sort_by_key(|(_, p)| p.spans.iter().map(|(s, _)| s.start_ns).min());
        for (id, p) in done {
            out.write_all(render_trace(id, &p.spans).as_bytes())?;
        }
        out.flush()
    }
}

fn duration(ns: u64) -> String {
    match ns {
        n if n >= 1_000_000_000 => format!("{:.2} s", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} ms", n as f64 / 1e6),
        n => format!("{:.1} µs", n as f64 / 1e3),
    }
}

/// One trace as an indented tree; children under their parent by start time.
pub fn render_trace(id: TraceId, spans: &[(SpanRecord, Arc<ProcessResource>)]) -> String {
    let mut s = format!(
        "trace {} ({} span{})\n",
        id.to_hex(),
        spans.len(),
        if spans.len() == 1 { "" } else { "s" }
    );
    let ids: std::collections::HashSet<_> = spans.iter().map(|(sp, _)| sp.span_id).collect();
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| spans[i].0.start_ns);
    let roots: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| spans[i].0.parent_span_id.is_none_or(|p| !ids.contains(&p)))
        .collect();
    fn walk(
        s: &mut String,
        spans: &[(SpanRecord, Arc<ProcessResource>)],
        order: &[usize],
        i: usize,
        prefix: &str,
        last: bool,
        depth: usize,
    ) {
        let (sp, res) = &spans[i];
        let branch = if last { "└─ " } else { "├─ " };
        let kind = match sp.kind {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
        };
        let status = match &sp.status {
            Status::Unset => "ok".to_string(),
            Status::Error(m) => format!("ERROR: {m}"),
        };
        s.push_str(&format!(
            "{prefix}{branch}{} {kind} {} {} [{status}]\n",
            res.service_name,
            sp.name,
            duration(sp.end_ns.saturating_sub(sp.start_ns))
        ));
        if depth > 64 {
            return;
        }
        let children: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&j| j != i && spans[j].0.parent_span_id == Some(sp.span_id))
            .collect();
        let child_prefix = format!("{prefix}{}", if last { "   " } else { "│  " });
        for (k, &c) in children.iter().enumerate() {
            walk(
                s,
                spans,
                order,
                c,
                &child_prefix,
                k + 1 == children.len(),
                depth + 1,
            );
        }
    }
    for (k, &r) in roots.iter().enumerate() {
        walk(&mut s, spans, &order, r, "", k + 1 == roots.len(), 0);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::{SpanId, TraceId};

    fn span(
        id: u8,
        parent: Option<u8>,
        kind: SpanKind,
        name: &str,
        start: u64,
        end: u64,
        status: Status,
    ) -> SpanRecord {
        SpanRecord {
            trace_id: TraceId([7; 16]),
            span_id: SpanId([id; 8]),
            parent_span_id: parent.map(|p| SpanId([p; 8])),
            remote_parent: false,
            trace_state: None,
            flags: 1,
            name: name.into(),
            kind,
            start_ns: start,
            end_ns: end,
            attributes: vec![],
            events: vec![],
            status,
            pid: 1,
            comm: "x".into(),
        }
    }

    fn res(name: &str) -> Arc<ProcessResource> {
        Arc::new(ProcessResource {
            service_name: name.into(),
            attributes: vec![],
            pid: 1,
        })
    }

    #[test]
    fn renders_a_tree_with_children_under_parents() {
        let spans = vec![
            (
                span(
                    2,
                    Some(1),
                    SpanKind::Server,
                    "GET /a",
                    1_100_000,
                    2_000_000,
                    Status::Unset,
                ),
                res("python3"),
            ),
            (
                span(
                    1,
                    Some(9),
                    SpanKind::Client,
                    "GET /a",
                    1_000_000,
                    3_500_000,
                    Status::Unset,
                ),
                res("curl"),
            ),
            (
                span(
                    3,
                    Some(2),
                    SpanKind::Client,
                    "POST /db",
                    1_200_000,
                    1_300_000,
                    Status::Error("HTTP 503".into()),
                ),
                res("python3"),
            ),
        ];
        let text = render_trace(TraceId([7; 16]), &spans);
        let want = "trace 07070707070707070707070707070707 (3 spans)
└─ curl CLIENT GET /a 2.50 ms [ok]
   └─ python3 SERVER GET /a 900.0 µs [ok]
      └─ python3 CLIENT POST /db 100.0 µs [ERROR: HTTP 503]
";
        assert_eq!(text, want);
    }

    #[test]
    fn prints_only_quiet_traces_until_forced() {
        let mut p = TreePrinter::new(Duration::from_secs(3600));
        let mut out = Vec::new();
        p.push(
            span(1, None, SpanKind::Server, "GET /", 0, 1000, Status::Unset),
            res("s"),
            &mut out,
        )
        .unwrap();
        p.flush(Some(Instant::now()), &mut out).unwrap();
        assert!(out.is_empty());
        p.flush(None, &mut out).unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("s SERVER GET / 1.0 µs [ok]"));
    }
}
