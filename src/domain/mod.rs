//! Validated domain types: what an order is once its input has been checked.
//!
//! Everything here is pure (no I/O, no protobuf, no SQL). Parsers return a
//! sentence for the caller on refusal; the gRPC layer gathers those into
//! `google.rpc.BadRequest` field violations.

mod decimal;
mod order;

pub use decimal::PositiveDecimal;
pub use order::{
    Cursor, Fingerprint, NewOrder, Order, OrderField, OrderFilter, OrderStatus, OrderType, Side, TimeInForce,
};

use std::fmt;

use decimal::truncate;
use uuid::Uuid;

/// The account a call acts for; every key and order is scoped to one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AccountId(String);

impl AccountId {
    /// The account of every caller while authentication is not configured.
    pub fn anonymous() -> Self {
        Self("anonymous".to_owned())
    }

    /// Wraps an account id taken from storage or configuration.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses a UUID in canonical hyphenated form (36 characters, any case).
fn parse_canonical_uuid(s: &str) -> Result<Uuid, String> {
    let hyphens_in_place =
        s.len() == 36 && s.char_indices().all(|(i, c)| matches!(i, 8 | 13 | 18 | 23) == (c == '-'));
    match Uuid::try_parse(s) {
        Ok(uuid) if hyphens_in_place => Ok(uuid),
        _ => Err(format!(
            "must be a UUID in canonical form like \"123e4567-e89b-12d3-a456-426614174000\", got {:?}",
            truncate(s)
        )),
    }
}

/// The caller's idempotency key: a UUID, compared case-insensitively and kept
/// lower-case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientRequestId(Uuid);

impl ClientRequestId {
    /// Parses a canonical hyphenated UUID; the nil UUID is refused because it is
    /// what an unset key field looks like in most languages.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("is required: a fresh UUID per order, reused on every retry".to_owned());
        }
        let uuid = parse_canonical_uuid(s)?;
        if uuid.is_nil() {
            return Err("must not be the nil UUID: generate a fresh UUID per order".to_owned());
        }
        Ok(Self(uuid))
    }

    /// Wraps a key read back from storage.
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The key as a UUID.
    pub fn uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for ClientRequestId {
    /// Lower-case hyphenated form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// A server-generated order id (UUID v7, time-ordered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrderId(Uuid);

impl OrderId {
    /// A fresh UUID v7.
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses an id sent by a caller (canonical hyphenated UUID).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("is required".to_owned());
        }
        parse_canonical_uuid(s).map(Self)
    }

    /// Wraps an id read back from storage.
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The id as a UUID.
    pub fn uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// An instrument symbol: 1 to 32 characters of `A-Z 0-9 . _ / -`, starting
/// with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Symbol(String);

impl Symbol {
    /// Most characters in a symbol.
    pub const MAX_LEN: usize = 32;

    /// Parses a symbol; lower-case letters are refused, not folded.
    pub fn parse(s: &str) -> Result<Self, String> {
        let allowed = |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit() || b"._/-".contains(&b);
        let first_ok = s.bytes().next().is_some_and(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        if s.is_empty() {
            Err("is required".to_owned())
        } else if s.len() > Self::MAX_LEN {
            Err(format!("must be at most {} characters", Self::MAX_LEN))
        } else if !s.bytes().all(allowed) || !first_ok {
            Err(format!(
                "must be upper-case letters, digits and . _ / - starting with a letter or digit, got {:?}",
                truncate(s)
            ))
        } else {
            Ok(Self(s.to_owned()))
        }
    }

    /// The symbol as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A point in time with microsecond precision, as microseconds since the Unix
/// epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// From microseconds since the Unix epoch.
    pub fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    /// Microseconds since the Unix epoch.
    pub fn as_micros(&self) -> i64 {
        self.0
    }

    /// This instant plus `d` (saturating).
    pub fn add(&self, d: std::time::Duration) -> Self {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(micros))
    }

    /// This instant minus `d` (saturating).
    pub fn sub(&self, d: std::time::Duration) -> Self {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self(self.0.saturating_sub(micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_request_id_is_case_insensitive_and_lower_cased() {
        let upper = ClientRequestId::parse("123E4567-E89B-12D3-A456-426614174000").unwrap();
        let lower = ClientRequestId::parse("123e4567-e89b-12d3-a456-426614174000").unwrap();
        assert_eq!(upper, lower);
        assert_eq!(upper.to_string(), "123e4567-e89b-12d3-a456-426614174000");
    }

    #[test]
    fn client_request_id_refuses_non_canonical_forms() {
        for input in [
            "",
            "123e4567e89b12d3a456426614174000",
            "{123e4567-e89b-12d3-a456-426614174000}",
            "urn:uuid:123e4567-e89b-12d3-a456-426614174000",
            "123e4567-e89b-12d3-a456-42661417400",
            "123e4567-e89b-12d3-a456-4266141740000",
            "123e4567-e89b-12d3-a456_426614174000",
            "g23e4567-e89b-12d3-a456-426614174000",
            "00000000-0000-0000-0000-000000000000",
            "123e4567-e89b-12d3-a4564-26614174000",
        ] {
            assert!(ClientRequestId::parse(input).is_err(), "accepted {input:?}");
        }
    }

    #[test]
    fn symbols() {
        for ok in ["A", "AAPL", "BTC-USD", "BRK.B", "ES_F", "EUR/USD", "7203", &"X".repeat(32)] {
            assert!(Symbol::parse(ok).is_ok(), "refused {ok:?}");
        }
        for bad in ["", "aapl", "Aapl", "-X", ".X", "/X", "_X", "A B", "É", &"X".repeat(33), "A\n"] {
            assert!(Symbol::parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
