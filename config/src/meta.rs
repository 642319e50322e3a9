use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The subset of Kubernetes' `ObjectMeta` that the mesh reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The API server's identifier of this incarnation of the object; a pod recreated under
    /// the same name has another. Kept for Workloads (pods), which the CNI plugin and the
    /// agent's search of /proc know by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// RFC 3339, as the API server writes it; orders HTTPRoutes of equal precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

impl ObjectMeta {
    /// The namespace, `default` when unset, as Kubernetes does.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// A field that is read only to be refused or ignored by name: whatever it holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ignored;

impl<'de> Deserialize<'de> for Ignored {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer).map(|_| Ignored)
    }
}

/// Checks a DNS-1123 label (namespace and object names): lower-case alphanumerics and `-`,
/// starting and ending with an alphanumeric, at most 63 characters.
pub(crate) fn check_dns_label(value: &str) -> Result<(), String> {
    let valid = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a valid name: use 1 to 63 lower-case letters, digits and '-', \
             starting and ending with a letter or digit"
        ))
    }
}

/// Checks a DNS-1123 subdomain (the names of most Kubernetes kinds, policies included):
/// dot-separated labels, at most 253 characters.
pub(crate) fn check_dns_subdomain(value: &str) -> Result<(), String> {
    if value.len() <= 253 && value.split('.').all(|label| check_dns_label(label).is_ok()) {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a valid name: use dot-separated parts of lower-case letters, \
             digits and '-', each starting and ending with a letter or digit, at most 253 \
             characters in all"
        ))
    }
}

/// Checks a regular expression (RE2 syntax, as Gateway API and Envoy use).
pub(crate) fn check_regex(at: &str, pattern: &str) -> Result<(), (String, String)> {
    regex::Regex::new(pattern).map(drop).map_err(|e| {
        (
            at.to_owned(),
            format!("{pattern:?} is not a valid regular expression: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "web-1", "0abc"] {
            assert!(check_dns_label(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Web", "a_b", &"a".repeat(64)] {
            assert!(check_dns_label(bad).is_err(), "{bad}");
        }
        assert!(check_dns_subdomain("service-httpbin.default.svc.cluster.local").is_ok());
        for bad in ["a..b", ".a", "A.b", &"a.".repeat(127)] {
            assert!(check_dns_subdomain(bad).is_err(), "{bad}");
        }
    }
}
