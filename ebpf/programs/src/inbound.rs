//! Inbound capture: sk_lookup hands connections for an enrolled pod's address to the proxy's
//! in-pod listeners. Attached to each enrolled pod's network namespace.
//!
//! It fails closed: a TCP connection to an enrolled pod's address reaches an application
//! socket only from the proxy itself (`TRANSPARENT`) or from the pod to itself. When no proxy
//! listener is there (the agent stopped, is restarting, or could not enroll the pod), the
//! connection is refused instead of passed through.

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC,
        sk_action::{SK_DROP, SK_PASS},
    },
    macros::{map, sk_lookup},
    maps::{HashMap, SockHash},
    programs::SkLookupContext,
};
use nodemesh_ebpf_abi::{
    ConnTuple, EnrolledPod, Listener, Stat, capacity, listener_key, pod_flags,
};

use crate::{settings::hbone_port, stats::count};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// The proxy's in-pod listeners, keyed by [`listener_key`].
#[map(name = "INBOUND")]
static INBOUND: SockHash<u64> = SockHash::with_max_entries(capacity::INBOUND, 0);

/// Enrolled pods by IPv4 address (network order). Written by the agent only; outlives it.
#[map(name = "PODS")]
static PODS: HashMap<u32, EnrolledPod> = HashMap::with_max_entries(capacity::PODS, 0);

/// Connections the proxy is opening to an application from the client's address
/// (IP_TRANSPARENT): client address as source, application address as destination. The proxy
/// adds an entry just before its connect and removes it once connected; only it can write
/// here, so a remote client cannot slip past the proxy by choosing its source.
///
/// Its entries live for a connect's round trip inside the pod, so a handful exist at once:
/// they are allocated as they come (`BPF_F_NO_PREALLOC`) rather than all up front, where the
/// capacity alone held 5.5 MiB of kernel memory, charged to the memory cgroup of the agent
/// that made the map. (The loopback device these connects arrive on cannot be the sign
/// instead: for an address of the namespace, `ingress_ifindex` is the address's device.)
#[map(name = "TRANSPARENT")]
static TRANSPARENT: HashMap<ConnTuple, u32> =
    HashMap::with_max_entries(capacity::TRANSPARENT, BPF_F_NO_PREALLOC);

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
    if family == AF_INET6 {
        return inbound_ipv6(&ctx);
    }
    // `remote == local`: the pod talking to itself through its own address (its connects to
    // the proxy's outbound listener among them).
    if family != AF_INET || remote_ip4 == local_ip4 {
        return SK_PASS;
    }
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    let Some(pod) = (unsafe { PODS.get(local_ip4) }).copied() else {
        // Not an enrolled pod's address (loopback, say): the normal lookup goes on.
        return SK_PASS;
    };
    if protocol == IPPROTO_UDP {
        if pod.flags & pod_flags::STRICT != 0 {
            count(Stat::InboundUdpRefused);
            return SK_DROP;
        }
        return SK_PASS;
    }
    if protocol != IPPROTO_TCP {
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
    let listener = if local_port as u16 == hbone_port() {
        Listener::Hbone
    } else {
        Listener::Inbound
    };
    match INBOUND.redirect_sk_lookup(&ctx, listener_key(local_ip4, listener), 0) {
        Ok(()) => {
            count(Stat::InboundSteered);
            SK_PASS
        }
        Err(_) => {
            count(Stat::InboundRefused);
            SK_DROP
        }
    }
}

/// IPv6 to a pod of this namespace: the mesh captures IPv4 only, so anything but loopback is
/// refused rather than reaching the application unauthenticated and unauthorized.
#[inline(always)]
fn inbound_ipv6(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: each word of local_ip6 is read with a 4-byte load.
    let ip6 = unsafe {
        [
            (*l).local_ip6[0],
            (*l).local_ip6[1],
            (*l).local_ip6[2],
            (*l).local_ip6[3],
        ]
    };
    if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == 1u32.to_be() {
        return SK_PASS;
    }
    count(Stat::InboundIpv6Refused);
    SK_DROP
}
