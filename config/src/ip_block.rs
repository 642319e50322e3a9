//! Address blocks (CIDR), as AuthorizationPolicies and rate limits match client addresses.

use std::net::IpAddr;

use crate::parse_ip_block;

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

impl std::fmt::Display for IpBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
