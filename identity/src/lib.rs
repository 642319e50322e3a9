//! Workload identity for nodemesh.
//!
//! - [`SpiffeId`]: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, the name a
//!   workload is known by on the wire.
//! - [`CertificateAuthority`]: the controller's CA, a root it creates or an operator's root or
//!   intermediate; signs workload CSRs into short-lived X.509 SVIDs.
//! - [`WorkloadCertificate`] and [`CertificateRequest`]: the agent's side, a key pair and CSR
//!   per identity, then the signed chain.
//! - [`tls`]: the rustls configurations of HBONE: TLS 1.3, ALPN `h2`, both ends presenting
//!   SPIFFE certificates; the client checks that the server is the identity it expected.
#![forbid(unsafe_code)]

pub mod api;
mod bundle;
mod ca;
mod certificate;
mod pem;
mod spiffe;
pub mod tls;

pub use bundle::TrustBundle;
pub use ca::{CaError, CertificateAuthority, IssuedCertificate, generate_root};
pub use certificate::{CertificateError, CertificateRequest, WorkloadCertificate};
pub use spiffe::{SpiffeId, SpiffeIdError};

/// The crypto provider every nodemesh TLS configuration uses.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
