//! The accept loop of a pod's listeners.

use std::{future::Future, net::SocketAddr, sync::Arc};

use nodemesh_admin::accept;
use tokio::net::{TcpListener, TcpStream};

use super::{PodContext, ProxyShared, admission::Refusal};

/// Serves one of a pod's listeners on the runtime running it (a worker's) until the pod is
/// released or the agent drains, running `handle` for each accepted connection in its own task
/// on the same runtime. Releasing the pod also ends those tasks, closing their sockets;
/// draining leaves them to finish.
pub async fn serve<F, Fut>(
    listener: std::net::TcpListener,
    pod: Arc<PodContext>,
    shared: Arc<ProxyShared>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<PodContext>, Arc<ProxyShared>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(workload = %pod.key, error = %e, "cannot serve a listener of the pod");
            return;
        }
    };
    let token = pod.cancel.clone();
    let stop = pod.stop_accepting.clone();
    while let Some((stream, peer)) = accept(&listener, &stop, &pod.key).await {
        let admitted = match shared.admission.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                refused(&shared, &pod, peer, refusal);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let task = handle(stream, peer, pod.clone(), shared.clone());
        tokio::spawn(token.clone().run_until_cancelled_owned(async move {
            let _admitted = admitted;
            task.await;
        }));
    }
}

/// Counts a connection closed for being over a cap (dropping it closes it) and says so,
/// without a line per connection when a flood keeps hitting it.
fn refused(shared: &ProxyShared, pod: &PodContext, peer: SocketAddr, refusal: Refusal) {
    let counter = shared
        .state
        .metrics
        .connections_refused
        .with_label_values(&[refusal.as_str()]);
    if counter.get().is_multiple_of(1000) {
        tracing::warn!(
            workload = %pod.key,
            %peer,
            reason = refusal.as_str(),
            refused_so_far = counter.get() + 1,
            "connection refused: over the cap on open connections"
        );
    }
    counter.inc();
}
