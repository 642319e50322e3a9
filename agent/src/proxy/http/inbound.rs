//! HTTP at the destination, for pods whose AuthorizationPolicies look at HTTP attributes, that
//! a rate limit covers, or with HTTP processing on: the protocol is detected from the client's
//! first bytes (no per-port declaration), then each HTTP/1.1 or HTTP/2 request goes through
//! telemetry, authorization and the rate limit to the application. Traffic that is not HTTP is
//! judged as a connection.

use std::{net::SocketAddr, sync::Arc};

use http::Request;
use hyper::{
    body::Incoming,
    client::conn::{http1 as client_h1, http2 as client_h2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodemesh_policy::{Decision, HttpAttributes, Peer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
};
use tower::ServiceBuilder;

use super::{
    app::{App, AppConnection},
    authz::{AuthzLayer, Judge, Judging},
    boxed,
    counted::Counted,
    detect::{Protocol, detect},
    filter::Stack,
    normalize::NormalizeLayer,
    rate_limit::{Limited, PodLimits, RateLimitLayer},
    telemetry::{Reporter, TelemetryLayer},
};
use crate::{
    proxy::{Direction, PodContext, ProxyError, ProxyShared, authz, sni, splice},
    telemetry::Labels,
};

/// One inbound connection and what its requests are judged and reported with.
#[derive(Debug)]
pub struct Connection {
    pub peer: Peer,
    pub dst: SocketAddr,
    pub labels: Arc<Labels>,
    pub pod: Arc<PodContext>,
    pub shared: Arc<ProxyShared>,
}

/// The pod's policies, judging this connection's requests (counted and logged).
#[derive(Debug)]
struct PodJudge {
    peer: Peer,
    dst: SocketAddr,
    pod: Arc<PodContext>,
    shared: Arc<ProxyShared>,
}

impl Judge for PodJudge {
    fn decide(&self, http: &HttpAttributes) -> Decision {
        decide(
            &self.pod,
            &self.shared,
            &self.peer,
            self.dst,
            None,
            Some(http),
        )
    }
}

fn decide(
    pod: &PodContext,
    shared: &ProxyShared,
    peer: &Peer,
    dst: SocketAddr,
    sni: Option<&str>,
    http: Option<&HttpAttributes>,
) -> Decision {
    let policies = pod.policies();
    let request = nodemesh_policy::Request {
        peer,
        destination_ip: dst.ip(),
        destination_port: dst.port(),
        sni,
        http,
    };
    authz::decide(pod, shared, &policies, &request)
}

/// Judges a connection that is not HTTP and carries it as bytes.
async fn serve_opaque<S>(
    mut client: S,
    mut upstream: TcpStream,
    conn: &Connection,
    sni: Option<&str>,
) -> Result<(u64, u64), ProxyError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let decision = decide(&conn.pod, &conn.shared, &conn.peer, conn.dst, sni, None);
    if !decision.allowed {
        return Err(ProxyError::Denied {
            by: decision.denied_by().unwrap_or_default(),
        });
    }
    let registration = conn
        .pod
        .active
        .register(conn.peer.clone(), conn.dst, sni, &conn.pod.cancel);
    tokio::select! {
        () = registration.cancel.cancelled() => Err(ProxyError::Revoked),
        result = splice(&mut client, &mut upstream, conn.shared.tcp_idle_timeout) => result,
    }
}

/// Serves one inbound connection whose pod reads HTTP. `upstream` is already connected to the
/// application from the client's address.
pub async fn serve<S>(
    client: S,
    upstream: TcpStream,
    conn: Connection,
) -> Result<(u64, u64), ProxyError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (protocol, client) = detect(client).await?;
    let app = match protocol {
        Protocol::Opaque => {
            // Not HTTP: judged as a connection, HTTP-only ALLOW rules cannot match.
            if conn.pod.policies().needs_sni() {
                let (sni, client) = sni::read_server_name(client).await?;
                return serve_opaque(client, upstream, &conn, sni.as_deref()).await;
            }
            return serve_opaque(client, upstream, &conn, None).await;
        }
        Protocol::Http1 => {
            let (sender, connection) = client_h1::handshake(TokioIo::new(upstream))
                .await
                .map_err(|e| ProxyError::Http(e.to_string()))?;
            tokio::spawn(connection);
            AppConnection::Http1(Mutex::new(sender))
        }
        Protocol::Http2 => {
            let (sender, connection) =
                client_h2::handshake(TokioExecutor::new(), TokioIo::new(upstream))
                    .await
                    .map_err(|e| ProxyError::Http(e.to_string()))?;
            tokio::spawn(connection);
            AppConnection::Http2(sender)
        }
    };
    let workload: Arc<str> = Arc::from(conn.pod.key.as_str());
    let http = &conn.shared.http;
    let stack = Stack::new(
        ServiceBuilder::new()
            .layer(TelemetryLayer::new(http.sinks.clone()))
            .layer(NormalizeLayer::new(conn.shared.mesh.clone()))
            .layer(AuthzLayer::default())
            .layer(RateLimitLayer::new(http.traffic.metrics.clone()))
            .service(App::new(app, workload.clone())),
    );
    let reporter = Reporter {
        direction: Direction::Inbound,
        workload: workload.clone(),
        peer_ip: conn.peer.ip,
        peer_identity: conn
            .peer
            .principal
            .as_deref()
            .map(|p| Arc::from(format!("spiffe://{p}").as_str())),
        labels: conn.labels.clone(),
        last: Default::default(),
    };
    let judging = Judging(Arc::new(PodJudge {
        peer: conn.peer.clone(),
        dst: conn.dst,
        pod: conn.pod.clone(),
        shared: conn.shared.clone(),
    }));
    let limits = PodLimits {
        workload,
        limits: conn.pod.rate_limits.clone(),
    };
    let limited = Limited {
        port: conn.dst.port(),
        source: conn.peer.ip,
    };
    let service = service_fn(move |req: Request<Incoming>| {
        let mut req = req.map(boxed);
        let extensions = req.extensions_mut();
        extensions.insert(reporter.clone());
        extensions.insert(judging.clone());
        extensions.insert(limits.clone());
        extensions.insert(limited);
        stack.answer(req)
    });
    let (client, counts) = Counted::new(client);
    let io = TokioIo::new(client);
    let served = match protocol {
        Protocol::Http2 => super::http2_server().serve_connection(io, service).await,
        _ => super::http1_server().serve_connection(io, service).await,
    };
    served.map_err(|e| ProxyError::Http(e.to_string()))?;
    Ok(counts.get())
}
