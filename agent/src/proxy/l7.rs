//! HTTP at the destination, for pods whose AuthorizationPolicies look at HTTP attributes:
//! the protocol is detected from the client's first bytes (no per-port declaration), then
//! each HTTP/1.1 or HTTP/2 request is judged and forwarded to the application, or answered
//! 403 naming the policy. Traffic that is not HTTP is judged as a connection.

mod detect;
mod prefixed;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::{
    body::Incoming,
    client::conn::{http1 as client_h1, http2 as client_h2},
    server::conn::{http1 as server_h1, http2 as server_h2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodemesh_policy::{HttpAttributes, Peer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
};

pub use self::detect::Protocol;
use self::detect::detect;
use super::{PodContext, ProxyError, ProxyShared, authz, splice};

type Body = Either<Incoming, Full<Bytes>>;

/// The application's side of one client connection.
enum Upstream {
    Http1(Mutex<client_h1::SendRequest<Incoming>>),
    Http2(client_h2::SendRequest<Incoming>),
}

/// Serves one inbound connection whose pod needs HTTP attributes to decide. `upstream` is
/// already connected to the application from the client's address.
pub async fn serve<S>(
    client: S,
    mut upstream: TcpStream,
    peer: Peer,
    dst: SocketAddr,
    pod: Arc<PodContext>,
    shared: Arc<ProxyShared>,
) -> Result<(u64, u64), ProxyError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (protocol, mut client) = detect(client).await?;
    let upstream = match protocol {
        Protocol::Opaque => {
            // Not HTTP: judged as a connection, HTTP-only ALLOW rules cannot match.
            let policies = pod.policies();
            let decision = authz::decide(
                &pod,
                &shared,
                &policies,
                &nodemesh_policy::Request {
                    peer: &peer,
                    destination_port: dst.port(),
                    http: None,
                },
            );
            if !decision.allowed {
                return Err(ProxyError::Denied {
                    by: decision.denied_by().unwrap_or_default(),
                });
            }
            let registration = pod.active.register(peer, dst.port(), &pod.cancel);
            return tokio::select! {
                () = registration.cancel.cancelled() => Err(ProxyError::Revoked),
                result = splice(&mut client, &mut upstream) => result,
            };
        }
        Protocol::Http1 => {
            let (sender, connection) = client_h1::handshake(TokioIo::new(upstream))
                .await
                .map_err(|e| ProxyError::Http(e.to_string()))?;
            tokio::spawn(connection);
            Arc::new(Upstream::Http1(Mutex::new(sender)))
        }
        Protocol::Http2 => {
            let (sender, connection) =
                client_h2::handshake(TokioExecutor::new(), TokioIo::new(upstream))
                    .await
                    .map_err(|e| ProxyError::Http(e.to_string()))?;
            tokio::spawn(connection);
            Arc::new(Upstream::Http2(sender))
        }
    };
    let peer = Arc::new(peer);
    let service = service_fn(move |req: Request<Incoming>| {
        let (pod, shared, upstream, peer) =
            (pod.clone(), shared.clone(), upstream.clone(), peer.clone());
        async move { Ok::<_, Infallible>(handle(req, &peer, dst, &pod, &shared, &upstream).await) }
    });
    let io = TokioIo::new(client);
    let served = match protocol {
        Protocol::Http2 => {
            server_h2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service)
                .await
        }
        _ => {
            server_h1::Builder::new()
                .serve_connection(io, service)
                .await
        }
    };
    served.map_err(|e| ProxyError::Http(e.to_string()))?;
    Ok((0, 0))
}

/// Judges and forwards one request.
async fn handle(
    req: Request<Incoming>,
    peer: &Peer,
    dst: SocketAddr,
    pod: &PodContext,
    shared: &ProxyShared,
    upstream: &Upstream,
) -> Response<Body> {
    let attributes = attributes(&req);
    let policies = pod.policies();
    let decision = authz::decide(
        pod,
        shared,
        &policies,
        &nodemesh_policy::Request {
            peer,
            destination_port: dst.port(),
            http: Some(&attributes),
        },
    );
    if !decision.allowed {
        let by = decision.denied_by().unwrap_or_default();
        return text(
            StatusCode::FORBIDDEN,
            format!("RBAC: access denied by {by}\n"),
        );
    }
    if req.headers().contains_key(header::UPGRADE) {
        return text(
            StatusCode::NOT_IMPLEMENTED,
            "HTTP upgrades are not carried yet for workloads with HTTP authorization rules\n"
                .to_owned(),
        );
    }
    let forwarded = match upstream {
        Upstream::Http1(sender) => {
            let mut sender = sender.lock().await;
            match sender.ready().await {
                Ok(()) => sender.send_request(req).await,
                Err(e) => Err(e),
            }
        }
        Upstream::Http2(sender) => sender.clone().send_request(req).await,
    };
    match forwarded {
        Ok(response) => response.map(Either::Left),
        Err(e) => {
            tracing::info!(workload = %pod.key, error = %e, "the application did not answer");
            text(
                StatusCode::BAD_GATEWAY,
                format!("the application did not answer: {e}\n"),
            )
        }
    }
}

fn attributes(req: &Request<Incoming>) -> HttpAttributes {
    let host = req
        .uri()
        .authority()
        .map(|a| a.host().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| h.rsplit_once(':').map_or(h, |(host, _)| host).to_owned())
        })
        .unwrap_or_default();
    HttpAttributes {
        method: req.method().as_str().to_owned(),
        path: req.uri().path().to_owned(),
        host,
        headers: req
            .headers()
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            })
            .collect(),
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Either::Right(Full::new(Bytes::from(body))))
        .unwrap_or_else(|_| Response::new(Either::Right(Full::new(Bytes::new()))))
}
