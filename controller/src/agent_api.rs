//! The API agents use, over HTTPS (TLS 1.3) on the controller's :15012. Every request carries
//! a bearer token (`Authorization: Bearer`) that says which node is asking: the node's
//! bootstrap token in local mode, the agent's projected ServiceAccount token in Kubernetes
//! (reviewed by the API server).
//!
//! - `POST /v1/certificates`: a workload certificate, only for identities of enrolled
//!   workloads on the asking node (`certificates`);
//! - `GET /v1/snapshots`: the node's view of the mesh, streamed as newline-delimited JSON,
//!   and `POST /v1/acks`: what the agent did with each snapshot (`snapshots`).

mod certificates;
pub(crate) mod snapshots;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Either, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use nodemesh_admin::{HEADER_READ_TIMEOUT, accept};
use nodemesh_config::snapshot::{ACKS_PATH, SNAPSHOTS_PATH};
use nodemesh_identity::{
    CertificateAuthority,
    api::{CERTIFICATES_PATH, CertificateApiError},
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use self::snapshots::ChannelBody;
use crate::{
    kubernetes::token_review::{ReviewError, TokenReviewer},
    node_tokens::NodeTokens,
    state::ControllerState,
};

/// How long an agent may take to finish the TLS handshake: a silent client must not hold a
/// task and a descriptor for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body accepted: a CSR or an ack fits in a few kilobytes.
const MAX_BODY: usize = 64 * 1024;
/// Lifetime of the controller's own serving certificate; it is re-issued at half of it.
const SERVING_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

type Body = Either<Full<Bytes>, ChannelBody>;

/// How an agent proves which node it runs on.
#[derive(Debug)]
pub enum AgentAuth {
    /// Local mode: each node's bootstrap token.
    NodeTokens(NodeTokens),
    /// Kubernetes: the agent pod's ServiceAccount token, reviewed by the API server.
    Kubernetes(Box<TokenReviewer>),
}

impl AgentAuth {
    /// The node the `Authorization` header proves, or the refusal: 401 with what is wrong
    /// with the token, or 503 when the API server cannot be asked.
    async fn node_of(&self, authorization: Option<&str>) -> Result<String, Refusal> {
        let unauthenticated =
            |message: String| Refusal::new(StatusCode::UNAUTHORIZED, "unauthenticated", message);
        let token = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        match self {
            AgentAuth::NodeTokens(tokens) => tokens
                .node_of(authorization)
                .map(str::to_owned)
                .ok_or_else(|| {
                    unauthenticated(
                        "missing or unknown node token; send `Authorization: Bearer <token>` \
                         with the token of the agent's node"
                            .to_owned(),
                    )
                }),
            AgentAuth::Kubernetes(reviewer) => {
                let token = token.ok_or_else(|| {
                    unauthenticated(
                        "no token; send `Authorization: Bearer <token>` with the agent pod's \
                         projected ServiceAccount token"
                            .to_owned(),
                    )
                })?;
                reviewer.node_of(token).await.map_err(|e| match e {
                    ReviewError::Api(_) => Refusal::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        e.to_string(),
                    ),
                    e => unauthenticated(e.to_string()),
                })
            }
        }
    }
}

pub struct AgentApi {
    pub ca: Arc<CertificateAuthority>,
    pub auth: AgentAuth,
    pub state: Arc<ControllerState>,
    pub workload_ttl: Duration,
    pub server_names: Vec<String>,
    /// Ends the snapshot streams when the controller stops.
    pub stop: CancellationToken,
}

/// A refusal: the status, a stable reason (a metric label) and what to do.
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn response(self) -> Response<Body> {
        json(
            self.status,
            &CertificateApiError {
                reason: self.reason.to_owned(),
                message: self.message,
            },
        )
    }
}

impl AgentApi {
    /// Binds now and serves until the stop token is cancelled.
    pub async fn spawn(self, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the agent API: {e}"))?;
        let bound = listener.local_addr()?;
        let tls = Arc::new(RwLock::new(self.serving_config()?));
        let api = Arc::new(self);
        tokio::spawn(api.clone().renew_serving_cert(tls.clone()));
        let stop = api.stop.clone();
        tokio::spawn(async move {
            while let Some((stream, peer)) = accept(&listener, &stop, "agent API").await {
                let acceptor =
                    TlsAcceptor::from(tls.read().unwrap_or_else(|e| e.into_inner()).clone());
                let api = api.clone();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    let stream = match handshake.await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "agent API TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "agent API TLS handshake timed out");
                            return;
                        }
                    };
                    let service = service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.route(req, peer).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(bound)
    }

    async fn route(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let node = self.auth.node_of(authorization).await;
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let node = match node {
            Ok(node) => node,
            Err(refusal) => {
                if path == CERTIFICATES_PATH {
                    self.state
                        .metrics()
                        .certificates_refused
                        .with_label_values(&[refusal.reason])
                        .inc();
                }
                tracing::warn!(%peer, %path, reason = %refusal.message, "agent API request without a valid token");
                return refusal.response();
            }
        };
        match (method, path.as_str()) {
            (Method::POST, CERTIFICATES_PATH) => self.certificates(req, &node, peer).await,
            (Method::GET, SNAPSHOTS_PATH) => self.stream_snapshots(&node, peer),
            (Method::POST, ACKS_PATH) => self.ack(req, &node).await,
            (method, path) => Refusal::new(
                StatusCode::NOT_FOUND,
                "bad_request",
                format!(
                    "no endpoint {method} {path}; use POST {CERTIFICATES_PATH}, GET \
                     {SNAPSHOTS_PATH} or POST {ACKS_PATH}"
                ),
            )
            .response(),
        }
    }

    fn serving_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let (chain, key) = self.ca.issue_server(&self.server_names, SERVING_CERT_TTL)?;
        let config =
            rustls::ServerConfig::builder_with_provider(nodemesh_identity::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_no_client_auth()
                .with_single_cert(chain, key)?;
        Ok(Arc::new(config))
    }

    async fn renew_serving_cert(self: Arc<Self>, tls: Arc<RwLock<Arc<rustls::ServerConfig>>>) {
        loop {
            if self
                .stop
                .run_until_cancelled(tokio::time::sleep(SERVING_CERT_TTL / 2))
                .await
                .is_none()
            {
                return;
            }
            match self.serving_config() {
                Ok(config) => *tls.write().unwrap_or_else(|e| e.into_inner()) = config,
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the agent API's serving certificate")
                }
            }
        }
    }
}

/// Reads a small JSON body.
async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Refusal> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| Refusal::bad_request(format!("cannot read the request: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| Refusal::bad_request(format!("the request is not valid JSON: {e}")))
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Either::Left(Full::new(Bytes::from(
            serde_json::to_vec(value).unwrap_or_default(),
        ))))
        .unwrap_or_else(|_| Response::new(Either::Left(Full::new(Bytes::new()))))
}
