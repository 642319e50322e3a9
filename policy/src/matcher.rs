//! Matching of single values as Istio's generated Envoy matchers do: string patterns, header
//! values, hosts, path templates and address blocks.

pub use nodemesh_config::IpBlock;

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` for any non-empty value. A `*`
/// anywhere else is a literal character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    pub fn new(text: &str) -> Self {
        if text == "*" {
            Pattern::Any
        } else if let Some(suffix) = text.strip_prefix('*') {
            Pattern::Suffix(suffix.to_owned())
        } else if let Some(prefix) = text.strip_suffix('*') {
            Pattern::Prefix(prefix.to_owned())
        } else {
            Pattern::Exact(text.to_owned())
        }
    }

    /// A pattern compared without regard to ASCII case (hosts).
    pub fn new_lowercase(text: &str) -> Self {
        Self::new(&text.to_ascii_lowercase())
    }

    /// Istio's `*` is the regular expression `.+`: it needs a value.
    pub fn matches(&self, value: &str) -> bool {
        self.matches_bytes(value.as_bytes())
    }

    pub fn matches_bytes(&self, value: &[u8]) -> bool {
        match self {
            Pattern::Any => !value.is_empty(),
            Pattern::Exact(s) => value == s.as_bytes(),
            Pattern::Prefix(p) => value.starts_with(p.as_bytes()),
            Pattern::Suffix(s) => value.ends_with(s.as_bytes()),
        }
    }

    /// As a header matcher: `*` asks only that the header be present, even empty.
    pub fn matches_header(&self, value: Option<&[u8]>) -> bool {
        match (self, value) {
            (_, None) => false,
            (Pattern::Any, Some(_)) => true,
            (pattern, Some(value)) => pattern.matches_bytes(value),
        }
    }

    /// As a host matcher: like a header matcher, without regard to ASCII case.
    pub fn matches_host(&self, authority: Option<&str>) -> bool {
        let Some(value) = authority.map(str::as_bytes) else {
            return false;
        };
        let same = |a: &[u8], b: &str| a.eq_ignore_ascii_case(b.as_bytes());
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => same(value, s),
            Pattern::Prefix(p) => value.get(..p.len()).is_some_and(|v| same(v, p)),
            Pattern::Suffix(s) => value
                .len()
                .checked_sub(s.len())
                .is_some_and(|at| same(&value[at..], s)),
        }
    }
}

/// A path as `paths` matches it: a string pattern, or a template with `{*}` (one segment of
/// one or more characters) and `{**}` (anything, `/` included, possibly nothing), as Envoy's
/// URI templates do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Plain(Pattern),
    Template(Vec<TemplatePart>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Literal(String),
    Segment,
    Rest,
}

impl PathPattern {
    pub fn new(text: &str) -> Self {
        if !(text.contains("{*}") || text.contains("{**}")) {
            return PathPattern::Plain(Pattern::new(text));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next = [("{**}", TemplatePart::Rest), ("{*}", TemplatePart::Segment)]
                .into_iter()
                .filter_map(|(token, part)| rest.find(token).map(|at| (at, token, part)))
                .min_by_key(|(at, _, _)| *at);
            match next {
                Some((at, token, part)) => {
                    if at > 0 {
                        parts.push(TemplatePart::Literal(rest[..at].to_owned()));
                    }
                    parts.push(part);
                    rest = &rest[at + token.len()..];
                }
                None => {
                    parts.push(TemplatePart::Literal(rest.to_owned()));
                    rest = "";
                }
            }
        }
        PathPattern::Template(parts)
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Plain(pattern) => pattern.matches(path),
            PathPattern::Template(parts) => template_matches(parts, path.as_bytes()),
        }
    }
}

/// The characters a template variable matches (RFC 3986 pchar, as Envoy's templates).
fn pchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=*".contains(&byte)
}

fn template_matches(parts: &[TemplatePart], path: &[u8]) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return path.is_empty();
    };
    match first {
        TemplatePart::Literal(text) => path
            .strip_prefix(text.as_bytes())
            .is_some_and(|after| template_matches(rest, after)),
        TemplatePart::Segment => {
            let run = path.iter().take_while(|b| pchar(**b)).count();
            (1..=run).any(|n| template_matches(rest, &path[n..]))
        }
        TemplatePart::Rest => {
            let run = path
                .iter()
                .take_while(|b| pchar(**b) || **b == b'/')
                .count();
            (0..=run).any(|n| template_matches(rest, &path[n..]))
        }
    }
}

/// Values and not-values of one field: any value matches (or there are none) and no
/// not-value matches. An absent attribute matches no value, so a not-value never excludes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Field<T> {
    pub values: Vec<T>,
    pub not_values: Vec<T>,
}

impl<T> Field<T> {
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    /// `Ok` when the field matches; otherwise whether it failed on `values` (false) or on
    /// `not_values` (true).
    pub fn check(&self, hit: impl Fn(&T) -> bool) -> Result<(), bool> {
        if !self.values.is_empty() && !self.values.iter().any(&hit) {
            return Err(false);
        }
        if self.not_values.iter().any(&hit) {
            return Err(true);
        }
        Ok(())
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(s) => f.write_str(s),
            Pattern::Prefix(p) => write!(f, "{p}*"),
            Pattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

impl std::fmt::Display for PathPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathPattern::Plain(p) => p.fmt(f),
            PathPattern::Template(parts) => {
                for part in parts {
                    match part {
                        TemplatePart::Literal(text) => f.write_str(text)?,
                        TemplatePart::Segment => f.write_str("{*}")?,
                        TemplatePart::Rest => f.write_str("{**}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

/// `[a, b]` for messages.
pub fn list<T: std::fmt::Display>(values: &[T]) -> String {
    let items: Vec<String> = values.iter().map(ToString::to_string).collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let cases = [
            ("*", "anything", true),
            ("*", "", false),
            ("/public/*", "/public/x", true),
            ("/public/*", "/public", false),
            ("*.png", "/a/b.png", true),
            ("/exact", "/exact", true),
            ("/exact", "/exact/", false),
            ("a*b", "a*b", true),
            ("a*b", "axb", false),
        ];
        for (pattern, value, expected) in cases {
            assert_eq!(
                Pattern::new(pattern).matches(value),
                expected,
                "{pattern} ~ {value}"
            );
        }
    }

    #[test]
    fn a_star_header_asks_for_presence_only() {
        assert!(Pattern::new("*").matches_header(Some(b"")));
        assert!(!Pattern::new("*").matches_header(None));
        assert!(Pattern::new("a*").matches_header(Some(b"a\xff")));
    }

    #[test]
    fn hosts_compare_without_case_and_with_their_port() {
        let exact = Pattern::new_lowercase("HttpBin.org");
        assert!(exact.matches_host(Some("httpbin.ORG")));
        assert!(!exact.matches_host(Some("httpbin.org:8080")));
        let any_port = Pattern::new_lowercase("httpbin.org:*");
        assert!(any_port.matches_host(Some("httpbin.org:8080")));
        assert!(!any_port.matches_host(Some("httpbin.org")));
        assert!(Pattern::new_lowercase("*.org").matches_host(Some("a.ORG")));
        assert!(Pattern::new("*").matches_host(Some("")));
    }

    #[test]
    fn path_templates_match_as_envoy_does() {
        let cases = [
            ("/foo/{*}", "/foo/bar", true),
            ("/foo/{*}", "/foo/", false),
            ("/foo/{*}", "/foo", false),
            ("/foo/{*}", "/foo/bar/baz", false),
            ("/foo/{**}", "/foo/", true),
            ("/foo/{**}", "/foo/a/b/", true),
            ("/foo/{**}", "/foo", false),
            ("/{**}", "/", true),
            ("/foo/{*}/bar", "/foo/x/bar", true),
            ("/foo/{*}/bar", "/foo/x/y/bar", false),
            ("/foo/{**}/bar", "/foo/x/y/bar", true),
            ("/foo/{*}.txt", "/foo/a.txt", true),
            ("/foo/{*}", "/foo/a%2Fb", true),
            ("/foo/{*}", "/foo/a*", true),
            ("/{**}.mpd", "/v/1/x.mpd", true),
        ];
        for (template, path, expected) in cases {
            assert_eq!(
                PathPattern::new(template).matches(path),
                expected,
                "{template} ~ {path}"
            );
        }
    }

    proptest::proptest! {
        /// Any pattern and any path: a verdict, never a panic (the path is the client's).
        #[test]
        fn matching_never_panics(pattern in "[/a{}*.]{0,16}", path in "\\PC{0,32}") {
            let _ = PathPattern::new(&pattern).matches(&path);
            let _ = Pattern::new(&pattern).matches_host(Some(&path));
        }
    }
}
