//! Matching of single values: string patterns and address blocks.

use std::net::IpAddr;

use nodemesh_config::parse_ip_block;

/// An Istio string match: exact, `prefix*`, `*suffix`, or `*` for any value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    pub fn new(text: &str) -> Self {
        if text == "*" {
            Pattern::Any
        } else if let Some(prefix) = text.strip_suffix('*') {
            Pattern::Prefix(prefix.to_owned())
        } else if let Some(suffix) = text.strip_prefix('*') {
            Pattern::Suffix(suffix.to_owned())
        } else {
            Pattern::Exact(text.to_owned())
        }
    }

    /// A pattern compared without regard to ASCII case (hosts).
    pub fn new_lowercase(text: &str) -> Self {
        Self::new(&text.to_ascii_lowercase())
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => value == s,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

/// A CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    network: IpAddr,
    prefix: u8,
}

impl IpBlock {
    /// Parses a block the configuration already validated; `None` if it is not one.
    pub fn new(text: &str) -> Option<Self> {
        let (network, prefix) = parse_ip_block(text).ok()?;
        Some(Self { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            (IpAddr::V6(_), IpAddr::V4(ip)) => self.contains(IpAddr::V6(ip.to_ipv6_mapped())),
            (IpAddr::V4(_), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(IpAddr::V4(v4))),
        }
    }
}

/// Values and not-values of one field: any value matches (or there are none) and no
/// not-value matches. An absent attribute matches no value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Field<T> {
    pub values: Vec<T>,
    pub not_values: Vec<T>,
}

impl<T> Field<T> {
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    /// `Ok` when the field matches; otherwise whether it failed on `values` (false) or on
    /// `not_values` (true).
    pub fn check(&self, hit: impl Fn(&T) -> bool) -> Result<(), bool> {
        if !self.values.is_empty() && !self.values.iter().any(&hit) {
            return Err(false);
        }
        if self.not_values.iter().any(&hit) {
            return Err(true);
        }
        Ok(())
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(s) => f.write_str(s),
            Pattern::Prefix(p) => write!(f, "{p}*"),
            Pattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

impl std::fmt::Display for IpBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// `[a, b]` for messages.
pub fn list<T: std::fmt::Display>(values: &[T]) -> String {
    let items: Vec<String> = values.iter().map(ToString::to_string).collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let cases = [
            ("*", "anything", true),
            ("/public/*", "/public/x", true),
            ("/public/*", "/public", false),
            ("*.png", "/a/b.png", true),
            ("/exact", "/exact", true),
            ("/exact", "/exact/", false),
        ];
        for (pattern, value, expected) in cases {
            assert_eq!(
                Pattern::new(pattern).matches(value),
                expected,
                "{pattern} ~ {value}"
            );
        }
    }

    #[test]
    fn ip_blocks() {
        let block = IpBlock::new("10.88.1.0/24").expect("block");
        assert!(block.contains("10.88.1.250".parse().expect("ip")));
        assert!(!block.contains("10.88.2.1".parse().expect("ip")));
        assert!(
            IpBlock::new("0.0.0.0/0")
                .expect("all")
                .contains("1.2.3.4".parse().expect("ip"))
        );
        assert!(
            IpBlock::new("10.88.1.2")
                .expect("host")
                .contains("10.88.1.2".parse().expect("ip"))
        );
        assert!(block.contains("::ffff:10.88.1.9".parse().expect("mapped")));
    }
}
