//! HBONE connections, pooled: one HTTP/2 connection per (source workload, destination
//! identity, destination address, worker), shared by every tunnel between them opened on that
//! worker (so a tunnel and its connection never wait on another thread, and a busy pair uses
//! as many connections as there are workers), and replaced once the
//! source's certificate has been renewed, so that no pooled connection outlives the
//! certificate it was opened with (its open tunnels finish on it).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
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
    /// The proxy worker whose tunnels it carries.
    pub worker: usize,
}

/// The pooled sender and the start of validity of the certificate it was opened with.
type Slot = Arc<tokio::sync::Mutex<Option<(HboneSender, SystemTime)>>>;

#[derive(Debug, Default)]
pub struct HbonePool {
    slots: Mutex<HashMap<PoolKey, Slot>>,
}

impl HbonePool {
    /// A sender on the pooled connection for `key`, made with `connect` when there is none, it
    /// has closed, or it was opened with another certificate than the one valid from
    /// `certificate`. Concurrent callers wait for one connect instead of each making their own.
    pub async fn sender<F, Fut>(
        &self,
        key: PoolKey,
        certificate: SystemTime,
        connect: F,
    ) -> Result<HboneSender, ProxyError>
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
        if let Some((sender, _)) = pooled
            .as_ref()
            .filter(|(s, opened_with)| !s.is_closed() && *opened_with == certificate)
        {
            return Ok(sender.clone());
        }
        let sender = connect().await?;
        *pooled = Some((sender.clone(), certificate));
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

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::{Duration, UNIX_EPOCH},
    };

    use super::*;

    /// An HBONE connection over memory, to a server that refuses every CONNECT.
    async fn connection() -> Result<HboneSender, ProxyError> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let settings = nodemesh_hbone::ServerSettings::default();
            nodemesh_hbone::serve(server, &settings, std::future::pending(), |_| async {
                nodemesh_hbone::status(http::StatusCode::SERVICE_UNAVAILABLE)
            })
            .await
        });
        let settings = nodemesh_hbone::ClientSettings::default();
        Ok(nodemesh_hbone::handshake(client, &settings).await?)
    }

    fn key() -> PoolKey {
        PoolKey {
            source: "shop/web".into(),
            destination_identity: "spiffe://cluster.local/ns/shop/sa/api"
                .parse()
                .expect("SPIFFE ID"),
            destination: "10.0.0.2:15008".parse().expect("address"),
            worker: 0,
        }
    }

    #[tokio::test]
    async fn a_renewed_certificate_gets_a_new_connection_the_same_one_is_reused() {
        let pool = HbonePool::default();
        let made = AtomicUsize::new(0);
        let connect = || {
            made.fetch_add(1, Ordering::Relaxed);
            connection()
        };
        let first = UNIX_EPOCH + Duration::from_secs(1_000);
        let renewed = first + Duration::from_secs(600);
        pool.sender(key(), first, connect).await.expect("connect");
        pool.sender(key(), first, connect).await.expect("pooled");
        assert_eq!(
            made.load(Ordering::Relaxed),
            1,
            "one connection per certificate"
        );
        pool.sender(key(), renewed, connect).await.expect("connect");
        assert_eq!(
            made.load(Ordering::Relaxed),
            2,
            "a connection opened with the old certificate is not handed out again"
        );
    }

    #[tokio::test]
    async fn each_worker_has_its_own_connection_to_a_destination() {
        let pool = HbonePool::default();
        let made = AtomicUsize::new(0);
        let connect = || {
            made.fetch_add(1, Ordering::Relaxed);
            connection()
        };
        let certificate = UNIX_EPOCH + Duration::from_secs(1_000);
        let on = |worker| PoolKey { worker, ..key() };
        for worker in [0, 1, 0, 1] {
            pool.sender(on(worker), certificate, connect)
                .await
                .expect("connect");
        }
        assert_eq!(made.load(Ordering::Relaxed), 2, "one connection per worker");
        pool.forget_source("shop/web");
        pool.sender(on(1), certificate, connect)
            .await
            .expect("connect");
        assert_eq!(
            made.load(Ordering::Relaxed),
            3,
            "a source's connections are forgotten on every worker"
        );
    }
}
