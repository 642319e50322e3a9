//! nodemesh's eBPF datapath.
//!
//! - `nodemesh_connect4` / `nodemesh_connect6` (cgroup connect hooks on the cgroup2 root):
//!   a TCP connect from an enrolled network namespace is rewritten to the proxy's in-pod
//!   outbound listener, and its original destination kept in `COOKIE_DST` by socket cookie.
//! - `nodemesh_sock_ops` (same cgroup): when that connect sends its SYN, the source port is
//!   known, so the original destination moves to `TUPLE_DST` under the connection's 4-tuple,
//!   which the proxy takes after `accept()`; an entry it never takes is removed when the
//!   socket closes.
//! - `nodemesh_sk_lookup` (attached to each enrolled pod's netns): an inbound TCP connection
//!   to the pod's address is handed to the proxy's in-pod inbound or HBONE listener. The
//!   accepted socket keeps the original destination as its local address, so no map is needed.
//!
//! The agent pins programs, links and maps in bpffs, so capture outlives it. Everything fails
//! closed: with no proxy listener to take it, a captured connection is refused, never passed
//! around the mesh. Each refusal is counted in `STATS`.
#![no_std]
#![no_main]

mod capture;
mod inbound;
mod settings;
mod stats;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // eBPF code cannot unwind; no path reaches here in a verified program.
    loop {}
}

/// The eBPF object must carry a GPL-compatible license to use the socket helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
