//! Inbound plaintext: a connection sk_lookup steered to the pod's :15006, from a client
//! outside the mesh. Accepted unless the pod's mTLS mode is STRICT; the accepted socket's
//! local address is where the client was connecting to.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    ConnectionTracker, Direction, PodContext, ProxyError, ProxyShared, connect_to_app,
    listener::accept_loop, splice,
};

/// Serves one pod's inbound plaintext listener until `token` is cancelled.
pub async fn serve_inbound(
    listener: TcpListener,
    pod: Arc<PodContext>,
    shared: Arc<ProxyShared>,
    token: CancellationToken,
) {
    accept_loop(listener, token, move |client, peer| {
        let pod = pod.clone();
        let shared = shared.clone();
        async move { proxy(client, peer, &pod, &shared).await }
    })
    .await;
}

async fn proxy(
    mut client: TcpStream,
    peer: SocketAddr,
    pod: &PodContext,
    shared: &Arc<ProxyShared>,
) {
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
