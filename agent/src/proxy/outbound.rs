//! Outbound: a connection the capture redirected to the pod's outbound listener. To an
//! enrolled workload it travels in an HBONE tunnel; to anything else as plain TCP, unless the
//! mesh denies egress. To a Service address, it goes to an endpoint the Service's balancer
//! picks, within its connection limit; on a port that reads HTTP (an HTTPRoute attaches, or
//! appProtocol says so), each request is routed on its own by the HTTP stack.

use std::{
    future::Future as _,
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::Poll,
    time::{Duration, Instant},
};

use bytes::Bytes;
use nodemesh_config::EgressPolicy;
use nodemesh_hbone::{Connecting, HboneSender, Tunnel};
use nodemesh_identity::SpiffeId;
use nodemesh_traffic::{outlier::Outcome, policy::BudgetSettings};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

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
    let Some(dst) = shared.original_dst.lookup(peer, listener) else {
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

/// Most of the client's first bytes that go ahead of a tunnel's answer: a request's head, a TLS
/// ClientHello. The rest follows the answer.
const FIRST_BYTES: usize = 16 * 1024;

/// The client's first bytes, sent on a new tunnel ahead of the CONNECT's answer, so that a
/// client that speaks first (HTTP, TLS) waits no round trip more than without the mesh: the
/// destination's proxy reads them once it has connected to the application.
struct FirstBytes<'a> {
    client: &'a mut (dyn AsyncRead + Send + Unpin + 'a),
    /// What was read and sent; kept to send again when the CONNECT has to go on another
    /// connection (one that closed before its server looked at the stream).
    sent: Bytes,
}

impl<'a> FirstBytes<'a> {
    fn new(client: &'a mut (dyn AsyncRead + Send + Unpin + 'a)) -> Self {
        Self {
            client,
            sent: Bytes::new(),
        }
    }

    /// How many bytes of the client went ahead of the answer; they are let go, not held for
    /// the connection's life.
    fn finish(self) -> u64 {
        self.sent.len() as u64
    }

    /// Waits for the answer to `connecting`, sending ahead of it the client's first bytes if
    /// they come first (or those already sent once, on a connection that refused the stream).
    async fn ahead_of(&mut self, mut connecting: Connecting) -> Result<Tunnel, ProxyError> {
        if !self.sent.is_empty() {
            connecting.send_early(self.sent.clone())?;
            return Ok(connecting.await?);
        }
        let mut reading = true;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(answer) = Pin::new(&mut connecting).poll(cx) {
                return Poll::Ready(answer.map_err(ProxyError::from));
            }
            if reading {
                let mut buffer = [MaybeUninit::uninit(); FIRST_BYTES];
                let mut read = ReadBuf::uninit(&mut buffer);
                match Pin::new(&mut *self.client).poll_read(cx, &mut read) {
                    Poll::Pending => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(ProxyError::Io(e))),
                    Poll::Ready(Ok(())) => {
                        reading = false;
                        if !read.filled().is_empty() {
                            self.sent = Bytes::copy_from_slice(read.filled());
                            if let Err(e) = connecting.send_early(self.sent.clone()) {
                                return Poll::Ready(Err(e.into()));
                            }
                        }
                    }
                }
            }
            Poll::Pending
        })
        .await
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nodemesh_hbone::{ClientSettings, ConnectRequest, HboneSender, ServerSettings};
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        sync::mpsc,
    };

    use super::*;

    /// An HBONE connection in memory whose server answers each CONNECT only when the test
    /// says so, and hands the test the server's end of each tunnel.
    async fn held_hbone() -> (
        HboneSender,
        mpsc::UnboundedSender<()>,
        mpsc::UnboundedReceiver<Tunnel>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (go, go_rx) = mpsc::unbounded_channel::<()>();
        let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
        let (ends, far_ends) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let handle = move |connect: ConnectRequest| {
                let (go_rx, ends) = (go_rx.clone(), ends.clone());
                async move {
                    let _ = go_rx.lock().await.recv().await;
                    let (response, tunnel) = connect.accept();
                    tokio::spawn(async move {
                        if let Some(tunnel) = tunnel.await {
                            let _ = ends.send(tunnel);
                        }
                    });
                    response
                }
            };
            let settings = ServerSettings::default();
            nodemesh_hbone::serve(server_io, &settings, std::future::pending(), handle).await
        });
        let sender = nodemesh_hbone::handshake(client_io, &ClientSettings::default())
            .await
            .expect("HTTP/2");
        (sender, go, far_ends)
    }

    async fn connecting(sender: &mut HboneSender) -> Connecting {
        let dst = "10.0.0.2:9000".parse().expect("address");
        nodemesh_hbone::connect(sender, dst, ::http::HeaderMap::new())
            .await
            .expect("CONNECT sent")
    }

    /// Reads what the far end has received, up to `len` bytes.
    async fn received(far: &mut Tunnel, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        tokio::time::timeout(Duration::from_secs(10), far.read_exact(&mut bytes))
            .await
            .expect("received in time")
            .expect("read");
        bytes
    }

    #[tokio::test]
    async fn a_clients_first_bytes_go_ahead_of_the_answer_and_the_rest_follows() {
        let (mut sender, go, mut far_ends) = held_hbone().await;
        let (mut app, mut socket) = tokio::io::duplex(64 * 1024);
        app.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        let mut first = FirstBytes::new(&mut socket);
        let connecting = connecting(&mut sender).await;
        let answer = tokio::time::timeout(Duration::from_secs(10), first.ahead_of(connecting));
        // The server answers only a while after the bytes could have been taken.
        let answer_later = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            go.send(()).expect("server");
        };
        let (tunnel, ()) = tokio::join!(answer, answer_later);
        let mut tunnel = tunnel.expect("answered").expect("tunnel");
        assert_eq!(&first.sent[..], b"GET / HTTP/1.1\r\n");
        drop(first);
        app.write_all(b"\r\n").await.expect("write");
        let mut rest = [0; 2];
        socket.read_exact(&mut rest).await.expect("read");
        tunnel.write_all(&rest).await.expect("forward");
        let mut far = far_ends.recv().await.expect("far end");
        assert_eq!(received(&mut far, 18).await, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_client_that_waits_for_the_server_to_speak_first_gets_its_tunnel() {
        let (mut sender, go, _far_ends) = held_hbone().await;
        let (_app, mut socket) = tokio::io::duplex(64 * 1024);
        let mut first = FirstBytes::new(&mut socket);
        let connecting = connecting(&mut sender).await;
        go.send(()).expect("server");
        tokio::time::timeout(Duration::from_secs(10), first.ahead_of(connecting))
            .await
            .expect("answered without the client speaking")
            .expect("tunnel");
        assert_eq!(first.finish(), 0);
    }

    #[tokio::test]
    async fn on_another_connection_the_bytes_sent_ahead_go_again_and_nothing_more_is_read() {
        let (mut sender, go, mut far_ends) = held_hbone().await;
        let (mut app, mut socket) = tokio::io::duplex(64 * 1024);
        app.write_all(b"later").await.expect("write");
        let mut first = FirstBytes::new(&mut socket);
        // As left by a first attempt whose connection closed before its server answered.
        first.sent = Bytes::from_static(b"first");
        let connecting = connecting(&mut sender).await;
        go.send(()).expect("server");
        tokio::time::timeout(Duration::from_secs(10), first.ahead_of(connecting))
            .await
            .expect("answered")
            .expect("tunnel");
        let mut far = far_ends.recv().await.expect("far end");
        assert_eq!(received(&mut far, 5).await, b"first");
        let mut unread = [0; 5];
        socket.read_exact(&mut unread).await.expect("read");
        assert_eq!(
            &unread, b"later",
            "the client's next bytes stay for the copy"
        );
    }

    #[tokio::test]
    async fn a_client_gone_while_waiting_for_the_answer_fails_the_tunnel() {
        let (mut sender, _go, _far_ends) = held_hbone().await;
        let mut socket = ResetOnRead;
        let mut first = FirstBytes::new(&mut socket);
        let connecting = connecting(&mut sender).await;
        let answer = tokio::time::timeout(Duration::from_secs(10), first.ahead_of(connecting))
            .await
            .expect("failed without waiting for the answer");
        assert!(matches!(answer, Err(ProxyError::Io(_))), "{answer:?}");
    }

    /// A client socket the peer has reset.
    struct ResetOnRead;

    impl AsyncRead for ResetOnRead {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
        }
    }
}
