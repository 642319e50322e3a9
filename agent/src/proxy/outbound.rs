//! Outbound: a connection the capture redirected to the pod's outbound listener. To an
//! enrolled workload it travels in an HBONE tunnel; to anything else as plain TCP, unless the
//! mesh denies egress. To a Service address, it goes to an endpoint the Service's balancer
//! picks, within its connection limit; on a port that reads HTTP (an HTTPRoute attaches, or
//! appProtocol says so), each request is routed on its own by the HTTP stack.

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use nodemesh_config::EgressPolicy;
use nodemesh_hbone::{HboneSender, Tunnel};
use nodemesh_identity::SpiffeId;
use nodemesh_traffic::{outlier::Outcome, policy::BudgetSettings};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use self::first_bytes::FirstBytes;
use super::{
    CONNECT_TIMEOUT, ConnectionTracker, Direction, PodContext, ProxyError, ProxyShared,
    connect_from_pod,
    destination::Delivery,
    http::{
        self,
        balance::{self, PickInput},
        counted::Counted,
        detect::{Protocol, detect},
        outbound::OutboundConnection,
        state::ClientState,
    },
    local,
    pool::PoolKey,
    splice, splice_tunnel,
};
use crate::mesh::{Destination, MeshView};

mod first_bytes;

/// Handles one connection accepted on the pod's outbound listener.
pub async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    shared: Arc<ProxyShared>,
) {
    let shared = &shared;
    pod.counters.outbound.fetch_add(1, Ordering::Relaxed);
    let listener = match client.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::debug!(error = %e, "outbound connection gone before it was handled");
            return;
        }
    };
    let Some(dst) = shared.original_dst.take(peer, listener) else {
        ConnectionTracker::start(shared, &pod, Direction::Outbound, peer, listener)
            .finish(Err(ProxyError::NoOriginalDst { client: peer }));
        return;
    };
    let mesh = shared.mesh.load();
    let original = SocketAddr::V4(dst);
    let mut tracker = ConnectionTracker::start(shared, &pod, Direction::Outbound, peer, original);
    if let Some(service) = mesh.service_port(dst) {
        tracker.record.destination_service = Some(service.service.key.clone());
        // Boxed: the HTTP stack's state is large, and plain TCP to a pod should not carry it
        // in every connection's task.
        let result = Box::pin(to_service(
            client,
            peer,
            dst,
            &mesh,
            &pod,
            shared,
            &mut tracker,
        ))
        .await;
        tracker.finish(result);
        return;
    }
    let destination = mesh.workload(*dst.ip()).cloned();
    let result = to_address(
        client,
        original,
        destination,
        &mesh,
        &pod,
        shared,
        &mut tracker,
    )
    .await;
    tracker.finish(result);
}

/// A connection to a workload's own address, or to an address the mesh does not know.
async fn to_address<S>(
    mut client: S,
    target: SocketAddr,
    destination: Option<Arc<Destination>>,
    mesh: &MeshView,
    pod: &PodContext,
    shared: &Arc<ProxyShared>,
    tracker: &mut ConnectionTracker,
) -> Result<(u64, u64), ProxyError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut first = FirstBytes::new(&mut client);
    let upstream = connect(target, destination, mesh, pod, shared, tracker, &mut first).await?;
    let ahead = first.finish();
    let (sent, received) = splice_to(client, upstream, shared).await?;
    Ok((sent + ahead, received))
}

/// Where a connection goes on: a tunnel to an enrolled workload, another pod of this node,
/// or plain TCP.
enum Upstream {
    Tunnel(Tunnel),
    // Boxed: it holds the destination's record.
    Local(Box<Delivery>),
    Tcp(TcpStream),
}

async fn splice_to<S>(
    mut client: S,
    upstream: Upstream,
    shared: &Arc<ProxyShared>,
) -> Result<(u64, u64), ProxyError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let idle = shared.tcp_idle_timeout;
    match upstream {
        Upstream::Tunnel(mut tunnel) => splice_tunnel(&mut client, &mut tunnel, idle).await,
        // Boxed, as the handover itself: tunnels and plain TCP should not carry its state.
        Upstream::Local(delivery) => Box::pin(delivery.carry(client, shared)).await,
        Upstream::Tcp(mut stream) => splice(&mut client, &mut stream, idle).await,
    }
}

/// Connects to `target`: handed over in-process when it is an enrolled workload of this
/// node, in an HBONE tunnel when it is one elsewhere (the client's `first` bytes going ahead
/// of the tunnel's answer), as plain TCP otherwise (unless egress is denied).
async fn connect(
    target: SocketAddr,
    destination: Option<Arc<Destination>>,
    mesh: &MeshView,
    pod: &PodContext,
    shared: &Arc<ProxyShared>,
    tracker: &mut ConnectionTracker,
    first: &mut FirstBytes<'_>,
) -> Result<Upstream, ProxyError> {
    tracker.record.destination_workload = destination.as_ref().map(|d| d.key.clone());
    let identity = destination.and_then(|d| d.identity.clone());
    if let Some(identity) = &identity {
        tracker.record.security = "mtls";
        tracker.record.destination_identity = Some(identity.to_string());
    }
    tracker.open();
    match identity {
        Some(identity) => {
            let local = match target.ip() {
                IpAddr::V4(ip) => shared.local.destination(ip, &identity),
                IpAddr::V6(_) => None,
            };
            if let Some(destination) = local {
                let client = tracker.record.client;
                let accept = local::accept(pod, client, target, destination, shared);
                let delivery = Box::pin(accept).await?;
                return Ok(Upstream::Local(Box::new(delivery)));
            }
            let from = tracker.record.client;
            let service = tracker.record.destination_service.clone();
            let service = service.as_deref();
            let tunnel =
                open_tunnel(pod, shared, target, identity, from, service, Some(first)).await?;
            tracker.record.hbone = Some(SocketAddr::new(target.ip(), shared.hbone_port));
            Ok(Upstream::Tunnel(tunnel))
        }
        None if mesh.egress == EgressPolicy::Deny => Err(ProxyError::EgressDenied { dst: target }),
        None => {
            let upstream = connect_from_pod(pod, shared.mark, target).await?;
            tracker.record.upstream_local = upstream.local_addr().ok();
            Ok(Upstream::Tcp(upstream))
        }
    }
}

/// A connection to a Service address: HTTP routed per request when the port reads HTTP and
/// the client speaks it, else bytes to one endpoint.
async fn to_service(
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddrV4,
    mesh: &Arc<MeshView>,
    pod: &Arc<PodContext>,
    shared: &Arc<ProxyShared>,
    tracker: &mut ConnectionTracker,
) -> Result<(u64, u64), ProxyError> {
    let Some(service) = mesh.service_port(dst) else {
        return Err(ProxyError::NoEndpoint {
            reason: format!("{dst} is no longer a Service address"),
        });
    };
    let Some(port) = service.port else {
        return Err(ProxyError::NoEndpoint {
            reason: format!("Service {} has no port {}", service.service.key, dst.port()),
        });
    };
    if port.reads_http() {
        let (protocol, client) = detect(client).await?;
        if protocol != Protocol::Opaque {
            let labels = tracker.open();
            let (client, counts) = Counted::new(client);
            let connection = OutboundConnection {
                pod: pod.clone(),
                client_ip: peer.ip(),
                service: service.id,
                dst,
                http2_upstream: port.protocol == nodemesh_config::AppProtocol::Http2,
                labels,
            };
            Box::pin(http::outbound::serve(
                client,
                protocol,
                connection,
                shared.http.outbound(),
            ))
            .await?;
            return Ok(counts.get());
        }
        // Not HTTP after all: carried as bytes, with what was read put back.
        return to_endpoint(client, peer, port, mesh, pod, shared, tracker).await;
    }
    to_endpoint(client, peer, port, mesh, pod, shared, tracker).await
}

/// Plain TCP to a Service: one endpoint by the Service's balancer, skipping ejected ones, within
/// `maxConnections`, connected within `connectTimeout`; a failed connect counts toward the
/// endpoint's ejection.
async fn to_endpoint<S>(
    mut client: S,
    peer: SocketAddr,
    port: &nodemesh_traffic::PortEntry,
    mesh: &MeshView,
    pod: &PodContext,
    shared: &Arc<ProxyShared>,
    tracker: &mut ConnectionTracker,
) -> Result<(u64, u64), ProxyError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let target = &port.service_target;
    let traffic = &shared.http.traffic;
    let client_state: Arc<ClientState> =
        traffic.client(&pod.key, &target.state_key, BudgetSettings::default());
    let limits = target.settings.limits;
    let Some(_connection) = client_state.try_hold(|c| &c.connections, limits.max_connections)
    else {
        traffic
            .metrics
            .overflows
            .with_label_values(&[&target.service_key, "max_connections"])
            .inc();
        return Err(ProxyError::Overflow {
            service: target.service_key.clone(),
            limit: "maxConnections",
            value: limits.max_connections,
        });
    };
    let health = traffic.backend(&target.state_key);
    let input = PickInput {
        client_ip: peer.ip(),
        headers: None,
        avoid: &[],
        by_latency: false,
    };
    let Some(endpoint) = balance::pick(mesh, target, &health, input, Instant::now()) else {
        return Err(ProxyError::NoEndpoint {
            reason: format!("Service {} selects no workload", target.service_key),
        });
    };
    let addr = SocketAddr::V4(endpoint.addr);
    // Connections open count as in flight; only connecting says anything of the endpoint.
    let _open = Open(&health, endpoint.addr);
    let mut first = FirstBytes::new(&mut client);
    let connect = tokio::time::timeout(
        target.settings.connect_timeout,
        connect(
            addr,
            endpoint.destination.clone(),
            mesh,
            pod,
            shared,
            tracker,
            &mut first,
        ),
    );
    let upstream = match connect.await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::ConnectTimeout {
            dst: addr,
            timeout: target.settings.connect_timeout,
        }),
    };
    let outcome = match &upstream {
        Ok(_) => Outcome::Answered(200),
        Err(
            ProxyError::Connect { .. }
            | ProxyError::ConnectTimeout { .. }
            | ProxyError::HboneTimeout { .. }
            | ProxyError::Tls { .. }
            | ProxyError::Hbone(_),
        ) => Outcome::LocalFailure,
        Err(_) => Outcome::Answered(200),
    };
    let finished = balance::Finished {
        outcome: Some(outcome),
        latency: None,
        release: false,
    };
    balance::record(traffic, target, &health, endpoint.addr, finished);
    let ahead = first.finish();
    let (sent, received) = splice_to(client, upstream?, shared).await?;
    Ok((sent + ahead, received))
}

/// Gives back the endpoint's count of open connections when the connection ends.
struct Open<'a>(&'a Arc<http::state::BackendHealth>, SocketAddrV4);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        balance::release(self.0, self.1);
    }
}

/// A tunnel from the pod to `dst` (an enrolled workload proving `destination_identity`), on
/// the pooled HBONE connection to it. `client` and `service` go in its `forwarded` header.
pub async fn open_hbone_tunnel(
    pod: &PodContext,
    shared: &Arc<ProxyShared>,
    dst: SocketAddr,
    destination_identity: SpiffeId,
    client: SocketAddr,
    service: Option<&str>,
) -> Result<Tunnel, ProxyError> {
    open_tunnel(
        pod,
        shared,
        dst,
        destination_identity,
        client,
        service,
        None,
    )
    .await
}

/// [`open_hbone_tunnel`], with the client's `first` bytes sent ahead of the answer.
async fn open_tunnel(
    pod: &PodContext,
    shared: &Arc<ProxyShared>,
    dst: SocketAddr,
    destination_identity: SpiffeId,
    client: SocketAddr,
    service: Option<&str>,
    mut first: Option<&mut FirstBytes<'_>>,
) -> Result<Tunnel, ProxyError> {
    let hbone_addr = SocketAddr::new(dst.ip(), shared.hbone_port);
    let key = PoolKey {
        source: pod.key.clone(),
        destination_identity: destination_identity.clone(),
        destination: hbone_addr,
        worker: crate::workers::current(),
    };
    // Checked per connection, so an expired certificate fails closed even on a pooled
    // connection.
    let identity = shared.identities.get(&pod.identity).await?;
    let certificate = identity.cert.not_before();
    // A pooled connection may close (idle, or the peer went away) between the pool handing
    // it out and the CONNECT: then once more, on a new one.
    let mut retried = false;
    loop {
        let mut sender = shared
            .pool
            // Boxed: only a new pooled connection runs the handshakes, and their state should
            // not sit in every connection's task.
            .sender(key.clone(), certificate, || {
                Box::pin(connect_hbone(
                    pod,
                    shared,
                    identity.clone(),
                    destination_identity.clone(),
                    hbone_addr,
                ))
            })
            .await?;
        let headers = super::baggage::connect_headers(pod.baggage.as_ref(), client, service);
        let answer = async {
            let connecting = nodemesh_hbone::connect(&mut sender, dst, headers).await?;
            match first.as_deref_mut() {
                Some(first) => first.ahead_of(connecting).await,
                None => Ok(connecting.await?),
            }
        };
        return match tokio::time::timeout(HBONE_STEP_TIMEOUT, answer).await {
            Ok(Err(ProxyError::Hbone(nodemesh_hbone::HboneError::Closed))) if !retried => {
                retried = true;
                continue;
            }
            Ok(tunnel) => tunnel,
            Err(_) => Err(ProxyError::HboneTimeout {
                dst: hbone_addr,
                timeout: HBONE_STEP_TIMEOUT,
            }),
        };
    }
}

/// How long the TLS and HTTP/2 handshakes of a new HBONE connection, and the answer to a
/// CONNECT, may take: a peer that accepts TCP and then says nothing must not hold the pool
/// slot, and every connection waiting on it, for ever.
const HBONE_STEP_TIMEOUT: Duration = Duration::from_secs(10);

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
    let handshakes = async {
        let tls = TlsConnector::from(config)
            .connect(name, super::read_ahead::ReadAhead::new(tcp))
            .await
            .map_err(|source| ProxyError::Tls {
                peer: hbone_addr,
                source,
            })?;
        let settings = nodemesh_hbone::ClientSettings::default();
        Ok(nodemesh_hbone::handshake(tls, &settings).await?)
    };
    tokio::time::timeout(HBONE_STEP_TIMEOUT, handshakes)
        .await
        .unwrap_or(Err(ProxyError::HboneTimeout {
            dst: hbone_addr,
            timeout: HBONE_STEP_TIMEOUT,
        }))
}
