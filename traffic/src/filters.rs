//! HTTPRoute filters as pure functions on a request's or response's head: header modifiers,
//! URL rewrites and redirects, with Gateway API's semantics.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use nodemesh_config::{
    HeaderModifier, PathModifier, PathModifierType, RequestRedirect, UrlRewrite,
};

/// A header modifier with names and values parsed once.
#[derive(Debug, Clone, Default)]
pub struct HeaderEdit {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderEdit {
    pub fn new(modifier: &HeaderModifier) -> Self {
        let pairs = |headers: &[nodemesh_config::HttpHeader]| {
            headers
                .iter()
                .filter_map(|h| {
                    Some((
                        HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                        HeaderValue::from_str(&h.value).ok()?,
                    ))
                })
                .collect()
        };
        Self {
            set: pairs(&modifier.set),
            add: pairs(&modifier.add),
            remove: modifier
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
        }
    }

    /// Gateway API's order: set, then add, then remove.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// A path after a path modifier. `matched_prefix` is the rule's PathPrefix value when the
/// request matched one.
pub fn modify_path(modifier: &PathModifier, path: &str, matched_prefix: Option<&str>) -> String {
    match modifier.kind {
        PathModifierType::ReplaceFullPath => modifier.replace_full_path.clone().unwrap_or_default(),
        PathModifierType::ReplacePrefixMatch => {
            let replacement = modifier.replace_prefix_match.as_deref().unwrap_or("");
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let replacement = replacement.trim_end_matches('/');
            // The element boundary stays: "/foo/bar" with prefix "/foo" keeps "/bar".
            let joined = format!("{replacement}{rest}");
            if joined.is_empty() {
                "/".to_owned()
            } else if !joined.starts_with('/') {
                format!("/{joined}")
            } else {
                joined
            }
        }
    }
}

/// A path and query joined again.
fn with_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    }
}

/// The request's new `path?query` and host after a URL rewrite.
pub fn rewrite(
    rewrite: &UrlRewrite,
    path: &str,
    query: Option<&str>,
    matched_prefix: Option<&str>,
) -> (Option<String>, Option<String>) {
    let path = rewrite
        .path
        .as_ref()
        .map(|modifier| with_query(&modify_path(modifier, path, matched_prefix), query));
    (path, rewrite.hostname.clone())
}

/// What a RequestRedirect answers: the status and the `Location`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub status: StatusCode,
    pub location: String,
}

/// The request as a redirect sees it.
#[derive(Debug, Clone, Copy)]
pub struct RedirectInput<'a> {
    pub scheme: &'a str,
    /// The request's host, without a port.
    pub host: &'a str,
    /// The port the client addressed (the Service port).
    pub port: u16,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub matched_prefix: Option<&'a str>,
}

/// Gateway API's redirect: fields left out keep the request's; with a new scheme and no port
/// the scheme's well-known port; the port is left out of `Location` when it is the scheme's
/// well-known one.
pub fn redirect(redirect: &RequestRedirect, input: &RedirectInput<'_>) -> Redirect {
    let scheme = redirect.scheme.as_deref().unwrap_or(input.scheme);
    let host = redirect.hostname.as_deref().unwrap_or(input.host);
    let well_known = |scheme: &str| if scheme == "https" { 443 } else { 80 };
    let port = match (redirect.port, &redirect.scheme) {
        (Some(port), _) => port,
        (None, Some(scheme)) => well_known(scheme),
        (None, None) => input.port,
    };
    let path = match &redirect.path {
        Some(modifier) => modify_path(modifier, input.path, input.matched_prefix),
        None => input.path.to_owned(),
    };
    let authority = if port == well_known(scheme) {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    };
    Redirect {
        status: redirect
            .status_code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::FOUND),
        location: format!("{scheme}://{authority}{}", with_query(&path, input.query)),
    }
}

/// The request's host without a port: `:authority` (from the URI) or `Host`.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> &'a str {
    host_of(uri.authority(), headers.get(header::HOST))
}

/// [`request_host`] from the two places a host can be: the URI's authority, else the `Host`
/// header (its port, if any, left out).
pub fn host_of<'a>(
    authority: Option<&'a http::uri::Authority>,
    host: Option<&'a http::HeaderValue>,
) -> &'a str {
    authority
        .map(|a| a.host())
        .or_else(|| {
            let host = host?.to_str().ok()?;
            Some(match host.rsplit_once(':') {
                Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => host,
            })
        })
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(replacement: &str) -> PathModifier {
        PathModifier {
            kind: PathModifierType::ReplacePrefixMatch,
            replace_full_path: None,
            replace_prefix_match: Some(replacement.to_owned()),
        }
    }

    #[test]
    fn replace_prefix_match_follows_gateway_apis_table() {
        // (request path, prefix match, replacement, result), from the specification.
        for (path, matched, replacement, expected) in [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
        ] {
            assert_eq!(
                modify_path(&prefix(replacement), path, Some(matched)),
                expected,
                "{path} with prefix {matched} replaced by {replacement:?}"
            );
        }
    }

    #[test]
    fn replace_full_path_keeps_the_query() {
        let modifier = PathModifier {
            kind: PathModifierType::ReplaceFullPath,
            replace_full_path: Some("/new".to_owned()),
            replace_prefix_match: None,
        };
        let rewrite_spec = UrlRewrite {
            hostname: Some("web.internal".to_owned()),
            path: Some(modifier),
        };
        assert_eq!(
            rewrite(&rewrite_spec, "/old/x", Some("a=1"), None),
            (Some("/new?a=1".to_owned()), Some("web.internal".to_owned()))
        );
    }

    #[test]
    fn header_edits_set_then_add_then_remove() {
        let edit = HeaderEdit::new(
            &serde_yaml::from_str(
                "set: [{name: x-a, value: one}]\nadd: [{name: x-b, value: two}]\nremove: [x-c]",
            )
            .expect("modifier"),
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-a", "old".parse().expect("value"));
        headers.insert("x-b", "first".parse().expect("value"));
        headers.insert("x-c", "gone".parse().expect("value"));
        edit.apply(&mut headers);
        assert_eq!(headers["x-a"], "one");
        let b: Vec<_> = headers.get_all("x-b").iter().collect();
        assert_eq!(b, ["first", "two"]);
        assert!(!headers.contains_key("x-c"));
    }

    #[test]
    fn redirects_derive_what_is_left_out() {
        let input = RedirectInput {
            scheme: "http",
            host: "web",
            port: 8080,
            path: "/old/page",
            query: Some("q=1"),
            matched_prefix: Some("/old"),
        };
        let to_https: RequestRedirect =
            serde_yaml::from_str("scheme: https\nstatusCode: 301").expect("redirect");
        assert_eq!(
            redirect(&to_https, &input),
            Redirect {
                status: StatusCode::MOVED_PERMANENTLY,
                location: "https://web/old/page?q=1".to_owned()
            },
            "a new scheme takes its well-known port, left out of Location"
        );
        let moved: RequestRedirect = serde_yaml::from_str(
            "hostname: new.example\npath: {type: ReplacePrefixMatch, replacePrefixMatch: /new}",
        )
        .expect("redirect");
        assert_eq!(
            redirect(&moved, &input),
            Redirect {
                status: StatusCode::FOUND,
                location: "http://new.example:8080/new/page?q=1".to_owned()
            },
            "302 by default; the port the client used is kept"
        );
    }

    #[test]
    fn the_host_comes_from_the_authority_or_the_host_header() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "web:8080".parse().expect("value"));
        assert_eq!(request_host(&"/x".parse().expect("uri"), &headers), "web");
        let absolute: http::Uri = "http://api.shop/x".parse().expect("uri");
        assert_eq!(request_host(&absolute, &headers), "api.shop");
    }
}
