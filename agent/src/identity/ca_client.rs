//! The client of the controller's certificate API: HTTPS with the mesh's roots as the only
//! trust, the node's bootstrap token as a bearer token.

use std::{path::Path, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use nodemesh_identity::{
    CertificateRequest, TrustBundle,
    api::{CERTIFICATES_PATH, CertificateApiError, CertificateApiRequest, CertificateApiResponse},
};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::IdentityError;

/// How long one request to the controller may take, connect included.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct CaClient {
    /// `host:port` of the certificate API.
    authority: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    token: String,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl CaClient {
    /// `url` is `https://host:port`; `ca_bundle` holds the roots the controller's serving
    /// certificate chains to; `token_file` holds this node's bootstrap token.
    pub fn new(url: &str, ca_bundle: &Path, token_file: &Path) -> Result<Self, IdentityError> {
        let config = |reason: String| IdentityError::Config(reason);
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
        let bundle = TrustBundle::from_pem(&pem)
            .map_err(|e| config(format!("--controller-ca {}: {e}", ca_bundle.display())))?;
        let roots = bundle
            .root_store()
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
        Ok(Self {
            authority,
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            token,
        })
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Sends the CSR and returns the controller's answer.
    pub async fn sign(
        &self,
        request: &CertificateRequest,
    ) -> Result<CertificateApiResponse, IdentityError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.sign_once(request))
            .await
            .map_err(|_| IdentityError::Unreachable {
                controller: self.authority.clone(),
                reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
            })?
    }

    async fn sign_once(
        &self,
        request: &CertificateRequest,
    ) -> Result<CertificateApiResponse, IdentityError> {
        let unreachable = |reason: String| IdentityError::Unreachable {
            controller: self.authority.clone(),
            reason,
        };
        let tcp = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| unreachable(format!("TLS: {e}")))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(connection);
        let body = serde_json::to_vec(&CertificateApiRequest {
            identity: request.id().to_string(),
            csr: request.csr_pem().to_owned(),
        })
        .map_err(|e| IdentityError::Config(e.to_string()))?;
        let http_request = Request::builder()
            .method(Method::POST)
            .uri(CERTIFICATES_PATH)
            .header(header::HOST, &self.authority)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| IdentityError::Config(e.to_string()))?;
        let response = sender
            .send_request(http_request)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        if status == StatusCode::OK {
            return serde_json::from_slice(&body)
                .map_err(|e| unreachable(format!("unreadable answer: {e}")));
        }
        let refusal: CertificateApiError =
            serde_json::from_slice(&body).unwrap_or(CertificateApiError {
                reason: status.to_string(),
                message: String::from_utf8_lossy(&body).into_owned(),
            });
        Err(IdentityError::Refused {
            id: request.id().to_string(),
            reason: refusal.reason,
            message: refusal.message,
        })
    }
}
