//! The accept loop of a pod's listeners.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use super::{PodContext, ProxyShared};

/// Pause after an accept error (out of file descriptors, say) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serves one of a pod's listeners until the pod is released, running `handle` for each
/// accepted connection in its own task. Releasing the pod also ends those tasks, closing
/// their sockets.
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
    loop {
        let accepted = tokio::select! {
            biased;
            () = token.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let task = handle(stream, peer, pod.clone(), shared.clone());
                tokio::spawn(token.clone().run_until_cancelled_owned(task));
            }
            Err(e) => {
                tracing::warn!(error = %e, workload = %pod.key, "accept failed");
                if token
                    .run_until_cancelled(tokio::time::sleep(ACCEPT_ERROR_PAUSE))
                    .await
                    .is_none()
                {
                    return;
                }
            }
        }
    }
}
