//! HTTPRoute matches, compiled, and the precedence Gateway API defines between them.
//!
//! Across every rule of every route attached to a Service port, the match that wins is the
//! one with, in order: an `Exact` path; then (nodemesh's choice where the specification leaves
//! it to implementations) a `RegularExpression` path, longer patterns first; then the longest
//! `PathPrefix`; then a method; then the most header matches; then the most query parameter
//! matches. Ties go to the oldest route (`creationTimestamp`), then to the route first by
//! `namespace/name`, then to the first rule and match in list order.

use std::cmp::Ordering;

use http::{HeaderMap, HeaderName, Method};
use nodemesh_config::{HttpRouteMatch, PathMatchType, ValueMatchType};
use regex::Regex;

/// The parts of a request that routes look at.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// The path, without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

#[derive(Debug, Clone)]
pub(crate) enum PathCondition {
    Exact(String),
    /// Without a trailing `/`; empty for `/`.
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub(crate) enum ValueCondition {
    Exact(String),
    Regex(Regex),
}

/// One `matches` entry of a rule.
#[derive(Debug, Clone)]
pub struct CompiledMatch {
    path: PathCondition,
    /// The path value as written, for precedence and explanations.
    pub(crate) path_text: String,
    headers: Vec<(HeaderName, ValueCondition)>,
    query: Vec<(String, ValueCondition)>,
    method: Option<Method>,
}

/// A regular expression that must match the whole value, as Envoy's `safe_regex` does.
fn whole(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

fn value_condition(kind: ValueMatchType, value: &str) -> Result<ValueCondition, regex::Error> {
    Ok(match kind {
        ValueMatchType::Exact => ValueCondition::Exact(value.to_owned()),
        ValueMatchType::RegularExpression => ValueCondition::Regex(whole(value)?),
    })
}

impl ValueCondition {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueCondition::Exact(expected) => expected == value,
            ValueCondition::Regex(regex) => regex.is_match(value),
        }
    }
}

impl CompiledMatch {
    /// Compiles a validated match; a regular expression that does not compile is an error
    /// (validation refuses those first).
    pub fn new(m: &HttpRouteMatch) -> Result<Self, regex::Error> {
        let path = m.effective_path();
        let condition = match path.kind {
            PathMatchType::Exact => PathCondition::Exact(path.value.clone()),
            PathMatchType::PathPrefix => {
                PathCondition::Prefix(path.value.trim_end_matches('/').to_owned())
            }
            PathMatchType::RegularExpression => PathCondition::Regex(whole(&path.value)?),
        };
        let headers = m
            .headers
            .iter()
            .filter_map(|h| {
                let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
                Some(value_condition(h.kind, &h.value).map(|c| (name, c)))
            })
            .collect::<Result<_, _>>()?;
        let query = m
            .query_params
            .iter()
            .map(|q| value_condition(q.kind, &q.value).map(|c| (q.name.clone(), c)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            path: condition,
            path_text: path.value,
            headers,
            query,
            method: m.method.as_deref().and_then(|m| m.parse().ok()),
        })
    }

    pub fn matches(&self, request: &RequestHead<'_>) -> bool {
        self.path_matches(request.path)
            && self.method.as_ref().is_none_or(|m| m == request.method)
            && self.headers.iter().all(|(name, condition)| {
                header_value(request.headers, name).is_some_and(|v| condition.matches(&v))
            })
            && self.query.iter().all(|(name, condition)| {
                query_value(request.query, name).is_some_and(|v| condition.matches(v))
            })
    }

    fn path_matches(&self, path: &str) -> bool {
        match &self.path {
            PathCondition::Exact(expected) => path == expected,
            PathCondition::Prefix(prefix) => {
                prefix.is_empty()
                    || path
                        .strip_prefix(prefix.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathCondition::Regex(regex) => regex.is_match(path),
        }
    }

    /// The prefix a `ReplacePrefixMatch` replaces: the matched path prefix as written.
    pub fn prefix(&self) -> Option<&str> {
        match &self.path {
            PathCondition::Prefix(_) => Some(&self.path_text),
            _ => None,
        }
    }

    /// Gateway API's precedence: `Less` when `self` wins over `other`.
    pub(crate) fn precedence(&self, other: &Self) -> Ordering {
        let rank = |m: &Self| match &m.path {
            PathCondition::Exact(p) => (0, std::cmp::Reverse(p.len())),
            PathCondition::Regex(_) => (1, std::cmp::Reverse(m.path_text.len())),
            PathCondition::Prefix(p) => (2, std::cmp::Reverse(p.len())),
        };
        rank(self)
            .cmp(&rank(other))
            .then_with(|| other.method.is_some().cmp(&self.method.is_some()))
            .then_with(|| other.headers.len().cmp(&self.headers.len()))
            .then_with(|| other.query.len().cmp(&self.query.len()))
    }
}

/// A header's value as Envoy matches it: every value of the header, joined by `,`. A value
/// that is not text matches nothing.
fn header_value<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Option<std::borrow::Cow<'a, str>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?.to_str().ok()?;
    let mut joined = std::borrow::Cow::Borrowed(first);
    for value in values {
        let value = value.to_str().ok()?;
        let text = joined.to_mut();
        text.push(',');
        text.push_str(value);
    }
    Some(joined)
}

/// The first value of a query parameter (names compare exactly).
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(yaml: &str) -> CompiledMatch {
        CompiledMatch::new(&serde_yaml::from_str(yaml).expect("match")).expect("compiles")
    }

    fn head<'a>(method: &'a Method, uri: &'a str, headers: &'a HeaderMap) -> RequestHead<'a> {
        let (path, query) = match uri.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (uri, None),
        };
        RequestHead {
            method,
            path,
            query,
            headers,
        }
    }

    fn matches(m: &CompiledMatch, uri: &str) -> bool {
        m.matches(&head(&Method::GET, uri, &HeaderMap::new()))
    }

    #[test]
    fn path_prefix_matches_whole_elements() {
        let m = compiled("path: {type: PathPrefix, value: /abc}");
        for path in ["/abc", "/abc/", "/abc/def"] {
            assert!(matches(&m, path), "{path}");
        }
        for path in ["/abcd", "/ab", "/"] {
            assert!(!matches(&m, path), "{path}");
        }
        let slash = compiled("path: {type: PathPrefix, value: /abc/}");
        assert!(
            matches(&slash, "/abc"),
            "a trailing / in the prefix is ignored"
        );
        assert!(!matches(&slash, "/abcd"));
        let root = compiled("{}");
        assert!(
            matches(&root, "/anything"),
            "the default match is a prefix on /"
        );
    }

    #[test]
    fn exact_and_regular_expression_paths() {
        let exact = compiled("path: {type: Exact, value: /login}");
        assert!(matches(&exact, "/login"));
        assert!(!matches(&exact, "/login/"));
        let regex = compiled("path: {type: RegularExpression, value: '/v[0-9]+/.*'}");
        assert!(matches(&regex, "/v2/items"));
        assert!(
            !matches(&regex, "/api/v2/items"),
            "the expression must match the whole path"
        );
    }

    #[test]
    fn headers_queries_and_methods_must_all_hold() {
        let m = compiled(
            "headers: [{name: X-Canary, value: \"true\"}, {type: RegularExpression, name: x-user, value: 'u[0-9]+'}]\nqueryParams: [{name: v, value: \"2\"}]\nmethod: POST",
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-canary", "true".parse().expect("value"));
        headers.insert("x-user", "u42".parse().expect("value"));
        assert!(m.matches(&head(&Method::POST, "/x?a=1&v=2", &headers)));
        assert!(
            !m.matches(&head(&Method::GET, "/x?v=2", &headers)),
            "method"
        );
        assert!(
            !m.matches(&head(&Method::POST, "/x?v=3", &headers)),
            "query value"
        );
        assert!(
            !m.matches(&head(&Method::POST, "/x?V=2", &headers)),
            "query names are case-sensitive"
        );
        headers.insert("x-user", "admin".parse().expect("value"));
        assert!(
            !m.matches(&head(&Method::POST, "/x?v=2", &headers)),
            "regex header"
        );
    }

    #[test]
    fn a_repeated_header_is_matched_on_its_joined_values() {
        let m = compiled("headers: [{name: x-env, value: \"a,b\"}]");
        let mut headers = HeaderMap::new();
        headers.append("x-env", "a".parse().expect("value"));
        headers.append("x-env", "b".parse().expect("value"));
        assert!(m.matches(&head(&Method::GET, "/", &headers)));
        let mut invalid = HeaderMap::new();
        invalid.insert(
            "x-env",
            http::HeaderValue::from_bytes(b"\xff").expect("opaque value"),
        );
        let any = compiled("headers: [{type: RegularExpression, name: x-env, value: '.*'}]");
        assert!(
            !any.matches(&head(&Method::GET, "/", &invalid)),
            "not text: no match"
        );
    }

    #[test]
    fn precedence_follows_the_specification() {
        let ordered = [
            "path: {type: Exact, value: /a/b}",
            "path: {type: Exact, value: /a}",
            "path: {type: RegularExpression, value: '/a/.*'}",
            "path: {type: PathPrefix, value: /a/b}",
            "{path: {type: PathPrefix, value: /a}, method: GET}",
            "{path: {type: PathPrefix, value: /a}, headers: [{name: x, value: y}, {name: z, value: w}]}",
            "{path: {type: PathPrefix, value: /a}, headers: [{name: x, value: y}]}",
            "{path: {type: PathPrefix, value: /a}, queryParams: [{name: q, value: r}]}",
            "path: {type: PathPrefix, value: /a}",
            "{}",
        ];
        let compiled: Vec<CompiledMatch> = ordered.iter().map(|m| compiled(m)).collect();
        for (i, first) in compiled.iter().enumerate() {
            for (j, second) in compiled.iter().enumerate() {
                assert_eq!(
                    first.precedence(second),
                    i.cmp(&j),
                    "{} vs {}",
                    ordered[i],
                    ordered[j]
                );
            }
        }
    }
}
