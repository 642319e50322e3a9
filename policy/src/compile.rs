//! Policies compiled for one workload, and the decision.

use nodemesh_config::{Action, AuthorizationPolicy, ConditionKey, parse_port};

pub use crate::trust_domains::TrustDomains;
use crate::{
    Decision, Reason, Request, Verdict,
    matcher::{Field, IpBlock, PathPattern, Pattern},
    peer_match::PeerMatch,
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
    pub principals: Field<PeerMatch>,
    pub namespaces: Field<PeerMatch>,
    pub service_accounts: Field<PeerMatch>,
    pub trust_domains: Field<PeerMatch>,
    pub ip_blocks: Field<IpBlock>,
    pub remote_ip_blocks: Field<IpBlock>,
}

impl CompiledSource {
    pub fn check(&self, req: &Request<'_>) -> Result<(), Miss> {
        let peer = |m: &PeerMatch| m.matches(req.peer);
        field("principals", &self.principals, peer)?;
        field("namespaces", &self.namespaces, peer)?;
        field("serviceAccounts", &self.service_accounts, peer)?;
        field("trustDomains", &self.trust_domains, peer)?;
        field("ipBlocks", &self.ip_blocks, |b| b.contains(req.peer.ip))?;
        // No proxy in front of the mesh is trusted to name another client: the peer's address.
        field("remoteIpBlocks", &self.remote_ip_blocks, |b| {
            b.contains(req.peer.ip)
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledOperation {
    pub hosts: Field<Pattern>,
    pub ports: Field<u16>,
    pub methods: Field<Pattern>,
    pub paths: Field<PathPattern>,
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
                ("hosts", self.hosts.is_empty()),
                ("methods", self.methods.is_empty()),
                ("paths", self.paths.is_empty()),
            ]
            .into_iter()
            .find(|(_, empty)| !empty)
            {
                Some((name, _)) if strict => Err(Miss::NeedsHttp { field: name }),
                _ => Ok(()),
            };
        };
        field("hosts", &self.hosts, |p| {
            p.matches_host(http.authority.as_deref())
        })?;
        field("methods", &self.methods, |p| {
            p.matches_header(Some(http.method.as_bytes()))
        })?;
        field("paths", &self.paths, |p| p.matches(&http.path))
    }
}

#[derive(Debug, Clone)]
pub(crate) enum ConditionValues {
    Patterns(Field<Pattern>),
    Peers(Field<PeerMatch>),
    Blocks(Field<IpBlock>),
    Ports(Field<u16>),
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledCondition {
    pub key: ConditionKey,
    pub values: ConditionValues,
}

impl CompiledCondition {
    pub fn check(&self, req: &Request<'_>, strict: bool) -> Result<(), Miss> {
        let at = "values";
        match (&self.key, &self.values) {
            (ConditionKey::SourceIp | ConditionKey::RemoteIp, ConditionValues::Blocks(f)) => {
                field(at, f, |b| b.contains(req.peer.ip))
            }
            (ConditionKey::DestinationIp, ConditionValues::Blocks(f)) => {
                field(at, f, |b| b.contains(req.destination_ip))
            }
            (ConditionKey::DestinationPort, ConditionValues::Ports(f)) => {
                field(at, f, |p| *p == req.destination_port)
            }
            (_, ConditionValues::Peers(f)) => field(at, f, |m| m.matches(req.peer)),
            (ConditionKey::ConnectionSni, ConditionValues::Patterns(f)) => {
                // Server names compare without regard to case, as DNS names do.
                let sni = req.sni.map(str::to_ascii_lowercase);
                field(at, f, |p| sni.as_deref().is_some_and(|sni| p.matches(sni)))
            }
            (ConditionKey::RequestHeader(name), ConditionValues::Patterns(f)) => match req.http {
                Some(http) => {
                    let value = http.header(name);
                    field(at, f, |p| p.matches_header(value.as_deref()))
                }
                None if strict => Err(Miss::NeedsHttp { field: "key" }),
                None => Ok(()),
            },
            _ => Err(Miss::Field {
                field: at,
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

    fn needs_sni(&self) -> bool {
        self.when
            .iter()
            .any(|c| c.key == ConditionKey::ConnectionSni)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledPolicy {
    pub key: String,
    pub action: Action,
    pub dry_run: bool,
    pub rules: Vec<CompiledRule>,
    /// Why the policy does not validate, if it does not (a newer controller's field, say).
    /// Its unreadable values are left out, so that an ALLOW policy then matches nothing and a
    /// DENY policy matches more: both fail closed, as Istio's builder does.
    pub invalid: Option<String>,
}

impl CompiledPolicy {
    /// The first rule that matches.
    pub fn matching_rule(&self, req: &Request<'_>) -> Option<usize> {
        if self.invalid.is_some() && self.action == Action::Allow {
            return None;
        }
        let strict = strict_on_tcp(self.action);
        self.rules.iter().position(|r| r.matches(req, strict))
    }
}

fn each<T>(values: &[String], not_values: &[String], make: impl Fn(&str) -> T) -> Field<T> {
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
        values: values.iter().filter_map(|v| parse_port(v)).collect(),
        not_values: not_values.iter().filter_map(|v| parse_port(v)).collect(),
    }
}

/// What the compiler needs besides the policy.
struct Context<'a> {
    trust_domains: &'a TrustDomains,
    /// The policy's namespace: a bare service account name is in it.
    namespace: &'a str,
}

impl Context<'_> {
    fn principals(&self, values: &[String], not_values: &[String]) -> Field<PeerMatch> {
        let expand = |list: &[String]| {
            list.iter()
                .flat_map(|v| self.trust_domains.expand(v))
                .map(|v| PeerMatch::Principal(Pattern::new(&v)))
                .collect()
        };
        Field {
            values: expand(values),
            not_values: expand(not_values),
        }
    }

    fn service_account(&self, value: &str) -> PeerMatch {
        match value.split_once('/') {
            Some((ns, sa)) => PeerMatch::ServiceAccount(ns.to_owned(), sa.to_owned()),
            None => PeerMatch::ServiceAccount(self.namespace.to_owned(), value.to_owned()),
        }
    }
}

fn compile(policy: &AuthorizationPolicy, trust_domains: &TrustDomains) -> CompiledPolicy {
    let cx = Context {
        trust_domains,
        namespace: policy.metadata.namespace(),
    };
    let rules = policy
        .spec
        .rules
        .iter()
        .map(|rule| CompiledRule {
            from: rule
                .from()
                .iter()
                .filter_map(|f| f.source.as_ref())
                .map(|s| CompiledSource {
                    principals: cx.principals(&s.principals, &s.not_principals),
                    namespaces: each(&s.namespaces, &s.not_namespaces, PeerMatch::namespace),
                    service_accounts: each(&s.service_accounts, &s.not_service_accounts, |v| {
                        cx.service_account(v)
                    }),
                    trust_domains: each(&s.trust_domains, &s.not_trust_domains, |v| {
                        PeerMatch::TrustDomain(Pattern::new(v))
                    }),
                    ip_blocks: blocks(&s.ip_blocks, &s.not_ip_blocks),
                    remote_ip_blocks: blocks(&s.remote_ip_blocks, &s.not_remote_ip_blocks),
                })
                .collect(),
            to: rule
                .to()
                .iter()
                .filter_map(|t| t.operation.as_ref())
                .map(|o| CompiledOperation {
                    hosts: each(&o.hosts, &o.not_hosts, Pattern::new_lowercase),
                    ports: ports(&o.ports, &o.not_ports),
                    methods: each(&o.methods, &o.not_methods, Pattern::new),
                    paths: each(&o.paths, &o.not_paths, PathPattern::new),
                })
                .collect(),
            when: rule
                .when
                .iter()
                .filter_map(|c| {
                    let key = ConditionKey::parse(&c.key).ok()?;
                    let (v, n) = (&c.values, &c.not_values);
                    let values = match key {
                        ConditionKey::SourceIp
                        | ConditionKey::RemoteIp
                        | ConditionKey::DestinationIp => ConditionValues::Blocks(blocks(v, n)),
                        ConditionKey::DestinationPort => ConditionValues::Ports(ports(v, n)),
                        ConditionKey::SourcePrincipal => {
                            ConditionValues::Peers(cx.principals(v, n))
                        }
                        ConditionKey::SourceNamespace => {
                            ConditionValues::Peers(each(v, n, PeerMatch::namespace))
                        }
                        ConditionKey::SourceServiceAccount => {
                            ConditionValues::Peers(each(v, n, |v| cx.service_account(v)))
                        }
                        ConditionKey::RequestHeader(_) => {
                            ConditionValues::Patterns(each(v, n, Pattern::new))
                        }
                        ConditionKey::ConnectionSni => {
                            ConditionValues::Patterns(each(v, n, Pattern::new_lowercase))
                        }
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
        invalid: policy
            .validate()
            .err()
            .map(|(field, message)| format!("{field}: {message}")),
    }
}

/// The AuthorizationPolicies of one workload, ready to decide.
#[derive(Debug, Clone, Default)]
pub struct WorkloadPolicies {
    pub(crate) policies: Vec<CompiledPolicy>,
    needs_http: bool,
    needs_sni: bool,
}

impl WorkloadPolicies {
    /// Compiles the policies that apply to a workload (see
    /// `MeshConfig::authorization_policies_for`), for a mesh of `trust_domains`.
    pub fn new<'a>(
        policies: impl IntoIterator<Item = &'a AuthorizationPolicy>,
        trust_domains: &TrustDomains,
    ) -> Self {
        let policies: Vec<CompiledPolicy> = policies
            .into_iter()
            .filter(|p| p.spec.action != Action::Custom)
            .map(|p| compile(p, trust_domains))
            .collect();
        let any = |f: fn(&CompiledRule) -> bool| policies.iter().any(|p| p.rules.iter().any(f));
        let needs_http = any(CompiledRule::needs_http);
        let needs_sni = any(CompiledRule::needs_sni);
        Self {
            policies,
            needs_http,
            needs_sni,
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

    /// Whether some rule looks at `connection.sni`, so the proxy must read the TLS hello.
    pub fn needs_sni(&self) -> bool {
        self.needs_sni
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
            Action::Deny | Action::Custom => {}
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
