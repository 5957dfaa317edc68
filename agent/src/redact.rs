//! What never leaves the host: values of sensitive header fields and query
//! parameters.
//!
//! A name is sensitive when, lowercased, percent-decoded and with `-`, `_`,
//! `.` and spaces taken out (so `X-Api-Key`, `x_api_key`, `pass%77ord` and
//! `accessToken` compare alike), it is one of [`NAMES`] or ends with one of
//! [`SUFFIXES`] (`my_token`, `client-secret`, `x-amz-security-token`), or it is
//! one the user added (`--redact-header`, `--redact-param`). Header fields
//! with such names are dropped from stored headers; query parameters keep
//! their name with the value `REDACTED`. Query parameters are split at `&`
//! and at `;` (both are used as separators). `agent dump` applies the same
//! rules to HTTP/1 text it prints unless given `--no-redact`.
//!
//! The rules are process-wide (set once from the command line before the
//! pipeline starts) because the decoders that drop header fields run deep in
//! per-connection state that has no business carrying configuration.

use std::{borrow::Cow, sync::OnceLock};

/// Exact names (normalised: lowercase, no `-`, `_`, `.` or space).
pub const NAMES: &[&str] = &[
    // Header fields.
    "authorization",
    "proxyauthorization",
    "cookie",
    "setcookie",
    "xapikey",
    "apikey",
    // Query parameters (OpenTelemetry's HTTP conventions list and common
    // credential names: OAuth codes, sessions, cloud signatures).
    "awsaccesskeyid",
    "signature",
    "sig",
    "xgoogsignature",
    "xamzsignature",
    "xamzcredential",
    "key",
    "code",
    "session",
    "sessionid",
    "sid",
    "jwt",
    "password",
    "passwd",
    "pwd",
    "pass",
    "secret",
    "auth",
    "credentials",
    "credential",
];

/// Suffixes (normalised) that make any name sensitive.
pub const SUFFIXES: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "apikey",
    "signature",
    "credential",
    "credentials",
    "sessionid",
    "jwt",
    "authorization",
    "cookie",
];

/// Longest name compared; longer names are normalised from their head only
/// (no allocation), which can only miss a suffix of a name nobody uses.
const MAX_NAME: usize = 128;

#[derive(Debug, Clone, Default)]
pub struct Redaction {
    /// Extra names (normalised) from the command line.
    extra: Vec<String>,
    /// Nothing is redacted (`agent dump --no-redact` only).
    off: bool,
}

static ACTIVE: OnceLock<Redaction> = OnceLock::new();

/// Sets the process-wide rules; the first call wins (later ones are ignored,
/// so tests and the CLI cannot fight over it).
pub fn configure(rules: Redaction) {
    let _ = ACTIVE.set(rules);
}

/// The process-wide rules (the defaults until [`configure`] is called).
pub fn active() -> &'static Redaction {
    ACTIVE.get_or_init(Redaction::default)
}

/// Normalises `name` into `buf`: percent-decoded, lowercase, separators out.
fn normalise<'a>(name: &[u8], buf: &'a mut [u8; MAX_NAME]) -> &'a [u8] {
    let mut n = 0;
    let mut i = 0;
    while i < name.len() && n < MAX_NAME {
        let mut b = name[i];
        i += 1;
        if b == b'%' {
            if let Some(v) = name.get(i..i + 2).and_then(hex_pair) {
                b = v;
                i += 2;
            }
        } else if b == b'+' {
            b = b' ';
        }
        if matches!(b, b'-' | b'_' | b'.' | b' ') {
            continue;
        }
        buf[n] = b.to_ascii_lowercase();
        n += 1;
    }
    &buf[..n]
}

fn hex_pair(p: &[u8]) -> Option<u8> {
    let h = |c: u8| (c as char).to_digit(16);
    Some((h(p[0])? * 16 + h(p[1])?) as u8)
}

impl Redaction {
    pub fn new(extra: &[String]) -> Self {
        let extra = extra
            .iter()
            .map(|e| {
                let mut buf = [0; MAX_NAME];
                String::from_utf8_lossy(normalise(e.as_bytes(), &mut buf)).into_owned()
            })
            .filter(|e| !e.is_empty())
            .collect();
        Self { extra, off: false }
    }

    /// Rules that redact nothing.
    pub fn off() -> Self {
        Self {
            extra: Vec::new(),
            off: true,
        }
    }

    /// Whether a header field or query parameter name is sensitive.
    pub fn sensitive(&self, name: &[u8]) -> bool {
        if self.off {
            return false;
        }
        let mut buf = [0; MAX_NAME];
        let n = normalise(name, &mut buf);
        NAMES.iter().any(|s| s.as_bytes() == n)
            || SUFFIXES.iter().any(|s| n.ends_with(s.as_bytes()))
            || self.extra.iter().any(|s| s.as_bytes() == n)
    }

    /// `query` with the values of sensitive parameters replaced by
    /// `REDACTED` (borrowed when nothing is).
    pub fn query<'a>(&self, query: &'a str) -> Cow<'a, str> {
        // Copied only from the first sensitive parameter on: one pass.
        let mut out: Option<String> = None;
        let mut at = 0;
        for pair in query.split_inclusive(['&', ';']) {
            let start = at;
            at += pair.len();
            let body = pair.trim_end_matches(['&', ';']);
            let sep = &pair[body.len()..];
            match body.split_once('=') {
                Some((k, _)) if self.sensitive(k.as_bytes()) => {
                    let o = out.get_or_insert_with(|| query[..start].to_string());
                    o.push_str(k);
                    o.push_str("=REDACTED");
                    o.push_str(sep);
                }
                _ => {
                    if let Some(o) = out.as_mut() {
                        o.push_str(pair);
                    }
                }
            }
        }
        match out {
            Some(o) => Cow::Owned(o),
            None => Cow::Borrowed(query),
        }
    }

    /// HTTP/1 text in `payload` with the values of sensitive header lines
    /// and of sensitive query parameters of request lines replaced by
    /// `REDACTED` (for `agent dump`; binary data passes unchanged).
    pub fn http1_text<'a>(&self, payload: &'a [u8]) -> Cow<'a, [u8]> {
        if self.off {
            return Cow::Borrowed(payload);
        }
        let mut out: Option<Vec<u8>> = None;
        let mut at = 0;
        for line in payload.split_inclusive(|&b| b == b'\n') {
            let start = at;
            at += line.len();
            let Some(redacted) = self.http1_line(line) else {
                if let Some(o) = out.as_mut() {
                    o.extend_from_slice(line);
                }
                continue;
            };
            let o = out.get_or_insert_with(|| payload[..start].to_vec());
            o.extend_from_slice(&redacted);
        }
        match out {
            Some(o) => Cow::Owned(o),
            None => Cow::Borrowed(payload),
        }
    }

    fn http1_line(&self, line: &[u8]) -> Option<Vec<u8>> {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        let eol = &line[body.len()..];
        if let Some(o) = self.request_line(body, eol) {
            return Some(o);
        }
        let colon = body.iter().position(|&b| b == b':')?;
        let name = &body[..colon];
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) || !self.sensitive(name) {
            return None;
        }
        let mut o = name.to_vec();
        o.extend_from_slice(b": REDACTED");
        o.extend_from_slice(eol);
        Some(o)
    }

    /// A request line (`METHOD SP target SP HTTP/x`) with its query redacted,
    /// if it is one and has something to redact.
    fn request_line(&self, body: &[u8], eol: &[u8]) -> Option<Vec<u8>> {
        {
            let text = std::str::from_utf8(body).ok()?;
            let (head, version) = text.rsplit_once(' ')?;
            if !version.starts_with("HTTP/") {
                return None;
            }
            let (method, target) = head.split_once(' ')?;
            let (path, q) = target.split_once('?')?;
            let (q, frag) = match q.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (q, None),
            };
            let Cow::Owned(r) = self.query(q) else {
                return None;
            };
            let mut o = format!("{method} {path}?{r}");
            if let Some(f) = frag {
                o.push('#');
                o.push_str(f);
            }
            o.push(' ');
            o.push_str(version);
            let mut o = o.into_bytes();
            o.extend_from_slice(eol);
            Some(o)
        }
    }
}

/// Percent-decodes `s` bytewise (`%` not followed by two hex digits stays
/// as is); never panics, whatever the bytes.
pub fn percent_decode(s: &[u8]) -> Cow<'_, [u8]> {
    if !s.contains(&b'%') {
        return Cow::Borrowed(s);
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            if let Some(v) = s.get(i + 1..i + 3).and_then(hex_pair) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_names_table() {
        let r = Redaction::new(&["X-Internal-Ticket".to_string()]);
        let cases: &[(&str, bool)] = &[
            ("Authorization", true),
            ("proxy-authorization", true),
            ("Cookie", true),
            ("Set-Cookie", true),
            ("X-API-Key", true),
            ("api-key", true),
            ("x-auth-token", true),
            ("X-CSRF-Token", true),
            ("x-amz-security-token", true),
            ("token", true),
            ("access_token", true),
            ("accessToken", true),
            ("my_token", true),
            ("private_token", true),
            ("code", true),
            ("session", true),
            ("jwt", true),
            ("x-api-key", true),
            ("pass%77ord", true),
            ("PASS%57ORD", true),
            ("client_secret", true),
            ("password", true),
            ("user_password", true),
            ("sig", true),
            ("x-internal-ticket", true),
            ("x_internal_ticket", true),
            // Not secrets.
            ("traceparent", false),
            ("content-type", false),
            ("user-agent", false),
            ("monkey", false),
            ("sec-websocket-key", false),
            ("page", false),
            ("q", false),
            ("codec", false),
            ("tokens_left", false),
            ("", false),
            ("%", false),
            ("%zz", false),
        ];
        for (name, want) in cases {
            assert_eq!(r.sensitive(name.as_bytes()), *want, "{name}");
        }
        assert!(!Redaction::off().sensitive(b"authorization"));
    }

    #[test]
    fn query_table() {
        let r = Redaction::default();
        let cases: &[(&str, &str)] = &[
            ("a=1&b=2", "a=1&b=2"),
            ("a=1&token=abc", "a=1&token=REDACTED"),
            (
                "code=xyz;session=s1;page=2",
                "code=REDACTED;session=REDACTED;page=2",
            ),
            ("pass%77ord=hunter2&x=1", "pass%77ord=REDACTED&x=1"),
            (
                "accessToken=t&my_token=u",
                "accessToken=REDACTED&my_token=REDACTED",
            ),
            ("token", "token"),
            ("=v&&jwt=x", "=v&&jwt=REDACTED"),
            ("", ""),
            ("é=1&pwd=é", "é=1&pwd=REDACTED"),
        ];
        for (q, want) in cases {
            assert_eq!(r.query(q), *want, "{q}");
        }
        assert!(matches!(r.query("a=1"), Cow::Borrowed(_)));
    }

    #[test]
    fn http1_text_table() {
        let r = Redaction::default();
        let cases: &[(&[u8], &[u8])] = &[
            (
                b"GET /a?token=t&x=1 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer s\r\ncookie: c=1\r\n\r\n",
                b"GET /a?token=REDACTED&x=1 HTTP/1.1\r\nHost: h\r\nAuthorization: REDACTED\r\ncookie: REDACTED\r\n\r\n",
            ),
            (
                b"HTTP/1.1 200 OK\r\nSet-Cookie: id=1\r\nContent-Length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\nSet-Cookie: REDACTED\r\nContent-Length: 2\r\n\r\nok",
            ),
            (b"GET /plain HTTP/1.1\r\n\r\n", b"GET /plain HTTP/1.1\r\n\r\n"),
            (b"\x00\x01binary:\xff", b"\x00\x01binary:\xff"),
            (b"X-Api-Key: k", b"X-Api-Key: REDACTED"),
            (b"Cookie: a HTTP/1.1\r\n", b"Cookie: REDACTED\r\n"),
        ];
        for (input, want) in cases {
            assert_eq!(
                &*r.http1_text(input),
                *want,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        let raw = b"Authorization: x\r\n";
        assert_eq!(&*Redaction::off().http1_text(raw), raw);
    }

    #[test]
    fn percent_decode_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"cart%20svc", b"cart svc"),
            ("%aé".as_bytes(), "%aé".as_bytes()),
            (b"%", b"%"),
            (b"%4", b"%4"),
            (b"%41", b"A"),
            (b"a%2", b"a%2"),
            (b"%e9%", b"\xe9%"),
            (b"plain", b"plain"),
        ];
        for (input, want) in cases {
            assert_eq!(&*percent_decode(input), *want, "{:?}", input);
        }
    }
}
