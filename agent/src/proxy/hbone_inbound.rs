//! Inbound HBONE: the pod's :15008. A client must finish its TLS handshake in time and present
//! a certificate chaining to the trust bundle, of one of the mesh's trust domains; its SPIFFE
//! identity is kept with the connection. Each CONNECT stream for an address of this pod becomes
//! a connection to the application, from the client's address.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Empty;
use nodemesh_hbone::{ConnectRequest, status};
use nodemesh_identity::{SpiffeId, tls};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{
    ConnectionTracker, Direction, PodContext, ProxyError, ProxyShared, destination,
    listener::until_released,
};

/// How long a client may take to finish the TLS handshake: a silent one must not hold a task
/// and a descriptor for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handles one connection accepted on the pod's HBONE listener: mTLS, then HTTP/2 until the
/// client closes it.
pub async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    shared: Arc<ProxyShared>,
) {
    let identity = match shared.identities.get(&pod.identity).await {
        Ok(identity) => identity,
        Err(e) => {
            refused(&shared, &pod, peer, ProxyError::Identity(e));
            return;
        }
    };
    let accept = TlsAcceptor::from(identity.server_config.clone())
        .accept(super::read_ahead::ReadAhead::new(stream));
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(source)) => {
            refused(&shared, &pod, peer, ProxyError::Tls { peer, source });
            return;
        }
        Err(_) => {
            let source = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}"),
            );
            refused(&shared, &pod, peer, ProxyError::Tls { peer, source });
            return;
        }
    };
    let Some(client_identity) = tls::peer_identity(tls.get_ref().1.peer_certificates()) else {
        let source = std::io::Error::other("the client certificate carries no SPIFFE ID");
        refused(&shared, &pod, peer, ProxyError::Tls { peer, source });
        return;
    };
    // The bundle may hold other meshes' roots; only the mesh's own trust domains get in.
    let mesh = shared.mesh.load();
    if !mesh.trust_domains.contains(client_identity.trust_domain()) {
        let error = ProxyError::ForeignTrustDomain {
            peer,
            identity: client_identity.to_string(),
            trusted: mesh.trust_domains.iter().collect::<Vec<_>>().join(", "),
        };
        refused(&shared, &pod, peer, error);
        return;
    }
    drop(mesh);
    let stop_accepting = pod.stop_accepting.clone();
    let handle = move |connect: ConnectRequest| {
        let (pod, shared, client_identity) = (pod.clone(), shared.clone(), client_identity.clone());
        async move { open(connect, peer, client_identity, pod, shared).await }
    };
    // Draining (the agent stopping): a GOAWAY, so the client opens its next tunnels
    // elsewhere while the open ones finish.
    let shutdown = stop_accepting.cancelled_owned();
    let settings = nodemesh_hbone::ServerSettings::default();
    // Boxed: the HTTP/2 server's state is large, and a connection still in its handshake
    // (a silent client, say) should not carry it.
    let serve = Box::pin(nodemesh_hbone::serve(tls, &settings, shutdown, handle));
    if let Err(e) = serve.await {
        tracing::debug!(%peer, error = %e, "HBONE connection ended");
    }
}

/// Records a connection refused before any tunnel: TLS failures, a missing certificate.
fn refused(shared: &Arc<ProxyShared>, pod: &PodContext, peer: SocketAddr, error: ProxyError) {
    let local = SocketAddr::from((pod.ip, shared.hbone_port));
    let mut tracker = ConnectionTracker::start(shared, pod, Direction::Inbound, peer, local);
    tracker.record.security = "mtls";
    tracker.finish(Err(error));
}

/// Answers one CONNECT stream: connect to the application first, so that a failure is a 503
/// to the client rather than a tunnel that closes at once.
async fn open(
    connect: ConnectRequest,
    peer: SocketAddr,
    client_identity: SpiffeId,
    pod: Arc<PodContext>,
    shared: Arc<ProxyShared>,
) -> Response<Empty<Bytes>> {
    let dst = connect.authority;
    if dst.ip() != pod.ip || dst.port() == shared.hbone_port {
        tracing::info!(%peer, %dst, workload = %pod.key, "HBONE request for an address that is not this pod's");
        return status(StatusCode::BAD_REQUEST);
    }
    let claimed = || super::baggage::source_workload(connect.headers());
    let accepted = destination::accept(pod.clone(), &shared, peer, dst, &client_identity, claimed);
    let delivery = match accepted.await {
        Ok(delivery) => delivery,
        Err(ProxyError::Denied { .. }) => return status(StatusCode::FORBIDDEN),
        Err(_) => return status(StatusCode::SERVICE_UNAVAILABLE),
    };
    let (response, tunnel) = connect.accept();
    // Tied to the pod: releasing the workload ends its tunnels too.
    let released = pod.clone();
    let task = async move {
        match tunnel.await {
            Some(tunnel) => drop(delivery.carry(tunnel, &shared).await),
            None => delivery.abandoned(ProxyError::Io(std::io::Error::other(
                "the client closed the stream before it opened",
            ))),
        }
    };
    tokio::spawn(until_released(&released, task, None));
    response
}
