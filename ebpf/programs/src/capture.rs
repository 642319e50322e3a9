//! Outbound capture: cgroup connect4/connect6 redirect enrolled workloads' TCP connects to the
//! in-pod outbound listener; sock_ops re-keys the original destination by 4-tuple.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, bpf_sock_addr,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
};
use nodemesh_ebpf_abi::{ConnTuple, EnrolledPod, OriginalDst, Stat, capacity, pod_flags};

use crate::{
    settings::{is_proxy_mark, outbound_port},
    stats::count,
};

const IPPROTO_TCP: u32 = 6;

/// Enrolled workloads by network-namespace cookie. Written by the agent only.
#[map(name = "ENROLLED")]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::with_max_entries(capacity::ENROLLED, 0);

/// Original destination by socket cookie, from connect() until the SYN.
#[map(name = "COOKIE_DST")]
static COOKIE_DST: LruHashMap<u64, OriginalDst> =
    LruHashMap::with_max_entries(capacity::COOKIE_DST, 0);

/// Original destination by the client's 4-tuple, from the SYN until the proxy takes it after
/// `accept()` (or, when no proxy does, until the socket closes).
#[map(name = "TUPLE_DST")]
static TUPLE_DST: LruHashMap<ConnTuple, OriginalDst> =
    LruHashMap::with_max_entries(capacity::TUPLE_DST, 0);

#[cgroup_sock_addr(connect4)]
pub fn nodemesh_connect4(ctx: SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: `addr` is the context the kernel passed to this connect4 program.
    let dst_ip4 = unsafe { (*addr).user_ip4 };
    let Some(pod) = enrolled_tcp_connect(&ctx) else {
        return ALLOW;
    };
    match capture(&ctx, &pod, dst_ip4, 0) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Rewrite(rewrite) => {
            // SAFETY: connect4 may write user_ip4 and user_port with 4-byte stores.
            unsafe {
                (*addr).user_ip4 = rewrite.ip4;
                (*addr).user_port = rewrite.port_be;
            }
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn nodemesh_connect6(ctx: SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    let Some(pod) = enrolled_tcp_connect(&ctx) else {
        return ALLOW;
    };
    // SAFETY: `addr` is the context the kernel passed to this connect6 program; each word is
    // read with a 4-byte load as the verifier requires.
    let ip6 = unsafe {
        [
            (*addr).user_ip6[0],
            (*addr).user_ip6[1],
            (*addr).user_ip6[2],
            (*addr).user_ip6[3],
        ]
    };
    let v4_mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0xffffu32.to_be();
    if !v4_mapped {
        let local =
            ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && (ip6[3] == 0 || ip6[3] == 1u32.to_be());
        // `::1`, and `::`, which connects to this host.
        if local {
            return ALLOW;
        }
        // Native IPv6 is not carried by the mesh: refused, never let around it.
        count(if pod.flags & pod_flags::REFUSE != 0 {
            Stat::OutboundRefused
        } else {
            Stat::OutboundIpv6Refused
        });
        return REFUSE;
    }
    match capture(&ctx, &pod, ip6[3], 1) {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Rewrite(rewrite) => {
            // SAFETY: connect6 may write user_ip6 words and user_port with 4-byte stores;
            // words 0-2 already hold the v4-mapped prefix.
            unsafe {
                (*addr).user_ip6[3] = rewrite.ip4;
                (*addr).user_port = rewrite.port_be;
            }
            ALLOW
        }
    }
}

/// The enrolled pod behind this connect, if the socket is a TCP socket of an enrolled
/// workload and not one of the proxy's own.
#[inline(always)]
fn enrolled_tcp_connect(ctx: &SockAddrContext) -> Option<EnrolledPod> {
    // SAFETY: the helper only reads the network namespace of the context's socket.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    let pod = *unsafe { ENROLLED.get(netns) }?;
    let addr: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: reading fields of the kernel-provided context; `sk` is never null in connect
    // hooks (PTR_TO_SOCKET) and `mark` is a readable bpf_sock field.
    let (protocol, mark) = unsafe { ((*addr).protocol, (*(*addr).__bindgen_anon_1.sk).mark) };
    if is_proxy_mark(mark) {
        count(Stat::ProxySocketSkipped);
        return None;
    }
    if protocol != IPPROTO_TCP {
        return None;
    }
    Some(pod)
}

/// What a connect hook returns to let the connect go on, or to fail it with EPERM.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

struct Rewrite {
    ip4: u32,
    port_be: u32,
}

enum Verdict {
    /// Not captured: loopback or the pod's own address.
    Pass,
    Rewrite(Rewrite),
    /// The workload could not be enrolled: nothing it sends may go around the mesh.
    Refuse,
}

/// Records the original destination and says where to send the connect instead. Every other
/// address is captured, the proxy's port numbers included: only the pod's own address and
/// loopback reach the proxy's listeners directly.
#[inline(always)]
fn capture(ctx: &SockAddrContext, pod: &EnrolledPod, dst_ip4: u32, via_ipv6: u16) -> Verdict {
    // SAFETY: user_port is readable with a 4-byte load; it holds the port in network order.
    let dst_port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    let first_octet = u32::from_be(dst_ip4) >> 24;
    if first_octet == 127 || dst_ip4 == 0 || dst_ip4 == pod.ip4 {
        count(Stat::OutboundBypassed);
        return Verdict::Pass;
    }
    if pod.flags & pod_flags::REFUSE != 0 {
        count(Stat::OutboundRefused);
        return Verdict::Refuse;
    }
    // SAFETY: the helper only reads the cookie of the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let dst = OriginalDst {
        ip4: dst_ip4,
        port: dst_port,
        via_ipv6,
    };
    if COOKIE_DST.insert(cookie, dst, 0).is_err() {
        // Without its original destination the proxy could not serve it; passing it would
        // let it around the mesh.
        count(Stat::CookieInsertFailed);
        return Verdict::Refuse;
    }
    count(Stat::OutboundRedirected);
    Verdict::Rewrite(Rewrite {
        ip4: pod.ip4,
        port_be: u32::from(outbound_port().to_be()),
    })
}

#[sock_ops]
pub fn nodemesh_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

/// The socket is closed: an original destination the proxy did not take is no longer needed.
#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    if TUPLE_DST.remove(tuple(ctx)).is_ok() {
        count(Stat::TupleRemoved);
    }
}

/// The SYN is about to leave: the source port is final, so the entry moves to TUPLE_DST.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the cookie of the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once; entries are written once by connect4/6 and then removed.
    let Some(dst) = (unsafe { COOKIE_DST.get(cookie) }).copied() else {
        return;
    };
    let _ = COOKIE_DST.remove(cookie);
    if TUPLE_DST.insert(tuple(ctx), dst, 0).is_err() {
        count(Stat::TupleInsertFailed);
        return;
    }
    count(Stat::TupleRecorded);
    // Ask for state changes on this socket only, to drop the entry when it closes untaken.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// The connection's 4-tuple seen from the client socket. For a v4-mapped IPv6 socket the
/// kernel fills the IPv4 fields too, so one key form serves both families.
#[inline(always)]
fn tuple(ctx: &SockOpsContext) -> ConnTuple {
    ConnTuple {
        src_ip4: ctx.local_ip4(),
        dst_ip4: ctx.remote_ip4(),
        // local_port is in host order; remote_port holds the network-order port in its
        // upper 16 bits.
        src_port: ctx.local_port() as u16,
        dst_port: u16::from_be((ctx.remote_port() >> 16) as u16),
    }
}
