//! W3C trace context for calls: every attempt of one call carries the same
//! `traceparent` (and `tracestate`), so the server's spans of all of them
//! sit in one trace, under the caller's span.

use std::fmt;

use opentelemetry::trace::TraceContextExt as _;

/// The trace a call belongs to and the span it is a child of: a W3C
/// `traceparent` header, and the `tracestate` that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id (16 bytes, never zero).
    pub trace_id: u128,
    /// The caller's span id (8 bytes, never zero).
    pub parent_id: u64,
    /// Whether the caller records the trace (the `sampled` flag).
    pub sampled: bool,
    /// The `tracestate` header, if any.
    pub state: Option<String>,
}

impl TraceParent {
    /// A new trace, with a random trace id and span id (the OS's random
    /// source, by way of UUID v4s: 122 random bits are plenty).
    pub fn start(sampled: bool) -> Self {
        let trace_id = uuid::Uuid::new_v4().as_u128();
        let parent_id = uuid::Uuid::new_v4().as_u64_pair().1.max(1);
        Self { trace_id, parent_id, sampled, state: None }
    }

    /// The current OpenTelemetry span of the calling code, if it has one
    /// (an application traced with `opentelemetry`, or `tracing` with
    /// `tracing-opentelemetry`).
    pub fn current() -> Option<Self> {
        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let context = span.span_context();
        if !context.is_valid() {
            return None;
        }
        let state = context.trace_state().header();
        Some(Self {
            trace_id: u128::from_be_bytes(context.trace_id().to_bytes()),
            parent_id: u64::from_be_bytes(context.span_id().to_bytes()),
            sampled: context.is_sampled(),
            state: (!state.is_empty()).then_some(state),
        })
    }

    /// Parses a `traceparent` header value (version `00`; a later version
    /// is read for its first four fields, as the specification asks).
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let mut parts = header.split('-');
        let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2) {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().filter(|&id| id != 0)?;
        let parent_id = u64::from_str_radix(parent, 16).ok().filter(|&id| id != 0)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self { trace_id, parent_id, sampled: flags & 1 == 1, state: None })
    }

    /// The trace id as 32 lowercase hex digits, as tracing backends show it.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

/// The `traceparent` header value.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-{:02x}", self.trace_id, self.parent_id, u8::from(self.sampled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_round_trip_and_bad_ones_are_refused() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(header).unwrap();
        assert_eq!(parsed.to_string(), header);
        assert!(parsed.sampled);
        assert_eq!(parsed.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version: its first four fields are read.
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more").is_some());
        let started = TraceParent::start(true);
        assert_ne!(started.trace_id, 0);
        assert_ne!(started.trace_id, TraceParent::start(true).trace_id);
        assert_eq!(TraceParent::parse(&started.to_string()), Some(started));
    }
}
