//! The proxy's side of TUPLE_DST: where a captured connection was going.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use aya::maps::{HashMap, MapData};
use nodemesh_ebpf_abi::{ConnTuple, OriginalDst};

use super::take;

/// The proxy's side of TUPLE_DST: where a captured connection was going. The proxy takes
/// (reads and removes) an entry once it has accepted the connection, so the map holds only
/// connections between `connect()` and the proxy's `accept()`.
#[derive(Clone)]
pub struct OriginalDstTable {
    map: Arc<HashMap<MapData, ConnTuple, OriginalDst>>,
    /// Entries taken, for the map's occupancy in the metrics.
    taken: Arc<AtomicU64>,
    /// Set once the kernel has refused to remove entries on reading (before 5.14).
    read_only: Arc<AtomicBool>,
}

impl OriginalDstTable {
    pub(super) fn new(
        map: HashMap<MapData, ConnTuple, OriginalDst>,
        taken: Arc<AtomicU64>,
    ) -> Self {
        Self {
            map: Arc::new(map),
            taken,
            read_only: Arc::default(),
        }
    }

    /// The original destination of the connection the proxy accepted from `client` on its
    /// outbound listener `listener`, removed from the map. A kernel that cannot remove hash
    /// entries on reading (before 5.14) has it read only: sock_ops removes it when the
    /// connection closes.
    pub fn take(&self, client: SocketAddr, listener: SocketAddr) -> Option<SocketAddrV4> {
        let (SocketAddr::V4(client), SocketAddr::V4(listener)) = (client, listener) else {
            return None;
        };
        let key = ConnTuple {
            src_ip4: u32::from_ne_bytes(client.ip().octets()),
            dst_ip4: u32::from_ne_bytes(listener.ip().octets()),
            src_port: client.port(),
            dst_port: listener.port(),
        };
        let taken = if self.read_only.load(Ordering::Relaxed) {
            None
        } else {
            match take::lookup_and_delete(&self.map, &key) {
                Ok(found) => Some(found?),
                Err(e) => {
                    tracing::info!(
                        error = %e,
                        "this kernel cannot remove TUPLE_DST entries on reading them: the proxy \
                         reads them, and sock_ops removes each when its connection closes"
                    );
                    self.read_only.store(true, Ordering::Relaxed);
                    None
                }
            }
        };
        let dst = match taken {
            Some(dst) => {
                self.taken.fetch_add(1, Ordering::Relaxed);
                dst
            }
            None => self.map.get(&key, 0).ok()?,
        };
        Some(SocketAddrV4::new(
            Ipv4Addr::from(dst.ip4.to_ne_bytes()),
            dst.port,
        ))
    }
}
