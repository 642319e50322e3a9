//! Inbound: a connection sk_lookup steered to the pod's inbound listener is carried to the
//! application inside the pod. The accepted socket's local address is where the client was
//! connecting to, so no lookup is needed.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{Direction, PodContext, ProxyShared, carry, listener::accept_loop};

/// Serves one pod's inbound listener until `token` is cancelled.
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

async fn proxy(client: TcpStream, peer: SocketAddr, pod: &PodContext, shared: &ProxyShared) {
    pod.counters.inbound.fetch_add(1, Ordering::Relaxed);
    match client.local_addr() {
        Ok(dst) => carry(client, peer, dst, Direction::Inbound, pod, shared).await,
        Err(e) => tracing::debug!(error = %e, "inbound connection gone before it was handled"),
    }
}
