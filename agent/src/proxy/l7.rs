//! HTTP at the destination, for pods whose AuthorizationPolicies look at HTTP attributes:
//! the protocol is detected from the client's first bytes (no per-port declaration), then
//! each HTTP/1.1 or HTTP/2 request is judged and forwarded to the application, or answered
//! 403 naming the policy. Traffic that is not HTTP is judged as a connection.

mod counted;
mod detect;
mod prefixed;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

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
use self::{counted::Counted, detect::detect};
use super::{PodContext, ProxyError, ProxyShared, authz, splice};
use crate::{
    state::unix_millis,
    telemetry::{FinishedSpan, Labels, RequestLogEntry, Tracer},
};

type Body = Either<Incoming, Full<Bytes>>;

/// The application's side of one client connection.
enum Upstream {
    Http1(Mutex<client_h1::SendRequest<Incoming>>),
    Http2(client_h2::SendRequest<Incoming>),
}

/// One inbound connection and what its requests are judged and reported with.
pub struct Connection {
    pub peer: Peer,
    pub dst: SocketAddr,
    pub labels: Arc<Labels>,
    pub pod: Arc<PodContext>,
    pub shared: Arc<ProxyShared>,
}

impl Connection {
    /// The pod's policies' verdict on this connection (`http: None`) or on one of its
    /// requests, counted and logged.
    fn decide(&self, http: Option<&HttpAttributes>) -> nodemesh_policy::Decision {
        let policies = self.pod.policies();
        let request = nodemesh_policy::Request {
            peer: &self.peer,
            destination_port: self.dst.port(),
            http,
        };
        authz::decide(&self.pod, &self.shared, &policies, &request)
    }
}

/// Serves one inbound connection whose pod needs HTTP attributes to decide. `upstream` is
/// already connected to the application from the client's address.
pub async fn serve<S>(
    client: S,
    mut upstream: TcpStream,
    conn: Connection,
) -> Result<(u64, u64), ProxyError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (protocol, mut client) = detect(client).await?;
    let upstream = match protocol {
        Protocol::Opaque => {
            // Not HTTP: judged as a connection, HTTP-only ALLOW rules cannot match.
            let decision = conn.decide(None);
            if !decision.allowed {
                return Err(ProxyError::Denied {
                    by: decision.denied_by().unwrap_or_default(),
                });
            }
            let registration =
                conn.pod
                    .active
                    .register(conn.peer.clone(), conn.dst.port(), &conn.pod.cancel);
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
            Upstream::Http1(Mutex::new(sender))
        }
        Protocol::Http2 => {
            let (sender, connection) =
                client_h2::handshake(TokioExecutor::new(), TokioIo::new(upstream))
                    .await
                    .map_err(|e| ProxyError::Http(e.to_string()))?;
            tokio::spawn(connection);
            Upstream::Http2(sender)
        }
    };
    let shared = Arc::new((conn, upstream));
    let service = service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(req, &shared.0, &shared.1).await) }
    });
    let (client, counts) = Counted::new(client);
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
    Ok(counts.get())
}

/// The size a message announces (Content-Length or an exact body size), else 0.
fn announced_size<B: hyper::body::Body>(headers: &http::HeaderMap, body: &B) -> u64 {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .or_else(|| body.size_hint().exact())
        .unwrap_or(0)
}

/// Judges and forwards one request, and reports it with Istio's metrics, the access log and a
/// span.
async fn handle(
    mut req: Request<Incoming>,
    conn: &Connection,
    upstream: &Upstream,
) -> Response<Body> {
    let started = Instant::now();
    let started_at = SystemTime::now();
    let attributes = attributes(&req);
    let request_bytes = announced_size(req.headers(), req.body());
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let protocol = if grpc { "grpc" } else { "http" };
    let state = &conn.shared.state;
    let span = state.tracer.begin(req.headers());
    if let Some(span) = &span {
        Tracer::propagate(span, req.headers_mut());
    }
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (response, flags) = judge_and_forward(req, &attributes, conn, upstream).await;
    let code = response.status().as_u16();
    let response_bytes = announced_size(response.headers(), response.body());
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    if let Some(context) = span {
        let labels = &conn.labels;
        state.tracer.finish(FinishedSpan {
            context,
            name: format!("{} {}", attributes.method, attributes.host),
            start: started_at,
            end: SystemTime::now(),
            attributes: vec![
                ("http.request.method", attributes.method.clone()),
                ("url.path", attributes.path.clone()),
                ("server.address", attributes.host.clone()),
                ("http.response.status_code", code.to_string()),
                ("network.peer.address", conn.peer.ip.to_string()),
                ("source.workload", labels.source_workload().to_owned()),
                ("source.principal", labels.source_principal().to_owned()),
                (
                    "destination.workload",
                    labels.destination_workload().to_owned(),
                ),
                (
                    "destination.principal",
                    labels.destination_principal().to_owned(),
                ),
                ("nodemesh.response_flags", flags.to_owned()),
            ],
            error: code >= 500,
        });
    }
    state.istio.http_request(
        &conn.labels,
        protocol,
        code,
        flags,
        duration_ms,
        request_bytes,
        response_bytes,
    );
    if let Some(log) = &state.access_log {
        log.request(RequestLogEntry {
            start_unix_ms: unix_millis(started_at),
            duration_ms,
            workload: conn.pod.key.clone(),
            client: conn.peer.ip.to_string(),
            source_identity: conn
                .peer
                .principal
                .as_ref()
                .map(|p| format!("spiffe://{p}")),
            method: attributes.method,
            path: attributes.path,
            authority: attributes.host,
            protocol,
            response_code: code,
            response_flags: flags,
            request_bytes,
            response_bytes,
            traceparent,
        });
    }
    response
}

/// The response, and Envoy's response flags for it (`RBAC` denied here, `UF` the application
/// failed to answer).
async fn judge_and_forward(
    req: Request<Incoming>,
    attributes: &HttpAttributes,
    conn: &Connection,
    upstream: &Upstream,
) -> (Response<Body>, &'static str) {
    let decision = conn.decide(Some(attributes));
    if !decision.allowed {
        let by = decision.denied_by().unwrap_or_default();
        let body = format!("RBAC: access denied by {by}\n");
        return (text(StatusCode::FORBIDDEN, body), "RBAC");
    }
    if req.headers().contains_key(header::UPGRADE) {
        let body = "HTTP upgrades are not carried yet for workloads with HTTP processing\n";
        return (text(StatusCode::NOT_IMPLEMENTED, body.to_owned()), "-");
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
        Ok(response) => (response.map(Either::Left), "-"),
        Err(e) => {
            tracing::info!(workload = %conn.pod.key, error = %e, "the application did not answer");
            let body = format!("the application did not answer: {e}\n");
            (text(StatusCode::BAD_GATEWAY, body), "UF")
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
