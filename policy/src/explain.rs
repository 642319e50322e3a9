//! The reasons behind a decision, policy by policy and rule by rule.

use nodemesh_config::{Action, ConditionKey};
use serde::Serialize;

use crate::{
    Decision, Request, WorkloadPolicies,
    compile::{
        CompiledCondition, CompiledOperation, CompiledRule, CompiledSource, ConditionValues, Miss,
    },
    matcher::list,
    strict_on_tcp,
};

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub decision: Decision,
    /// Every policy that applies to the workload, in evaluation order.
    pub policies: Vec<PolicyTrace>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyTrace {
    pub policy: String,
    pub action: Action,
    pub dry_run: bool,
    /// The first rule that matched.
    pub matched_rule: Option<usize>,
    pub rules: Vec<RuleTrace>,
    /// Set when the policy has no rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleTrace {
    pub rule: usize,
    pub matched: bool,
    /// Why it did not match, one line per failing part.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

impl WorkloadPolicies {
    /// The decision, and why: what every rule of every policy made of the request.
    pub fn explain(&self, req: &Request<'_>) -> Explanation {
        let policies = self
            .policies
            .iter()
            .map(|policy| {
                let strict = strict_on_tcp(policy.action);
                let rules: Vec<RuleTrace> = policy
                    .rules
                    .iter()
                    .enumerate()
                    .map(|(i, rule)| trace_rule(i, rule, req, strict))
                    .collect();
                let note = match (&policy.invalid, policy.rules.is_empty()) {
                    (Some(why), _) => Some(format!(
                        "does not validate ({why}): an ALLOW policy matches nothing, other \
                         actions match without the unreadable values"
                    )),
                    (None, true) => Some(match policy.action {
                        Action::Allow => "no rules: this ALLOW policy matches nothing".to_owned(),
                        _ => "no rules: this policy matches nothing".to_owned(),
                    }),
                    (None, false) => None,
                };
                PolicyTrace {
                    policy: policy.key.clone(),
                    action: policy.action,
                    dry_run: policy.dry_run,
                    matched_rule: rules.iter().find(|r| r.matched).map(|r| r.rule),
                    rules,
                    note,
                }
            })
            .collect();
        Explanation {
            decision: self.decide(req),
            policies,
        }
    }
}

fn trace_rule(index: usize, rule: &CompiledRule, req: &Request<'_>, strict: bool) -> RuleTrace {
    let mut reasons = Vec::new();
    if !rule.from.is_empty() && !rule.from.iter().any(|s| s.check(req).is_ok()) {
        for (i, source) in rule.from.iter().enumerate() {
            if let Err(miss) = source.check(req) {
                reasons.push(format!(
                    "from[{i}].source.{}",
                    describe_source(source, miss, req)
                ));
            }
        }
    }
    if !rule.to.is_empty() && !rule.to.iter().any(|o| o.check(req, strict).is_ok()) {
        for (i, operation) in rule.to.iter().enumerate() {
            if let Err(miss) = operation.check(req, strict) {
                reasons.push(format!(
                    "to[{i}].operation.{}",
                    describe_operation(operation, miss, req)
                ));
            }
        }
    }
    for (i, condition) in rule.when.iter().enumerate() {
        if let Err(miss) = condition.check(req, strict) {
            reasons.push(format!(
                "when[{i}] {}",
                describe_condition(condition, miss, req)
            ));
        }
    }
    RuleTrace {
        rule: index,
        matched: reasons.is_empty(),
        reasons,
    }
}

fn verdict(negated: bool, actual: &str, values: String, not_values: String) -> String {
    if negated {
        format!("{actual} is excluded by {not_values}")
    } else {
        format!("{actual} is not in {values}")
    }
}

fn negated_name(field: &str, negated: bool) -> String {
    if negated {
        format!("not{}{}", &field[..1].to_uppercase(), &field[1..])
    } else {
        field.to_owned()
    }
}

fn describe_source(source: &CompiledSource, miss: Miss, req: &Request<'_>) -> String {
    let Miss::Field { field, negated } = miss else {
        return "needs HTTP".to_owned();
    };
    let peer = req.peer;
    let plaintext = |what: &str| format!("no {what} (plaintext)");
    let (actual, values, not_values) = match field {
        "principals" => (
            peer.principal
                .clone()
                .unwrap_or_else(|| plaintext("principal")),
            list(&source.principals.values),
            list(&source.principals.not_values),
        ),
        "namespaces" => (
            peer.namespace()
                .map_or_else(|| plaintext("namespace"), str::to_owned),
            list(&source.namespaces.values),
            list(&source.namespaces.not_values),
        ),
        "serviceAccounts" => (
            peer.service_account().map_or_else(
                || plaintext("service account"),
                |(ns, sa)| format!("{ns}/{sa}"),
            ),
            list(&source.service_accounts.values),
            list(&source.service_accounts.not_values),
        ),
        "trustDomains" => (
            peer.trust_domain()
                .map_or_else(|| plaintext("trust domain"), str::to_owned),
            list(&source.trust_domains.values),
            list(&source.trust_domains.not_values),
        ),
        "remoteIpBlocks" => (
            peer.ip.to_string(),
            list(&source.remote_ip_blocks.values),
            list(&source.remote_ip_blocks.not_values),
        ),
        _ => (
            peer.ip.to_string(),
            list(&source.ip_blocks.values),
            list(&source.ip_blocks.not_values),
        ),
    };
    format!(
        "{}: {}",
        negated_name(field, negated),
        verdict(negated, &actual, values, not_values)
    )
}

fn describe_operation(operation: &CompiledOperation, miss: Miss, req: &Request<'_>) -> String {
    match miss {
        Miss::NeedsHttp { field } => {
            format!(
                "{field}: the traffic is not HTTP, so an ALLOW rule on HTTP attributes cannot match"
            )
        }
        Miss::Field { field, negated } => {
            let http = req.http;
            let (actual, values, not_values) = match field {
                "ports" => (
                    req.destination_port.to_string(),
                    list(&operation.ports.values),
                    list(&operation.ports.not_values),
                ),
                "hosts" => (
                    http.and_then(|h| h.authority.clone())
                        .unwrap_or_else(|| "no :authority".to_owned()),
                    list(&operation.hosts.values),
                    list(&operation.hosts.not_values),
                ),
                "methods" => (
                    http.map_or_else(String::new, |h| h.method.clone()),
                    list(&operation.methods.values),
                    list(&operation.methods.not_values),
                ),
                _ => (
                    http.map_or_else(String::new, |h| h.path.clone()),
                    list(&operation.paths.values),
                    list(&operation.paths.not_values),
                ),
            };
            format!(
                "{}: {}",
                negated_name(field, negated),
                verdict(negated, &actual, values, not_values)
            )
        }
    }
}

fn describe_condition(condition: &CompiledCondition, miss: Miss, req: &Request<'_>) -> String {
    let key = condition.key.name();
    let Miss::Field { negated, .. } = miss else {
        return format!(
            "({key}): the traffic is not HTTP, so an ALLOW rule on request headers cannot match"
        );
    };
    let peer = req.peer;
    let actual = match &condition.key {
        ConditionKey::RequestHeader(name) => req.http.and_then(|h| h.header(name)).map_or_else(
            || "no such header".to_owned(),
            |v| String::from_utf8_lossy(&v).into_owned(),
        ),
        ConditionKey::SourceIp | ConditionKey::RemoteIp => peer.ip.to_string(),
        ConditionKey::DestinationIp => req.destination_ip.to_string(),
        ConditionKey::SourceNamespace => peer.namespace().unwrap_or("no namespace").to_owned(),
        ConditionKey::SourceServiceAccount => peer.service_account().map_or_else(
            || "no service account".to_owned(),
            |(ns, sa)| format!("{ns}/{sa}"),
        ),
        ConditionKey::SourcePrincipal => peer
            .principal
            .clone()
            .unwrap_or_else(|| "no principal".to_owned()),
        ConditionKey::DestinationPort => req.destination_port.to_string(),
        ConditionKey::ConnectionSni => req.sni.unwrap_or("no SNI").to_owned(),
    };
    let (values, not_values) = match &condition.values {
        ConditionValues::Patterns(f) => (list(&f.values), list(&f.not_values)),
        ConditionValues::Peers(f) => (list(&f.values), list(&f.not_values)),
        ConditionValues::Blocks(f) => (list(&f.values), list(&f.not_values)),
        ConditionValues::Ports(f) => (list(&f.values), list(&f.not_values)),
    };
    format!("({key}): {}", verdict(negated, &actual, values, not_values))
}
