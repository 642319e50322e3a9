//! Durations as Gateway API writes them (GEP-2257), which Envoy Gateway's policies use too:
//! one to four `<number><unit>` parts, the number 1 to 5 digits, the unit `h`, `m`, `s` or
//! `ms`, for example `500ms`, `10s`, `1h30m`. `0s` is zero.

use std::{fmt, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration in Gateway API's format; keeps the text it was written as, for dumps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayDuration {
    text: String,
    value: Duration,
}

impl GatewayDuration {
    pub fn parse(text: &str) -> Result<Self, String> {
        parse(text).map(|value| Self {
            text: text.to_owned(),
            value,
        })
    }

    pub fn get(&self) -> Duration {
        self.value
    }

    pub fn is_zero(&self) -> bool {
        self.value.is_zero()
    }
}

impl From<Duration> for GatewayDuration {
    fn from(value: Duration) -> Self {
        Self {
            text: format!("{}ms", value.as_millis()),
            value,
        }
    }
}

impl fmt::Display for GatewayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for GatewayDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for GatewayDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

fn parse(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{text:?} is not a duration: write one to four parts of 1 to 5 digits followed by \
             h, m, s or ms, such as 500ms, 10s or 1h30m"
        )
    };
    let mut rest = text;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * number as u32;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

/// A duration as Kubernetes' `metav1.Duration` writes it (Go's format): decimal numbers with
/// an optional fraction and a unit each, `ns`, `us`, `µs`, `ms`, `s`, `m` or `h`, as in `3s`,
/// `1.5s` or `1m30s`. Envoy Gateway uses it for passive health check intervals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoDuration {
    text: String,
    value: Duration,
}

impl GoDuration {
    pub fn parse(text: &str) -> Result<Self, String> {
        parse_go(text).map(|value| Self {
            text: text.to_owned(),
            value,
        })
    }

    pub fn get(&self) -> Duration {
        self.value
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

fn parse_go(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{text:?} is not a duration: write numbers with units, such as 3s, 1.5s, 500ms or \
             1m30s"
        )
    };
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let number_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let units = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("\u{b5}s", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ];
        let (unit, scale) = units
            .iter()
            .find(|(unit, _)| rest.starts_with(unit))
            .ok_or_else(bad)?;
        rest = &rest[unit.len()..];
        total += number * scale;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        for (text, ms) in [
            ("3s", 3000),
            ("1.5s", 1500),
            ("1m30s", 90_000),
            ("300ms", 300),
            ("0", 0),
            ("2h", 7_200_000),
        ] {
            assert_eq!(
                GoDuration::parse(text).map(|d| d.get().as_millis()),
                Ok(ms),
                "{text}"
            );
        }
        for text in ["", "3", "1d", "s", "-1s", "1.2.3s"] {
            assert!(GoDuration::parse(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn parses_gateway_api_durations() {
        for (text, ms) in [
            ("0s", 0),
            ("500ms", 500),
            ("10s", 10_000),
            ("1h30m", 5_400_000),
            ("1m1s1ms", 61_001),
            ("1h1m1s1ms", 3_661_001),
            ("99999ms", 99_999),
        ] {
            assert_eq!(
                GatewayDuration::parse(text).map(|d| d.get()),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_what_gateway_api_refuses() {
        for text in [
            "",
            "10",
            "1.5s",
            "-1s",
            "100000s",
            "1d",
            "1h1m1s1ms1ms",
            "s",
            "10 s",
            "1us",
        ] {
            assert!(GatewayDuration::parse(text).is_err(), "{text:?}");
        }
    }
}
