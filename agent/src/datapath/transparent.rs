//! The proxy's side of TRANSPARENT: the connects to applications it has in flight, which
//! sk_lookup lets through instead of steering them back to the proxy.

use std::{net::SocketAddrV4, sync::Arc};

use aya::maps::{HashMap, MapData};
use nodemesh_ebpf_abi::ConnTuple;

/// The proxy's transparent connects in flight, which sk_lookup lets through to the
/// application instead of steering them back to the proxy.
#[derive(Clone)]
pub struct TransparentConnects(Arc<std::sync::Mutex<HashMap<MapData, ConnTuple, u32>>>);

impl TransparentConnects {
    pub(super) fn new(map: HashMap<MapData, ConnTuple, u32>) -> Self {
        Self(Arc::new(std::sync::Mutex::new(map)))
    }

    /// Lets the connection from `local` (the client's address, already bound) to `dst` reach
    /// the application until the returned guard is dropped.
    pub fn allow(
        &self,
        local: SocketAddrV4,
        dst: SocketAddrV4,
    ) -> Result<TransparentGuard, aya::maps::MapError> {
        let key = ConnTuple {
            src_ip4: u32::from_ne_bytes(local.ip().octets()),
            dst_ip4: u32::from_ne_bytes(dst.ip().octets()),
            src_port: local.port(),
            dst_port: dst.port(),
        };
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, 1, 0)?;
        Ok(TransparentGuard {
            map: self.clone(),
            key,
        })
    }
}

/// Removes its TRANSPARENT entry when dropped: once connected, or when the connect failed.
pub struct TransparentGuard {
    map: TransparentConnects,
    key: ConnTuple,
}

impl Drop for TransparentGuard {
    fn drop(&mut self) {
        let _ = self
            .map
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}
