//! Policies compiled for one workload, and the decision.

use nodemesh_config::{Action, AuthorizationPolicy, ConditionKey};

use crate::{
    Decision, Reason, Request, Verdict,
    matcher::{Field, IpBlock, Pattern},
    strict_on_tcp,
};

/// Why one element of a rule did not match: the field, and whether a `not` form excluded it.
/// `NeedsHttp` when the field is an HTTP attribute and the traffic is not HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Miss {
    Field { field: &'static str, negated: bool },
    NeedsHttp { field: &'static str },
}

fn field<T>(name: &'static str, field: &Field<T>, hit: impl Fn(&T) -> bool) -> Result<(), Miss> {
    field.check(hit).map_err(|negated| Miss::Field {
        field: name,
        negated,
    })
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledSource {
    pub principals: Field<Pattern>,
    pub namespaces: Field<Pattern>,
    pub ip_blocks: Field<IpBlock>,
}

impl CompiledSource {
    pub fn check(&self, req: &Request<'_>) -> Result<(), Miss> {
        let principal = req.peer.principal.as_deref();
        field("principals", &self.principals, |p| {
            principal.is_some_and(|v| p.matches(v))
        })?;
        let namespace = req.peer.namespace();
        field("namespaces", &self.namespaces, |p| {
            namespace.is_some_and(|v| p.matches(v))
        })?;
        field("ipBlocks", &self.ip_blocks, |b| b.contains(req.peer.ip))
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledOperation {
    pub hosts: Field<Pattern>,
    pub ports: Field<u16>,
    pub methods: Field<Pattern>,
    pub paths: Field<Pattern>,
}

impl CompiledOperation {
    fn needs_http(&self) -> bool {
        !(self.hosts.is_empty() && self.methods.is_empty() && self.paths.is_empty())
    }

    pub fn check(&self, req: &Request<'_>, strict: bool) -> Result<(), Miss> {
        field("ports", &self.ports, |p| *p == req.destination_port)?;
        let Some(http) = req.http else {
            // Not HTTP: an ALLOW rule cannot be satisfied, a DENY rule applies regardless.
            return match [
                ("hosts", &self.hosts),
                ("methods", &self.methods),
                ("paths", &self.paths),
            ]
            .into_iter()
            .find(|(_, f)| !f.is_empty())
            {
                Some((name, _)) if strict => Err(Miss::NeedsHttp { field: name }),
                _ => Ok(()),
            };
        };
        let host = http.host.to_ascii_lowercase();
        field("hosts", &self.hosts, |p| p.matches(&host))?;
        field("methods", &self.methods, |p| p.matches(&http.method))?;
        field("paths", &self.paths, |p| p.matches(&http.path))
    }
}

#[derive(Debug, Clone)]
pub(crate) enum ConditionValues {
    Patterns(Field<Pattern>),
    Blocks(Field<IpBlock>),
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledCondition {
    pub key: ConditionKey,
    pub values: ConditionValues,
}

impl CompiledCondition {
    pub fn check(&self, req: &Request<'_>, strict: bool) -> Result<(), Miss> {
        let patterns = |f: &Field<Pattern>, value: Option<&str>| {
            field("values", f, |p| value.is_some_and(|v| p.matches(v)))
        };
        match (&self.key, &self.values) {
            (ConditionKey::SourceIp, ConditionValues::Blocks(f)) => {
                field("values", f, |b| b.contains(req.peer.ip))
            }
            (ConditionKey::SourceNamespace, ConditionValues::Patterns(f)) => {
                patterns(f, req.peer.namespace())
            }
            (ConditionKey::SourcePrincipal, ConditionValues::Patterns(f)) => {
                patterns(f, req.peer.principal.as_deref())
            }
            (ConditionKey::DestinationPort, ConditionValues::Patterns(f)) => {
                patterns(f, Some(&req.destination_port.to_string()))
            }
            (ConditionKey::RequestHeader(name), ConditionValues::Patterns(f)) => match req.http {
                Some(http) => patterns(f, http.header(name)),
                None if strict => Err(Miss::NeedsHttp { field: "key" }),
                None => Ok(()),
            },
            _ => Err(Miss::Field {
                field: "values",
                negated: false,
            }),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    pub from: Vec<CompiledSource>,
    pub to: Vec<CompiledOperation>,
    pub when: Vec<CompiledCondition>,
}

impl CompiledRule {
    pub fn matches(&self, req: &Request<'_>, strict: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.check(req).is_ok()))
            && (self.to.is_empty() || self.to.iter().any(|o| o.check(req, strict).is_ok()))
            && self.when.iter().all(|c| c.check(req, strict).is_ok())
    }

    fn needs_http(&self) -> bool {
        self.to.iter().any(CompiledOperation::needs_http)
            || self.when.iter().any(|c| c.key.is_http())
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledPolicy {
    pub key: String,
    pub action: Action,
    pub dry_run: bool,
    pub rules: Vec<CompiledRule>,
}

impl CompiledPolicy {
    /// The first rule that matches.
    pub fn matching_rule(&self, req: &Request<'_>) -> Option<usize> {
        let strict = strict_on_tcp(self.action);
        self.rules.iter().position(|r| r.matches(req, strict))
    }
}

fn patterns(values: &[String], not_values: &[String], make: fn(&str) -> Pattern) -> Field<Pattern> {
    Field {
        values: values.iter().map(|v| make(v)).collect(),
        not_values: not_values.iter().map(|v| make(v)).collect(),
    }
}

fn principals(values: &[String], not_values: &[String]) -> Field<Pattern> {
    let make = |v: &str| Pattern::new(v.strip_prefix("spiffe://").unwrap_or(v));
    Field {
        values: values.iter().map(|v| make(v)).collect(),
        not_values: not_values.iter().map(|v| make(v)).collect(),
    }
}

fn blocks(values: &[String], not_values: &[String]) -> Field<IpBlock> {
    Field {
        values: values.iter().filter_map(|v| IpBlock::new(v)).collect(),
        not_values: not_values.iter().filter_map(|v| IpBlock::new(v)).collect(),
    }
}

fn ports(values: &[String], not_values: &[String]) -> Field<u16> {
    Field {
        values: values.iter().filter_map(|v| v.parse().ok()).collect(),
        not_values: not_values.iter().filter_map(|v| v.parse().ok()).collect(),
    }
}

fn compile(policy: &AuthorizationPolicy) -> CompiledPolicy {
    let rules = policy
        .spec
        .rules
        .iter()
        .map(|rule| CompiledRule {
            from: rule
                .from
                .iter()
                .map(|f| {
                    let s = &f.source;
                    CompiledSource {
                        principals: principals(&s.principals, &s.not_principals),
                        namespaces: patterns(&s.namespaces, &s.not_namespaces, Pattern::new),
                        ip_blocks: blocks(&s.ip_blocks, &s.not_ip_blocks),
                    }
                })
                .collect(),
            to: rule
                .to
                .iter()
                .map(|t| {
                    let o = &t.operation;
                    CompiledOperation {
                        hosts: patterns(&o.hosts, &o.not_hosts, Pattern::new_lowercase),
                        ports: ports(&o.ports, &o.not_ports),
                        methods: patterns(&o.methods, &o.not_methods, Pattern::new),
                        paths: patterns(&o.paths, &o.not_paths, Pattern::new),
                    }
                })
                .collect(),
            when: rule
                .when
                .iter()
                .filter_map(|c| {
                    let key = ConditionKey::parse(&c.key).ok()?;
                    let values = match key {
                        ConditionKey::SourceIp => {
                            ConditionValues::Blocks(blocks(&c.values, &c.not_values))
                        }
                        ConditionKey::SourcePrincipal => {
                            ConditionValues::Patterns(principals(&c.values, &c.not_values))
                        }
                        _ => ConditionValues::Patterns(patterns(
                            &c.values,
                            &c.not_values,
                            Pattern::new,
                        )),
                    };
                    Some(CompiledCondition { key, values })
                })
                .collect(),
        })
        .collect();
    CompiledPolicy {
        key: policy.key(),
        action: policy.spec.action,
        dry_run: policy.dry_run(),
        rules,
    }
}

/// The AuthorizationPolicies of one workload, ready to decide.
#[derive(Debug, Clone, Default)]
pub struct WorkloadPolicies {
    pub(crate) policies: Vec<CompiledPolicy>,
    needs_http: bool,
}

impl WorkloadPolicies {
    /// Compiles the policies that apply to a workload (see
    /// `MeshConfig::authorization_policies_for`).
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a AuthorizationPolicy>) -> Self {
        let policies: Vec<CompiledPolicy> = policies.into_iter().map(compile).collect();
        let needs_http = policies
            .iter()
            .any(|p| p.rules.iter().any(CompiledRule::needs_http));
        Self {
            policies,
            needs_http,
        }
    }

    /// No policy applies: everything is allowed, nothing needs evaluating.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Whether some rule looks at HTTP attributes, so the proxy must read requests to decide.
    pub fn needs_http(&self) -> bool {
        self.needs_http
    }

    /// The keys (`namespace/name`) of the policies, in evaluation order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.policies.iter().map(|p| p.key.as_str())
    }

    pub fn decide(&self, req: &Request<'_>) -> Decision {
        let enforced = decide(self.policies.iter().filter(|p| !p.dry_run), req);
        if !self.policies.iter().any(|p| p.dry_run) {
            return enforced;
        }
        let shadow = decide(self.policies.iter(), req);
        Decision {
            dry_run: Some(Box::new(shadow)),
            ..enforced
        }
    }
}

fn decide<'a>(policies: impl Iterator<Item = &'a CompiledPolicy>, req: &Request<'_>) -> Decision {
    let mut denied = None;
    let mut allowed = None;
    let mut allow_policies = Vec::new();
    let mut audited = Vec::new();
    let mut any = false;
    for policy in policies {
        any = true;
        let verdict = || {
            policy.matching_rule(req).map(|rule| Verdict {
                policy: policy.key.clone(),
                rule,
            })
        };
        match policy.action {
            Action::Deny if denied.is_none() => denied = verdict(),
            Action::Deny => {}
            Action::Allow => {
                allow_policies.push(policy.key.clone());
                if allowed.is_none() {
                    allowed = verdict();
                }
            }
            Action::Audit => audited.extend(verdict()),
        }
    }
    let (allowed, reason) = match (denied, allowed) {
        (Some(deny), _) => (false, Reason::Denied(deny)),
        (None, Some(allow)) => (true, Reason::Allowed(allow)),
        (None, None) if !allow_policies.is_empty() => (
            false,
            Reason::NoAllowMatched {
                policies: allow_policies,
            },
        ),
        (None, None) if any => (true, Reason::NoDenyMatched),
        (None, None) => (true, Reason::NoPolicy),
    };
    Decision {
        allowed,
        reason,
        audited,
        dry_run: None,
    }
}
