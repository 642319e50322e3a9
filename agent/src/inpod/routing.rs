//! The routing a pod needs for transparent connections, set up at enrollment.
//!
//! The proxy hands an inbound connection to the application from the client's own address,
//! on a socket marked with the transparent mark. With `tcp_fwmark_accept`, the application's
//! accepted socket takes the mark of that SYN, so every reply carries it; a rule sends marked
//! packets to a table whose only route is `local`, so the replies come back to the proxy's
//! socket instead of leaving the pod. With `fwmark_reflect`, the kernel's own answers (the
//! RST of a port nobody listens on, ICMP errors) carry the mark of what they answer too, so a
//! refused connect fails at once in the proxy instead of leaking toward the client's address
//! in plaintext. Nothing else in the pod carries that mark.

use std::net::Ipv4Addr;

use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        route::{RouteScope, RouteType},
        rule::RuleAction,
    },
};

use crate::netns::PodNetns;

/// The routing table of transparent connections inside a pod.
const TABLE: u32 = 15006;
/// Before the main table (32766), after the local one (0).
const RULE_PRIORITY: u32 = 15006;
const LOOPBACK_IFINDEX: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot enable tcp_fwmark_accept and fwmark_reflect in {netns}: {source}")]
    Sysctl {
        netns: String,
        source: std::io::Error,
    },
    #[error("cannot open a netlink socket in {netns}: {source}")]
    Netlink {
        netns: String,
        source: std::io::Error,
    },
    #[error("cannot add the transparent-connection {what} in {netns}: {source}")]
    Add {
        what: &'static str,
        netns: String,
        source: rtnetlink::Error,
    },
}

fn netlink(netns: &PodNetns) -> Result<Handle, RoutingError> {
    let (connection, handle, _) =
        netns
            .run(rtnetlink::new_connection)
            .map_err(|source| RoutingError::Netlink {
                netns: netns.to_string(),
                source,
            })?;
    tokio::spawn(connection);
    Ok(handle)
}

fn already_there(error: &rtnetlink::Error) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(e) if e.raw_code() == -libc::EEXIST)
}

fn local_route() -> rtnetlink::packet_route::route::RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .table_id(TABLE)
        .output_interface(LOOPBACK_IFINDEX)
        .build()
}

/// Installs the sysctl, rule and route in the pod. Idempotent.
pub async fn install_routing(netns: &PodNetns, mark: u32) -> Result<(), RoutingError> {
    let name = || netns.to_string();
    netns
        .run(|| {
            std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")?;
            std::fs::write("/proc/sys/net/ipv4/fwmark_reflect", "1")
        })
        .map_err(|source| RoutingError::Sysctl {
            netns: name(),
            source,
        })?;
    let handle = netlink(netns)?;
    let rule = handle
        .rule()
        .add()
        .v4()
        .fw_mark(mark)
        .table_id(TABLE)
        .priority(RULE_PRIORITY)
        .action(RuleAction::ToTable)
        .execute()
        .await;
    match rule {
        Ok(()) => {}
        Err(e) if already_there(&e) => {}
        Err(source) => {
            return Err(RoutingError::Add {
                what: "rule",
                netns: name(),
                source,
            });
        }
    }
    match handle.route().add(local_route()).execute().await {
        Ok(()) => Ok(()),
        Err(e) if already_there(&e) => Ok(()),
        Err(source) => Err(RoutingError::Add {
            what: "route",
            netns: name(),
            source,
        }),
    }
}

/// Removes the rule and route again (the sysctl only matters with them). Best effort: the pod
/// may be gone already.
pub async fn remove_routing(netns: &PodNetns, mark: u32) {
    let Ok(handle) = netlink(netns) else { return };
    let _ = handle.route().del(local_route()).execute().await;
    let mut rule = rtnetlink::packet_route::rule::RuleMessage::default();
    rule.header.family = rtnetlink::packet_route::AddressFamily::Inet;
    rule.header.action = RuleAction::ToTable;
    rule.attributes.extend([
        rtnetlink::packet_route::rule::RuleAttribute::FwMark(mark),
        rtnetlink::packet_route::rule::RuleAttribute::Table(TABLE),
        rtnetlink::packet_route::rule::RuleAttribute::Priority(RULE_PRIORITY),
    ]);
    let _ = handle.rule().del(rule).execute().await;
}
