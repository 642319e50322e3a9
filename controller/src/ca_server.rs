//! The certificate API: `POST /v1/certificates` over HTTPS. An agent authenticates with its
//! node's token and may obtain only the identities of enrolled workloads on that node.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use nodemesh_identity::{
    CertificateAuthority, SpiffeId,
    api::{CERTIFICATES_PATH, CertificateApiError, CertificateApiRequest, CertificateApiResponse},
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{node_tokens::NodeTokens, state::ControllerState};

/// Largest request body accepted: a CSR and an identity fit in a few kilobytes.
const MAX_BODY: usize = 64 * 1024;
/// Lifetime of the controller's own serving certificate; it is re-issued at half of it.
const SERVING_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct CaServer {
    pub ca: Arc<CertificateAuthority>,
    pub tokens: NodeTokens,
    pub state: Arc<ControllerState>,
    pub workload_ttl: Duration,
    pub server_names: Vec<String>,
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
}

impl CaServer {
    /// Binds now and serves until `token` is cancelled.
    pub async fn spawn(
        self,
        addr: SocketAddr,
        token: CancellationToken,
    ) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the certificate API: {e}"))?;
        let bound = listener.local_addr()?;
        let tls = Arc::new(RwLock::new(self.serving_config()?));
        let server = Arc::new(self);
        tokio::spawn(
            server
                .clone()
                .renew_serving_cert(tls.clone(), token.clone()),
        );
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    () = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            tracing::warn!(error = %e, "certificate API accept failed");
                            continue;
                        }
                    },
                };
                let acceptor =
                    TlsAcceptor::from(tls.read().unwrap_or_else(|e| e.into_inner()).clone());
                let server = server.clone();
                tokio::spawn(async move {
                    let stream = match acceptor.accept(stream).await {
                        Ok(stream) => stream,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "certificate API TLS handshake failed");
                            return;
                        }
                    };
                    let service = service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(req, peer).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(bound)
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

    async fn renew_serving_cert(
        self: Arc<Self>,
        tls: Arc<RwLock<Arc<rustls::ServerConfig>>>,
        token: CancellationToken,
    ) {
        loop {
            if token
                .run_until_cancelled(tokio::time::sleep(SERVING_CERT_TTL / 2))
                .await
                .is_none()
            {
                return;
            }
            match self.serving_config() {
                Ok(config) => *tls.write().unwrap_or_else(|e| e.into_inner()) = config,
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the certificate API's serving certificate")
                }
            }
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let result = self.issue(req).await;
        let metrics = self.state.metrics();
        match result {
            Ok(response) => {
                metrics.certificates_signed.inc();
                tracing::info!(%peer, identity = %response.0, serial = %response.1.serial, "certificate issued");
                json(StatusCode::OK, &response.1)
            }
            Err(refusal) => {
                metrics
                    .certificates_refused
                    .with_label_values(&[refusal.reason])
                    .inc();
                tracing::warn!(%peer, reason = refusal.reason, "certificate refused: {}", refusal.message);
                json(
                    refusal.status,
                    &CertificateApiError {
                        reason: refusal.reason.to_owned(),
                        message: refusal.message,
                    },
                )
            }
        }
    }

    async fn issue(
        &self,
        req: Request<Incoming>,
    ) -> Result<(SpiffeId, CertificateApiResponse), Refusal> {
        if req.uri().path() != CERTIFICATES_PATH {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "bad_request",
                format!(
                    "no endpoint {}; use POST {CERTIFICATES_PATH}",
                    req.uri().path()
                ),
            ));
        }
        if req.method() != Method::POST {
            return Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "bad_request",
                "use POST",
            ));
        }
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(node) = self.tokens.node_of(authorization).map(str::to_owned) else {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "missing or unknown node token; send `Authorization: Bearer <token>` with the \
                 token of the agent's node",
            ));
        };
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("cannot read the request: {e}"),
                )
            })?
            .to_bytes();
        let request: CertificateApiRequest = serde_json::from_slice(&body).map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the request is not valid JSON: {e}"),
            )
        })?;
        let id: SpiffeId =
            request
                .identity
                .parse()
                .map_err(|e: nodemesh_identity::SpiffeIdError| {
                    Refusal::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
                })?;
        self.state
            .authorize(&node, &id)
            .map_err(|(reason, message)| Refusal::new(StatusCode::FORBIDDEN, reason, message))?;
        let issued = self
            .ca
            .sign_workload(&request.csr, &id, self.workload_ttl)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
        let response = CertificateApiResponse {
            certificate_chain: issued.chain_pem,
            trust_bundle: self.ca.bundle().to_pem(),
            serial: issued.serial,
            not_after_unix: issued
                .not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        Ok((id, response))
    }
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(value).unwrap_or_default(),
        )))
        .unwrap_or_default()
}
