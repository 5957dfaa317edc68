//! HTTP exchanges -> spans.
//!
//! Each exchange becomes a SERVER span (the traced process received the
//! request) or a CLIENT span (it sent it). Trace ids and parents come from the
//! context in the request headers when there is one. When the agent sees both
//! ends of one connection on this host (the client's exchange on `A -> B` and
//! the server's on `B -> A`, overlapping in time), they are paired: each span
//! gets the other side's two moments as events (client send, server receive,
//! server send, client receive), and a server span whose request carried no
//! context joins the client span's trace as its child. Unpaired exchanges wait
//! `pair_window` for their peer, then go out alone.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
};

use super::{
    context::{self, RemoteContext, SpanId, TraceId},
    sampling::Sampler,
    AttrValue, SpanKind, SpanRecord, Status,
};
use crate::{
    capture::Role,
    decode::{Headers, HttpExchange, Outcome, Protocol},
};

/// Query parameters whose values are redacted in `url.query` (the
/// OpenTelemetry HTTP conventions' list plus common credential names).
const SENSITIVE_QUERY_PARAMS: &[&str] = &[
    "awsaccesskeyid",
    "signature",
    "sig",
    "x-goog-signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "api_key",
    "apikey",
    "key",
    "password",
    "passwd",
    "pwd",
    "secret",
    "client_secret",
    "auth",
];
const KNOWN_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY",
];
/// Exchanges waiting for their peer; beyond this the oldest go out unpaired.
const MAX_WAITING: usize = 65536;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SpanCounters {
    /// Spans built and handed on (sampled).
    pub spans: u64,
    pub server_spans: u64,
    pub client_spans: u64,
    /// Not exported: the caller's or the ratio sampler's decision.
    pub sampled_out: u64,
    /// Exchanges whose end could not be told (no role): not turned into spans.
    pub unknown_role: u64,
    /// Client/server span pairs seen on this host.
    pub paired: u64,
    /// Requests carrying context, by format; and malformed context headers.
    pub context_w3c: u64,
    pub context_b3: u64,
    pub context_jaeger: u64,
    pub context_malformed: u64,
}

/// (client address, server address) of a connection, its HTTP/2 stream (0
/// for HTTP/1: on one connection both ends number streams alike), and a span kind.
type PairKey = ((SocketAddr, SocketAddr, u32), SpanKind);

struct Waiting {
    ex: HttpExchange,
    ctx: Option<RemoteContext>,
    kind: SpanKind,
    /// Client (address, port) and server (address, port) of the connection,
    /// and the HTTP/2 stream id (0 for HTTP/1).
    key: (SocketAddr, SocketAddr, u32),
    deadline_ns: u64,
    /// A lone `b3: 0`: the caller denies sampling without passing ids.
    deny: bool,
}

pub struct SpanBuilder {
    sampler: Sampler,
    /// Add to kernel monotonic ns to get Unix ns.
    epoch_offset_ns: i128,
    pair_window_ns: u64,
    queue: VecDeque<u64>,
    waiting: HashMap<u64, Waiting>,
    /// Waiting exchanges by connection and kind, oldest first: a push only
    /// looks at the other kind of its own connection.
    by_key: HashMap<PairKey, VecDeque<u64>>,
    next_id: u64,
    /// Also set the pre-2026 gRPC attributes (`rpc.system`, `rpc.service`,
    /// `rpc.grpc.status_code`) that many dashboards still query.
    legacy_rpc: bool,
    pub counters: SpanCounters,
}

impl SpanBuilder {
    pub fn new(sampler: Sampler, epoch_offset_ns: i128, pair_window_ns: u64) -> Self {
        Self {
            sampler,
            epoch_offset_ns,
            pair_window_ns,
            queue: VecDeque::new(),
            waiting: HashMap::new(),
            by_key: HashMap::new(),
            next_id: 0,
            legacy_rpc: true,
            counters: SpanCounters::default(),
        }
    }

    /// Turns the legacy gRPC attributes on or off (on by default).
    pub fn with_legacy_rpc_attributes(mut self, on: bool) -> Self {
        self.legacy_rpc = on;
        self
    }

    /// Takes one exchange (`now_ns`: kernel monotonic time); appends spans that are ready.
    pub fn push(&mut self, ex: HttpExchange, now_ns: u64, out: &mut Vec<SpanRecord>) {
        let kind = match ex.role {
            Role::Server => SpanKind::Server,
            Role::Client => SpanKind::Client,
            Role::Unknown => {
                self.counters.unknown_role += 1;
                return;
            }
        };
        let extracted = context::extract(&ex.request_headers);
        self.counters.context_malformed += extracted.malformed.len() as u64;
        if let Some(c) = &extracted.context {
            match c.format {
                context::Format::W3c => self.counters.context_w3c += 1,
                context::Format::B3Single | context::Format::B3Multi => {
                    self.counters.context_b3 += 1
                }
                context::Format::Jaeger => self.counters.context_jaeger += 1,
            }
        }
        let stream = match ex.protocol {
            Protocol::Http2 { stream_id } => stream_id,
            Protocol::Http1 { .. } => 0,
        };
        let key = match kind {
            SpanKind::Client => (ex.local, ex.remote, stream),
            SpanKind::Server => (ex.remote, ex.local, stream),
        };
        let deny = extracted.context.is_none()
            && header(&ex.request_headers, "b3").is_some_and(|v| v.trim() == "0");
        let me = Waiting {
            ex,
            ctx: extracted.context,
            kind,
            key,
            deadline_ns: now_ns + self.pair_window_ns,
            deny,
        };
        if let Some(peer_id) = self.find_peer(&me) {
            if let Some(peer) = self.take(peer_id) {
                self.counters.paired += 1;
                let (client, server) = if me.kind == SpanKind::Client {
                    (me, peer)
                } else {
                    (peer, me)
                };
                self.emit_pair(client, server, out);
                return;
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.by_key.entry((key, kind)).or_default().push_back(id);
        self.queue.push_back(id);
        self.waiting.insert(id, me);
        while self.waiting.len() > MAX_WAITING {
            match self.queue.front().copied() {
                Some(oldest) => {
                    self.queue.pop_front();
                    if let Some(w) = self.take(oldest) {
                        self.emit_alone(w, out);
                    }
                }
                None => break,
            }
        }
    }

    /// Sends out exchanges whose pairing window has passed (`now_ns`: monotonic);
    /// with `now_ns = u64::MAX`, everything.
    pub fn flush(&mut self, now_ns: u64, out: &mut Vec<SpanRecord>) {
        while let Some(&id) = self.queue.front() {
            match self.waiting.get(&id) {
                Some(w) if w.deadline_ns > now_ns => break,
                _ => {}
            }
            self.queue.pop_front();
            if let Some(w) = self.take(id) {
                self.emit_alone(w, out);
            }
        }
    }

    /// Exchanges waiting for a peer.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    fn find_peer(&self, me: &Waiting) -> Option<u64> {
        let other = match me.kind {
            SpanKind::Client => SpanKind::Server,
            SpanKind::Server => SpanKind::Client,
        };
        let ids = self.by_key.get(&(me.key, other))?;
        ids.iter().copied().find(|id| {
            self.waiting.get(id).is_some_and(|w| {
                let (c, s) = if me.kind == SpanKind::Client {
                    (&me.ex, &w.ex)
                } else {
                    (&w.ex, &me.ex)
                };
                // Causality on one clock: the server read the request after the
                // client began sending it, and before the client finished.
                s.request_first_ns >= c.request_first_ns && s.request_first_ns <= end_ns(c)
            })
        })
    }

    fn take(&mut self, id: u64) -> Option<Waiting> {
        let w = self.waiting.remove(&id)?;
        let k = (w.key, w.kind);
        if let Some(ids) = self.by_key.get_mut(&k) {
            // Usually the front: exchanges leave in the order they came.
            if let Some(pos) = ids.iter().position(|i| *i == id) {
                ids.remove(pos);
            }
            if ids.is_empty() {
                self.by_key.remove(&k);
            }
        }
        Some(w)
    }

    fn unix(&self, mono: u64) -> u64 {
        (mono as i128 + self.epoch_offset_ns).max(0) as u64
    }

    /// Ids and sampling of a span from the request's context (or a new trace).
    fn ids(&mut self, w: &Waiting) -> (TraceId, Option<SpanId>, bool) {
        let (trace_id, parent) = match &w.ctx {
            Some(c) => (c.trace_id, Some(c.span_id)),
            None => (TraceId::random(), None),
        };
        (
            trace_id,
            parent,
            !w.deny && self.sampler.should_sample(trace_id, w.ctx.as_ref()),
        )
    }

    fn emit_alone(&mut self, w: Waiting, out: &mut Vec<SpanRecord>) {
        let (trace_id, parent, sampled) = self.ids(&w);
        self.finish(&w, trace_id, parent, sampled, Vec::new(), out);
    }

    fn emit_pair(&mut self, client: Waiting, server: Waiting, out: &mut Vec<SpanRecord>) {
        let (trace_id, parent, sampled) = self.ids(&client);
        let client_span = SpanId::random();
        let c_events = vec![
            ("server_receive", self.unix(server.ex.request_first_ns)),
            ("server_send", self.unix(end_ns(&server.ex))),
        ];
        let s_events = vec![
            ("client_send", self.unix(client.ex.request_first_ns)),
            ("client_receive", self.unix(end_ns(&client.ex))),
        ];
        self.finish_with_id(
            &client,
            trace_id,
            parent,
            client_span,
            sampled,
            c_events,
            out,
        );
        // The server continues the request's own context when it has one (the
        // same bytes crossed the connection); otherwise the client span is its parent.
        let (s_trace, s_parent, s_sampled) = match &server.ctx {
            Some(_) => self.ids(&server),
            None => (trace_id, Some(client_span), sampled),
        };
        self.finish(&server, s_trace, s_parent, s_sampled, s_events, out);
    }

    fn finish(
        &mut self,
        w: &Waiting,
        trace_id: TraceId,
        parent: Option<SpanId>,
        sampled: bool,
        events: Vec<(&'static str, u64)>,
        out: &mut Vec<SpanRecord>,
    ) {
        self.finish_with_id(w, trace_id, parent, SpanId::random(), sampled, events, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_with_id(
        &mut self,
        w: &Waiting,
        trace_id: TraceId,
        parent: Option<SpanId>,
        span_id: SpanId,
        sampled: bool,
        mut events: Vec<(&'static str, u64)>,
        out: &mut Vec<SpanRecord>,
    ) {
        if !sampled {
            self.counters.sampled_out += 1;
            return;
        }
        let ex = &w.ex;
        let start_ns = self.unix(ex.request_first_ns);
        let end = self.unix(end_ns(ex)).max(start_ns);
        events.sort_by_key(|e| e.1);
        let method = normalize_method(&ex.method);
        let path = url_path(&ex.target);
        let grpc = Grpc::of(ex);
        let name = match &grpc {
            Some(g) => g.method.to_string(),
            None => format!(
                "{} {}",
                if method == "_OTHER" { "HTTP" } else { method },
                path
            ),
        };
        let status = span_status(w.kind, ex, grpc.as_ref());
        let flags = w.ctx.as_ref().map_or(1, |c| c.trace_flags | 1);
        let span = SpanRecord {
            trace_id,
            span_id,
            parent_span_id: parent,
            remote_parent: parent.is_some() && w.ctx.is_some(),
            trace_state: w.ctx.as_ref().and_then(|c| c.trace_state.clone()),
            flags,
            name,
            kind: w.kind,
            start_ns,
            end_ns: end,
            attributes: attributes(w.kind, ex, method, &path, grpc.as_ref(), self.legacy_rpc),
            events,
            status,
            pid: ex.pid,
            comm: ex.comm.to_string(),
        };
        self.counters.spans += 1;
        match w.kind {
            SpanKind::Server => self.counters.server_spans += 1,
            SpanKind::Client => self.counters.client_spans += 1,
        }
        out.push(span);
    }
}

/// The last moment of an exchange this end saw.
fn end_ns(ex: &HttpExchange) -> u64 {
    ex.response_last_ns
        .or(ex.response_first_ns)
        .unwrap_or(ex.request_last_ns)
        .max(ex.request_first_ns)
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.get(name)
}

/// gRPC status code names, indexed by code.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
/// Codes that are errors on a server (OpenTelemetry gRPC conventions): the
/// server failed, not the caller.
const GRPC_SERVER_ERRORS: [u32; 6] = [2, 4, 12, 13, 14, 15];
/// HTTP/2 RST_STREAM CANCEL: the gRPC call was cancelled.
const H2_CANCEL: u32 = 8;

/// `/package.Service/Method`: what gRPC paths look like.
fn grpc_path(p: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    };
    match p.strip_prefix('/').and_then(|r| r.split_once('/')) {
        Some((svc, m)) => ok(svc) && svc.contains('.') && ok(m) && !m.contains('.'),
        None => false,
    }
}

/// A gRPC call: an HTTP/2 stream whose request is `application/grpc*`.
struct Grpc<'a> {
    /// `package.Service/Method`.
    method: &'a str,
    /// `package.Service`.
    service: &'a str,
    /// From the trailers, or the headers of a Trailers-Only response; a reset
    /// stream is CANCELLED.
    code: Option<u32>,
}

impl<'a> Grpc<'a> {
    fn of(ex: &'a HttpExchange) -> Option<Self> {
        if !matches!(ex.protocol, Protocol::Http2 { .. }) {
            return None;
        }
        let grpc = match header(&ex.request_headers, "content-type") {
            Some(ct) => ct
                .as_bytes()
                .get(..16)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc")),
            // Joined mid-connection, the content-type is often an HPACK entry
            // the agent never saw: a POST to `/package.Service/Method` then
            // stands for it (the span is marked incomplete either way).
            None => ex.incomplete && ex.method == "POST" && grpc_path(&ex.target),
        };
        if !grpc {
            return None;
        }
        let method = ex.target.strip_prefix('/').unwrap_or(&ex.target);
        let method = method.split('?').next().unwrap_or(method);
        let service = method.rsplit_once('/').map_or(method, |(s, _)| s);
        let code = header(&ex.trailers, "grpc-status")
            .or_else(|| header(&ex.response_headers, "grpc-status"))
            .and_then(|v| v.trim().parse::<u32>().ok())
            .or(match ex.outcome {
                Outcome::Reset { code: H2_CANCEL } => Some(1),
                _ => None,
            });
        Some(Self {
            method,
            service,
            code,
        })
    }

    fn code_name(&self) -> Option<&'static str> {
        self.code
            .map(|c| GRPC_CODES.get(c as usize).copied().unwrap_or("UNKNOWN"))
    }

    fn is_error(&self, kind: SpanKind) -> bool {
        match (self.code, kind) {
            (Some(0), _) | (None, _) => false,
            (Some(_), SpanKind::Client) => true,
            (Some(c), SpanKind::Server) => GRPC_SERVER_ERRORS.contains(&c),
        }
    }
}

fn normalize_method(m: &str) -> &str {
    KNOWN_METHODS
        .iter()
        .copied()
        .find(|k| *k == m)
        .unwrap_or("_OTHER")
}

/// Path of a request-target (origin or absolute form), without the query.
pub fn url_path(target: &str) -> String {
    let rest = match target.find("://") {
        Some(i) => {
            let after = &target[i + 3..];
            after.find('/').map_or("/", |j| &after[j..])
        }
        None => target,
    };
    let path = rest.split(['?', '#']).next().unwrap_or("");
    if path.is_empty() {
        "/".to_string()
    } else {
        path.to_string()
    }
}

/// Query of a request-target with the values of sensitive parameters replaced.
pub fn redacted_query(target: &str) -> Option<String> {
    let q = target.split_once('?')?.1;
    let q = q.split('#').next().unwrap_or("");
    let parts: Vec<String> = q
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _))
                if SENSITIVE_QUERY_PARAMS
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(k)) =>
            {
                format!("{k}=REDACTED")
            }
            _ => pair.to_string(),
        })
        .collect();
    Some(parts.join("&"))
}

/// Host and port of a Host header value (`name`, `name:port`, `[v6]:port`).
fn parse_host(v: &str) -> Option<(String, Option<u16>)> {
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    if let Some(rest) = v.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return Some((host.to_string(), port));
    }
    match v.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), p.parse().ok())),
        _ => Some((v.to_string(), None)),
    }
}

fn span_status(kind: SpanKind, ex: &HttpExchange, grpc: Option<&Grpc<'_>>) -> Status {
    match (&ex.outcome, grpc) {
        (_, Some(g)) if g.is_error(kind) => {
            return Status::Error(g.code_name().unwrap_or("UNKNOWN").to_string())
        }
        (Outcome::Aborted, _) => {
            return Status::Error("connection closed before the response completed".into())
        }
        (Outcome::Reset { code }, _) => {
            return Status::Error(format!("stream reset (HTTP/2 error code {code})"))
        }
        (_, Some(g)) if g.code.is_some() => return Status::Unset,
        _ => {}
    }
    match ex.status {
        Some(s) if s >= 500 => Status::Error(format!("HTTP {s}")),
        Some(s) if s >= 400 && kind == SpanKind::Client => Status::Error(format!("HTTP {s}")),
        _ => Status::Unset,
    }
}

fn attributes(
    kind: SpanKind,
    ex: &HttpExchange,
    method: &str,
    path: &str,
    grpc: Option<&Grpc<'_>>,
    legacy_rpc: bool,
) -> Vec<(&'static str, AttrValue)> {
    use AttrValue::{Bool, Int, Str};
    let mut a: Vec<(&'static str, AttrValue)> = Vec::with_capacity(24);
    match grpc {
        Some(g) => {
            a.push(("rpc.system.name", Str("grpc".into())));
            a.push(("rpc.method", Str(g.method.to_string())));
            if let Some(name) = g.code_name() {
                a.push(("rpc.status_code", Str(name.into())));
            }
            if legacy_rpc {
                a.push(("rpc.system", Str("grpc".into())));
                a.push(("rpc.service", Str(g.service.to_string())));
                if let Some(c) = g.code {
                    a.push(("rpc.grpc.status_code", Int(i64::from(c))));
                }
            }
        }
        None if !ex.method.is_empty() => {
            a.push(("http.request.method", Str(method.to_string())));
            if method == "_OTHER" {
                a.push(("http.request.method_original", Str(ex.method.clone())));
            }
        }
        None => {}
    }
    if grpc.is_none() && !ex.target.is_empty() {
        a.push(("url.path", Str(path.to_string())));
        if let Some(q) = redacted_query(&ex.target) {
            a.push(("url.query", Str(q)));
        }
    }
    let h2 = matches!(ex.protocol, Protocol::Http2 { .. });
    let scheme = if h2 {
        header(&ex.request_headers, ":scheme")
    } else {
        Some("http")
    };
    if let (None, Some(scheme)) = (grpc, scheme) {
        a.push(("url.scheme", Str(scheme.to_string())));
    }
    if let Some(s) = ex.status {
        a.push(("http.response.status_code", Int(i64::from(s))));
    }
    let (fallback, peer) = match kind {
        SpanKind::Client => (ex.remote, ex.remote),
        SpanKind::Server => (ex.local, ex.remote),
    };
    let host = header(&ex.request_headers, ":authority")
        .or_else(|| header(&ex.request_headers, "host"))
        .and_then(parse_host);
    let (server_address, server_port) = match host {
        Some((h, p)) => (h, p.unwrap_or(fallback.port())),
        None => (fallback.ip().to_string(), fallback.port()),
    };
    a.push(("server.address", Str(server_address)));
    a.push(("server.port", Int(i64::from(server_port))));
    if kind == SpanKind::Server {
        let forwarded = header(&ex.request_headers, "x-forwarded-for")
            .and_then(|v| v.split(',').next())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        match forwarded {
            Some(f) => a.push(("client.address", Str(f))),
            None => {
                a.push(("client.address", Str(peer.ip().to_string())));
                a.push(("client.port", Int(i64::from(peer.port()))));
            }
        }
    }
    a.push(("network.peer.address", Str(peer.ip().to_string())));
    a.push(("network.peer.port", Int(i64::from(peer.port()))));
    a.push(("network.protocol.name", Str("http".into())));
    let version = match ex.protocol {
        Protocol::Http1 { minor: 0 } => "1.0",
        Protocol::Http1 { .. } => "1.1",
        Protocol::Http2 { .. } => "2",
    };
    a.push(("network.protocol.version", Str(version.into())));
    if let Protocol::Http2 { stream_id } = ex.protocol {
        a.push(("http2.stream.id", Int(i64::from(stream_id))));
    }
    if let Some(ua) = header(&ex.request_headers, "user-agent") {
        a.push(("user_agent.original", Str(ua.to_string())));
    }
    a.push(("http.request.body.size", Int(ex.request_body_bytes as i64)));
    a.push((
        "http.response.body.size",
        Int(ex.response_body_bytes as i64),
    ));
    a.push(("thread.id", Int(i64::from(ex.tid))));
    if ex.incomplete {
        a.push(("http2.hpack.incomplete", Bool(true)));
    }
    match (&ex.outcome, ex.status, grpc) {
        (_, _, Some(g)) if g.is_error(kind) => {
            a.push(("error.type", Str(g.code_name().unwrap_or("UNKNOWN").into())))
        }
        (Outcome::Aborted, _, _) => a.push(("error.type", Str("aborted".into()))),
        (Outcome::Reset { .. }, _, _) => a.push(("error.type", Str("reset".into()))),
        (_, _, Some(g)) if g.code.is_some() => {}
        (_, Some(s), _) if s >= 500 || (s >= 400 && kind == SpanKind::Client) => {
            a.push(("error.type", Str(s.to_string())))
        }
        (Outcome::Upgraded { protocol }, _, _) => {
            a.push(("network.protocol.upgrade", Str(protocol.clone())))
        }
        _ => {}
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::ConnId;

    fn ex(
        role: Role,
        local: &str,
        remote: &str,
        headers: &[(&str, &str)],
        t: (u64, u64, u64, u64),
    ) -> HttpExchange {
        HttpExchange {
            conn: ConnId {
                sock: 1,
                start_ns: 1,
            },
            pid: 10,
            tid: 11,
            comm: "svc".into(),
            role,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            method: "GET".into(),
            target: "/a/b?x=1&token=abc".into(),
            protocol: Protocol::Http1 { minor: 1 },
            request_headers: headers.iter().copied().collect(),
            status: Some(200),
            response_headers: Headers::default(),
            trailers: Headers::default(),
            request_body_bytes: 0,
            response_body_bytes: 5,
            request_first_ns: t.0,
            request_last_ns: t.1,
            response_first_ns: Some(t.2),
            response_last_ns: Some(t.3),
            outcome: Outcome::Complete,
            incomplete: false,
        }
    }

    const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const S: &str = "00f067aa0ba902b7";

    fn builder() -> SpanBuilder {
        SpanBuilder::new(
            Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            1_000,
            100,
        )
    }

    #[test]
    fn server_span_continues_w3c_context_with_semconv_attributes() {
        let mut b = builder();
        let mut out = vec![];
        let tp = format!("00-{T}-{S}-01");
        let e = ex(
            Role::Server,
            "127.0.0.1:8080",
            "127.0.0.1:50000",
            &[
                ("traceparent", &tp),
                ("host", "example:8080"),
                ("user-agent", "curl/8"),
            ],
            (100, 110, 150, 160),
        );
        b.push(e, 0, &mut out);
        b.flush(u64::MAX, &mut out);
        assert_eq!(out.len(), 1);
        let s = &out[0];
        assert_eq!(s.trace_id.to_hex(), T);
        assert_eq!(s.parent_span_id.map(|p| p.to_hex()), Some(S.to_string()));
        assert_eq!(s.kind, SpanKind::Server);
        assert_eq!(s.name, "GET /a/b");
        assert_eq!((s.start_ns, s.end_ns), (1_100, 1_160));
        let want: [(&str, AttrValue); 10] = [
            ("http.request.method", AttrValue::Str("GET".into())),
            ("url.path", AttrValue::Str("/a/b".into())),
            ("url.query", AttrValue::Str("x=1&token=REDACTED".into())),
            ("http.response.status_code", AttrValue::Int(200)),
            ("server.address", AttrValue::Str("example".into())),
            ("server.port", AttrValue::Int(8080)),
            ("client.address", AttrValue::Str("127.0.0.1".into())),
            ("client.port", AttrValue::Int(50000)),
            ("network.protocol.version", AttrValue::Str("1.1".into())),
            ("user_agent.original", AttrValue::Str("curl/8".into())),
        ];
        for (k, v) in want {
            assert_eq!(s.attr(k), Some(&v), "{k}");
        }
        assert_eq!(s.status, Status::Unset);
        assert_eq!(b.counters.context_w3c, 1);
    }

    #[test]
    fn both_ends_on_one_host_are_paired_and_stitched_without_context() {
        let mut b = builder();
        let mut out = vec![];
        // The server's exchange completes first, then the client's.
        b.push(
            ex(
                Role::Server,
                "127.0.0.1:8080",
                "127.0.0.1:50000",
                &[],
                (110, 111, 140, 141),
            ),
            0,
            &mut out,
        );
        assert!(out.is_empty(), "waits for its peer");
        b.push(
            ex(
                Role::Client,
                "127.0.0.1:50000",
                "127.0.0.1:8080",
                &[],
                (100, 101, 145, 150),
            ),
            0,
            &mut out,
        );
        assert_eq!(out.len(), 2);
        let (c, s) = (&out[0], &out[1]);
        assert_eq!((c.kind, s.kind), (SpanKind::Client, SpanKind::Server));
        assert_eq!(c.trace_id, s.trace_id);
        assert_eq!(s.parent_span_id, Some(c.span_id));
        assert_eq!(c.parent_span_id, None);
        assert_eq!(
            c.events,
            vec![("server_receive", 1_110), ("server_send", 1_141)]
        );
        assert_eq!(
            s.events,
            vec![("client_send", 1_100), ("client_receive", 1_150)]
        );
        assert!(
            c.start_ns <= s.start_ns && s.end_ns <= c.end_ns,
            "client contains server"
        );
        assert_eq!(b.counters.paired, 1);
        assert_eq!(b.waiting(), 0);
    }

    #[test]
    fn paired_spans_with_context_keep_the_callers_parent() {
        let mut b = builder();
        let mut out = vec![];
        let h = [
            ("x-b3-traceid", T),
            ("x-b3-spanid", S),
            ("x-b3-sampled", "1"),
        ];
        b.push(
            ex(
                Role::Client,
                "127.0.0.1:50000",
                "127.0.0.1:8080",
                &h,
                (100, 101, 145, 150),
            ),
            0,
            &mut out,
        );
        b.push(
            ex(
                Role::Server,
                "127.0.0.1:8080",
                "127.0.0.1:50000",
                &h,
                (110, 111, 140, 141),
            ),
            0,
            &mut out,
        );
        assert_eq!(out.len(), 2);
        for s in &out {
            assert_eq!(s.trace_id.to_hex(), T);
            assert_eq!(s.parent_span_id.map(|p| p.to_hex()), Some(S.to_string()));
        }
    }

    #[test]
    fn unpaired_exchanges_wait_the_window_then_go_alone() {
        let mut b = builder();
        let mut out = vec![];
        b.push(
            ex(
                Role::Server,
                "127.0.0.1:8080",
                "127.0.0.1:50000",
                &[],
                (110, 111, 140, 141),
            ),
            1_000,
            &mut out,
        );
        // A client on another connection does not pair.
        b.push(
            ex(
                Role::Client,
                "127.0.0.1:50001",
                "127.0.0.1:8080",
                &[],
                (100, 101, 145, 150),
            ),
            1_000,
            &mut out,
        );
        b.flush(1_099, &mut out);
        assert!(out.is_empty());
        b.flush(1_100, &mut out);
        assert_eq!(out.len(), 2);
        assert_ne!(out[0].trace_id, out[1].trace_id);
        assert_eq!(b.counters.paired, 0);
    }

    #[test]
    fn status_and_sampling_table() {
        // (role, status, outcome, headers, want exported, want error)
        let deny = [(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )];
        type Case<'a> = (
            Role,
            Option<u16>,
            Outcome,
            &'a [(&'a str, &'a str)],
            bool,
            bool,
        );
        let cases: Vec<Case<'_>> = vec![
            (Role::Server, Some(200), Outcome::Complete, &[], true, false),
            (Role::Server, Some(404), Outcome::Complete, &[], true, false),
            (Role::Client, Some(404), Outcome::Complete, &[], true, true),
            (Role::Server, Some(503), Outcome::Complete, &[], true, true),
            (Role::Client, None, Outcome::Aborted, &[], true, true),
            (
                Role::Server,
                Some(200),
                Outcome::Complete,
                &deny,
                false,
                false,
            ),
            (
                Role::Server,
                Some(200),
                Outcome::Complete,
                &[("b3", "0")],
                false,
                false,
            ),
            (
                Role::Server,
                Some(200),
                Outcome::Complete,
                &[("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0")],
                false,
                false,
            ),
        ];
        for (i, (role, status, outcome, headers, exported, error)) in cases.into_iter().enumerate()
        {
            let mut b = builder();
            let mut out = vec![];
            let mut e = ex(role, "127.0.0.1:1", "127.0.0.1:2", headers, (1, 2, 3, 4));
            e.status = status;
            e.outcome = outcome;
            b.push(e, 0, &mut out);
            b.flush(u64::MAX, &mut out);
            assert_eq!(out.len(), usize::from(exported), "case {i}");
            if let Some(s) = out.first() {
                assert_eq!(matches!(s.status, Status::Error(_)), error, "case {i}");
            }
        }
    }

    #[test]
    fn url_helpers() {
        let paths = [
            ("/a?b=1", "/a"),
            ("/", "/"),
            ("http://h:1/x/y?z", "/x/y"),
            ("http://h", "/"),
            ("*", "*"),
            ("/p#f", "/p"),
        ];
        for (t, want) in paths {
            assert_eq!(url_path(t), want, "{t}");
        }
        assert_eq!(
            redacted_query("/a?b=1&Signature=s&sig=x&c"),
            Some("b=1&Signature=REDACTED&sig=REDACTED&c".into())
        );
        assert_eq!(redacted_query("/a"), None);
        assert_eq!(parse_host("[::1]:8080"), Some(("::1".into(), Some(8080))));
        assert_eq!(parse_host("h"), Some(("h".into(), None)));
        assert_eq!(parse_host("h:81"), Some(("h".into(), Some(81))));
        assert_eq!(normalize_method("FOO"), "_OTHER");
    }

    fn h2(
        mut e: HttpExchange,
        stream_id: u32,
        path: &str,
        grpc: Option<(&str, bool)>,
    ) -> HttpExchange {
        e.protocol = Protocol::Http2 { stream_id };
        e.method = "POST".into();
        e.target = path.into();
        e.request_headers = [
            (":authority", "svc:50051"),
            (":scheme", "http"),
            ("content-type", "application/grpc+proto"),
        ]
        .into_iter()
        .filter(|h| grpc.is_some() || h.0 != "content-type")
        .collect();
        if let Some((code, trailers_only)) = grpc {
            let t: Headers = [("grpc-status", code)].into_iter().collect();
            if trailers_only {
                e.response_headers = t;
            } else {
                e.trailers = t;
            }
        }
        e
    }

    #[test]
    fn http2_streams_pair_by_stream_id_on_one_connection() {
        let mut b = builder();
        let mut out = vec![];
        let (c, s) = (
            ("127.0.0.1:50000", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "127.0.0.1:50000"),
        );
        // Two concurrent streams whose times overlap: only the stream id tells them apart.
        b.push(
            h2(
                ex(Role::Server, s.0, s.1, &[], (112, 113, 120, 121)),
                3,
                "/b",
                None,
            ),
            0,
            &mut out,
        );
        b.push(
            h2(
                ex(Role::Server, s.0, s.1, &[], (110, 111, 130, 131)),
                1,
                "/a",
                None,
            ),
            0,
            &mut out,
        );
        b.push(
            h2(
                ex(Role::Client, c.0, c.1, &[], (100, 101, 140, 141)),
                1,
                "/a",
                None,
            ),
            0,
            &mut out,
        );
        b.push(
            h2(
                ex(Role::Client, c.0, c.1, &[], (102, 103, 142, 143)),
                3,
                "/b",
                None,
            ),
            0,
            &mut out,
        );
        assert_eq!(out.len(), 4);
        for pair in out.chunks(2) {
            let (cl, sv) = (&pair[0], &pair[1]);
            assert_eq!((cl.kind, sv.kind), (SpanKind::Client, SpanKind::Server));
            assert_eq!(sv.parent_span_id, Some(cl.span_id));
            assert_eq!(cl.attr("url.path"), sv.attr("url.path"));
            assert_eq!(cl.attr("http2.stream.id"), sv.attr("http2.stream.id"));
        }
        assert_eq!(
            out[0].attr("network.protocol.version"),
            Some(&AttrValue::Str("2".into()))
        );
        assert_eq!(
            out[0].attr("server.address"),
            Some(&AttrValue::Str("svc".into()))
        );
        assert_eq!(out[0].attr("server.port"), Some(&AttrValue::Int(50051)));
    }

    #[test]
    fn grpc_names_attributes_and_status_table() {
        // (kind, grpc-status, trailers-only, legacy on, want error, want code name)
        type Case = (Role, &'static str, bool, bool, bool, &'static str);
        let cases: [Case; 8] = [
            (Role::Server, "0", false, true, false, "OK"),
            (Role::Client, "0", true, true, false, "OK"),
            (Role::Server, "5", true, true, false, "NOT_FOUND"),
            (Role::Client, "5", true, false, true, "NOT_FOUND"),
            (Role::Server, "13", false, true, true, "INTERNAL"),
            (Role::Server, "4", false, true, true, "DEADLINE_EXCEEDED"),
            (Role::Server, "16", false, true, false, "UNAUTHENTICATED"),
            (Role::Client, "99", false, true, true, "UNKNOWN"),
        ];
        for (i, (role, code, only, legacy, error, name)) in cases.into_iter().enumerate() {
            let mut b = builder().with_legacy_rpc_attributes(legacy);
            let mut out = vec![];
            let e = h2(
                ex(role, "127.0.0.1:1", "127.0.0.1:2", &[], (1, 2, 3, 4)),
                1,
                "/demo.v1.Echo/Unary",
                Some((code, only)),
            );
            b.push(e, 0, &mut out);
            b.flush(u64::MAX, &mut out);
            let s = &out[0];
            assert_eq!(s.name, "demo.v1.Echo/Unary", "case {i}");
            assert_eq!(
                s.attr("rpc.system.name"),
                Some(&AttrValue::Str("grpc".into())),
                "case {i}"
            );
            assert_eq!(
                s.attr("rpc.method"),
                Some(&AttrValue::Str("demo.v1.Echo/Unary".into())),
                "case {i}"
            );
            assert_eq!(
                s.attr("rpc.status_code"),
                Some(&AttrValue::Str(name.into())),
                "case {i}"
            );
            assert_eq!(s.attr("rpc.service").is_some(), legacy, "case {i}");
            if legacy {
                assert_eq!(
                    s.attr("rpc.service"),
                    Some(&AttrValue::Str("demo.v1.Echo".into())),
                    "case {i}"
                );
                assert_eq!(
                    s.attr("rpc.grpc.status_code"),
                    Some(&AttrValue::Int(code.parse().unwrap())),
                    "case {i}"
                );
            }
            assert_eq!(matches!(s.status, Status::Error(_)), error, "case {i}");
            assert_eq!(s.attr("error.type").is_some(), error, "case {i}");
            assert!(
                s.attr("http.request.method").is_none() && s.attr("url.path").is_none(),
                "case {i}"
            );
        }
    }
}
