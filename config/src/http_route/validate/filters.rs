//! The checks on a rule's filters: Gateway API's CEL rules (one filter of a type per rule, the
//! field that goes with the type, ReplacePrefixMatch only with one PathPrefix match, no
//! redirect with backendRefs or with a rewrite) and refusals of the filters nodemesh lacks.

use std::collections::BTreeSet;

use super::{MAX_CONDITIONS, Refusal, check_header_name, max_items};
use crate::http_route::{
    FilterType, HeaderModifier, HttpRouteFilter, HttpRouteRule, PathMatchType, PathModifier,
    PathModifierType,
};

const MAX_FILTERS: usize = 16;
const REDIRECT_CODES: [u16; 5] = [301, 302, 303, 307, 308];

pub(super) fn check_filters(at: &str, rule: &HttpRouteRule) -> Result<(), Refusal> {
    max_items(&format!("{at}.filters"), rule.filters.len(), MAX_FILTERS)?;
    let mut seen = BTreeSet::new();
    for (j, filter) in rule.filters.iter().enumerate() {
        let field = format!("{at}.filters[{j}]");
        check_filter(&field, filter)?;
        if !seen.insert(filter.kind.name()) {
            return Err((
                format!("{field}.type"),
                format!(
                    "{} appears twice in this rule; give it once",
                    filter.kind.name()
                ),
            ));
        }
        let prefix_modifier = [
            filter
                .request_redirect
                .as_ref()
                .and_then(|r| r.path.as_ref()),
            filter.url_rewrite.as_ref().and_then(|r| r.path.as_ref()),
        ]
        .into_iter()
        .flatten()
        .any(|p| p.kind == PathModifierType::ReplacePrefixMatch);
        let one_prefix_match = rule.matches.len() == 1
            && rule.matches[0].effective_path().kind == PathMatchType::PathPrefix;
        if prefix_modifier && !one_prefix_match && !rule.matches.is_empty() {
            return Err((
                format!("{field}.path.replacePrefixMatch"),
                "needs the rule to have exactly one match, of path type PathPrefix".into(),
            ));
        }
    }
    let has = |kind| rule.filters.iter().any(|f| f.kind == kind);
    if has(FilterType::RequestRedirect) && has(FilterType::UrlRewrite) {
        return Err((
            format!("{at}.filters"),
            "RequestRedirect and URLRewrite cannot both be in one rule".into(),
        ));
    }
    if has(FilterType::RequestRedirect) && !rule.backend_refs.is_empty() {
        return Err((
            format!("{at}.filters"),
            "RequestRedirect answers the request itself; remove the rule's backendRefs".into(),
        ));
    }
    Ok(())
}

fn check_filter(at: &str, filter: &HttpRouteFilter) -> Result<(), Refusal> {
    let unsupported = |why: &str| {
        Err((
            format!("{at}.type"),
            format!(
                "{} filters are not supported by nodemesh{why}",
                filter.kind.name()
            ),
        ))
    };
    let present = [
        (
            FilterType::RequestHeaderModifier,
            filter.request_header_modifier.is_some(),
            "requestHeaderModifier",
        ),
        (
            FilterType::ResponseHeaderModifier,
            filter.response_header_modifier.is_some(),
            "responseHeaderModifier",
        ),
        (
            FilterType::RequestRedirect,
            filter.request_redirect.is_some(),
            "requestRedirect",
        ),
        (
            FilterType::UrlRewrite,
            filter.url_rewrite.is_some(),
            "urlRewrite",
        ),
        (
            FilterType::RequestMirror,
            filter.request_mirror.is_some(),
            "requestMirror",
        ),
        (
            FilterType::ExtensionRef,
            filter.extension_ref.is_some(),
            "extensionRef",
        ),
        (FilterType::Cors, filter.cors.is_some(), "cors"),
    ];
    for (kind, is_set, field) in present {
        if kind == filter.kind && !is_set {
            return Err((
                format!("{at}.{field}"),
                format!("is missing; a {} filter needs it", kind.name()),
            ));
        }
        if kind != filter.kind && is_set {
            return Err((
                format!("{at}.{field}"),
                format!(
                    "does not belong in a filter of type {}; give it its own filter",
                    filter.kind.name()
                ),
            ));
        }
    }
    match filter.kind {
        FilterType::RequestHeaderModifier => check_modifier(
            &format!("{at}.requestHeaderModifier"),
            filter.request_header_modifier.as_ref(),
        ),
        FilterType::ResponseHeaderModifier => check_modifier(
            &format!("{at}.responseHeaderModifier"),
            filter.response_header_modifier.as_ref(),
        ),
        FilterType::RequestRedirect => {
            let at = format!("{at}.requestRedirect");
            let Some(redirect) = &filter.request_redirect else {
                return Ok(());
            };
            if let Some(scheme) = &redirect.scheme
                && scheme != "http"
                && scheme != "https"
            {
                return Err((
                    format!("{at}.scheme"),
                    format!("{scheme:?} is not http or https"),
                ));
            }
            if let Some(host) = &redirect.hostname {
                check_hostname(&format!("{at}.hostname"), host)?;
            }
            if redirect.port == Some(0) {
                return Err((format!("{at}.port"), "0 is not a port".into()));
            }
            if let Some(code) = redirect.status_code
                && !REDIRECT_CODES.contains(&code)
            {
                return Err((
                    format!("{at}.statusCode"),
                    format!("{code} is not a redirect code; use 301, 302, 303, 307 or 308"),
                ));
            }
            match &redirect.path {
                Some(path) => check_path_modifier(&format!("{at}.path"), path),
                None => Ok(()),
            }
        }
        FilterType::UrlRewrite => {
            let at = format!("{at}.urlRewrite");
            let Some(rewrite) = &filter.url_rewrite else {
                return Ok(());
            };
            if let Some(host) = &rewrite.hostname {
                check_hostname(&format!("{at}.hostname"), host)?;
            }
            match &rewrite.path {
                Some(path) => check_path_modifier(&format!("{at}.path"), path),
                None => Ok(()),
            }
        }
        FilterType::RequestMirror => unsupported(""),
        FilterType::ExtensionRef => unsupported(": it has no extensions"),
        FilterType::Cors => unsupported(""),
    }
}

fn check_modifier(at: &str, modifier: Option<&HeaderModifier>) -> Result<(), Refusal> {
    let Some(modifier) = modifier else {
        return Ok(());
    };
    for (list, headers) in [("set", &modifier.set), ("add", &modifier.add)] {
        max_items(&format!("{at}.{list}"), headers.len(), MAX_CONDITIONS)?;
        let mut seen = BTreeSet::new();
        for (k, header) in headers.iter().enumerate() {
            let field = format!("{at}.{list}[{k}]");
            check_header_name(&format!("{field}.name"), &header.name)?;
            if !seen.insert(header.name.to_ascii_lowercase()) {
                return Err((
                    format!("{field}.name"),
                    format!("header {:?} is listed twice", header.name),
                ));
            }
            if http::HeaderValue::from_str(&header.value).is_err() {
                return Err((
                    format!("{field}.value"),
                    format!("{:?} is not a valid header value", header.value),
                ));
            }
        }
    }
    max_items(
        &format!("{at}.remove"),
        modifier.remove.len(),
        MAX_CONDITIONS,
    )?;
    let mut seen = BTreeSet::new();
    for (k, name) in modifier.remove.iter().enumerate() {
        check_header_name(&format!("{at}.remove[{k}]"), name)?;
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err((
                format!("{at}.remove[{k}]"),
                format!("header {name:?} is listed twice"),
            ));
        }
    }
    Ok(())
}

fn check_path_modifier(at: &str, path: &PathModifier) -> Result<(), Refusal> {
    let (value, other, wanted, unwanted) = match path.kind {
        PathModifierType::ReplaceFullPath => (
            &path.replace_full_path,
            &path.replace_prefix_match,
            "replaceFullPath",
            "replacePrefixMatch",
        ),
        PathModifierType::ReplacePrefixMatch => (
            &path.replace_prefix_match,
            &path.replace_full_path,
            "replacePrefixMatch",
            "replaceFullPath",
        ),
    };
    if other.is_some() {
        return Err((
            format!("{at}.{unwanted}"),
            format!("does not go with this type; a path modifier of this type takes {wanted}"),
        ));
    }
    let Some(value) = value else {
        return Err((
            format!("{at}.{wanted}"),
            "is missing; a path modifier of this type needs it".to_owned(),
        ));
    };
    if !value.is_empty() && !value.starts_with('/') {
        return Err((
            format!("{at}.{wanted}"),
            format!("{value:?} must start with '/'"),
        ));
    }
    if value.len() > 1024 {
        return Err((
            format!("{at}.{wanted}"),
            "is longer than 1024 characters".into(),
        ));
    }
    Ok(())
}

fn check_hostname(at: &str, host: &str) -> Result<(), Refusal> {
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if valid {
        Ok(())
    } else {
        Err((
            at.to_owned(),
            format!("{host:?} is not a host name (lower-case DNS labels separated by dots)"),
        ))
    }
}
