//! Authorization decisions with Istio's AuthorizationPolicy semantics.
//!
//! The policies that apply to a workload are compiled once per configuration into
//! [`WorkloadPolicies`]; each connection or HTTP request is then a [`Request`] judged by
//! [`WorkloadPolicies::decide`]:
//! - a matching DENY policy denies;
//! - otherwise, if any ALLOW policy applies to the workload, one must match, or the request is
//!   denied;
//! - otherwise the request is allowed.
//!
//! AUDIT policies and dry-run policies (annotation `istio.io/dry-run` or `nodemesh.dev/dry-run`
//! read as Go reads a boolean) are evaluated and reported but never change the outcome. On traffic that is not HTTP, HTTP
//! attributes (hosts, methods, paths, request headers) cannot be checked: an ALLOW rule that
//! needs them does not match, and a DENY rule ignores them, so that both fail closed.
//!
//! [`WorkloadPolicies::explain`] gives the same verdict with the reason of every policy and
//! rule, for `nodemesh explain`.
#![forbid(unsafe_code)]

mod compile;
mod explain;
mod matcher;
pub mod normalize;
#[cfg(any(test, feature = "parity"))]
pub mod parity;
mod path;
mod peer_match;
mod trust_domains;

use std::net::IpAddr;

use nodemesh_config::Action;
use serde::Serialize;

pub use self::{
    compile::{TrustDomains, WorkloadPolicies},
    explain::{Explanation, PolicyTrace, RuleTrace},
    path::{Endpoint, PathExplanation, Question, Step, explain_path, workload_policies},
};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's principal in Istio's form, `<trust-domain>/ns/<ns>/sa/<sa>`; `None` for
    /// plaintext.
    pub principal: Option<String>,
    pub ip: IpAddr,
}

impl Peer {
    /// A peer authenticated with a SPIFFE ID (`spiffe://...`).
    pub fn authenticated(spiffe_id: &str, ip: IpAddr) -> Self {
        Self {
            principal: Some(
                spiffe_id
                    .strip_prefix("spiffe://")
                    .unwrap_or(spiffe_id)
                    .to_owned(),
            ),
            ip,
        }
    }

    pub fn plaintext(ip: IpAddr) -> Self {
        Self {
            principal: None,
            ip,
        }
    }

    /// The parts of a principal of the standard form `<td>/ns/<ns>/sa/<sa>`.
    fn parts(&self) -> Option<(&str, &str, &str)> {
        let principal = self.principal.as_deref()?;
        let mut parts = principal.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((td, ns, sa)),
            _ => None,
        }
    }

    /// The peer's namespace, from its principal.
    pub fn namespace(&self) -> Option<&str> {
        self.parts().map(|(_, ns, _)| ns)
    }

    /// The peer's trust domain, from its principal.
    pub fn trust_domain(&self) -> Option<&str> {
        self.principal.as_deref()?.split('/').next()
    }

    /// The peer's `namespace/serviceAccount`.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        self.parts().map(|(_, ns, sa)| (ns, sa))
    }
}

/// The HTTP attributes of a request, as the policies judge them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpAttributes {
    pub method: String,
    /// The normalised path, without its query string.
    pub path: String,
    /// The query string, without `?`, when the request has one (it is part of `:path`).
    pub query: Option<String>,
    /// `:authority` (or the Host header) as sent, port included; `None` when there is none.
    pub authority: Option<String>,
    pub scheme: Option<String>,
    /// Every header line, names lower-cased, values as bytes (they need not be UTF-8).
    pub headers: Vec<(String, Vec<u8>)>,
}

impl HttpAttributes {
    /// A header as Envoy's matchers see it: a pseudo-header, or the values of every line with
    /// that name joined by `,`; `None` when absent.
    pub fn header(&self, name: &str) -> Option<std::borrow::Cow<'_, [u8]>> {
        use std::borrow::Cow;
        match name {
            ":method" => return Some(Cow::Borrowed(self.method.as_bytes())),
            ":authority" => {
                return self
                    .authority
                    .as_deref()
                    .map(|a| Cow::Borrowed(a.as_bytes()));
            }
            ":scheme" => return self.scheme.as_deref().map(|s| Cow::Borrowed(s.as_bytes())),
            // Envoy moves Host into `:authority`; no `host` header remains to match.
            "host" => return None,
            ":path" => {
                return Some(match &self.query {
                    Some(query) => Cow::Owned(format!("{}?{query}", self.path).into_bytes()),
                    None => Cow::Borrowed(self.path.as_bytes()),
                });
            }
            _ => {}
        }
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice());
        let first = values.next()?;
        match values.next() {
            None => Some(Cow::Borrowed(first)),
            Some(second) => {
                let mut joined = [first, second].join(&b","[..]);
                for more in values {
                    joined.push(b',');
                    joined.extend_from_slice(more);
                }
                Some(Cow::Owned(joined))
            }
        }
    }
}

impl HttpAttributes {
    /// The attributes with the path normalised as the proxies normalise it; an error when the
    /// proxies refuse the request instead (400).
    pub fn normalized(
        &self,
        mode: nodemesh_config::PathNormalization,
    ) -> Result<Self, normalize::InvalidRequest> {
        normalize::check_method(&self.method)?;
        let path = normalize::normalize_path(&self.path, mode)?.into_owned();
        Ok(Self {
            path,
            ..self.clone()
        })
    }
}

/// What is being decided: a connection (no HTTP attributes) or an HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub peer: &'a Peer,
    /// The address the client connected to (the destination pod's).
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// The server name of the application's own TLS handshake, when the traffic is TLS.
    pub sni: Option<&'a str>,
    pub http: Option<&'a HttpAttributes>,
}

/// A policy and the rule of it that matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// `namespace/name`.
    pub policy: String,
    /// Index in `spec.rules`.
    pub rule: usize,
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// AUDIT policies that matched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audited: Vec<Verdict>,
    /// What the dry-run policies would have decided, if any applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<Box<Decision>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// No AuthorizationPolicy applies to the workload.
    NoPolicy,
    /// Only DENY or AUDIT policies apply and none denied.
    NoDenyMatched,
    /// This ALLOW policy rule matched.
    Allowed(Verdict),
    /// This DENY policy rule matched.
    Denied(Verdict),
    /// ALLOW policies apply, and none matched.
    NoAllowMatched { policies: Vec<String> },
}

impl Decision {
    /// The policy to name to the client when denied: `namespace/name`, or a description.
    pub fn denied_by(&self) -> Option<String> {
        match &self.reason {
            Reason::Denied(v) => Some(format!(
                "AuthorizationPolicy {} (DENY, rule {})",
                v.policy, v.rule
            )),
            Reason::NoAllowMatched { policies } => Some(format!(
                "AuthorizationPolicy {} (no ALLOW rule matched)",
                policies.join(", ")
            )),
            _ => None,
        }
    }

    /// The policy that allowed, for logs.
    pub fn allowed_by(&self) -> Option<&Verdict> {
        match &self.reason {
            Reason::Allowed(v) => Some(v),
            _ => None,
        }
    }
}

/// Whether a policy action needs its HTTP attributes checked to match (ALLOW), or may
/// ignore them when they cannot be (DENY and AUDIT, failing closed).
fn strict_on_tcp(action: Action) -> bool {
    action == Action::Allow
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
