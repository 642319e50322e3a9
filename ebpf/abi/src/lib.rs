//! The kernel/user ABI of nodemesh's eBPF datapath.
//!
//! Every type here crosses the boundary between the eBPF programs (`ebpf/programs`) and the
//! agent, so each is `#[repr(C)]`, has no implicit padding and no `bool`. Addresses are kept
//! exactly as the kernel hands them to programs: IPv4 addresses in network byte order inside a
//! `u32`, ports in host byte order unless a field says otherwise.
#![no_std]

/// Names of the maps and programs in the eBPF object, shared so that a rename breaks the build
/// instead of the agent at run time.
pub mod names {
    pub const ENROLLED: &str = "ENROLLED";
    pub const COOKIE_DST: &str = "COOKIE_DST";
    pub const TUPLE_DST: &str = "TUPLE_DST";
    pub const INBOUND: &str = "INBOUND";
    pub const PODS: &str = "PODS";
    pub const TRANSPARENT: &str = "TRANSPARENT";
    pub const STATS: &str = "STATS";

    pub const CONNECT4: &str = "nodemesh_connect4";
    pub const CONNECT6: &str = "nodemesh_connect6";
    pub const SOCK_OPS: &str = "nodemesh_sock_ops";
    pub const SK_LOOKUP: &str = "nodemesh_sk_lookup";

    /// Read-only globals the agent sets when it loads the object.
    pub const PROXY_MARK: &str = "PROXY_MARK";
    pub const TRANSPARENT_MARK: &str = "TRANSPARENT_MARK";
    pub const OUTBOUND_PORT: &str = "OUTBOUND_PORT";
    pub const INBOUND_PORT: &str = "INBOUND_PORT";
    pub const HBONE_PORT: &str = "HBONE_PORT";
    pub const DNS_PORT: &str = "DNS_PORT";
}

/// Capacity of the maps. The LRU maps hold one entry per connection in flight: from `connect()`
/// to the SYN (COOKIE_DST), from the SYN to the proxy's `accept()`, where the proxy takes it
/// (TUPLE_DST). They are sized for a busy node and many CPUs (the kernel's LRU keeps free
/// entries per CPU); eviction only ever drops entries of connections long gone. Each entry's
/// place is allocated up front: TUPLE_DST's 65,536 take 5.5 MiB of kernel memory.
pub mod capacity {
    pub const ENROLLED: u32 = 4096;
    pub const COOKIE_DST: u32 = 65_536;
    pub const TUPLE_DST: u32 = 65_536;
    /// Two listeners (inbound, HBONE) per enrolled pod.
    pub const INBOUND: u32 = 8192;
    pub const PODS: u32 = 4096;
    /// Connections between the proxy's connect() and its completion, node-wide.
    pub const TRANSPARENT: u32 = 65_536;
}

/// An enrolled workload, keyed in `ENROLLED` by the cookie of its network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledPod {
    /// The pod's IPv4 address, network byte order. Outbound captures are redirected to
    /// `ip4:OUTBOUND_PORT`, the proxy's listener inside the pod.
    pub ip4: u32,
    /// [`pod_flags`] bits.
    pub flags: u32,
}

/// Switches of an enrolled workload, in [`EnrolledPod::flags`].
pub mod pod_flags {
    /// The workload could not be enrolled: its connects are refused (EPERM) and nothing
    /// reaches it, instead of its traffic going around the mesh.
    pub const REFUSE: u32 = 1;
    /// Its mTLS mode is STRICT: inbound UDP, which the mesh cannot authenticate, is refused.
    pub const STRICT: u32 = 2;
}

/// Which of a pod's proxy listeners an `INBOUND` entry holds.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The inbound capture listener (15006): plaintext connections to any application port.
    Inbound = 0,
    /// The HBONE listener (15008).
    Hbone = 1,
}

/// The `INBOUND` key of a pod's listener: its IPv4 address (network order) in the low half,
/// the [`Listener`] in the high half.
#[inline(always)]
pub const fn listener_key(ip4: u32, listener: Listener) -> u64 {
    ip4 as u64 | ((listener as u64) << 32)
}

/// Where a captured connection was going before it was redirected to the proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    /// IPv4 address, network byte order.
    pub ip4: u32,
    /// Port, host byte order.
    pub port: u16,
    /// `1` when the application connected through an IPv6 socket to a v4-mapped address.
    pub via_ipv6: u16,
}

/// The client side of a captured connection as the proxy sees it after `accept()`: the peer
/// is `src`, the local end is the in-pod outbound listener `dst`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnTuple {
    /// Network byte order.
    pub src_ip4: u32,
    /// Network byte order.
    pub dst_ip4: u32,
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
}

/// Slots of the per-CPU `STATS` array: what the programs did, for metrics and the demo.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// connect4/connect6 rewrote an enrolled workload's connect to the proxy.
    OutboundRedirected = 0,
    /// connect from an enrolled workload left alone (loopback, own pod, not TCP).
    OutboundBypassed = 1,
    /// connect from a proxy socket (SO_MARK) left alone.
    ProxySocketSkipped = 2,
    /// COOKIE_DST could not take an entry; the connect was refused.
    CookieInsertFailed = 3,
    /// sock_ops moved an original destination from COOKIE_DST to TUPLE_DST.
    TupleRecorded = 4,
    /// TUPLE_DST could not take an entry; the proxy will refuse that connection.
    TupleInsertFailed = 5,
    /// sk_lookup steered an inbound connection to the in-pod inbound listener.
    InboundSteered = 6,
    /// sk_lookup found no listener for an enrolled address or could not assign it.
    InboundSteerFailed = 7,
    /// A native IPv6 connect from an enrolled workload, which the mesh does not carry, was
    /// refused (EPERM), so that it cannot go around the mesh; clients fall back to IPv4.
    OutboundIpv6Refused = 8,
    /// sock_ops removed a TUPLE_DST entry when its socket closed: one the proxy never took
    /// (it refused the connection, or no proxy was there to accept it).
    TupleRemoved = 9,
    /// An inbound connection to an enrolled pod was refused because no proxy listener was
    /// there to take it (agent stopped or restarting, enrollment failed).
    InboundRefused = 10,
    /// Inbound IPv6 to an enrolled pod, which the mesh does not capture, was refused.
    InboundIpv6Refused = 11,
    /// Inbound UDP to a STRICT pod was refused.
    InboundUdpRefused = 12,
    /// A connect from a workload that could not be enrolled was refused.
    OutboundRefused = 13,
}

impl Stat {
    /// Number of slots in `STATS`.
    pub const COUNT: u32 = 14;

    /// Every slot, in index order.
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::OutboundRedirected,
        Stat::OutboundBypassed,
        Stat::ProxySocketSkipped,
        Stat::CookieInsertFailed,
        Stat::TupleRecorded,
        Stat::TupleInsertFailed,
        Stat::InboundSteered,
        Stat::InboundSteerFailed,
        Stat::OutboundIpv6Refused,
        Stat::TupleRemoved,
        Stat::InboundRefused,
        Stat::InboundIpv6Refused,
        Stat::InboundUdpRefused,
        Stat::OutboundRefused,
    ];

    /// A stable snake_case name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::OutboundRedirected => "outbound_redirected",
            Stat::OutboundBypassed => "outbound_bypassed",
            Stat::ProxySocketSkipped => "proxy_socket_skipped",
            Stat::CookieInsertFailed => "cookie_insert_failed",
            Stat::TupleRecorded => "tuple_recorded",
            Stat::TupleInsertFailed => "tuple_insert_failed",
            Stat::InboundSteered => "inbound_steered",
            Stat::InboundSteerFailed => "inbound_steer_failed",
            Stat::OutboundIpv6Refused => "outbound_ipv6_refused",
            Stat::TupleRemoved => "tuple_removed",
            Stat::InboundRefused => "inbound_refused",
            Stat::InboundIpv6Refused => "inbound_ipv6_refused",
            Stat::InboundUdpRefused => "inbound_udp_refused",
            Stat::OutboundRefused => "outbound_refused",
        }
    }

    /// Whether the slot counts a failure of the datapath rather than a normal decision.
    pub const fn is_error(self) -> bool {
        matches!(
            self,
            Stat::CookieInsertFailed | Stat::TupleInsertFailed | Stat::InboundSteerFailed
        )
    }
}

#[cfg(feature = "user")]
mod user {
    #![expect(
        unsafe_code,
        reason = "aya::Pod is an unsafe marker trait for plain-data map types"
    )]
    // SAFETY: each type is #[repr(C)], Copy, made only of integers, with no padding (checked by
    // the size assertions below), so any byte pattern of the right length is a valid value.
    unsafe impl aya::Pod for super::EnrolledPod {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OriginalDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnTuple {}
}

// No implicit padding: the kernel compares keys byte for byte.
const _: () = assert!(core::mem::size_of::<EnrolledPod>() == 8);
const _: () = assert!(core::mem::size_of::<OriginalDst>() == 8);
const _: () = assert!(core::mem::size_of::<ConnTuple>() == 12);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_keys_of_one_pod_differ() {
        let ip = u32::from_ne_bytes([10, 88, 1, 2]);
        assert_ne!(
            listener_key(ip, Listener::Inbound),
            listener_key(ip, Listener::Hbone)
        );
        assert_eq!(listener_key(ip, Listener::Inbound) as u32, ip);
    }

    #[test]
    fn stat_slots_are_dense_and_named_uniquely() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as u32, i as u32);
            for other in &Stat::ALL[i + 1..] {
                assert_ne!(stat.name(), other.name());
            }
        }
    }
}
