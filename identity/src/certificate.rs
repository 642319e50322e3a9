//! A workload's certificate, from the agent's side: a fresh key pair and CSR per identity,
//! then the chain the CA signed.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::FromDer as _;

use crate::{SpiffeId, pem};

#[derive(Debug, Clone, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot create a key pair or CSR: {0}")]
    Csr(String),
    #[error("the CA's answer is not a certificate chain: {0}")]
    BadChain(String),
    #[error("the CA issued a certificate for {got}, not {wanted}")]
    WrongIdentity { got: String, wanted: String },
    #[error("the CA's certificate does not match the key this request made")]
    KeyMismatch,
}

/// A key pair and CSR for one identity, waiting for the CA's answer.
#[derive(Debug)]
pub struct CertificateRequest {
    id: SpiffeId,
    key: KeyPair,
    csr_pem: String,
}

impl CertificateRequest {
    /// Makes a new ECDSA P-256 key and a CSR naming `id` as its only URI SAN.
    pub fn new(id: SpiffeId) -> Result<Self, CertificateError> {
        let key = KeyPair::generate().map_err(|e| CertificateError::Csr(e.to_string()))?;
        let uri = id
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| CertificateError::Csr(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .map_err(|e| CertificateError::Csr(e.to_string()))?;
        let csr_pem = csr
            .pem()
            .map_err(|e| CertificateError::Csr(e.to_string()))?;
        Ok(Self { id, key, csr_pem })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }

    /// Pairs the CA's chain (leaf first) with this request's key, after checking that the
    /// leaf names this identity and carries this key.
    pub fn complete(self, chain_pem: &[String]) -> Result<WorkloadCertificate, CertificateError> {
        WorkloadCertificate::assemble(self.id, &self.key, chain_pem)
    }
}

/// A workload's key and signed certificate chain.
#[derive(Debug)]
pub struct WorkloadCertificate {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

impl WorkloadCertificate {
    /// A certificate kept earlier (see [`to_pem`](Self::to_pem)), checked as when it was
    /// issued: the leaf names `id` and carries the key.
    pub fn from_pem(
        id: SpiffeId,
        chain_pem: &[String],
        key_pem: &str,
    ) -> Result<Self, CertificateError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CertificateError::BadChain(format!("key: {e}")))?;
        Self::assemble(id, &key, chain_pem)
    }

    /// The chain (leaf first) and the private key, in PEM, to keep across restarts.
    pub fn to_pem(&self) -> (Vec<String>, String) {
        let chain = self
            .chain
            .iter()
            .map(|c| pem::encode_certificate(c))
            .collect();
        let key = ::pem::encode(&::pem::Pem::new(
            "PRIVATE KEY",
            self.key.secret_pkcs8_der().to_vec(),
        ));
        (chain, key)
    }

    fn assemble(
        id: SpiffeId,
        key: &KeyPair,
        chain_pem: &[String],
    ) -> Result<Self, CertificateError> {
        let chain = pem::certificates(&chain_pem.concat()).map_err(CertificateError::BadChain)?;
        let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(&chain[0])
            .map_err(|e| CertificateError::BadChain(e.to_string()))?;
        if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertificateError::KeyMismatch);
        }
        let got = SpiffeId::from_certificate(&chain[0])
            .map_err(|e| CertificateError::BadChain(e.to_string()))?;
        if got != id {
            return Err(CertificateError::WrongIdentity {
                got: got.to_string(),
                wanted: id.to_string(),
            });
        }
        let validity = leaf.validity();
        let to_system = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        Ok(WorkloadCertificate {
            not_before: to_system(validity.not_before),
            not_after: to_system(validity.not_after),
            serial: leaf.raw_serial_as_string().replace(':', ""),
            id,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            chain,
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The leaf first, then its intermediates.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial number in hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// When to renew: half-way through the certificate's life, spread between 45% and 55%
    /// by `spread` (0 to 1) so that certificates issued together renew apart.
    pub fn renew_at(&self, spread: f64) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life.mul_f64(0.45 + 0.1 * spread.clamp(0.0, 1.0))
    }
}
