//! HBONE connections, pooled: one HTTP/2 connection per (source workload, destination
//! identity, destination address), shared by every tunnel between them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use nodemesh_hbone::HboneSender;
use nodemesh_identity::SpiffeId;

use super::ProxyError;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// `namespace/name` of the source workload: the connection leaves from its namespace
    /// with its certificate.
    pub source: String,
    pub destination_identity: SpiffeId,
    /// The destination pod's HBONE address.
    pub destination: SocketAddr,
}

type Slot = Arc<tokio::sync::Mutex<Option<HboneSender>>>;

#[derive(Debug, Default)]
pub struct HbonePool {
    slots: Mutex<HashMap<PoolKey, Slot>>,
}

impl HbonePool {
    /// A sender on the pooled connection for `key`, made with `connect` when there is none or
    /// it has closed. Concurrent callers wait for one connect instead of each making their own.
    pub async fn sender<F, Fut>(&self, key: PoolKey, connect: F) -> Result<HboneSender, ProxyError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<HboneSender, ProxyError>>,
    {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let mut pooled = slot.lock().await;
        if let Some(sender) = pooled.as_ref().filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let sender = connect().await?;
        *pooled = Some(sender.clone());
        Ok(sender)
    }

    /// Drops the connections of a source workload that left the mesh.
    pub fn forget_source(&self, source: &str) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| key.source != source);
    }
}
