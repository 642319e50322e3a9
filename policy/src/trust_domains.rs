//! The mesh's trust domain and its aliases, as Istio applies them to principals.

/// The mesh's trust domain and its aliases (MeshSettings `trustDomainAliases`): a principal
/// naming any of them, or `cluster.local`, matches identities of all of them, as in Istio.
/// The default holds none: nothing is trusted before the configuration says so.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustDomains(Vec<String>);

impl TrustDomains {
    pub fn new(local: &str, aliases: &[String]) -> Self {
        let mut all = vec![local.to_owned()];
        all.extend(aliases.iter().filter(|a| *a != local).cloned());
        Self(all)
    }

    /// Whether `trust_domain` is the mesh's or one of its aliases.
    pub fn contains(&self, trust_domain: &str) -> bool {
        self.0.iter().any(|td| td == trust_domain)
    }

    /// The mesh's own first, then the aliases.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// Istio's `ReplaceTrustDomainAliases` for one principal: the forms it stands for.
    pub(crate) fn expand(&self, principal: &str) -> Vec<String> {
        let parts: Vec<&str> = principal.split('/').collect();
        // Not `<td>/ns/<ns>/sa/<sa>`, or any trust domain: the principal as written.
        if parts.len() != 5 || parts[0] == "*" {
            return vec![principal.to_owned()];
        }
        let from = parts[0];
        let known = from == "cluster.local" || self.0.iter().any(|td| loose_match(from, td));
        if !known {
            return vec![principal.to_owned()];
        }
        let rest = parts[1..].join("/");
        let mut out: Vec<String> = Vec::new();
        for td in &self.0 {
            // A policy trust domain `*suffix` that covers this one stays as written.
            let kept = from
                .strip_prefix('*')
                .is_some_and(|suffix| td.ends_with(suffix));
            let form = if kept {
                principal.to_owned()
            } else {
                format!("{td}/{rest}")
            };
            if !out.contains(&form) {
                out.push(form);
            }
        }
        out
    }
}

/// Istio's `stringMatch` of a trust domain against a listed one: equal, or either a prefix or
/// suffix pattern of the other.
fn loose_match(a: &str, b: &str) -> bool {
    let prefix = |s: &str, p: &str| p.strip_suffix('*').is_some_and(|p| s.starts_with(p));
    let suffix = |s: &str, p: &str| p.strip_prefix('*').is_some_and(|p| s.ends_with(p));
    a == b || b == "*" || prefix(a, b) || prefix(b, a) || suffix(a, b) || suffix(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domain_aliases_expand_as_istio_does() {
        let tds = TrustDomains::new("td2", &["td1".to_owned()]);
        assert_eq!(
            tds.expand("td1/ns/foo/sa/bar"),
            ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"]
        );
        assert_eq!(
            tds.expand("cluster.local/ns/foo/sa/bar"),
            ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"],
            "cluster.local stands for the mesh's own trust domains"
        );
        assert_eq!(tds.expand("other/ns/foo/sa/bar"), ["other/ns/foo/sa/bar"]);
        assert_eq!(tds.expand("*/ns/foo/sa/bar"), ["*/ns/foo/sa/bar"]);
        assert_eq!(tds.expand("*"), ["*"]);
        assert_eq!(
            tds.expand("*td1/ns/foo/sa/bar"),
            ["td2/ns/foo/sa/bar", "*td1/ns/foo/sa/bar"]
        );
        let local = TrustDomains::new("cluster.local", &[]);
        assert_eq!(
            local.expand("cluster.local/ns/a/sa/b"),
            ["cluster.local/ns/a/sa/b"]
        );
    }

    #[test]
    fn only_the_mesh_and_its_aliases_are_trusted() {
        let tds = TrustDomains::new("td2", &["td1".to_owned()]);
        assert!(tds.contains("td2") && tds.contains("td1"));
        assert!(!tds.contains("other.example") && !tds.contains("*"));
        assert!(
            !TrustDomains::default().contains("td2"),
            "nothing before configuration"
        );
        assert_eq!(tds.iter().collect::<Vec<_>>(), ["td2", "td1"]);
    }
}
