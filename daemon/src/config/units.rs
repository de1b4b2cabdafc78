//! The config's quantities: durations, sizes and rates, parsed once when the
//! file is read, each with the message that says how to write it. The CLI's
//! flags use the same parsers, so `--max-rate` and `scrub_max_rate` accept
//! the same spellings.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written like "5s", "200ms" or "10m".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

/// A size in bytes written like "64MiB", "50GiB" or "1000000".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

/// Bytes a second written like "200MiB/s", "50MB/s" or a plain number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| {
        format!("`{s}` is not a duration ({e}); write it like \"5s\", \"200ms\" or \"10m\"")
    })
}

/// A positive number with an optional decimal or binary unit suffix.
fn parse_bytes(t: &str) -> Option<u64> {
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    (n > 0.0 && n.is_finite()).then_some((n * mult) as u64)
}

/// Parses "200MiB/s", "10MB/s" or a plain number of bytes per second.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    parse_bytes(t.strip_suffix("/s").unwrap_or(t)).ok_or_else(|| {
        format!("`{s}` is not a bandwidth; write it like \"200MiB/s\" or \"50MB/s\"")
    })
}

/// Parses "64MiB", "50GiB" or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_bytes(s.trim())
        .ok_or_else(|| format!("`{s}` is not a size; write it like \"50GiB\" or \"64MiB\""))
}

/// Deserializes a string through `parse`, keeping its message (the file's
/// reader adds the field's path).
fn from_text<'de, D, T>(d: D, parse: fn(&str) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    let text = d.deserialize_str(Text)?;
    parse(&text).map_err(serde::de::Error::custom)
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, parse_duration).map(Span)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, parse_size).map(Size)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, parse_bandwidth).map(Rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse() {
        assert_eq!(parse_bandwidth("200MiB/s"), Ok(200 << 20));
        assert_eq!(parse_bandwidth("50MB/s"), Ok(50_000_000));
        assert!(parse_bandwidth("fast").is_err());
        assert!(parse_bandwidth("0").is_err());
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert!(parse_size("NaNGiB").is_err());
        assert!(parse_size("big").unwrap_err().contains("not a size"));
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert!(parse_duration("soon")
            .unwrap_err()
            .contains("not a duration"));
    }
}
