//! Inbound capture: sk_lookup hands connections for an enrolled pod's address to the proxy's
//! in-pod inbound listener. Attached to each enrolled pod's network namespace.

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    macros::{map, sk_lookup},
    maps::{HashMap, SockHash},
    programs::SkLookupContext,
};
use nodemesh_ebpf_abi::{ConnTuple, Stat, capacity};

use crate::{settings::is_proxy_port, stats::count};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const ENOENT: i32 = 2;

/// The in-pod inbound listener, keyed by the pod's IPv4 address (network order).
#[map(name = "INBOUND")]
static INBOUND: SockHash<u32> = SockHash::with_max_entries(capacity::INBOUND, 0);

/// Connections the proxy is opening to an application from the client's address
/// (IP_TRANSPARENT): client address as source, application address as destination. The proxy
/// adds an entry just before its connect and removes it once connected; only it can write
/// here, so a remote client cannot slip past the proxy by choosing its source.
#[map(name = "TRANSPARENT")]
static TRANSPARENT: HashMap<ConnTuple, u32> = HashMap::with_max_entries(capacity::TRANSPARENT, 0);

#[sk_lookup]
pub fn nodemesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: reading fields of the kernel-provided context with their natural sizes.
    let (family, protocol, local_ip4, remote_ip4, local_port, remote_port) = unsafe {
        (
            (*l).family,
            (*l).protocol,
            (*l).local_ip4,
            (*l).remote_ip4,
            (*l).local_port,
            (*l).remote_port,
        )
    };
    // `remote == local`: the application talking to itself through its own address.
    if family != AF_INET
        || protocol != IPPROTO_TCP
        || is_proxy_port(local_port as u16)
        || remote_ip4 == local_ip4
    {
        return SK_PASS;
    }
    let tuple = ConnTuple {
        src_ip4: remote_ip4,
        dst_ip4: local_ip4,
        src_port: u16::from_be(remote_port),
        dst_port: local_port as u16,
    };
    if TRANSPARENT.get_ptr(tuple).is_some() {
        return SK_PASS;
    }
    match INBOUND.redirect_sk_lookup(&ctx, local_ip4, 0) {
        Ok(()) => count(Stat::InboundSteered),
        // Not an address of an enrolled pod (loopback, say): the normal lookup goes on.
        Err(e) if e == -ENOENT => {}
        Err(_) => count(Stat::InboundSteerFailed),
    }
    SK_PASS
}
