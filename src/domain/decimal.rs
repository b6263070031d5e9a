//! Exact positive decimals for quantities and prices: strict parsing and the
//! normalized form that is stored, compared and echoed.

use std::{fmt, str::FromStr};

use rust_decimal::Decimal;

/// Most digits after the point (Postgres stores `numeric(38,18)`).
pub const MAX_SCALE: u32 = 18;
/// Most significant digits in all (what `rust_decimal` holds exactly).
pub const MAX_SIGNIFICANT_DIGITS: usize = 28;
/// Most digits before the point (38 - 18: what `numeric(38,18)` holds).
pub const MAX_INTEGER_DIGITS: usize = 20;

/// A strictly positive, exact decimal in normalized form: `007.50` is `7.5`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PositiveDecimal(Decimal);

impl PositiveDecimal {
    /// Parses digits, optionally followed by `.` and more digits.
    ///
    /// Refuses signs, exponents, white space, a bare `.5` or `1.`, zero, and
    /// values beyond [`MAX_SCALE`], [`MAX_INTEGER_DIGITS`] or
    /// [`MAX_SIGNIFICANT_DIGITS`]. The error is a sentence for the caller.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (int, frac) = match s.split_once('.') {
            Some((int, frac)) => (int, Some(frac)),
            None => (s, None),
        };
        let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
            return Err(format!(
                "must be a decimal number such as \"100\" or \"0.5\" (digits, optionally a point and more digits), got {:?}",
                truncate(s)
            ));
        }
        let int = int.trim_start_matches('0');
        let frac = frac.unwrap_or("").trim_end_matches('0');
        if frac.len() > MAX_SCALE as usize {
            return Err(format!("must have at most {MAX_SCALE} digits after the point"));
        }
        if int.len() > MAX_INTEGER_DIGITS {
            return Err(format!("must have at most {MAX_INTEGER_DIGITS} digits before the point"));
        }
        let significant = format!("{int}{frac}");
        let significant = significant.trim_start_matches('0');
        if significant.is_empty() {
            return Err("must be greater than zero".to_owned());
        }
        if significant.len() > MAX_SIGNIFICANT_DIGITS {
            return Err(format!("must have at most {MAX_SIGNIFICANT_DIGITS} significant digits"));
        }
        let canonical = if frac.is_empty() {
            int.to_owned()
        } else {
            format!("{}.{frac}", if int.is_empty() { "0" } else { int })
        };
        // The checks above keep the value within what `Decimal` holds exactly.
        Decimal::from_str_exact(&canonical)
            .map(|d| Self(d.normalize()))
            .map_err(|_| "is out of range".to_owned())
    }

    /// The exact value.
    pub fn value(&self) -> Decimal {
        self.0
    }

    /// Wraps a value read back from storage; `None` unless it is positive and
    /// within the limits [`parse`](Self::parse) enforces.
    pub fn from_decimal(d: Decimal) -> Option<Self> {
        Self::parse(&d.normalize().to_string()).ok()
    }
}

impl fmt::Display for PositiveDecimal {
    /// The normalized form: no leading or trailing zeros, no exponent.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for PositiveDecimal {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Shortens what is echoed back in an error message.
pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_normalizes() {
        for (input, normalized) in [
            ("0.5", "0.5"),
            ("100", "100"),
            ("007.50", "7.5"),
            ("1.50", "1.5"),
            ("1.000", "1"),
            ("0.000000000000000001", "0.000000000000000001"),
            ("10", "10"),
            ("12345678901234567890", "12345678901234567890"),
            ("1234567890.123456789012345678", "1234567890.123456789012345678"),
        ] {
            let d = PositiveDecimal::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(d.to_string(), normalized, "input {input}");
        }
    }

    #[test]
    fn refuses_malformed_and_out_of_range() {
        for input in [
            "",
            ".5",
            "1.",
            "1e3",
            "+1",
            "-1",
            " 1",
            "1 ",
            "0",
            "0.000",
            "00",
            "1.2.3",
            "１",
            "0x10",
            "0.0000000000000000001",          // 19 digits after the point
            "123456789012345678901",          // 21 digits before the point
            "12345678901.123456789012345678", // 29 significant digits
            "NaN",
            "inf",
        ] {
            assert!(PositiveDecimal::parse(input).is_err(), "accepted {input:?}");
        }
    }

    #[test]
    fn equal_values_in_other_spellings_are_equal() {
        let a = PositiveDecimal::parse("1.50").unwrap();
        let b = PositiveDecimal::parse("01.5").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), b.to_string());
    }
}
