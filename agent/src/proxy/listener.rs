//! The accept loop of a pod's listeners.

use std::{future::Future, net::SocketAddr, sync::Arc};

use nodemesh_admin::accept;
use tokio::net::{TcpListener, TcpStream};

use super::{PodContext, ProxyShared};

/// Serves one of a pod's listeners until the pod is released or the agent drains, running
/// `handle` for each accepted connection in its own task. Releasing the pod also ends those
/// tasks, closing their sockets; draining leaves them to finish.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    pod: Arc<PodContext>,
    shared: Arc<ProxyShared>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<PodContext>, Arc<ProxyShared>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let token = pod.cancel.clone();
    let stop = pod.stop_accepting.clone();
    while let Some((stream, peer)) = accept(&listener, &stop, &pod.key).await {
        let _ = stream.set_nodelay(true);
        let task = handle(stream, peer, pod.clone(), shared.clone());
        tokio::spawn(token.clone().run_until_cancelled_owned(task));
    }
}
