//! Inbound plaintext: a connection sk_lookup steered to the pod's :15006, from a client
//! outside the mesh. Accepted unless the pod's mTLS mode is STRICT; the accepted socket's
//! local address is where the client was connecting to.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use tokio::net::TcpStream;

use super::{
    ConnectionTracker, Direction, PodContext, ProxyError, ProxyShared, authz, connect_to_app,
    deliver,
};

/// Handles one connection accepted on the pod's plaintext inbound listener.
pub async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    shared: Arc<ProxyShared>,
) {
    let shared = &shared;
    pod.counters.inbound.fetch_add(1, Ordering::Relaxed);
    let dst = match client.local_addr() {
        Ok(dst) => dst,
        Err(e) => {
            tracing::debug!(error = %e, "inbound connection gone before it was handled");
            return;
        }
    };
    let mut tracker = ConnectionTracker::start(shared, &pod, Direction::Inbound, peer, dst);
    let labels = tracker.open();
    let result = async {
        let mtls = pod.mtls();
        let (mode, policy) = mtls.for_port(dst.port());
        if !mode.accepts_plaintext() {
            return Err(ProxyError::PlaintextRefused {
                policy: policy.unwrap_or("mesh default").to_owned(),
            });
        }
        let client_peer = authz::peer(None, peer);
        authz::authorize_connection(&pod, shared, &client_peer, dst)?;
        let (upstream, local) = connect_to_app(&pod, shared, peer, dst).await?;
        tracker.record.upstream_local = Some(local);
        deliver(client, upstream, client_peer, dst, labels, &pod, shared).await
    }
    .await;
    tracker.finish(result);
}
