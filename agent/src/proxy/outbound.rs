//! Outbound: a connection the capture redirected to the pod's outbound listener. To an
//! enrolled workload it travels in an HBONE tunnel; to anything else as plain TCP, unless the
//! mesh denies egress.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
};

use nodemesh_config::EgressPolicy;
use nodemesh_hbone::HboneSender;
use nodemesh_identity::SpiffeId;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::mesh::Route;

use super::{
    CONNECT_TIMEOUT, ConnectionTracker, Direction, PodContext, ProxyError, ProxyShared,
    connect_from_pod, pool::PoolKey, splice,
};

/// Handles one connection accepted on the pod's outbound listener.
pub async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    shared: Arc<ProxyShared>,
) {
    let (pod, shared) = (&*pod, &shared);
    pod.counters.outbound.fetch_add(1, Ordering::Relaxed);
    let listener = match client.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::debug!(error = %e, "outbound connection gone before it was handled");
            return;
        }
    };
    let Some(dst) = shared.original_dst.lookup(peer, listener) else {
        ConnectionTracker::start(shared, pod, Direction::Outbound, peer, listener)
            .finish(Err(ProxyError::NoOriginalDst { client: peer }));
        return;
    };
    let mesh = shared.mesh.load();
    let original = SocketAddr::V4(dst);
    let mut tracker = ConnectionTracker::start(shared, pod, Direction::Outbound, peer, original);
    let (target, destination) = match mesh.route(dst) {
        Route::Direct(destination) => (original, destination),
        Route::Service {
            service,
            endpoint,
            destination,
        } => {
            tracker.record.destination_service = Some(service.to_owned());
            (SocketAddr::V4(endpoint), destination)
        }
        Route::Unavailable { service, reason } => {
            tracker.record.destination_service = Some(service.to_owned());
            tracker.finish(Err(ProxyError::NoEndpoint { reason }));
            return;
        }
    };
    tracker.record.destination_workload = destination.map(|d| d.key.clone());
    let identity = destination.and_then(|d| d.identity.clone());
    if let Some(identity) = &identity {
        tracker.record.security = "mtls";
        tracker.record.destination_identity = Some(identity.to_string());
    }
    tracker.open();
    let result = match identity {
        Some(identity) => through_hbone(client, target, identity, pod, shared, &mut tracker).await,
        None if mesh.egress == EgressPolicy::Deny => Err(ProxyError::EgressDenied { dst: target }),
        None => passthrough(client, target, pod, shared, &mut tracker).await,
    };
    tracker.finish(result);
}

async fn passthrough(
    mut client: TcpStream,
    dst: SocketAddr,
    pod: &PodContext,
    shared: &ProxyShared,
    tracker: &mut ConnectionTracker,
) -> Result<(u64, u64), ProxyError> {
    let mut upstream = connect_from_pod(pod, shared.mark, dst).await?;
    tracker.record.upstream_local = upstream.local_addr().ok();
    splice(&mut client, &mut upstream).await
}

async fn through_hbone(
    mut client: TcpStream,
    dst: SocketAddr,
    destination_identity: SpiffeId,
    pod: &PodContext,
    shared: &Arc<ProxyShared>,
    tracker: &mut ConnectionTracker,
) -> Result<(u64, u64), ProxyError> {
    let hbone_addr = SocketAddr::new(dst.ip(), shared.hbone_port);
    let key = PoolKey {
        source: pod.key.clone(),
        destination_identity: destination_identity.clone(),
        destination: hbone_addr,
    };
    // Checked per connection, so an expired certificate fails closed even on a pooled
    // connection.
    let identity = shared.identities.get(&pod.identity).await?;
    let mut sender = shared
        .pool
        .sender(key, || {
            connect_hbone(pod, shared, identity, destination_identity, hbone_addr)
        })
        .await?;
    let mut tunnel = nodemesh_hbone::open_tunnel(&mut sender, dst).await?;
    tracker.record.hbone = Some(hbone_addr);
    splice(&mut client, &mut tunnel).await
}

/// A new HBONE connection from the pod to a destination pod's :15008, proving the pod's
/// identity and accepting only the expected destination identity.
async fn connect_hbone(
    pod: &PodContext,
    shared: &ProxyShared,
    identity: Arc<crate::identity::Identity>,
    expected: SpiffeId,
    hbone_addr: SocketAddr,
) -> Result<HboneSender, ProxyError> {
    let tcp = connect_from_pod(pod, shared.mark, hbone_addr)
        .await
        .map_err(|e| match e {
            ProxyError::ConnectTimeout { dst, .. } => ProxyError::HboneTimeout {
                dst,
                timeout: CONNECT_TIMEOUT,
            },
            other => other,
        })?;
    let config = identity.client_config(expected)?;
    let name = match hbone_addr.ip() {
        IpAddr::V4(ip) => ServerName::IpAddress(ip.into()),
        IpAddr::V6(ip) => ServerName::IpAddress(ip.into()),
    };
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|source| ProxyError::Tls {
            peer: hbone_addr,
            source,
        })?;
    Ok(nodemesh_hbone::handshake(tls).await?)
}
