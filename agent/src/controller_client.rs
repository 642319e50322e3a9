//! The agent's client of the controller's agent API: HTTPS with the mesh's roots as the only
//! trust, the node's bootstrap token as a bearer token. Certificates, the snapshot stream and
//! its acknowledgements all go through it.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use nodemesh_config::snapshot::{ACKS_PATH, SNAPSHOTS_PATH, SnapshotAck};
use nodemesh_identity::{
    CertificateRequest, TrustBundle,
    api::{CERTIFICATES_PATH, CertificateApiError, CertificateApiRequest, CertificateApiResponse},
};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How long a request may take to be answered, connect included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Config(String),
    #[error("the controller at {controller} is unreachable: {reason}")]
    Unreachable { controller: String, reason: String },
    #[error("the controller refused ({reason}): {message}")]
    Refused { reason: String, message: String },
}

pub struct ControllerClient {
    /// `host:port` of the agent API.
    authority: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    /// Read again whenever it changes: the kubelet rotates a projected ServiceAccount token
    /// before it expires.
    token_file: PathBuf,
    token: Mutex<(String, Option<SystemTime>)>,
}

impl std::fmt::Debug for ControllerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerClient")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl ControllerClient {
    /// `url` is `https://host:port`; `ca_bundle` holds the roots the controller's serving
    /// certificate chains to; `token_file` holds this node's bootstrap token.
    pub fn new(url: &str, ca_bundle: &Path, token_file: &Path) -> Result<Self, ClientError> {
        let config = |reason: String| ClientError::Config(reason);
        let authority = url
            .strip_prefix("https://")
            .map(|rest| rest.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| {
                config(format!(
                    "--controller {url:?} must look like https://host:port"
                ))
            })?
            .to_owned();
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => {
                return Err(config(format!(
                    "--controller {url:?} has no port; use https://host:port"
                )));
            }
        };
        let server_name = ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        )
        .map_err(|e| config(format!("--controller {url:?}: {e}")))?;
        let pem = std::fs::read_to_string(ca_bundle).map_err(|e| {
            config(format!(
                "cannot read --controller-ca {}: {e}",
                ca_bundle.display()
            ))
        })?;
        let roots = TrustBundle::from_pem(&pem)
            .and_then(|b| b.root_store().map_err(|e| e.to_string()))
            .map_err(|e| config(format!("--controller-ca {}: {e}", ca_bundle.display())))?;
        let tls = rustls::ClientConfig::builder_with_provider(nodemesh_identity::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let token = std::fs::read_to_string(token_file)
            .map_err(|e| {
                config(format!(
                    "cannot read --token-file {}: {e}",
                    token_file.display()
                ))
            })?
            .trim()
            .to_owned();
        if token.is_empty() {
            return Err(config(format!(
                "--token-file {} is empty",
                token_file.display()
            )));
        }
        let modified = std::fs::metadata(token_file)
            .and_then(|m| m.modified())
            .ok();
        Ok(Self {
            authority,
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            token_file: token_file.to_owned(),
            token: Mutex::new((token, modified)),
        })
    }

    /// The token to present: the file's, read again when it changed since the last read.
    async fn token(&self) -> Result<String, ClientError> {
        let modified = tokio::fs::metadata(&self.token_file)
            .await
            .and_then(|m| m.modified())
            .ok();
        {
            let cached = self.token.lock().unwrap_or_else(|e| e.into_inner());
            if modified.is_some() && cached.1 == modified {
                return Ok(cached.0.clone());
            }
        }
        let text = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| {
                ClientError::Config(format!(
                    "cannot read --token-file {}: {e}",
                    self.token_file.display()
                ))
            })?;
        let token = text.trim().to_owned();
        if token.is_empty() {
            return Err(ClientError::Config(format!(
                "--token-file {} is empty",
                self.token_file.display()
            )));
        }
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = (token.clone(), modified);
        Ok(token)
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    fn unreachable(&self, reason: impl ToString) -> ClientError {
        ClientError::Unreachable {
            controller: self.authority.clone(),
            reason: reason.to_string(),
        }
    }

    /// Sends one request on a fresh connection and returns the response head, its body still
    /// to be read. A refusal (any status but 200) is turned into an error.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Response<Incoming>, ClientError> {
        let token = self.token().await?;
        let exchange = async {
            let tcp = TcpStream::connect(&self.authority)
                .await
                .map_err(|e| self.unreachable(e))?;
            let tls = self
                .tls
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| self.unreachable(format!("TLS: {e}")))?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| self.unreachable(e))?;
            tokio::spawn(connection);
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, &self.authority)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| ClientError::Config(e.to_string()))?;
            sender
                .send_request(request)
                .await
                .map_err(|e| self.unreachable(e))
        };
        let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| self.unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))??;
        if response.status() == StatusCode::OK {
            return Ok(response);
        }
        let status = response.status();
        let body = read_body(response).await.unwrap_or_default();
        let refusal: CertificateApiError =
            serde_json::from_slice(&body).unwrap_or(CertificateApiError {
                reason: status.to_string(),
                message: String::from_utf8_lossy(&body).into_owned(),
            });
        Err(ClientError::Refused {
            reason: refusal.reason,
            message: refusal.message,
        })
    }

    /// Asks for a certificate for the request's identity.
    pub async fn sign(
        &self,
        request: &CertificateRequest,
    ) -> Result<CertificateApiResponse, ClientError> {
        let body = serde_json::to_vec(&CertificateApiRequest {
            identity: request.id().to_string(),
            csr: request.csr_pem().to_owned(),
        })
        .map_err(|e| ClientError::Config(e.to_string()))?;
        let response = self.send(Method::POST, CERTIFICATES_PATH, body).await?;
        let body = read_body(response).await.map_err(|e| self.unreachable(e))?;
        serde_json::from_slice(&body)
            .map_err(|e| self.unreachable(format!("unreadable answer: {e}")))
    }

    /// Opens the snapshot stream; the body delivers newline-delimited snapshots.
    pub async fn snapshots(&self) -> Result<Incoming, ClientError> {
        Ok(self
            .send(Method::GET, SNAPSHOTS_PATH, Vec::new())
            .await?
            .into_body())
    }

    pub async fn ack(&self, ack: &SnapshotAck) -> Result<(), ClientError> {
        let body = serde_json::to_vec(ack).map_err(|e| ClientError::Config(e.to_string()))?;
        let response = self.send(Method::POST, ACKS_PATH, body).await?;
        read_body(response).await.map_err(|e| self.unreachable(e))?;
        Ok(())
    }
}

async fn read_body(response: Response<Incoming>) -> Result<Bytes, hyper::Error> {
    Ok(response.into_body().collect().await?.to_bytes())
}
