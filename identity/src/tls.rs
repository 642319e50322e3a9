//! TLS configurations of HBONE: TLS 1.3 only, ALPN `h2`, a SPIFFE certificate on both ends.
//!
//! The server requires a client certificate chaining to the trust bundle and reads the
//! client's identity from it after the handshake ([`peer_identity`]). The client checks the
//! server's chain against the bundle and that its SPIFFE ID is the one it expected; DNS names
//! play no part.

mod verifier;

use std::sync::Arc;

use rustls::{ClientConfig, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::CertificateDer;

pub use self::verifier::SpiffeServerVerifier;
use crate::{SpiffeId, TrustBundle, WorkloadCertificate, crypto_provider};

/// The ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the trust bundle is unusable: {0}")]
    Bundle(String),
}

/// The server side of HBONE for a workload: presents `cert`, requires a client certificate
/// chaining to `bundle`.
pub fn server_config(
    cert: &WorkloadCertificate,
    bundle: &TrustBundle,
) -> Result<ServerConfig, TlsConfigError> {
    let provider = crypto_provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(bundle.root_store()?, provider.clone())
            .build()
            .map_err(|e| TlsConfigError::Bundle(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain().to_vec(), cert.private_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The client side of HBONE: presents `cert`, accepts only a server that proves `expected`
/// with a chain to `bundle`.
pub fn client_config(
    cert: &WorkloadCertificate,
    bundle: &TrustBundle,
    expected: SpiffeId,
) -> Result<ClientConfig, TlsConfigError> {
    let provider = crypto_provider();
    let verifier = SpiffeServerVerifier::new(bundle, expected, provider.clone())?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain().to_vec(), cert.private_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The SPIFFE ID of the peer of a finished handshake, from its leaf certificate.
pub fn peer_identity(certificates: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certificates?.first()?;
    SpiffeId::from_certificate(leaf).ok()
}
