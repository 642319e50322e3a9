//! How a source field names the peer: principals, namespaces, service accounts, trust domains.

use crate::{Peer, matcher::Pattern};

/// How a source field names the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerMatch {
    /// A principal pattern (`principals`, `source.principal`).
    Principal(Pattern),
    /// Istio's `.*/ns/<value>/.*` over the peer's SPIFFE ID, `*` standing for any text: the
    /// value as written, and the glob made of it once.
    Namespace {
        value: String,
        glob: String,
    },
    /// `namespace/serviceAccount`.
    ServiceAccount(String, String),
    TrustDomain(Pattern),
}

impl PeerMatch {
    pub(crate) fn namespace(value: &str) -> Self {
        PeerMatch::Namespace {
            value: value.to_owned(),
            glob: format!("*/ns/{value}/*"),
        }
    }

    pub(crate) fn matches(&self, peer: &Peer) -> bool {
        let Some(principal) = peer.principal.as_deref() else {
            return false;
        };
        match self {
            PeerMatch::Principal(p) => p.matches(principal),
            // The leading `*` also covers the `spiffe://` the principal is kept without.
            PeerMatch::Namespace { glob: pattern, .. } => {
                glob(pattern.as_bytes(), principal.as_bytes())
            }
            PeerMatch::ServiceAccount(ns, sa) => peer
                .service_account()
                .is_some_and(|(n, s)| n == ns && s == sa),
            PeerMatch::TrustDomain(p) => peer.trust_domain().is_some_and(|td| p.matches(td)),
        }
    }
}

impl std::fmt::Display for PeerMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerMatch::Principal(p) | PeerMatch::TrustDomain(p) => p.fmt(f),
            PeerMatch::Namespace { value, .. } => f.write_str(value),
            PeerMatch::ServiceAccount(ns, sa) => write!(f, "{ns}/{sa}"),
        }
    }
}

/// A glob where `*` stands for any text, matched against the whole of `text`.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|n| glob(rest, &text[n..])),
        Some((c, rest)) => text
            .split_first()
            .is_some_and(|(t, more)| t == c && glob(rest, more)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(b"*/ns/foo/*", b"spiffe://td/ns/foo/sa/x"));
        assert!(!glob(b"*/ns/foo/*", b"spiffe://td/ns/foobar/sa/x"));
        assert!(glob(b"*/ns/foo*/*", b"spiffe://td/ns/foobar/sa/x"));
        assert!(
            !glob(b"*/ns/f.o/*", b"spiffe://td/ns/foo/sa/x"),
            "a dot is a dot"
        );
    }
}
