//! Istio's AuthorizationPolicy, under `apiVersion: security.nodemesh.dev/v1`: an Istio policy
//! works here after changing its apiVersion. Parsing and validation only; matching lives in
//! the `nodemesh-policy` crate.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{ObjectMeta, WorkloadSelector};

/// Annotation that makes a policy report what it would do without enforcing it. Istio's
/// `istio.io/dry-run` is honoured too.
pub const DRY_RUN_ANNOTATION: &str = "nodemesh.dev/dry-run";
const ISTIO_DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: Action,
    /// No rules: an ALLOW policy allows nothing, a DENY policy denies nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Logs and counts matching requests; decides nothing.
    Audit,
}

/// A rule matches when one of `from` matches (or there is none), one of `to` matches (or
/// there is none) and every `when` condition holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<From>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<To>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

/// Every field set must match; within a field, any value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Addresses or CIDR blocks of the peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// JWT principals and original client addresses are not supported; kept to give a clear
    /// error instead of "unknown field".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

/// Every field set must match; within a field, any value. Hosts, methods and paths are HTTP
/// attributes; ports apply to any traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
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
    /// Exact (`/a`), prefix (`/a/*`), suffix (`*.png`) or any (`*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// `key` is `request.headers[<name>]`, `source.ip`, `source.namespace`, `source.principal`
/// or `destination.port`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// What a `when` key refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    /// A request header, its name lower-cased.
    RequestHeader(String),
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
}

impl ConditionKey {
    pub fn parse(key: &str) -> Result<Self, String> {
        if let Some(name) = key
            .strip_prefix("request.headers[")
            .and_then(|rest| rest.strip_suffix(']'))
        {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            {
                return Err(format!(
                    "{key:?} names no valid header; use request.headers[<name>]"
                ));
            }
            return Ok(Self::RequestHeader(name.to_ascii_lowercase()));
        }
        match key {
            "source.ip" => Ok(Self::SourceIp),
            "source.namespace" => Ok(Self::SourceNamespace),
            "source.principal" => Ok(Self::SourcePrincipal),
            "destination.port" => Ok(Self::DestinationPort),
            _ => Err(format!(
                "{key:?} is not a supported condition key; use request.headers[<name>], \
                 source.ip, source.namespace, source.principal or destination.port"
            )),
        }
    }

    /// Whether the key needs the HTTP request.
    pub fn is_http(&self) -> bool {
        matches!(self, Self::RequestHeader(_))
    }
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

impl AuthorizationPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }

    /// Whether the policy only reports what it would do.
    pub fn dry_run(&self) -> bool {
        [DRY_RUN_ANNOTATION, ISTIO_DRY_RUN_ANNOTATION]
            .iter()
            .any(|a| {
                self.metadata
                    .annotations
                    .get(*a)
                    .is_some_and(|v| v == "true")
            })
    }

    /// Checks the fields that serde cannot: returns the field's path and what is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (r, rule) in self.spec.rules.iter().enumerate() {
            for (f, from) in rule.from.iter().enumerate() {
                let at = |field: &str| format!("spec.rules[{r}].from[{f}].source.{field}");
                let s = &from.source;
                for (field, values) in [
                    ("requestPrincipals", &s.request_principals),
                    ("notRequestPrincipals", &s.not_request_principals),
                    ("remoteIpBlocks", &s.remote_ip_blocks),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ] {
                    if !values.is_empty() {
                        return Err((
                            at(field),
                            "is not supported: nodemesh has no JWT authentication and no proxies \
                             in front of the mesh; use principals or ipBlocks"
                                .to_owned(),
                        ));
                    }
                }
                for (field, values) in [
                    ("ipBlocks", &s.ip_blocks),
                    ("notIpBlocks", &s.not_ip_blocks),
                ] {
                    for (i, v) in values.iter().enumerate() {
                        parse_ip_block(v).map_err(|e| (format!("{}[{i}]", at(field)), e))?;
                    }
                }
                for (field, values) in [
                    ("principals", &s.principals),
                    ("notPrincipals", &s.not_principals),
                ] {
                    for (i, v) in values.iter().enumerate() {
                        check_pattern(v).map_err(|e| (format!("{}[{i}]", at(field)), e))?;
                    }
                }
            }
            for (t, to) in rule.to.iter().enumerate() {
                let at = |field: &str| format!("spec.rules[{r}].to[{t}].operation.{field}");
                let o = &to.operation;
                for (field, values) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
                    for (i, v) in values.iter().enumerate() {
                        if v.parse::<u16>().map_or(true, |p| p == 0) {
                            return Err((
                                format!("{}[{i}]", at(field)),
                                format!("{v:?} is not a port number (1-65535)"),
                            ));
                        }
                    }
                }
                for (field, values) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
                    for (i, v) in values.iter().enumerate() {
                        if v != "*" && !v.starts_with('/') && !v.starts_with('*') {
                            return Err((
                                format!("{}[{i}]", at(field)),
                                format!(
                                    "{v:?} is not a path pattern; use /exact, /prefix/*, *.suffix or *"
                                ),
                            ));
                        }
                        check_pattern(v).map_err(|e| (format!("{}[{i}]", at(field)), e))?;
                    }
                }
                for (field, values) in [("hosts", &o.hosts), ("notHosts", &o.not_hosts)] {
                    for (i, v) in values.iter().enumerate() {
                        check_pattern(v).map_err(|e| (format!("{}[{i}]", at(field)), e))?;
                    }
                }
                for (field, values) in [("methods", &o.methods), ("notMethods", &o.not_methods)] {
                    for (i, v) in values.iter().enumerate() {
                        if v != "*" && !v.bytes().all(|b| b.is_ascii_uppercase()) {
                            return Err((
                                format!("{}[{i}]", at(field)),
                                format!("{v:?} is not an HTTP method; use upper case, such as GET"),
                            ));
                        }
                    }
                }
            }
            for (w, condition) in rule.when.iter().enumerate() {
                let at = |field: &str| format!("spec.rules[{r}].when[{w}].{field}");
                let key = ConditionKey::parse(&condition.key).map_err(|e| (at("key"), e))?;
                if condition.values.is_empty() && condition.not_values.is_empty() {
                    return Err((
                        at("values"),
                        "a condition needs values or notValues".to_owned(),
                    ));
                }
                if matches!(key, ConditionKey::SourceIp) {
                    for (i, v) in condition
                        .values
                        .iter()
                        .chain(&condition.not_values)
                        .enumerate()
                    {
                        parse_ip_block(v).map_err(|e| (format!("{}[{i}]", at("values")), e))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// A pattern may carry one `*`, at its start or its end, or be `*` alone.
fn check_pattern(value: &str) -> Result<(), String> {
    let stars = value.matches('*').count();
    let placed = value == "*" || value.starts_with('*') || value.ends_with('*');
    if value.is_empty() {
        Err("is empty".to_owned())
    } else if stars > 1 || (stars == 1 && !placed) {
        Err(format!(
            "{value:?}: `*` may only stand alone, at the start or at the end"
        ))
    } else {
        Ok(())
    }
}
