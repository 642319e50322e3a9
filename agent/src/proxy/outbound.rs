//! Outbound: a connection the capture redirected to the pod's outbound listener is carried to
//! its original destination, from inside the pod's namespace.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    ConnectionTracker, Direction, PodContext, ProxyError, ProxyShared, carry, listener::accept_loop,
};

/// Serves one pod's outbound listener until `token` is cancelled.
pub async fn serve_outbound(
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
    pod.counters.outbound.fetch_add(1, Ordering::Relaxed);
    let listener = match client.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::debug!(error = %e, "outbound connection gone before it was handled");
            return;
        }
    };
    match shared.original_dst.lookup(peer, listener) {
        Some(dst) => {
            carry(
                client,
                peer,
                SocketAddr::V4(dst),
                Direction::Outbound,
                pod,
                shared,
            )
            .await
        }
        None => ConnectionTracker::start(shared, pod, Direction::Outbound, peer, listener)
            .finish(Err(ProxyError::NoOriginalDst { client: peer })),
    }
}
