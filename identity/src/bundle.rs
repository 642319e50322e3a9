//! The trust bundle: the roots a workload certificate must chain to. Several roots may be
//! trusted at once, so that a root can be replaced without downtime.

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::pem;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Self {
        Self { roots }
    }

    /// Reads a bundle from PEM certificates.
    pub fn from_pem(text: &str) -> Result<Self, String> {
        Ok(Self::new(pem::certificates(text)?))
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn to_pem(&self) -> Vec<String> {
        self.roots
            .iter()
            .map(|r| pem::encode_certificate(r))
            .collect()
    }

    /// The roots as webpki trust anchors.
    pub fn anchors(&self) -> Result<Vec<TrustAnchor<'static>>, webpki::Error> {
        self.roots
            .iter()
            .map(|root| webpki::anchor_from_trusted_cert(root).map(|a| a.to_owned()))
            .collect()
    }

    pub fn root_store(&self) -> Result<Arc<rustls::RootCertStore>, rustls::Error> {
        let mut store = rustls::RootCertStore::empty();
        for root in &self.roots {
            store.add(root.clone())?;
        }
        Ok(Arc::new(store))
    }
}
