//! Rates and sizes as operators write them.
//!
//! Rates follow tc(8): `bit` or a bare number is bits per second, `kbit`,
//! `mbit`, `gbit`, `tbit` are SI multiples of bits per second; `bps`, `kbps`,
//! `mbps`, `gbps`, `tbps` are BYTES per second; an `i` after the prefix
//! (`mibit`, `gibps`) makes it binary (1024). Decimals are allowed
//! (`1.5gbit`). Sizes are bytes with binary multiples, as systemd and docker
//! read them: `512M` = `512MiB` = 512 × 2^20; `K`, `M`, `G`, `T` with an
//! optional `i` and `B`.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a rate or size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty {0}")]
    Empty(&'static str),
    #[error("'{input}' is not a {what}: {reason}")]
    Invalid {
        input: String,
        what: &'static str,
        reason: String,
    },
    #[error("'{input}' is zero; a {what} must be positive")]
    Zero { input: String, what: &'static str },
    #[error("'{input}' is too large (the largest {what} is {max})")]
    TooLarge {
        input: String,
        what: &'static str,
        max: String,
    },
}

/// A bandwidth, stored exactly in bits per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate {
    bits_per_sec: u64,
}

impl Rate {
    /// Largest accepted rate: 1 Tbit/s.
    pub const MAX_BITS: u64 = 1_000_000_000_000;

    pub fn from_bits_per_sec(bits: u64) -> Result<Self, UnitError> {
        check_rate(bits, &bits.to_string())
    }

    pub const fn bits_per_sec(self) -> u64 {
        self.bits_per_sec
    }

    /// Bytes per second, rounded down.
    pub const fn bytes_per_sec(self) -> u64 {
        self.bits_per_sec / 8
    }
}

fn check_rate(bits: u64, input: &str) -> Result<Rate, UnitError> {
    if bits == 0 {
        return Err(UnitError::Zero {
            input: input.into(),
            what: "rate",
        });
    }
    if bits > Rate::MAX_BITS {
        return Err(UnitError::TooLarge {
            input: input.into(),
            what: "rate",
            max: "1tbit".into(),
        });
    }
    Ok(Rate { bits_per_sec: bits })
}

/// Splits "12.5mbit" into ("12.5", "mbit").
fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    s.split_at(end)
}

/// Exact `number × multiplier` for a decimal number; None on overflow.
/// Err(reason) on malformed numbers or results that are not whole units.
fn scale(number: &str, multiplier: u64, unit_name: &str) -> Result<Option<u64>, String> {
    if number.is_empty() {
        return Err("it does not start with a number".into());
    }
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err("malformed number".into());
    }
    if frac.len() > 12 {
        return Err("too many decimals".into());
    }
    let digits = format!("{int}{frac}");
    let Ok(mantissa) = digits.parse::<u128>() else {
        return Ok(None);
    };
    let denom = 10u128.pow(frac.len() as u32);
    let product = mantissa.checked_mul(multiplier as u128);
    let Some(product) = product else {
        return Ok(None);
    };
    if product % denom != 0 {
        return Err(format!("it is not a whole number of {unit_name}"));
    }
    Ok(u64::try_from(product / denom).ok())
}

impl FromStr for Rate {
    type Err = UnitError;

    fn from_str(input: &str) -> Result<Self, UnitError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(UnitError::Empty("rate"));
        }
        let (number, unit) = split_number(s);
        let unit_lc = unit.to_ascii_lowercase();
        let invalid = |reason: String| UnitError::Invalid {
            input: input.into(),
            what: "rate",
            reason,
        };
        if number.is_empty() {
            return Err(invalid("it does not start with a number".into()));
        }
        let (bytes, rest) = if let Some(p) = unit_lc.strip_suffix("bit") {
            (false, p)
        } else if let Some(p) = unit_lc.strip_suffix("bps") {
            (true, p)
        } else if unit_lc.is_empty() {
            (false, "")
        } else {
            return Err(invalid(format!(
                "unknown unit '{unit}' (use bit, kbit, mbit, gbit, tbit for bits/s or bps, \
                 kbps, mbps, gbps, tbps for bytes/s)"
            )));
        };
        let prefix = prefix_multiplier(rest, 1000)
            .ok_or_else(|| invalid(format!("unknown unit prefix in '{unit}'")))?;
        let multiplier = prefix * if bytes { 8 } else { 1 };
        let bits = scale(number, multiplier, "bits per second").map_err(invalid)?;
        match bits {
            Some(b) => check_rate(b, input),
            None => Err(UnitError::TooLarge {
                input: input.into(),
                what: "rate",
                max: "1tbit".into(),
            }),
        }
    }
}

/// Multiplier of "", "k", "m", "g", "t" (SI) or "ki", "mi", … (binary).
fn prefix_multiplier(prefix: &str, si: u64) -> Option<u64> {
    let (p, base) = match prefix.strip_suffix('i') {
        Some(p) if !p.is_empty() => (p, 1024),
        _ => (prefix, si),
    };
    let exp = match p {
        "" => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        _ => return None,
    };
    Some(base.pow(exp))
}

impl fmt::Display for Rate {
    /// The largest SI bit unit that represents the rate exactly, so that
    /// display → parse is the identity.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_bits_exact(self.bits_per_sec))
    }
}

/// Bits per second in the largest SI bit unit that is exact ("1010mbit");
/// any value, zero included.
pub fn format_bits_exact(b: u64) -> String {
    if b != 0 {
        for (unit, m) in [
            ("tbit", 1_000_000_000_000u64),
            ("gbit", 1_000_000_000),
            ("mbit", 1_000_000),
            ("kbit", 1000),
        ] {
            if b.is_multiple_of(m) {
                return format!("{}{unit}", b / m);
            }
        }
    }
    format!("{b}bit")
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An amount of memory or data, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size {
    bytes: u64,
}

impl Size {
    /// Largest accepted size: 1 PiB.
    pub const MAX_BYTES: u64 = 1 << 50;

    pub fn from_bytes(bytes: u64) -> Result<Self, UnitError> {
        check_size(bytes, &bytes.to_string())
    }

    /// `bytes` clamped into the accepted range (1 byte ..= 1 PiB): for
    /// defaults and computed sizes that cannot be refused.
    pub const fn clamped(bytes: u64) -> Self {
        let bytes = if bytes == 0 {
            1
        } else if bytes > Self::MAX_BYTES {
            Self::MAX_BYTES
        } else {
            bytes
        };
        Self { bytes }
    }

    pub const fn bytes(self) -> u64 {
        self.bytes
    }
}

fn check_size(bytes: u64, input: &str) -> Result<Size, UnitError> {
    if bytes == 0 {
        return Err(UnitError::Zero {
            input: input.into(),
            what: "size",
        });
    }
    if bytes > Size::MAX_BYTES {
        return Err(UnitError::TooLarge {
            input: input.into(),
            what: "size",
            max: "1PiB".into(),
        });
    }
    Ok(Size { bytes })
}

impl FromStr for Size {
    type Err = UnitError;

    fn from_str(input: &str) -> Result<Self, UnitError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(UnitError::Empty("size"));
        }
        let (number, unit) = split_number(s);
        let invalid = |reason: String| UnitError::Invalid {
            input: input.into(),
            what: "size",
            reason,
        };
        if number.is_empty() {
            return Err(invalid("it does not start with a number".into()));
        }
        let u = unit.to_ascii_lowercase();
        let u = u.strip_suffix('b').unwrap_or(&u);
        let multiplier = match u {
            "" => 1,
            p => {
                // Sizes are binary with or without the "i".
                let p = p.strip_suffix('i').unwrap_or(p);
                match p {
                    "k" => 1u64 << 10,
                    "m" => 1 << 20,
                    "g" => 1 << 30,
                    "t" => 1 << 40,
                    "p" => 1 << 50,
                    _ => {
                        return Err(invalid(format!(
                            "unknown unit '{unit}' (use B, K, M, G, T or KiB, MiB, GiB, TiB)"
                        )));
                    }
                }
            }
        };
        let bytes = scale(number, multiplier, "bytes").map_err(invalid)?;
        match bytes {
            Some(b) => check_size(b, input),
            None => Err(UnitError::TooLarge {
                input: input.into(),
                what: "size",
                max: "1PiB".into(),
            }),
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bytes;
        for (unit, shift) in [
            ("PiB", 50),
            ("TiB", 40),
            ("GiB", 30),
            ("MiB", 20),
            ("KiB", 10),
        ] {
            if b.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}B")
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Human-readable bits per second for tables ("94.2mbit"); not parseable.
pub fn format_bps(bits_per_sec: f64) -> String {
    let (v, unit) = if bits_per_sec >= 1e9 {
        (bits_per_sec / 1e9, "gbit")
    } else if bits_per_sec >= 1e6 {
        (bits_per_sec / 1e6, "mbit")
    } else if bits_per_sec >= 1e3 {
        (bits_per_sec / 1e3, "kbit")
    } else {
        (bits_per_sec, "bit")
    };
    format!("{v:.1}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rate(s: &str) -> u64 {
        s.parse::<Rate>()
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .bits_per_sec()
    }

    #[test]
    fn tc_rate_units() {
        assert_eq!(rate("100mbit"), 100_000_000);
        assert_eq!(rate("1gbit"), 1_000_000_000);
        assert_eq!(rate("1GBIT"), 1_000_000_000);
        assert_eq!(rate("250kbit"), 250_000);
        assert_eq!(rate("1tbit"), 1_000_000_000_000);
        assert_eq!(rate("12345"), 12_345);
        assert_eq!(rate("8bit"), 8);
        // bps family is bytes per second, as in tc.
        assert_eq!(rate("10mbps"), 80_000_000);
        assert_eq!(rate("1kbps"), 8_000);
        assert_eq!(rate("3bps"), 24);
        // binary prefixes
        assert_eq!(rate("1mibit"), 1_048_576);
        assert_eq!(rate("1kibps"), 8192);
        // decimals and spaces
        assert_eq!(rate("1.5gbit"), 1_500_000_000);
        assert_eq!(rate(" 0.5mbit "), 500_000);
    }

    #[test]
    fn bad_rates_are_refused_with_a_reason() {
        for (input, needle) in [
            ("", "empty"),
            ("fast", "does not start with a number"),
            ("10 megabits", "unknown unit"),
            ("10xbit", "unknown unit prefix"),
            ("1.2.3mbit", "malformed"),
            ("0mbit", "zero"),
            ("0", "zero"),
            ("2tbit", "too large"),
            ("99999999999999999999999gbit", "too large"),
            ("0.1bit", "whole number"),
            ("-5mbit", "does not start with a number"),
        ] {
            let err = input.parse::<Rate>().expect_err(input).to_string();
            assert!(err.contains(needle), "{input}: {err}");
        }
    }

    #[test]
    fn rate_display_round_trips() {
        for s in [
            "100mbit", "1gbit", "1500kbit", "12345bit", "80mbit", "1tbit",
        ] {
            let r: Rate = s.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.to_string(), s);
        }
        assert_eq!(
            "10mbps".parse::<Rate>().map(|r| r.to_string()),
            Ok("80mbit".into())
        );
    }

    #[test]
    fn sizes() {
        let size = |s: &str| {
            s.parse::<Size>()
                .unwrap_or_else(|e| panic!("{s}: {e}"))
                .bytes()
        };
        assert_eq!(size("512M"), 512 << 20);
        assert_eq!(size("512MiB"), 512 << 20);
        assert_eq!(size("2GiB"), 2 << 30);
        assert_eq!(size("2g"), 2 << 30);
        assert_eq!(size("4096"), 4096);
        assert_eq!(size("1.5G"), 3 << 29);
        assert_eq!(size("64KB"), 64 << 10);
        for (input, needle) in [
            ("0", "zero"),
            ("2X", "unknown unit"),
            ("1.2.3G", "malformed"),
            ("2PiB", "too large"),
            ("0.3K", "whole number"),
            ("", "empty"),
        ] {
            let err = input.parse::<Size>().expect_err(input).to_string();
            assert!(err.contains(needle), "{input}: {err}");
        }
        assert_eq!(
            Size::from_bytes(512 << 20).map(|s| s.to_string()),
            Ok("512MiB".into())
        );
        assert_eq!(
            Size::from_bytes(1000).map(|s| s.to_string()),
            Ok("1000B".into())
        );
    }

    #[test]
    fn serde_uses_the_text_form() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct T {
            r: Rate,
            s: Size,
        }
        let t: T = toml::from_str("r = \"10mbps\"\ns = \"1G\"").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.r.bits_per_sec(), 80_000_000);
        assert_eq!(
            toml::to_string(&t).ok(),
            Some("r = \"80mbit\"\ns = \"1GiB\"\n".into())
        );
        let e = toml::from_str::<T>("r = \"0\"\ns = \"1G\"").expect_err("zero rate");
        assert!(e.to_string().contains("zero"), "{e}");
    }

    proptest! {
        #[test]
        fn any_rate_round_trips(bits in 1u64..=Rate::MAX_BITS) {
            let r = Rate::from_bits_per_sec(bits).unwrap_or_else(|e| panic!("{e}"));
            prop_assert_eq!(r.to_string().parse::<Rate>(), Ok(r));
        }

        #[test]
        fn any_size_round_trips(bytes in 1u64..=Size::MAX_BYTES) {
            let s = Size::from_bytes(bytes).unwrap_or_else(|e| panic!("{e}"));
            prop_assert_eq!(s.to_string().parse::<Size>(), Ok(s));
        }

        #[test]
        fn parsing_never_panics(s in ".{0,24}") {
            let _ = s.parse::<Rate>();
            let _ = s.parse::<Size>();
        }
    }
}

/// Serde helper for an optional rate written as a rate or `"0"` / `"none"`
/// (no guarantee).
pub mod rate_or_zero {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Rate;

    pub fn serialize<S: Serializer>(v: &Option<Rate>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(r) => s.collect_str(r),
            None => s.serialize_str("0"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Rate>, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.trim();
        if t == "0" || t.eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        t.parse().map(Some).map_err(serde::de::Error::custom)
    }
}
