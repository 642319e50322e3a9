//! The controller's certificate API, shared by the controller (server) and the agent
//! (client): `POST /v1/certificates` over HTTPS, JSON in and out, the agent's node token as a
//! bearer token.

use serde::{Deserialize, Serialize};

pub const CERTIFICATES_PATH: &str = "/v1/certificates";

/// What an agent asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateApiRequest {
    /// The SPIFFE ID the agent wants a certificate for.
    pub identity: String,
    /// PEM PKCS#10 request naming that identity as its only URI SAN.
    pub csr: String,
}

/// What the controller answers on success.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateApiResponse {
    /// PEM certificates, the leaf first.
    pub certificate_chain: Vec<String>,
    /// PEM roots a peer's certificate must chain to.
    pub trust_bundle: Vec<String>,
    pub serial: String,
    pub not_after_unix: u64,
}

/// What the controller answers on refusal, with the HTTP status saying what kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateApiError {
    /// A stable label, also a metric label: `unauthenticated`, `not_on_node`,
    /// `unknown_identity`, `bad_request`, `internal`.
    pub reason: String,
    /// What was wrong and what to do.
    pub message: String,
}
