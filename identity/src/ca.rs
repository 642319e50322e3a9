//! The mesh certificate authority, run by the controller.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer as _;

use crate::{SpiffeId, TrustBundle, pem};

const CA_CERT: &str = "ca-cert.pem";
const CA_KEY: &str = "ca-key.pem";
const EXTRA_ROOTS: &str = "trust-bundle.pem";
/// Lifetime of a root the controller creates itself.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves start this much in the past, so that a peer whose clock is a little behind accepts
/// a certificate issued a moment ago.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a usable CA private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{path}: not a usable CA certificate: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path} is an intermediate CA; also give the root(s) it chains to as the trust bundle")]
    IntermediateWithoutBundle { path: PathBuf },
    #[error("cannot create the CA: {0}")]
    Create(String),
    #[error("the certificate signing request is not valid: {0}")]
    BadCsr(String),
    #[error("the certificate signing request asks for {requested}, not {allowed}")]
    WrongIdentity { requested: String, allowed: String },
    #[error(
        "the certificate signing request's key is not ECDSA P-256 (the only key type the mesh \
         issues certificates for); generate a P-256 key"
    )]
    KeyType,
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A certificate the CA issued, as the certificate API returns it.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The leaf first, then the intermediates up to (not including) a root.
    pub chain_pem: Vec<String>,
    /// Hex serial number.
    pub serial: String,
    pub not_after: SystemTime,
}

#[derive(Debug)]
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// Sent after every leaf: the CA's own certificate and the ones above it when it is an
    /// intermediate; empty for a root.
    chain: Vec<CertificateDer<'static>>,
    bundle: TrustBundle,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

impl CertificateAuthority {
    /// The CA kept in `dir`: `ca-cert.pem` and `ca-key.pem`, created (key mode 0600) as a new
    /// root on first use. `trust-bundle.pem` there, if present, holds more roots to trust, such
    /// as the next root during a rotation.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let cert = dir.join(CA_CERT);
        let key = dir.join(CA_KEY);
        if !cert.exists() && !key.exists() {
            fs::create_dir_all(dir).map_err(io(dir))?;
            create_root(&cert, &key, trust_domain)?;
        }
        let extra = dir.join(EXTRA_ROOTS);
        Self::from_files(&cert, &key, extra.exists().then_some(extra.as_path()))
    }

    /// An operator-supplied CA. `cert` holds the CA certificate, optionally followed by the
    /// intermediates above it. A root CA is trusted itself; an intermediate needs `bundle`,
    /// the root(s) to trust. A root's `bundle` adds roots to trust.
    pub fn from_files(cert: &Path, key: &Path, bundle: Option<&Path>) -> Result<Self, CaError> {
        let key_pem = fs::read_to_string(key).map_err(io(key))?;
        let cert_pem = fs::read_to_string(cert).map_err(io(cert))?;
        let bundle_pem = match bundle {
            Some(path) => Some((fs::read_to_string(path).map_err(io(path))?, path)),
            None => None,
        };
        Self::from_pem(
            (&cert_pem, cert),
            (&key_pem, key),
            bundle_pem
                .as_ref()
                .map(|(text, path)| (text.as_str(), *path)),
        )
    }

    /// A CA from PEM text, each part with where it came from (a file, or a Secret's key) for
    /// the errors: the certificate (optionally followed by the intermediates above it), its
    /// private key, and the roots to trust (required for an intermediate).
    pub fn from_pem(
        (cert_pem, cert): (&str, &Path),
        (key_pem, key): (&str, &Path),
        bundle: Option<(&str, &Path)>,
    ) -> Result<Self, CaError> {
        let bad_cert = |reason: String| CaError::BadCertificate {
            path: cert.to_owned(),
            reason,
        };
        let key_pair = KeyPair::from_pem(key_pem).map_err(|e| CaError::BadKey {
            path: key.to_owned(),
            reason: e.to_string(),
        })?;
        let certs = pem::certificates(cert_pem).map_err(bad_cert)?;
        let ca = &certs[0];
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(ca)
            .map_err(|e| bad_cert(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(bad_cert(
                "it is not a CA (basicConstraints CA:TRUE is missing)".into(),
            ));
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key_pair.public_key_raw() {
            return Err(CaError::BadKey {
                path: key.to_owned(),
                reason: format!(
                    "it does not belong to the certificate in {}",
                    cert.display()
                ),
            });
        }
        let is_root = parsed.subject() == parsed.issuer();
        let mut roots = match bundle {
            Some((text, path)) => {
                pem::certificates(text).map_err(|reason| CaError::BadCertificate {
                    path: path.to_owned(),
                    reason,
                })?
            }
            None if is_root => Vec::new(),
            None => {
                return Err(CaError::IntermediateWithoutBundle {
                    path: cert.to_owned(),
                });
            }
        };
        let chain = if is_root {
            if !roots.contains(ca) {
                roots.insert(0, ca.clone());
            }
            Vec::new()
        } else {
            certs.clone()
        };
        let issuer = Issuer::from_ca_cert_der(ca, key_pair).map_err(|e| bad_cert(e.to_string()))?;
        Ok(Self {
            issuer,
            chain,
            bundle: TrustBundle::new(roots),
        })
    }

    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// Signs a workload's CSR. The certificate names exactly `id` (URI SAN) whatever else the
    /// CSR asks for, may be used by both ends of a connection, and lasts `ttl`.
    pub fn sign_workload(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::KeyType);
        }
        let requested: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if requested != [id.to_string()] {
            return Err(CaError::WrongIdentity {
                requested: requested.join(", "),
                allowed: id.to_string(),
            });
        }
        let uri = id
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?;
        csr.params = leaf_params(vec![SanType::URI(uri)], ttl)?;
        let not_after = SystemTime::from(csr.params.not_after);
        let serial = hex(csr
            .params
            .serial_number
            .as_ref()
            .map(|s| s.to_bytes())
            .unwrap_or_default());
        let leaf = csr
            .signed_by(&self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(IssuedCertificate {
            chain_pem: self.chain_pem(leaf.pem()),
            serial,
            not_after,
        })
    }

    /// A serving certificate for the controller's own HTTPS endpoint, for the DNS names or IP
    /// addresses in `names`.
    pub fn issue_server(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let sans = CertificateParams::new(names.to_vec())
            .map_err(|e| CaError::Sign(format!("bad server name: {e}")))?
            .subject_alt_names;
        let mut params = leaf_params(sans, ttl)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((chain, key))
    }

    fn chain_pem(&self, leaf: String) -> Vec<String> {
        std::iter::once(leaf)
            .chain(self.chain.iter().map(|c| pem::encode_certificate(c)))
            .collect()
    }
}

fn leaf_params(sans: Vec<SanType>, ttl: Duration) -> Result<CertificateParams, CaError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "nodemesh");
    params.subject_alt_names = sans;
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + ttl;
    params.serial_number = Some(random_serial()?);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Sign("no randomness for the serial number".into()))?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

fn hex(bytes: Vec<u8>) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new root CA for `trust_domain`: its certificate and private key, as PEM.
pub fn generate_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let key_pair = KeyPair::generate().map_err(|e| CaError::Create(e.to_string()))?;
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "nodemesh");
    params.distinguished_name.push(
        DnType::CommonName,
        format!("nodemesh root CA for {trust_domain}"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + ROOT_LIFETIME;
    params.serial_number = Some(random_serial()?);
    let root = params
        .self_signed(&key_pair)
        .map_err(|e| CaError::Create(e.to_string()))?;
    Ok((root.pem(), key_pair.serialize_pem()))
}

fn create_root(cert: &Path, key: &Path, trust_domain: &str) -> Result<(), CaError> {
    let (cert_pem, key_pem) = generate_root(trust_domain)?;
    // The key first, with 0600 from the moment it exists.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key)
        .map_err(io(key))?;
    file.write_all(key_pem.as_bytes()).map_err(io(key))?;
    fs::write(cert, cert_pem).map_err(io(cert))?;
    Ok(())
}

#[cfg(test)]
mod tests;
