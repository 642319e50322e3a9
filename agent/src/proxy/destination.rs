//! The destination's side of a connection from a mesh client, wherever it arrives from (a
//! CONNECT in an HBONE tunnel, or a pod of this node handed over in-process): record it with
//! the client's identity, authorize it, connect to the application, then carry it.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use nodemesh_identity::SpiffeId;
use nodemesh_policy::Peer;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{
    ConnectionTracker, Direction, PodContext, ProxyError, ProxyShared, authz, connect_to_app,
    deliver,
};
use crate::telemetry::Labels;

/// A connection accepted at the destination and connected to its application.
pub(super) struct Delivery {
    pod: Arc<PodContext>,
    tracker: ConnectionTracker,
    upstream: TcpStream,
    peer: Peer,
    dst: SocketAddr,
    labels: Arc<Labels>,
}

/// A connection from `client`, proving `identity`, to `dst` in `pod`: recorded, authorized
/// and connected to the application from the client's address. `claimed_workload` names a
/// client the mesh does not know (another mesh's, say). A refusal is recorded here and
/// returned for the caller to answer or record on its side.
pub(super) async fn accept(
    pod: Arc<PodContext>,
    shared: &Arc<ProxyShared>,
    client: SocketAddr,
    dst: SocketAddr,
    identity: &SpiffeId,
    claimed_workload: impl FnOnce() -> Option<String>,
) -> Result<Delivery, ProxyError> {
    pod.counters.inbound.fetch_add(1, Ordering::Relaxed);
    let mut tracker = ConnectionTracker::start(shared, &pod, Direction::Inbound, client, dst);
    if tracker.record.source_workload.is_none() {
        tracker.record.source_workload = claimed_workload();
    }
    tracker.record.security = "mtls";
    tracker.record.source_identity = Some(identity.to_string());
    let labels = tracker.open();
    let peer = authz::peer(Some(identity), client);
    let connected = match authz::authorize_connection(&pod, shared, &peer, dst) {
        Ok(()) => connect_to_app(&pod, shared, SocketAddr::new(client.ip(), 0), dst).await,
        Err(denied) => Err(denied),
    };
    match connected {
        Ok((upstream, local)) => {
            tracker.record.upstream_local = Some(local);
            Ok(Delivery {
                pod,
                tracker,
                upstream,
                peer,
                dst,
                labels,
            })
        }
        Err(e) => {
            let again = e.again();
            tracker.finish(Err(e));
            Err(again)
        }
    }
}

impl Delivery {
    /// Carries `client` to the application (see `deliver`) until both are done or the
    /// destination is released; finishes the destination's record and returns the result for
    /// the client's side, (bytes from the client, bytes to it).
    pub(super) async fn carry<S>(
        self,
        client: S,
        shared: &Arc<ProxyShared>,
    ) -> Result<(u64, u64), ProxyError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Self {
            pod,
            tracker,
            upstream,
            peer,
            dst,
            labels,
        } = self;
        let released = pod.cancel.clone();
        let result = tokio::select! {
            result = deliver(client, upstream, peer, dst, labels, &pod, shared) => result,
            () = released.cancelled() => Err(ProxyError::Io(std::io::Error::other(
                "the destination workload was released",
            ))),
        };
        let theirs = match &result {
            Ok(counts) => Ok(*counts),
            Err(e) => Err(e.again()),
        };
        tracker.finish(theirs);
        result
    }

    /// The client went away before anything was carried.
    pub(super) fn abandoned(self, error: ProxyError) {
        self.tracker.finish(Err(error));
    }
}
