//! Istio's AuthorizationPolicy, under `apiVersion: security.nodemesh.dev/v1`: an Istio policy
//! works here after changing its apiVersion. Parsing and validation only; matching lives in
//! the `nodemesh-policy` crate.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{ObjectMeta, WorkloadSelector, meta::Ignored};

mod condition;
mod validate;

pub use condition::ConditionKey;
pub use validate::parse_port;

/// Annotation that makes a policy report what it would do without enforcing it. Istio's
/// `istio.io/dry-run` is honoured too; both take Go's boolean forms (`true`, `True`, `1`, ...).
pub const DRY_RUN_ANNOTATION: &str = "nodemesh.dev/dry-run";
pub const ISTIO_DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
    /// What a cluster wrote back; objects exported from one carry it. Never read.
    #[serde(default, skip_serializing)]
    pub status: Option<Ignored>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema, kube::CustomResource))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "security.nodemesh.dev",
        version = "v1",
        kind = "AuthorizationPolicy",
        doc = "Istio's AuthorizationPolicy: who may call the workloads it selects, judged by each workload's node proxy.",
        root = "AuthorizationPolicyResource",
        namespaced,
        status = "crate::ObjectStatus",
        shortname = "ap",
        category = "nodemesh",
        printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
        printcolumn(
            name = "Accepted",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
        )
    )
)]
#[cfg_attr(
    feature = "kube",
    expect(
        clippy::duplicated_attributes,
        reason = "each printcolumn has its own type_; the lint reads them as one attribute"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Istio's attachment to a Service (enforced where Istio's waypoint would, here at the
    /// proxy of each workload the Service selects); not together with `selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetRef>,
    #[serde(default)]
    pub action: Action,
    /// The external authorizer of a CUSTOM policy: refused, nodemesh has none.
    #[serde(default, skip_serializing)]
    pub provider: Option<Ignored>,
    /// No rules: an ALLOW policy allows nothing; a DENY policy needs rules (`- {}` denies all).
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Istio's `PolicyTargetReference`: an object in the policy's own namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetRef {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl AuthorizationPolicySpec {
    /// The Services the policy attaches to by `targetRef`/`targetRefs` (validated to be Services).
    pub fn target_services(&self) -> impl Iterator<Item = &str> {
        self.target_ref
            .iter()
            .chain(&self.target_refs)
            .map(|t| t.name.as_str())
    }

    /// Whether the policy attaches by target references rather than by selector.
    pub fn has_targets(&self) -> bool {
        self.target_ref.is_some() || !self.target_refs.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Logs and counts matching requests; decides nothing.
    Audit,
    /// Delegates to an external authorizer: refused, nodemesh has none yet.
    Custom,
}

/// A rule matches when one of `from` matches (or there is none), one of `to` matches (or
/// there is none) and every `when` condition holds. `from: []` and `to: []` are refused, as
/// by Istio: they read as "any" and would match plaintext too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<From>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<To>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

impl Rule {
    pub fn from(&self) -> &[From] {
        self.from.as_deref().unwrap_or_default()
    }

    pub fn to(&self) -> &[To] {
        self.to.as_deref().unwrap_or_default()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    /// Required; an entry without one is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// Every field set must match; within a field, any value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer identities as Istio writes them, `cluster.local/ns/<ns>/sa/<sa>`; `*` as a prefix
    /// or suffix matches any text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Service accounts of the peer, `name` (in the policy's namespace) or `namespace/name`,
    /// from any trust domain; not together with principals or namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    /// Trust domains of the peer's identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_trust_domains: Vec<String>,
    /// Addresses or CIDR blocks of the peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// The original client's address. No proxy in front of the mesh is trusted to report
    /// another, so this is the peer's address, as in Istio without trusted proxies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
    /// JWT principals: refused with a message saying so, nodemesh has no JWT authentication.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    /// Required; an entry without one is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// Every field set must match; within a field, any value. Hosts, methods and paths are HTTP
/// attributes; ports apply to any traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// `:authority` as sent (with its port, if any), compared without regard to case: exact,
    /// `prefix*`, `*suffix`, or `*` for any; `host:*` covers every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports, as strings (Istio's form).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Exact (`/a`), prefix (`/a/*`), suffix (`*.png`), any (`*`), or a template with `{*}`
    /// (one segment) and `{**}` (the rest), judged on the normalised path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// `key` is one of Istio's attributes (see [`ConditionKey`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    #[serde(default)]
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// An address or CIDR block, as `ipBlocks` holds them.
pub fn parse_ip_block(text: &str) -> Result<(IpAddr, u8), String> {
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (text, None),
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("{text:?} is not an IP address or CIDR block such as 10.0.0.0/8"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{text:?} has a prefix length outside 0..={max}"))?,
        None => max,
    };
    Ok((ip, prefix))
}

/// Go's `strconv.ParseBool`, as Istio reads `istio.io/dry-run`.
pub fn parse_go_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

impl AuthorizationPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }

    /// Whether the policy only reports what it would do: a dry-run annotation that reads as
    /// true (validation refuses one that reads as neither).
    pub fn dry_run(&self) -> bool {
        [DRY_RUN_ANNOTATION, ISTIO_DRY_RUN_ANNOTATION]
            .iter()
            .any(|a| {
                self.metadata
                    .annotations
                    .get(*a)
                    .and_then(|v| parse_go_bool(v))
                    .unwrap_or(false)
            })
    }
}
