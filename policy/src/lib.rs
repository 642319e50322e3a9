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
//! AUDIT policies and dry-run policies (annotation `nodemesh.dev/dry-run: "true"`) are
//! evaluated and reported but never change the outcome. On traffic that is not HTTP, HTTP
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
mod path;

use std::net::IpAddr;

use nodemesh_config::Action;
use serde::Serialize;

pub use self::{
    compile::WorkloadPolicies,
    explain::{Explanation, PolicyTrace, RuleTrace},
    path::{Endpoint, PathExplanation, Step, explain_path},
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

    /// The peer's namespace, from its principal.
    pub fn namespace(&self) -> Option<&str> {
        let principal = self.principal.as_deref()?;
        let (_, rest) = principal.split_once("/ns/")?;
        rest.split('/').next()
    }
}

/// The HTTP attributes of a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpAttributes {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    /// The Host header or `:authority`, without a port.
    pub host: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl HttpAttributes {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What is being decided: a connection (no HTTP attributes) or an HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub peer: &'a Peer,
    pub destination_port: u16,
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
mod tests;
