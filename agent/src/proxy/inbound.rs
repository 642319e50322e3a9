//! Inbound plaintext: a connection sk_lookup steered to the pod's :15006, from a client
//! outside the mesh. Accepted unless the pod's mTLS mode is STRICT; the accepted socket's
//! local address is where the client was connecting to.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use tokio::net::TcpStream;

use super::{
    ConnectionTracker, Direction, PodContext, ProxyError, ProxyShared, connect_to_app, splice,
};

/// Handles one connection accepted on the pod's plaintext inbound listener.
pub async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    shared: Arc<ProxyShared>,
) {
    let (pod, shared) = (&*pod, &shared);
    pod.counters.inbound.fetch_add(1, Ordering::Relaxed);
    let dst = match client.local_addr() {
        Ok(dst) => dst,
        Err(e) => {
            tracing::debug!(error = %e, "inbound connection gone before it was handled");
            return;
        }
    };
    let mut tracker = ConnectionTracker::start(shared, pod, Direction::Inbound, peer, dst);
    let mtls = pod.mtls();
    let result = if mtls.mode.accepts_plaintext() {
        async {
            let mut upstream = connect_to_app(pod, shared, peer, dst).await?;
            tracker.record.upstream_local = upstream.local_addr().ok();
            splice(&mut client, &mut upstream).await
        }
        .await
    } else {
        Err(ProxyError::PlaintextRefused {
            policy: mtls.policy.unwrap_or_else(|| "mesh default".to_owned()),
        })
    };
    tracker.finish(result);
}
