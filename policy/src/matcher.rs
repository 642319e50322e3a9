//! Matching of single values: string patterns and address blocks.

pub use nodemesh_config::IpBlock;

/// An Istio string match: exact, `prefix*`, `*suffix`, or `*` for any value.
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
        } else if let Some(prefix) = text.strip_suffix('*') {
            Pattern::Prefix(prefix.to_owned())
        } else if let Some(suffix) = text.strip_prefix('*') {
            Pattern::Suffix(suffix.to_owned())
        } else {
            Pattern::Exact(text.to_owned())
        }
    }

    /// A pattern compared without regard to ASCII case (hosts).
    pub fn new_lowercase(text: &str) -> Self {
        Self::new(&text.to_ascii_lowercase())
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => value == s,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

/// Values and not-values of one field: any value matches (or there are none) and no
/// not-value matches. An absent attribute matches no value.
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
            ("/public/*", "/public/x", true),
            ("/public/*", "/public", false),
            ("*.png", "/a/b.png", true),
            ("/exact", "/exact", true),
            ("/exact", "/exact/", false),
        ];
        for (pattern, value, expected) in cases {
            assert_eq!(
                Pattern::new(pattern).matches(value),
                expected,
                "{pattern} ~ {value}"
            );
        }
    }
}
