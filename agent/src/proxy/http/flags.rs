//! Envoy's response flags, as Istio's metrics and access logs carry them.

use std::{borrow::Cow, fmt, ops::BitOr};

/// A set of Envoy response flags. Shown as Envoy shows them: comma-separated, `-` for none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFlags(u16);

impl ResponseFlags {
    pub const NONE: Self = Self(0);
    /// No healthy upstream: the backend has no endpoint to send to.
    pub const NO_HEALTHY_UPSTREAM: Self = Self(1);
    /// The request timed out upstream.
    pub const UPSTREAM_TIMEOUT: Self = Self(1 << 1);
    /// The upstream could not be connected to.
    pub const UPSTREAM_CONNECT_FAILURE: Self = Self(1 << 2);
    /// The upstream connection ended before the response.
    pub const UPSTREAM_CONNECTION_TERMINATION: Self = Self(1 << 3);
    /// A circuit breaker was over its limit.
    pub const UPSTREAM_OVERFLOW: Self = Self(1 << 4);
    /// Retries were used up.
    pub const RETRY_LIMIT_EXCEEDED: Self = Self(1 << 5);
    /// No route matched.
    pub const NO_ROUTE: Self = Self(1 << 6);
    /// A rate limit refused the request.
    pub const RATE_LIMITED: Self = Self(1 << 7);
    /// An authorization policy refused the request.
    pub const RBAC: Self = Self(1 << 8);
    /// The client went away before the response.
    pub const DOWNSTREAM_TERMINATION: Self = Self(1 << 9);
    /// The client's request was malformed (a path that cannot be normalised).
    pub const DOWNSTREAM_PROTOCOL_ERROR: Self = Self(1 << 10);

    /// In Envoy's order.
    const NAMES: [(Self, &'static str); 11] = [
        (Self::NO_HEALTHY_UPSTREAM, "UH"),
        (Self::UPSTREAM_TIMEOUT, "UT"),
        (Self::UPSTREAM_CONNECT_FAILURE, "UF"),
        (Self::UPSTREAM_CONNECTION_TERMINATION, "UC"),
        (Self::UPSTREAM_OVERFLOW, "UO"),
        (Self::RETRY_LIMIT_EXCEEDED, "URX"),
        (Self::NO_ROUTE, "NR"),
        (Self::RATE_LIMITED, "RL"),
        (Self::RBAC, "RBAC"),
        (Self::DOWNSTREAM_TERMINATION, "DC"),
        (Self::DOWNSTREAM_PROTOCOL_ERROR, "DPE"),
    ];

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    /// The text Istio puts in `response_flags`; borrowed for no flag or one.
    pub fn text(self) -> Cow<'static, str> {
        let mut names = Self::NAMES
            .iter()
            .filter(|(flag, _)| self.contains(*flag))
            .map(|(_, name)| *name);
        match (names.next(), names.next()) {
            (None, _) => Cow::Borrowed("-"),
            (Some(one), None) => Cow::Borrowed(one),
            (Some(first), Some(second)) => {
                let mut text = format!("{first},{second}");
                for name in names {
                    text.push(',');
                    text.push_str(name);
                }
                Cow::Owned(text)
            }
        }
    }
}

impl BitOr for ResponseFlags {
    type Output = Self;

    fn bitor(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_read_as_envoy_writes_them() {
        assert_eq!(ResponseFlags::NONE.text(), "-");
        assert_eq!(ResponseFlags::UPSTREAM_TIMEOUT.text(), "UT");
        let both = ResponseFlags::RETRY_LIMIT_EXCEEDED | ResponseFlags::UPSTREAM_CONNECT_FAILURE;
        assert_eq!(both.text(), "UF,URX");
        assert!(both.contains(ResponseFlags::UPSTREAM_CONNECT_FAILURE));
        assert!(!both.contains(ResponseFlags::NO_ROUTE));
        assert!(!both.contains(ResponseFlags::NONE));
    }
}
