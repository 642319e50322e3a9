//! The node proxy: one accept loop per in-pod listener, one task per connection.
//!
//! - `outbound`: a connection the capture redirected to a pod's :15001 goes to an enrolled
//!   destination through an HBONE tunnel (mTLS, both identities checked), or as plain TCP to a
//!   destination outside the mesh (unless egress is denied).
//! - `local`: to an enrolled destination on this node, the outbound side hands the connection
//!   to the destination's inbound side in-process instead of tunnelling to itself.
//! - `hbone_inbound`: :15008 terminates HBONE for the pod, learns the client's identity and
//!   hands each tunnel to the application.
//! - `inbound`: :15006 takes plaintext that sk_lookup steered to the pod, if the pod's
//!   PeerAuthentication allows plaintext.
//!
//! Towards the application the proxy connects from the client's own address, so the
//! application sees who is calling. Plain TCP is a byte copy with half-close carried through.

pub mod admission;
mod authz;
pub mod baggage;
mod copy;
mod destination;
mod error;
mod hbone_inbound;
pub mod http;
mod idle;
mod inbound;
mod listener;
pub(crate) mod local;
mod outbound;
mod pool;
mod read_ahead;
mod sni;
mod spread;
#[cfg(test)]
mod testing;
mod tracker;

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use nodemesh_config::EffectiveMtls;
use nodemesh_identity::SpiffeId;
use nodemesh_policy::{Peer, WorkloadPolicies};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use self::authz::ActiveConnections;
use self::tracker::ConnectionTracker;
pub use self::{
    error::ProxyError,
    listener::{Placement, serve},
    local::LocalPods,
    pool::HbonePool,
    spread::Spread,
};

/// The handler of each in-pod listener, for [`serve`].
pub mod handlers {
    pub use super::{
        hbone_inbound::handle as hbone, inbound::handle as plaintext_inbound,
        outbound::handle as outbound,
    };
}

use crate::{
    datapath::{OriginalDstTable, TransparentConnects},
    identity::IdentityManager,
    inpod,
    mesh::SharedMesh,
    netns::PodNetns,
    state::{AgentState, WorkloadCounters},
    telemetry::Labels,
};

/// How long the proxy waits for an upstream connect before giving up on a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection task shares.
#[derive(Debug)]
pub struct ProxyShared {
    pub original_dst: OriginalDstTable,
    pub transparent: TransparentConnects,
    pub mark: u32,
    pub transparent_mark: u32,
    pub hbone_port: u16,
    /// How long a byte-stream connection may carry nothing before it is closed.
    pub tcp_idle_timeout: Option<Duration>,
    pub state: Arc<AgentState>,
    pub identities: Arc<IdentityManager>,
    pub mesh: Arc<SharedMesh>,
    pub pool: HbonePool,
    /// The runtimes of the proxy's workers: each pod has listeners on every one.
    pub workers: Vec<tokio::runtime::Handle>,
    /// The HBONE connections each worker serves.
    pub spread: Spread,
    /// Caps on open connections, every listener of every pod together.
    pub admission: Arc<admission::Admission>,
    /// The HTTP stack and the traffic state it keeps.
    pub http: http::outbound::HttpStacks,
    /// The enrolled pods, by address: connections between two of them skip the tunnel.
    pub local: LocalPods,
}

impl std::fmt::Debug for OriginalDstTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OriginalDstTable")
    }
}

impl std::fmt::Debug for TransparentConnects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransparentConnects")
    }
}

/// An enrolled pod as its connection tasks need it.
#[derive(Debug)]
pub struct PodContext {
    /// `namespace/name`.
    pub key: String,
    pub ip: std::net::Ipv4Addr,
    pub identity: SpiffeId,
    pub netns: PodNetns,
    pub counters: Arc<WorkloadCounters>,
    /// Whether plaintext is accepted, and which policy says so; follows the configuration.
    pub mtls: RwLock<EffectiveMtls>,
    /// Cancelled when the workload is released: ends its listeners and connections.
    pub cancel: tokio_util::sync::CancellationToken,
    /// A child of `cancel`, cancelled alone when the agent drains: ends the listeners only.
    pub stop_accepting: tokio_util::sync::CancellationToken,
    /// The AuthorizationPolicies that apply to the workload; follow the configuration.
    pub policies: RwLock<Arc<WorkloadPolicies>>,
    /// Byte-stream connections a policy change may have to close.
    pub active: ActiveConnections,
    /// The local rate limits of the Services that select the workload, and their buckets.
    pub rate_limits: Arc<http::PodRateLimits>,
    /// The `baggage` its HBONE CONNECTs carry, made once.
    pub baggage: Option<::http::HeaderValue>,
}

impl PodContext {
    /// A newly enrolled pod: default mTLS mode, no policies or rate limits yet.
    pub fn new(key: String, ip: std::net::Ipv4Addr, identity: SpiffeId, netns: PodNetns) -> Self {
        let cancel = tokio_util::sync::CancellationToken::new();
        Self {
            baggage: baggage::baggage(&key),
            key,
            ip,
            identity,
            netns,
            counters: Default::default(),
            mtls: RwLock::new(default_mtls()),
            policies: RwLock::default(),
            active: Default::default(),
            stop_accepting: cancel.child_token(),
            cancel,
            rate_limits: Default::default(),
        }
    }

    /// A pod in the test process's own namespace.
    #[cfg(test)]
    pub fn for_tests(key: &str, ip: std::net::Ipv4Addr, identity: SpiffeId) -> Self {
        Self::new(key.to_owned(), ip, identity, PodNetns::for_tests())
    }

    pub fn mtls(&self) -> EffectiveMtls {
        self.mtls.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn policies(&self) -> Arc<WorkloadPolicies> {
        self.policies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts new policies in force and closes the connections they no longer allow.
    pub fn set_policies(&self, shared: &ProxyShared, policies: WorkloadPolicies) {
        let policies = Arc::new(policies);
        *self.policies.write().unwrap_or_else(|e| e.into_inner()) = policies.clone();
        let closed = self.active.close_denied(self, shared, &policies);
        if closed > 0 {
            tracing::info!(
                workload = %self.key,
                closed,
                "closed connections the new policies or mTLS mode deny"
            );
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Connects to `dst` from inside the pod's namespace with the proxy mark.
pub(crate) async fn connect_from_pod(
    pod: &PodContext,
    mark: u32,
    dst: SocketAddr,
) -> Result<TcpStream, ProxyError> {
    let socket = inpod::tcp_socket(&pod.netns, dst, mark).map_err(|source| ProxyError::Socket {
        netns: pod.netns.to_string(),
        source,
    })?;
    connect_with_timeout(socket, dst).await
}

/// Connects to the application in the pod at `dst` from `client`'s address; also returns the
/// address it connected from (the port bound before connecting, read once).
async fn connect_to_app(
    pod: &PodContext,
    shared: &ProxyShared,
    client: SocketAddr,
    dst: SocketAddr,
) -> Result<(TcpStream, SocketAddr), ProxyError> {
    let socket_error = |source| ProxyError::Socket {
        netns: pod.netns.to_string(),
        source,
    };
    let socket = inpod::transparent_socket(&pod.netns, client.ip(), shared.transparent_mark)
        .map_err(socket_error)?;
    let (SocketAddr::V4(local), SocketAddr::V4(dst4)) =
        (socket.local_addr().map_err(socket_error)?, dst)
    else {
        return Err(socket_error(io::Error::other(
            "only IPv4 applications are supported",
        )));
    };
    // Until connected, sk_lookup must let this SYN through to the application.
    let _pass = shared
        .transparent
        .allow(local, dst4)
        .map_err(|e| socket_error(io::Error::other(format!("TRANSPARENT map: {e}"))))?;
    let stream = connect_with_timeout(socket, dst).await?;
    Ok((stream, SocketAddr::V4(local)))
}

async fn connect_with_timeout(
    socket: tokio::net::TcpSocket,
    dst: SocketAddr,
) -> Result<TcpStream, ProxyError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ProxyError::Connect { dst, source }),
        Err(_) => Err(ProxyError::ConnectTimeout {
            dst,
            timeout: CONNECT_TIMEOUT,
        }),
    }
}

/// Copies both ways until both sides are done; a FIN from one side is passed on as a
/// half-close to the other. Returns (bytes from the client, bytes to the client). With an
/// `idle` period, a connection that carries nothing either way for one to two periods is
/// closed.
async fn splice<A, B>(
    client: &mut A,
    upstream: &mut B,
    idle: Option<Duration>,
) -> Result<(u64, u64), ProxyError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Some(period) = idle else {
        return Ok(copy::bidirectional(client, upstream).await?);
    };
    let reads = std::sync::atomic::AtomicU64::new(0);
    let mut client = idle::Counted {
        inner: client,
        reads: &reads,
    };
    let mut upstream = idle::Counted {
        inner: upstream,
        reads: &reads,
    };
    let copy = copy::bidirectional(&mut client, &mut upstream);
    tokio::select! {
        result = copy => Ok(result?),
        () = idle::silent_for(&reads, period) => Err(ProxyError::Idle { timeout: period }),
    }
}

/// `splice` between a socket and an HBONE tunnel, moving the tunnel's bytes uncopied.
/// Returns (bytes from the socket, bytes from the tunnel).
async fn splice_tunnel<S>(
    socket: &mut S,
    tunnel: &mut nodemesh_hbone::Tunnel,
    idle: Option<Duration>,
) -> Result<(u64, u64), ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Some(period) = idle else {
        return Ok(copy::with_tunnel(socket, tunnel, None).await?);
    };
    let reads = std::sync::atomic::AtomicU64::new(0);
    let copy = copy::with_tunnel(socket, tunnel, Some(&reads));
    tokio::select! {
        result = copy => Ok(result?),
        () = idle::silent_for(&reads, period) => Err(ProxyError::Idle { timeout: period }),
    }
}

/// Hands an inbound stream to the application over `upstream`: request by request when the
/// pod's policies look at HTTP, otherwise as bytes, closed if a policy change denies it.
async fn deliver<S>(
    mut client: S,
    mut upstream: TcpStream,
    peer: Peer,
    dst: SocketAddr,
    labels: Arc<Labels>,
    pod: &Arc<PodContext>,
    shared: &Arc<ProxyShared>,
) -> Result<(u64, u64), ProxyError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let policies = pod.policies();
    let reads_http =
        policies.needs_http() || shared.mesh.load().reads_http || !pod.rate_limits.is_empty();
    if reads_http {
        let connection = http::inbound::Connection {
            peer,
            dst,
            labels,
            pod: pod.clone(),
            shared: shared.clone(),
        };
        // Boxed: byte-copy connections should not carry the HTTP server's state.
        return Box::pin(http::inbound::serve(client, upstream, connection)).await;
    }
    if !policies.needs_sni() {
        let registration = pod.active.register(peer, dst, None, &pod.cancel);
        let idle = shared.tcp_idle_timeout;
        // An HBONE tunnel's bytes move uncopied; any other client's through a buffer.
        let copy = async {
            match (&mut client as &mut dyn std::any::Any).downcast_mut::<nodemesh_hbone::Tunnel>() {
                Some(tunnel) => splice_tunnel(&mut upstream, tunnel, idle)
                    .await
                    .map(|(to_client, from_client)| (from_client, to_client)),
                None => splice(&mut client, &mut upstream, idle).await,
            }
        };
        return tokio::select! {
            () = registration.cancel.cancelled() => Err(ProxyError::Revoked),
            result = copy => result,
        };
    }
    // `connection.sni` conditions: judged once the application's ClientHello is read.
    let (sni, mut client) = sni::read_server_name(client).await?;
    let decision = authz::decide(
        pod,
        shared,
        &policies,
        &nodemesh_policy::Request {
            peer: &peer,
            destination_ip: dst.ip(),
            destination_port: dst.port(),
            sni: sni.as_deref(),
            http: None,
        },
    );
    if !decision.allowed {
        return Err(ProxyError::Denied {
            by: decision.denied_by().unwrap_or_default(),
        });
    }
    let registration = pod.active.register(peer, dst, sni.as_deref(), &pod.cancel);
    tokio::select! {
        () = registration.cancel.cancelled() => Err(ProxyError::Revoked),
        result = splice(&mut client, &mut upstream, shared.tcp_idle_timeout) => result,
    }
}

/// The mode a freshly enrolled pod starts with until the configuration says otherwise.
pub fn default_mtls() -> EffectiveMtls {
    EffectiveMtls::default()
}
