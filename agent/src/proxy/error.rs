//! Why a connection could not be carried, as its records and metrics say it.

use std::{io, net::SocketAddr, time::Duration};

use crate::identity::IdentityError;

/// Why a connection could not be carried; the text says what to check.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "no original destination recorded for {client}; the connection reached the proxy \
         without being captured"
    )]
    NoOriginalDst { client: SocketAddr },
    #[error("cannot create a socket in {netns}: {source}")]
    Socket { netns: String, source: io::Error },
    #[error("connect to {dst} failed: {source}; is anything listening there?")]
    Connect { dst: SocketAddr, source: io::Error },
    #[error("connect to {dst} timed out after {timeout:?}; maybe a firewall drops the traffic")]
    ConnectTimeout { dst: SocketAddr, timeout: Duration },
    #[error(
        "HBONE connection to {dst} timed out after {timeout:?}; maybe a NetworkPolicy blocks \
         port 15008"
    )]
    HboneTimeout { dst: SocketAddr, timeout: Duration },
    #[error("mTLS with {peer} failed: {source}")]
    Tls { peer: SocketAddr, source: io::Error },
    #[error(
        "mTLS with {peer} refused: its identity {identity} is not of the mesh's trust domains \
         ({trusted}); list a federated one in MeshSettings trustDomainAliases"
    )]
    ForeignTrustDomain {
        peer: SocketAddr,
        identity: String,
        trusted: String,
    },
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error("HBONE: {0}")]
    Hbone(#[from] nodemesh_hbone::HboneError),
    #[error(
        "egress to {dst} is denied: it is not a workload in the mesh (MeshSettings egress policy Deny)"
    )]
    EgressDenied { dst: SocketAddr },
    #[error("plaintext refused: the workload's mTLS mode is STRICT ({policy})")]
    PlaintextRefused { policy: String },
    #[error("{reason}")]
    NoEndpoint { reason: String },
    #[error("upstream overflow: {limit} ({value}) of Service {service} reached")]
    Overflow {
        service: String,
        limit: &'static str,
        value: u32,
    },
    #[error("denied by {by}")]
    Denied { by: String },
    #[error("closed: the authorization policies no longer allow this connection")]
    Revoked,
    #[error("closed: nothing crossed it either way for {timeout:?} (--tcp-idle-timeout)")]
    Idle { timeout: Duration },
    #[error("HTTP: {0}")]
    Http(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl ProxyError {
    /// The same error once more, for the other end's record of a connection both ends of
    /// which this proxy carries. A source it cannot copy is kept as text.
    pub(super) fn again(&self) -> Self {
        let io = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            Self::NoOriginalDst { client } => Self::NoOriginalDst { client: *client },
            Self::Socket { netns, source } => Self::Socket {
                netns: netns.clone(),
                source: io(source),
            },
            Self::Connect { dst, source } => Self::Connect {
                dst: *dst,
                source: io(source),
            },
            Self::ConnectTimeout { dst, timeout } => Self::ConnectTimeout {
                dst: *dst,
                timeout: *timeout,
            },
            Self::HboneTimeout { dst, timeout } => Self::HboneTimeout {
                dst: *dst,
                timeout: *timeout,
            },
            Self::Tls { peer, source } => Self::Tls {
                peer: *peer,
                source: io(source),
            },
            Self::ForeignTrustDomain {
                peer,
                identity,
                trusted,
            } => Self::ForeignTrustDomain {
                peer: *peer,
                identity: identity.clone(),
                trusted: trusted.clone(),
            },
            Self::EgressDenied { dst } => Self::EgressDenied { dst: *dst },
            Self::PlaintextRefused { policy } => Self::PlaintextRefused {
                policy: policy.clone(),
            },
            Self::NoEndpoint { reason } => Self::NoEndpoint {
                reason: reason.clone(),
            },
            Self::Overflow {
                service,
                limit,
                value,
            } => Self::Overflow {
                service: service.clone(),
                limit,
                value: *value,
            },
            Self::Denied { by } => Self::Denied { by: by.clone() },
            Self::Revoked => Self::Revoked,
            Self::Idle { timeout } => Self::Idle { timeout: *timeout },
            Self::Http(text) => Self::Http(text.clone()),
            Self::Io(e) => Self::Io(io(e)),
            Self::Identity(_) | Self::Hbone(_) => Self::Io(io::Error::other(self.to_string())),
        }
    }

    /// A short label for metrics.
    pub(super) fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoOriginalDst { .. } => "no_original_dst",
            ProxyError::Socket { .. } => "socket",
            ProxyError::Connect { .. } => "connect",
            ProxyError::ConnectTimeout { .. } | ProxyError::HboneTimeout { .. } => {
                "connect_timeout"
            }
            ProxyError::Tls { .. } => "tls",
            ProxyError::ForeignTrustDomain { .. } => "foreign_trust_domain",
            ProxyError::Identity(_) => "identity",
            ProxyError::Hbone(_) => "hbone",
            ProxyError::EgressDenied { .. } => "egress_denied",
            ProxyError::PlaintextRefused { .. } => "plaintext_refused",
            ProxyError::Denied { .. } => "denied",
            ProxyError::NoEndpoint { .. } => "no_endpoint",
            ProxyError::Overflow { .. } => "overflow",
            ProxyError::Revoked => "revoked",
            ProxyError::Idle { .. } => "idle_timeout",
            ProxyError::Http(_) => "http",
            ProxyError::Io(_) => "io",
        }
    }
}
