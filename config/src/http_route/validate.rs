//! The checks Gateway API's schema and CEL rules make on one HTTPRoute, plus what nodemesh
//! cannot do, each refusal naming the field.

use std::collections::BTreeSet;

use super::{
    HttpBackendRef, HttpPathMatch, HttpRoute, HttpRouteMatch, HttpRouteRule, ParentReference,
    PathMatchType, ValueMatchType,
};

mod filters;

use self::filters::check_filters;

type Refusal = (String, String);

const MAX_PARENT_REFS: usize = 32;
const MAX_RULES: usize = 16;
const MAX_MATCHES: usize = 64;
const MAX_MATCHES_PER_ROUTE: usize = 128;
const MAX_BACKEND_REFS: usize = 16;
pub(super) const MAX_CONDITIONS: usize = 16;
const MAX_WEIGHT: u32 = 1_000_000;
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

impl HttpRoute {
    /// Checks the route on its own; returns the field at fault and what to do.
    pub fn validate(&self) -> Result<(), Refusal> {
        let spec = &self.spec;
        if spec.parent_refs.is_empty() {
            return Err((
                "spec.parentRefs".into(),
                "is empty; attach the route to a Service: parentRefs: [{group: \"\", kind: \
                 Service, name: <service>, port: <port>}]"
                    .into(),
            ));
        }
        max_items("spec.parentRefs", spec.parent_refs.len(), MAX_PARENT_REFS)?;
        for (i, parent) in spec.parent_refs.iter().enumerate() {
            check_parent(&format!("spec.parentRefs[{i}]"), parent)?;
        }
        max_items("spec.rules", spec.rules.len(), MAX_RULES)?;
        let matches: usize = spec.rules.iter().map(|r| r.matches.len()).sum();
        if matches > MAX_MATCHES_PER_ROUTE {
            return Err((
                "spec.rules".into(),
                format!(
                    "has {matches} matches in all; Gateway API allows at most \
                     {MAX_MATCHES_PER_ROUTE} per route"
                ),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, rule) in spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{i}]");
            if let Some(name) = &rule.name {
                crate::meta::check_dns_label(name).map_err(|e| (format!("{at}.name"), e))?;
                if !names.insert(name) {
                    return Err((
                        format!("{at}.name"),
                        format!("{name:?} names another rule too; rule names are unique"),
                    ));
                }
            }
            check_rule(&at, rule)?;
        }
        Ok(())
    }
}

pub(super) fn max_items(field: &str, len: usize, max: usize) -> Result<(), Refusal> {
    if len > max {
        return Err((
            field.to_owned(),
            format!("has {len} entries; Gateway API allows at most {max}"),
        ));
    }
    Ok(())
}

fn check_parent(at: &str, parent: &ParentReference) -> Result<(), Refusal> {
    let group = parent
        .group
        .as_deref()
        .unwrap_or("gateway.networking.k8s.io");
    let kind = parent.kind.as_deref().unwrap_or("Gateway");
    if !group.is_empty() || kind != "Service" {
        return Err((
            at.to_owned(),
            format!(
                "refers to group {group:?} kind {kind:?}; nodemesh attaches routes to Services \
                 as GAMMA does: set group: \"\" and kind: Service (without them Gateway API \
                 means a Gateway)"
            ),
        ));
    }
    crate::meta::check_dns_label(&parent.name).map_err(|e| (format!("{at}.name"), e))?;
    if let Some(ns) = &parent.namespace {
        crate::meta::check_dns_label(ns).map_err(|e| (format!("{at}.namespace"), e))?;
    }
    if parent.section_name.is_some() {
        return Err((
            format!("{at}.sectionName"),
            "is not supported for Service parents; use port".into(),
        ));
    }
    if parent.port == Some(0) {
        return Err((format!("{at}.port"), "0 is not a port".into()));
    }
    Ok(())
}

fn check_rule(at: &str, rule: &HttpRouteRule) -> Result<(), Refusal> {
    if rule.session_persistence.is_some() {
        return Err((
            format!("{at}.sessionPersistence"),
            "is not supported by nodemesh; use a BackendTrafficPolicy with loadBalancer type \
             ConsistentHash"
                .into(),
        ));
    }
    max_items(&format!("{at}.matches"), rule.matches.len(), MAX_MATCHES)?;
    for (j, m) in rule.matches.iter().enumerate() {
        check_match(&format!("{at}.matches[{j}]"), m)?;
    }
    check_filters(at, rule)?;
    max_items(
        &format!("{at}.backendRefs"),
        rule.backend_refs.len(),
        MAX_BACKEND_REFS,
    )?;
    for (j, backend) in rule.backend_refs.iter().enumerate() {
        check_backend(&format!("{at}.backendRefs[{j}]"), backend)?;
    }
    if !rule.backend_refs.is_empty() && rule.backend_refs.iter().all(|b| b.weight == 0) {
        return Err((
            format!("{at}.backendRefs"),
            "every weight is 0, so the rule could send nowhere; give at least one backend a \
             weight above 0"
                .into(),
        ));
    }
    if let Some(timeouts) = &rule.timeouts
        && let (Some(request), Some(backend)) = (&timeouts.request, &timeouts.backend_request)
        && !request.is_zero()
        && backend.get() > request.get()
    {
        return Err((
            format!("{at}.timeouts.backendRequest"),
            format!(
                "{backend} is longer than timeouts.request ({request}); each attempt must fit \
                 in the whole request's time"
            ),
        ));
    }
    if let Some(retry) = &rule.retry {
        for (k, code) in retry.codes.iter().enumerate() {
            if !(400..=599).contains(code) {
                return Err((
                    format!("{at}.retry.codes[{k}]"),
                    format!("{code} cannot be retried; give codes from 400 to 599"),
                ));
            }
        }
    }
    Ok(())
}

fn check_match(at: &str, m: &HttpRouteMatch) -> Result<(), Refusal> {
    if let Some(path) = &m.path {
        check_path_match(&format!("{at}.path"), path)?;
    }
    max_items(&format!("{at}.headers"), m.headers.len(), MAX_CONDITIONS)?;
    let mut seen = BTreeSet::new();
    for (k, header) in m.headers.iter().enumerate() {
        let field = format!("{at}.headers[{k}]");
        check_header_name(&format!("{field}.name"), &header.name)?;
        if !seen.insert(header.name.to_ascii_lowercase()) {
            return Err((
                format!("{field}.name"),
                format!("header {:?} is matched twice; match it once", header.name),
            ));
        }
        check_value_match(&format!("{field}.value"), header.kind, &header.value)?;
    }
    max_items(
        &format!("{at}.queryParams"),
        m.query_params.len(),
        MAX_CONDITIONS,
    )?;
    let mut seen = BTreeSet::new();
    for (k, param) in m.query_params.iter().enumerate() {
        let field = format!("{at}.queryParams[{k}]");
        if param.name.is_empty() || param.name.len() > 256 {
            return Err((
                format!("{field}.name"),
                "must be 1 to 256 characters".into(),
            ));
        }
        if !seen.insert(param.name.as_str()) {
            return Err((
                format!("{field}.name"),
                format!(
                    "query parameter {:?} is matched twice; match it once",
                    param.name
                ),
            ));
        }
        check_value_match(&format!("{field}.value"), param.kind, &param.value)?;
    }
    if let Some(method) = &m.method
        && !METHODS.contains(&method.as_str())
    {
        return Err((
            format!("{at}.method"),
            format!("{method:?} is not one of {}", METHODS.join(", ")),
        ));
    }
    Ok(())
}

fn check_path_match(at: &str, path: &HttpPathMatch) -> Result<(), Refusal> {
    let value = &path.value;
    if value.len() > 1024 {
        return Err((
            format!("{at}.value"),
            "is longer than 1024 characters".into(),
        ));
    }
    match path.kind {
        PathMatchType::RegularExpression => crate::meta::check_regex(&format!("{at}.value"), value),
        PathMatchType::Exact | PathMatchType::PathPrefix => {
            if !value.starts_with('/') {
                return Err((
                    format!("{at}.value"),
                    format!("{value:?} must be an absolute path starting with '/'"),
                ));
            }
            let forbidden = ["//", "/./", "/../", "%2f", "%2F", "#"];
            if let Some(bad) = forbidden.iter().find(|f| value.contains(**f)) {
                return Err((
                    format!("{at}.value"),
                    format!("{value:?} must not contain {bad:?}"),
                ));
            }
            if value.ends_with("/..") || value.ends_with("/.") {
                return Err((
                    format!("{at}.value"),
                    format!("{value:?} must not end with '/..' or '/.'"),
                ));
            }
            Ok(())
        }
    }
}

fn check_value_match(at: &str, kind: ValueMatchType, value: &str) -> Result<(), Refusal> {
    if value.is_empty() || value.len() > 4096 {
        return Err((at.to_owned(), "must be 1 to 4096 characters".into()));
    }
    match kind {
        ValueMatchType::Exact => Ok(()),
        ValueMatchType::RegularExpression => crate::meta::check_regex(at, value),
    }
}

/// An HTTP header name (RFC 7230 token), as Gateway API's HTTPHeaderName.
pub(super) fn check_header_name(at: &str, name: &str) -> Result<(), Refusal> {
    let valid = !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if valid {
        Ok(())
    } else {
        Err((
            at.to_owned(),
            format!("{name:?} is not an HTTP header name"),
        ))
    }
}

fn check_backend(at: &str, backend: &HttpBackendRef) -> Result<(), Refusal> {
    let group = backend.group.as_deref().unwrap_or("");
    let kind = backend.kind.as_deref().unwrap_or("Service");
    if !group.is_empty() || kind != "Service" {
        return Err((
            at.to_owned(),
            format!(
                "refers to group {group:?} kind {kind:?}; nodemesh sends to Services (group \
                 \"\", kind Service)"
            ),
        ));
    }
    crate::meta::check_dns_label(&backend.name).map_err(|e| (format!("{at}.name"), e))?;
    if let Some(ns) = &backend.namespace {
        crate::meta::check_dns_label(ns).map_err(|e| (format!("{at}.namespace"), e))?;
    }
    match backend.port {
        None => {
            return Err((
                format!("{at}.port"),
                "is missing; a Service backend needs the Service port to send to".into(),
            ));
        }
        Some(0) => return Err((format!("{at}.port"), "0 is not a port".into())),
        Some(_) => {}
    }
    if backend.weight > MAX_WEIGHT {
        return Err((
            format!("{at}.weight"),
            format!(
                "{} is above the largest weight, {MAX_WEIGHT}",
                backend.weight
            ),
        ));
    }
    if backend.filters.is_some() {
        return Err((
            format!("{at}.filters"),
            "filters on a backendRef are not supported by nodemesh; put them on the rule".into(),
        ));
    }
    Ok(())
}
