//! The accept loop of a pod's listeners.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use nodemesh_admin::accept;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::{
    PodContext, ProxyShared,
    admission::{Admitted, Refusal},
    spread::{Placed, move_to},
};
use crate::workers;

/// Which worker serves a connection a listener accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The accepting one: the kernel spreads the application's connections.
    Accepting,
    /// The one serving the fewest HBONE connections (see `spread`).
    FewestHbone,
}

/// Serves one of a pod's listeners on the runtime running it (a worker's) until the pod is
/// released or the agent drains, running `handle` for each accepted connection in its own task
/// on the worker `placement` gives. Releasing the pod also ends those tasks, closing their
/// sockets; draining leaves them to finish.
pub async fn serve<F, Fut>(
    listener: std::net::TcpListener,
    pod: Arc<PodContext>,
    shared: Arc<ProxyShared>,
    placement: Placement,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<PodContext>, Arc<ProxyShared>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(workload = %pod.key, error = %e, "cannot serve a listener of the pod");
            return;
        }
    };
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
        let placed = match placement {
            Placement::Accepting => None,
            Placement::FewestHbone => Some(shared.spread.place(workers::current())),
        };
        match placed {
            Some(placed) if placed.worker != workers::current() => {
                let to = shared.workers[placed.worker].clone();
                let (pod, shared, handle) = (pod.clone(), shared.clone(), handle.clone());
                let moved = move_to(stream, &to, move |stream| {
                    let task = handle(stream, peer, pod.clone(), shared);
                    until_released(&pod, task, Some(admitted)).placed(Some(placed))
                });
                if let Err(e) = moved {
                    tracing::warn!(%peer, error = %e, "cannot move a connection to another worker");
                }
            }
            placed => {
                let task = handle(stream, peer, pod.clone(), shared.clone());
                tokio::spawn(until_released(&pod, task, Some(admitted)).placed(placed));
            }
        }
    }
}

/// `task`, ended when the pod is released; `admitted` holds its place under the caps while it
/// runs.
pub(super) fn until_released<F>(
    pod: &PodContext,
    task: F,
    admitted: Option<Admitted>,
) -> UntilReleased<F> {
    UntilReleased {
        released: pod.cancel.clone().cancelled_owned(),
        task,
        _admitted: admitted,
        _placed: None,
    }
}

pin_project_lite::pin_project! {
    /// A connection's task. A plain struct, so the handler's state is stored once: nesting it
    /// in `async` blocks or functions stores a copy per level (14 KiB instead of 2 KiB per
    /// connection, measured).
    pub(super) struct UntilReleased<F> {
        #[pin]
        released: WaitForCancellationFutureOwned,
        #[pin]
        task: F,
        _admitted: Option<Admitted>,
        _placed: Option<Placed>,
    }
}

impl<F> UntilReleased<F> {
    /// Counted on its worker while it runs, when `placed`.
    fn placed(mut self, placed: Option<Placed>) -> Self {
        self._placed = placed;
        self
    }
}

impl<F: Future<Output = ()>> Future for UntilReleased<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.released.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.task.poll(cx)
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
