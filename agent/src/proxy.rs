//! The node proxy: one accept loop per in-pod listener, one task per connection.
//!
//! - `outbound`: connections the capture redirected to a pod's outbound listener, carried to
//!   their original destination.
//! - `inbound`: connections sk_lookup steered to a pod's inbound listener, carried to the
//!   application inside the pod.
//!
//! Plain TCP is a byte copy with half-close carried through; nothing is parsed.

mod inbound;
mod listener;
mod outbound;

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::net::TcpStream;

pub use self::{inbound::serve_inbound, outbound::serve_outbound};
use crate::{
    datapath::OriginalDstTable,
    inpod,
    netns::PodNetns,
    state::{AgentState, ConnectionRecord, WorkloadCounters, unix_millis},
};

/// How long the proxy waits for an upstream connect before giving up on a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection task shares.
#[derive(Debug)]
pub struct ProxyShared {
    pub original_dst: OriginalDstTable,
    pub mark: u32,
    pub state: Arc<AgentState>,
}

impl std::fmt::Debug for OriginalDstTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OriginalDstTable")
    }
}

/// An enrolled pod as its connection tasks need it.
#[derive(Debug)]
pub struct PodContext {
    /// `namespace/name`.
    pub key: String,
    pub netns: PodNetns,
    pub counters: Arc<WorkloadCounters>,
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

/// Why a connection could not be carried; the text says what to check.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "no original destination recorded for {client}; the connection reached the proxy \
         without being captured"
    )]
    NoOriginalDst { client: SocketAddr },
    #[error("cannot create a socket in {netns}: {source}")]
    Socket { netns: String, source: io::Error },
    #[error("connect to {dst} failed: {source}; is anything listening there?")]
    Connect { dst: SocketAddr, source: io::Error },
    #[error("connect to {dst} timed out after {timeout:?}; maybe a firewall drops the traffic")]
    ConnectTimeout { dst: SocketAddr, timeout: Duration },
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl ProxyError {
    /// A short label for metrics.
    fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoOriginalDst { .. } => "no_original_dst",
            ProxyError::Socket { .. } => "socket",
            ProxyError::Connect { .. } => "connect",
            ProxyError::ConnectTimeout { .. } => "connect_timeout",
            ProxyError::Io(_) => "io",
        }
    }
}

/// Connects to `dst` from inside the pod's namespace with the proxy mark.
async fn connect_from_pod(
    pod: &PodContext,
    mark: u32,
    dst: SocketAddr,
) -> Result<TcpStream, ProxyError> {
    let socket = inpod::tcp_socket(&pod.netns, dst, mark).map_err(|source| ProxyError::Socket {
        netns: pod.netns.path().display().to_string(),
        source,
    })?;
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ProxyError::Connect { dst, source }),
        Err(_) => Err(ProxyError::ConnectTimeout {
            dst,
            timeout: CONNECT_TIMEOUT,
        }),
    }
}

/// Bookkeeping of one proxied connection: metrics while it runs, a record when it ends.
struct ConnectionTracker<'a> {
    shared: &'a ProxyShared,
    direction: Direction,
    record: ConnectionRecord,
    started: Instant,
}

impl<'a> ConnectionTracker<'a> {
    fn start(
        shared: &'a ProxyShared,
        pod: &PodContext,
        direction: Direction,
        client: SocketAddr,
        original_dst: SocketAddr,
    ) -> Self {
        let metrics = &shared.state.metrics;
        metrics
            .connections_opened
            .with_label_values(&[direction.as_str()])
            .inc();
        metrics
            .connections_active
            .with_label_values(&[direction.as_str()])
            .inc();
        Self {
            shared,
            direction,
            record: ConnectionRecord {
                id: shared.state.connections.next_id(),
                direction: direction.as_str(),
                workload: pod.key.clone(),
                client,
                original_dst,
                upstream_local: None,
                bytes_from_client: 0,
                bytes_to_client: 0,
                started_unix_ms: unix_millis(SystemTime::now()),
                duration_ms: 0,
                error: None,
            },
            started: Instant::now(),
        }
    }

    fn finish(mut self, result: Result<(u64, u64), ProxyError>) {
        let direction = self.direction.as_str();
        match result {
            Ok((from_client, to_client)) => {
                self.record.bytes_from_client = from_client;
                self.record.bytes_to_client = to_client;
            }
            Err(e) => {
                self.shared
                    .state
                    .metrics
                    .connection_failures
                    .with_label_values(&[direction, e.reason()])
                    .inc();
                tracing::info!(
                    direction,
                    workload = %self.record.workload,
                    client = %self.record.client,
                    dst = %self.record.original_dst,
                    error = %e,
                    "connection failed"
                );
                self.record.error = Some(e.to_string());
            }
        }
        self.record.duration_ms = self.started.elapsed().as_millis() as u64;
        self.shared.state.connections.push(self.record.clone());
    }
}

impl Drop for ConnectionTracker<'_> {
    fn drop(&mut self) {
        self.shared
            .state
            .metrics
            .connections_active
            .with_label_values(&[self.direction.as_str()])
            .dec();
    }
}

/// Carries one accepted connection to `dst`, connecting from inside the pod, then copies both
/// ways until both sides are done. A FIN from one side is passed on as a half-close.
async fn carry(
    mut client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    direction: Direction,
    pod: &PodContext,
    shared: &ProxyShared,
) {
    let mut tracker = ConnectionTracker::start(shared, pod, direction, peer, dst);
    let result = async {
        let mut upstream = connect_from_pod(pod, shared.mark, dst).await?;
        tracker.record.upstream_local = upstream.local_addr().ok();
        Ok(tokio::io::copy_bidirectional(&mut client, &mut upstream).await?)
    }
    .await;
    tracker.finish(result);
}
