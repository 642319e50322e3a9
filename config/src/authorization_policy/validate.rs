//! What Istio's validation refuses in an AuthorizationPolicy, refused here too, each with the
//! field that is wrong; and the fields that need what nodemesh lacks (JWT, CUSTOM), refused
//! saying so.

use super::{
    Action, AuthorizationPolicy, ConditionKey, DRY_RUN_ANNOTATION, ISTIO_DRY_RUN_ANNOTATION,
    Operation, PolicyTargetRef, Source, parse_go_bool, parse_ip_block,
};

type Invalid = (String, String);

impl AuthorizationPolicy {
    /// Checks the fields that serde cannot: returns the field's path and what is wrong.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.check_dry_run()?;
        let spec = &self.spec;
        let attachments = usize::from(spec.selector.is_some())
            + usize::from(spec.target_ref.is_some())
            + usize::from(!spec.target_refs.is_empty());
        if attachments > 1 {
            return Err((
                "spec".to_owned(),
                "only one of selector, targetRef or targetRefs can be set".to_owned(),
            ));
        }
        if let Some(selector) = &spec.selector {
            selector.validate("spec.selector")?;
        }
        match spec.action {
            Action::Custom => {
                return Err((
                    "spec.action".to_owned(),
                    "CUSTOM delegates the decision to an external authorizer (spec.provider), \
                     which nodemesh does not support yet; use ALLOW, DENY or AUDIT"
                        .to_owned(),
                ));
            }
            _ if spec.provider.is_some() => {
                return Err((
                    "spec.provider".to_owned(),
                    format!(
                        "must not be set with action {}; a provider is only for CUSTOM",
                        action_name(spec.action)
                    ),
                ));
            }
            Action::Deny if spec.rules.is_empty() => {
                return Err((
                    "spec.rules".to_owned(),
                    "a DENY policy without rules would never be triggered; add an empty rule \
                     `- {}` to deny every request"
                        .to_owned(),
                ));
            }
            _ => {}
        }
        for (r, rule) in spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{r}]");
            if rule.from.as_ref().is_some_and(Vec::is_empty) {
                return Err((
                    format!("{at}.from"),
                    "must not be empty; leave `from` out to match any source".to_owned(),
                ));
            }
            for (f, from) in rule.from().iter().enumerate() {
                let at = format!("{at}.from[{f}].source");
                let Some(source) = &from.source else {
                    return Err((at, "must be set".to_owned()));
                };
                check_source(&at, source)?;
            }
            if rule.to.as_ref().is_some_and(Vec::is_empty) {
                return Err((
                    format!("{at}.to"),
                    "must not be empty; leave `to` out to match any operation".to_owned(),
                ));
            }
            for (t, to) in rule.to().iter().enumerate() {
                let at = format!("{at}.to[{t}].operation");
                let Some(operation) = &to.operation else {
                    return Err((at, "must be set".to_owned()));
                };
                check_operation(&at, operation)?;
            }
            for (w, condition) in rule.when.iter().enumerate() {
                let at = format!("{at}.when[{w}]");
                let key =
                    ConditionKey::parse(&condition.key).map_err(|e| (format!("{at}.key"), e))?;
                if condition.values.is_empty() && condition.not_values.is_empty() {
                    return Err((
                        format!("{at}.values"),
                        format!(
                            "at least one of `values` or `notValues` must be set for key {}",
                            condition.key
                        ),
                    ));
                }
                for (field, values) in [
                    ("values", &condition.values),
                    ("notValues", &condition.not_values),
                ] {
                    check_condition_values(&format!("{at}.{field}"), &key, values)?;
                }
            }
        }
        // Last, so that a policy needing JWT or CUSTOM is refused for that first.
        let targets = spec
            .target_ref
            .iter()
            .map(|t| ("spec.targetRef".to_owned(), t))
            .chain(
                spec.target_refs
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (format!("spec.targetRefs[{i}]"), t)),
            );
        for (at, target) in targets {
            check_target(&at, target)?;
        }
        Ok(())
    }

    /// Istio's rules for `istio.io/dry-run` (and nodemesh's own annotation): a boolean, on an
    /// ALLOW or DENY policy.
    fn check_dry_run(&self) -> Result<(), Invalid> {
        for annotation in [ISTIO_DRY_RUN_ANNOTATION, DRY_RUN_ANNOTATION] {
            let Some(value) = self.metadata.annotations.get(annotation) else {
                continue;
            };
            let at = format!("metadata.annotations[{annotation}]");
            if !matches!(self.spec.action, Action::Allow | Action::Deny) {
                return Err((
                    at,
                    format!(
                        "dry-run applies only to ALLOW and DENY policies, not {}; remove the \
                         annotation",
                        action_name(self.spec.action)
                    ),
                ));
            }
            if parse_go_bool(value).is_none() {
                return Err((
                    at,
                    format!("{value:?} is not a boolean; use \"true\" or \"false\""),
                ));
            }
        }
        Ok(())
    }
}

fn check_target(at: &str, target: &PolicyTargetRef) -> Result<(), Invalid> {
    if target.name.is_empty() {
        return Err((format!("{at}.name"), "must be set".to_owned()));
    }
    if target.namespace.as_deref().is_some_and(|ns| !ns.is_empty()) {
        return Err((
            format!("{at}.namespace"),
            "must not be set; cross-namespace references are not supported".to_owned(),
        ));
    }
    let group = if target.group.is_empty() {
        "core"
    } else {
        target.group.as_str()
    };
    match (group, target.kind.as_str()) {
        ("core", "Service") => Ok(()),
        ("gateway.networking.k8s.io", "Gateway" | "GatewayClass") => Err((
            format!("{at}.kind"),
            format!(
                "{} is not supported: nodemesh has no gateways; attach the policy to a Service \
                 or select workloads with spec.selector",
                target.kind
            ),
        )),
        ("networking.istio.io", "ServiceEntry") => Err((
            format!("{at}.kind"),
            "ServiceEntry is not supported: nodemesh has no ServiceEntries; attach the policy \
             to a Service"
                .to_owned(),
        )),
        _ => Err((
            format!("{at}.kind"),
            format!(
                "targetRef must be to one of core/Service, gateway.networking.k8s.io/Gateway, \
                 gateway.networking.k8s.io/GatewayClass or networking.istio.io/ServiceEntry, \
                 not {group}/{}",
                target.kind
            ),
        )),
    }
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::Allow => "ALLOW",
        Action::Deny => "DENY",
        Action::Audit => "AUDIT",
        Action::Custom => "CUSTOM",
    }
}

fn check_source(at: &str, s: &Source) -> Result<(), Invalid> {
    let lists = [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
    ];
    if lists.iter().all(|(_, values)| values.is_empty()) {
        return Err((
            at.to_owned(),
            "must not be empty; say which sources match, or leave the `from` entry out".to_owned(),
        ));
    }
    for (field, values) in lists {
        check_not_empty(&format!("{at}.{field}"), values)?;
    }
    for (field, values) in [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
    ] {
        if !values.is_empty() {
            return Err((
                format!("{at}.{field}"),
                "is not supported: request principals come from JWT request authentication \
                 (RequestAuthentication), which nodemesh does not have yet; use principals or \
                 serviceAccounts, the peer's mTLS identity"
                    .to_owned(),
            ));
        }
    }
    let by_identity = [
        &s.principals,
        &s.not_principals,
        &s.namespaces,
        &s.not_namespaces,
    ];
    let by_account = [&s.service_accounts, &s.not_service_accounts];
    if by_identity.iter().any(|v| !v.is_empty()) && by_account.iter().any(|v| !v.is_empty()) {
        let field = if s.service_accounts.is_empty() {
            "notServiceAccounts"
        } else {
            "serviceAccounts"
        };
        return Err((
            format!("{at}.{field}"),
            "cannot be set together with principals or namespaces (or their not forms); use \
             one way of naming the peer per source"
                .to_owned(),
        ));
    }
    for (field, values) in [
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
    ] {
        check_service_accounts(&format!("{at}.{field}"), values)?;
    }
    for (field, values) in [
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        check_ips(&format!("{at}.{field}"), values)?;
    }
    Ok(())
}

fn check_operation(at: &str, o: &Operation) -> Result<(), Invalid> {
    let lists = [
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
        ("ports", &o.ports),
        ("notPorts", &o.not_ports),
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
    ];
    if lists.iter().all(|(_, values)| values.is_empty()) {
        return Err((
            at.to_owned(),
            "must not be empty; say which operations match, or leave the `to` entry out".to_owned(),
        ));
    }
    for (field, values) in lists {
        check_not_empty(&format!("{at}.{field}"), values)?;
    }
    for (field, values) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
        check_ports(&format!("{at}.{field}"), values)?;
    }
    for (field, values) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
        for (i, path) in values.iter().enumerate() {
            check_path_template(path).map_err(|e| (format!("{at}.{field}[{i}]"), e))?;
        }
    }
    Ok(())
}

fn check_condition_values(at: &str, key: &ConditionKey, values: &[String]) -> Result<(), Invalid> {
    check_not_empty(at, values)?;
    match key {
        ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => {
            check_ips(at, values)
        }
        ConditionKey::DestinationPort => check_ports(at, values),
        ConditionKey::SourceServiceAccount => check_service_accounts(at, values),
        _ => Ok(()),
    }
}

fn check_not_empty(at: &str, values: &[String]) -> Result<(), Invalid> {
    match values.iter().position(String::is_empty) {
        Some(i) => Err((
            format!("{at}[{i}]"),
            "is empty; an empty value is not allowed".to_owned(),
        )),
        None => Ok(()),
    }
}

fn check_ips(at: &str, values: &[String]) -> Result<(), Invalid> {
    for (i, value) in values.iter().enumerate() {
        parse_ip_block(value).map_err(|e| (format!("{at}[{i}]"), e))?;
    }
    Ok(())
}

/// A port as Istio reads one: decimal digits, 0 to 65535.
pub fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn check_ports(at: &str, values: &[String]) -> Result<(), Invalid> {
    for (i, value) in values.iter().enumerate() {
        if parse_port(value).is_none() {
            return Err((
                format!("{at}[{i}]"),
                format!("{value:?} is not a port number (0 to 65535, in digits)"),
            ));
        }
    }
    Ok(())
}

/// `name` or `namespace/name`, no wildcard, at most 16 values of at most 320 characters.
fn check_service_accounts(at: &str, values: &[String]) -> Result<(), Invalid> {
    if values.len() > 16 {
        return Err((at.to_owned(), "may not have more than 16 values".to_owned()));
    }
    for (i, value) in values.iter().enumerate() {
        let at = format!("{at}[{i}]");
        if value.contains('*') {
            return Err((
                at,
                format!("{value:?}: wildcards are not allowed in service accounts"),
            ));
        }
        if value.matches('/').count() > 1 {
            return Err((
                at,
                format!("{value:?}: use the form 'serviceAccount' or 'namespace/serviceAccount'"),
            ));
        }
        if value.len() > 320 {
            return Err((at, "may not be longer than 320 characters".to_owned()));
        }
        if let Some((ns, sa)) = value.split_once('/')
            && (ns.is_empty() || sa.is_empty())
        {
            return Err((
                at,
                format!("{value:?}: the namespace and the service account must not be empty"),
            ));
        }
    }
    Ok(())
}

/// The pchar characters a literal segment of a path template may hold (RFC 3986).
fn valid_literal(segment: &str) -> bool {
    !segment.is_empty()
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b))
}

/// Istio's rules for `{*}` and `{**}` in paths: whole segments, `{**}` last, no other braces,
/// literal segments made of pchar characters.
fn check_path_template(path: &str) -> Result<(), String> {
    let template = path.contains("{*}") || path.contains("{**}");
    let mut any_seen = false;
    for segment in path.trim_matches('/').split('/') {
        match segment {
            "{*}" | "{**}" if any_seen => {
                return Err(format!(
                    "{path:?}: {{**}} must be the last operator of a path template"
                ));
            }
            "{*}" => continue,
            "{**}" => {
                any_seen = true;
                continue;
            }
            _ => {}
        }
        if segment.contains(['{', '}']) {
            return Err(format!(
                "{path:?}: `{{` and `}}` may only appear as the whole segments {{*}} and {{**}}"
            ));
        }
        if template && !valid_literal(segment) {
            return Err(format!(
                "{path:?}: the segment {segment:?} of a path template may only hold letters, \
                 digits and -._~%!$&'()+,;:@="
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
