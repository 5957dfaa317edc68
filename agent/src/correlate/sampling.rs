//! Head sampling decision for spans the agent builds.
//!
//! Configured like an OpenTelemetry SDK via `OTEL_TRACES_SAMPLER` /
//! `OTEL_TRACES_SAMPLER_ARG` so operators can reuse what they know. The
//! ratio sampler uses the OpenTelemetry reference algorithm (as in
//! opentelemetry-go `TraceIDRatioBased`) so every agent on every host - and
//! any OTel SDK with the same ratio - makes the same decision for a trace.

use super::context::{CallerSampling, RemoteContext, TraceId};

/// A sampler. `ParentBased` holds the *root* sampler used when there is no
/// parent, or when the parent deferred the decision (B3 without sampling
/// state).
#[derive(Debug, Clone, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBased(Box<Sampler>),
}

/// Invalid sampler configuration.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplerError {
    #[error(
        "unsupported OTEL_TRACES_SAMPLER {0:?} (supported: always_on, always_off, traceidratio, \
         parentbased_always_on, parentbased_always_off, parentbased_traceidratio)"
    )]
    UnknownSampler(String),
    #[error("OTEL_TRACES_SAMPLER_ARG {0:?} is not a number")]
    InvalidArg(String),
    #[error("OTEL_TRACES_SAMPLER_ARG {0:?} is not a ratio in [0, 1]")]
    RatioOutOfRange(String),
}

impl Sampler {
    /// From OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG values.
    ///
    /// Per the OTel SDK environment spec, enum values are case-insensitive
    /// and an empty value means "unset". Default: `parentbased_always_on`.
    /// The arg is only read by the `*traceidratio` samplers (default 1.0) and
    /// must parse as a finite number in `[0, 1]`; other samplers ignore it,
    /// as the spec prescribes.
    pub fn from_env_values(sampler: Option<&str>, arg: Option<&str>) -> Result<Self, SamplerError> {
        let name = sampler
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty());
        let ratio = || parse_ratio(arg);
        Ok(match name.as_deref() {
            None | Some("parentbased_always_on") => {
                Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
            }
            Some("always_on") => Sampler::AlwaysOn,
            Some("always_off") => Sampler::AlwaysOff,
            Some("traceidratio") => Sampler::TraceIdRatio(ratio()?),
            Some("parentbased_always_off") => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Some("parentbased_traceidratio") => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatio(ratio()?)))
            }
            Some(other) => return Err(SamplerError::UnknownSampler(other.to_owned())),
        })
    }

    /// Decision for a span: `parent` is the caller's context if any.
    ///
    /// `ParentBased`: Sampled/Debug → true, NotSampled → false, Defer or no
    /// parent → root sampler. `TraceIdRatio` ignores the parent (as in the
    /// OTel spec) and is a pure function of the trace id.
    pub fn should_sample(&self, trace_id: TraceId, parent: Option<&RemoteContext>) -> bool {
        match self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::TraceIdRatio(ratio) => ratio_decision(*ratio, trace_id),
            Sampler::ParentBased(root) => match parent.map(|p| p.sampling) {
                Some(CallerSampling::Sampled | CallerSampling::Debug) => true,
                Some(CallerSampling::NotSampled) => false,
                // No decision from upstream: we are effectively the root.
                Some(CallerSampling::Defer) | None => root.should_sample(trace_id, None),
            },
        }
    }
}

fn parse_ratio(arg: Option<&str>) -> Result<f64, SamplerError> {
    let Some(raw) = arg.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(1.0);
    };
    let ratio: f64 = raw
        .parse()
        .map_err(|_| SamplerError::InvalidArg(raw.to_owned()))?;
    // Rust's f64 parser accepts "NaN" / "inf": reject them explicitly.
    if !ratio.is_finite() {
        return Err(SamplerError::InvalidArg(raw.to_owned()));
    }
    if !(0.0..=1.0).contains(&ratio) {
        return Err(SamplerError::RatioOutOfRange(raw.to_owned()));
    }
    Ok(ratio)
}

/// OTel reference: x = big-endian u64 of trace id bytes 8..16, shifted right
/// by one (63 bits, so the f64 bound is exact enough and never overflows);
/// sampled iff x < ratio * 2^63.
fn ratio_decision(ratio: f64, trace_id: TraceId) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    // Also catches NaN (a directly constructed Sampler): never sample.
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id.0[8..16]);
    let x = u64::from_be_bytes(low) >> 1;
    // `as` saturates; ratio in (0, 1) keeps this below 2^63 anyway.
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    x < bound
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::context::{Format, SpanId};

    fn pb(root: Sampler) -> Sampler {
        Sampler::ParentBased(Box::new(root))
    }

    fn tid(hex: &str) -> TraceId {
        TraceId::from_hex(hex).unwrap()
    }

    fn parent(sampling: CallerSampling) -> RemoteContext {
        RemoteContext {
            format: Format::B3Multi,
            trace_id: tid("4bf92f3577b34da6a3ce929d0e0e4736"),
            span_id: SpanId([0, 0, 0, 0, 0, 0, 0, 1]),
            parent_span_id: None,
            sampling,
            trace_flags: 0,
            trace_state: None,
        }
    }

    type EnvCase = (
        Option<&'static str>,
        Option<&'static str>,
        Result<Sampler, SamplerError>,
    );

    #[test]
    fn env_parsing_table() {
        use SamplerError::*;
        let cases: Vec<EnvCase> = vec![
            (None, None, Ok(pb(Sampler::AlwaysOn))),
            (Some(""), None, Ok(pb(Sampler::AlwaysOn))),
            (Some("  "), Some("abc"), Ok(pb(Sampler::AlwaysOn))),
            (
                Some("parentbased_always_on"),
                None,
                Ok(pb(Sampler::AlwaysOn)),
            ),
            (Some("always_on"), None, Ok(Sampler::AlwaysOn)),
            (Some("ALWAYS_ON"), None, Ok(Sampler::AlwaysOn)),
            (Some(" always_off "), None, Ok(Sampler::AlwaysOff)),
            // Arg is ignored by samplers that take none, even when invalid.
            (Some("always_on"), Some("abc"), Ok(Sampler::AlwaysOn)),
            (
                Some("parentbased_always_off"),
                Some("0.5"),
                Ok(pb(Sampler::AlwaysOff)),
            ),
            (Some("traceidratio"), None, Ok(Sampler::TraceIdRatio(1.0))),
            (
                Some("traceidratio"),
                Some(""),
                Ok(Sampler::TraceIdRatio(1.0)),
            ),
            (
                Some("traceidratio"),
                Some("0.25"),
                Ok(Sampler::TraceIdRatio(0.25)),
            ),
            (
                Some("traceidratio"),
                Some(" 0.5 "),
                Ok(Sampler::TraceIdRatio(0.5)),
            ),
            (
                Some("traceidratio"),
                Some("0"),
                Ok(Sampler::TraceIdRatio(0.0)),
            ),
            (
                Some("traceidratio"),
                Some("1"),
                Ok(Sampler::TraceIdRatio(1.0)),
            ),
            (
                Some("TraceIdRatio"),
                Some("1e-3"),
                Ok(Sampler::TraceIdRatio(0.001)),
            ),
            (
                Some("parentbased_traceidratio"),
                Some("0.1"),
                Ok(pb(Sampler::TraceIdRatio(0.1))),
            ),
            (
                Some("parentbased_traceidratio"),
                None,
                Ok(pb(Sampler::TraceIdRatio(1.0))),
            ),
            (
                Some("traceidratio"),
                Some("1.5"),
                Err(RatioOutOfRange("1.5".into())),
            ),
            (
                Some("traceidratio"),
                Some("-0.1"),
                Err(RatioOutOfRange("-0.1".into())),
            ),
            (
                Some("parentbased_traceidratio"),
                Some("2"),
                Err(RatioOutOfRange("2".into())),
            ),
            (
                Some("traceidratio"),
                Some("abc"),
                Err(InvalidArg("abc".into())),
            ),
            (
                Some("traceidratio"),
                Some("50%"),
                Err(InvalidArg("50%".into())),
            ),
            (
                Some("traceidratio"),
                Some("NaN"),
                Err(InvalidArg("NaN".into())),
            ),
            (
                Some("traceidratio"),
                Some("inf"),
                Err(InvalidArg("inf".into())),
            ),
            (
                Some("parentbased_traceidratio"),
                Some("abc"),
                Err(InvalidArg("abc".into())),
            ),
            (
                Some("jaeger_remote"),
                None,
                Err(UnknownSampler("jaeger_remote".into())),
            ),
            (Some("xray"), None, Err(UnknownSampler("xray".into()))),
            (
                Some("bogus"),
                Some("0.5"),
                Err(UnknownSampler("bogus".into())),
            ),
        ];
        for (sampler, arg, want) in cases {
            assert_eq!(
                Sampler::from_env_values(sampler, arg),
                want,
                "{sampler:?} / {arg:?}"
            );
        }
    }

    #[test]
    fn error_messages_name_the_value() {
        let e = Sampler::from_env_values(Some("traceidratio"), Some("abc")).unwrap_err();
        assert!(e.to_string().contains("\"abc\""), "{e}");
        let e = Sampler::from_env_values(Some("nope"), None).unwrap_err();
        assert!(
            e.to_string().contains("nope") && e.to_string().contains("parentbased_always_on"),
            "{e}"
        );
    }

    #[test]
    fn ratio_fixed_ids_quarter() {
        // ratio 0.25: bound = 0.25 * 2^63 = 2^61; x = low64 >> 1, so sampled
        // iff low64 < 2^62 = 0x4000_0000_0000_0000. High 8 bytes are ignored.
        let cases = [
            ("ffffffffffffffff0000000000000000", true),
            ("00000000000000010000000000000001", true),
            ("00000000000000011234567890abcdef", true),
            ("ffffffffffffffff3fffffffffffffff", true),
            ("00000000000000014000000000000000", false),
            ("00000000000000014000000000000001", false), // x == 2^61 exactly: not <
            ("0000000000000001ffffffffffffffff", false),
            ("4bf92f3577b34da6a3ce929d0e0e4736", false),
            ("4bf92f3577b34da61fe0e0e4d0e4736a", true),
        ];
        let s = Sampler::TraceIdRatio(0.25);
        for (hex, want) in cases {
            assert_eq!(s.should_sample(tid(hex), None), want, "{hex}");
        }
        // ratio 0.5: boundary at low64 = 2^63.
        let half = Sampler::TraceIdRatio(0.5);
        assert!(half.should_sample(tid("00000000000000017fffffffffffffff"), None));
        assert!(!half.should_sample(tid("00000000000000018000000000000000"), None));
    }

    #[test]
    fn ratio_extremes_and_parent_ignored() {
        let any = [
            tid("00000000000000010000000000000000"),
            tid("ffffffffffffffffffffffffffffffff"),
            tid("4bf92f3577b34da6a3ce929d0e0e4736"),
        ];
        let sampled = parent(CallerSampling::Sampled);
        let not = parent(CallerSampling::NotSampled);
        for t in any {
            assert!(Sampler::TraceIdRatio(1.0).should_sample(t, Some(&not)));
            assert!(Sampler::TraceIdRatio(7.0).should_sample(t, None));
            assert!(!Sampler::TraceIdRatio(0.0).should_sample(t, Some(&sampled)));
            assert!(!Sampler::TraceIdRatio(-1.0).should_sample(t, None));
            assert!(!Sampler::TraceIdRatio(f64::NAN).should_sample(t, None));
            assert!(Sampler::AlwaysOn.should_sample(t, Some(&not)));
            assert!(!Sampler::AlwaysOff.should_sample(t, Some(&sampled)));
        }
    }

    #[test]
    fn ratio_deterministic_and_proportional() {
        let a = Sampler::TraceIdRatio(0.5);
        let b = Sampler::from_env_values(Some("traceidratio"), Some("0.5")).unwrap();
        let n = 10_000;
        let mut hits = 0;
        for _ in 0..n {
            let t = TraceId::random();
            let d = a.should_sample(t, None);
            assert_eq!(d, a.should_sample(t, None));
            assert_eq!(
                d,
                b.should_sample(t, None),
                "independently built sampler disagrees"
            );
            hits += usize::from(d);
        }
        let frac = hits as f64 / n as f64;
        assert!((0.45..=0.55).contains(&frac), "fraction {frac}");
    }

    #[test]
    fn parent_based_table() {
        use CallerSampling::*;
        // Sampled at 0.25 (low64 < 2^62) vs. not.
        let in_t = tid("00000000000000011234567890abcdef");
        let out_t = tid("0000000000000001a3ce929d0e0e4736");
        let cases: Vec<(&str, Sampler, Option<CallerSampling>, TraceId, bool)> = vec![
            (
                "sampled parent overrides root off",
                pb(Sampler::AlwaysOff),
                Some(Sampled),
                out_t,
                true,
            ),
            (
                "debug parent overrides root off",
                pb(Sampler::AlwaysOff),
                Some(Debug),
                out_t,
                true,
            ),
            (
                "not-sampled parent overrides root on",
                pb(Sampler::AlwaysOn),
                Some(NotSampled),
                in_t,
                false,
            ),
            (
                "sampled parent overrides ratio miss",
                pb(Sampler::TraceIdRatio(0.25)),
                Some(Sampled),
                out_t,
                true,
            ),
            (
                "not-sampled parent overrides ratio hit",
                pb(Sampler::TraceIdRatio(0.25)),
                Some(NotSampled),
                in_t,
                false,
            ),
            (
                "defer uses root on",
                pb(Sampler::AlwaysOn),
                Some(Defer),
                out_t,
                true,
            ),
            (
                "defer uses root off",
                pb(Sampler::AlwaysOff),
                Some(Defer),
                in_t,
                false,
            ),
            (
                "defer uses root ratio hit",
                pb(Sampler::TraceIdRatio(0.25)),
                Some(Defer),
                in_t,
                true,
            ),
            (
                "defer uses root ratio miss",
                pb(Sampler::TraceIdRatio(0.25)),
                Some(Defer),
                out_t,
                false,
            ),
            (
                "no parent uses root on",
                pb(Sampler::AlwaysOn),
                None,
                out_t,
                true,
            ),
            (
                "no parent uses root off",
                pb(Sampler::AlwaysOff),
                None,
                in_t,
                false,
            ),
            (
                "no parent uses root ratio hit",
                pb(Sampler::TraceIdRatio(0.25)),
                None,
                in_t,
                true,
            ),
            (
                "no parent uses root ratio miss",
                pb(Sampler::TraceIdRatio(0.25)),
                None,
                out_t,
                false,
            ),
            (
                "nested parent-based defer",
                pb(pb(Sampler::AlwaysOff)),
                Some(Defer),
                in_t,
                false,
            ),
        ];
        for (name, sampler, p, t, want) in cases {
            let ctx = p.map(parent);
            assert_eq!(sampler.should_sample(t, ctx.as_ref()), want, "{name}");
        }
    }
}
