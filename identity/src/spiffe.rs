//! SPIFFE IDs of mesh workloads.

use std::{fmt, str::FromStr};

use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error(
        "{0:?} is not a workload SPIFFE ID; expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Malformed(String),
    #[error("the certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("the certificate carries no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("the certificate carries more than one spiffe:// URI SAN")]
    SeveralSpiffeIds,
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        let id = Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        if [trust_domain, namespace, service_account]
            .into_iter()
            .all(valid_segment)
        {
            Ok(id)
        } else {
            Err(SpiffeIdError::Malformed(id.to_string()))
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The SPIFFE ID in the URI SAN of a DER certificate. Exactly one is allowed.
    pub fn from_certificate(der: &[u8]) -> Result<Self, SpiffeIdError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| SpiffeIdError::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| SpiffeIdError::BadCertificate(e.to_string()))?
            .ok_or(SpiffeIdError::NoSpiffeId)?;
        let mut ids = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                _ => None,
            });
        let first = ids.next().ok_or(SpiffeIdError::NoSpiffeId)?;
        if ids.next().is_some() {
            return Err(SpiffeIdError::SeveralSpiffeIds);
        }
        first.parse()
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || SpiffeIdError::Malformed(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                Self::new(td, ns, sa).map_err(|_| malformed())
            }
            _ => Err(malformed()),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_workload_ids() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web"
            .parse()
            .expect("valid");
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            ("cluster.local", "shop", "web")
        );
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "http://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://Cluster/ns/a/sa/b",
            "spiffe://cluster.local/sa/web/ns/shop",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
