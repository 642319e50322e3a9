//! The attributes a `when` condition can name, as Istio spells them.

/// What a `when` key refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    /// A request header, its name lower-cased; pseudo-headers (`:method`, `:authority`,
    /// `:path`, `:scheme`) included.
    RequestHeader(String),
    /// The peer's address (`source.ip`).
    SourceIp,
    /// The original client's address (`remote.ip`): the peer's, no proxy in front is trusted.
    RemoteIp,
    SourceNamespace,
    /// `name` or `namespace/name`, from any trust domain.
    SourceServiceAccount,
    SourcePrincipal,
    /// The address the client connected to (the pod's).
    DestinationIp,
    DestinationPort,
    /// The server name the client asked for in its TLS handshake with the application.
    ConnectionSni,
}

/// Keys Istio knows that need something nodemesh does not have: the reason, said plainly.
fn unsupported(key: &str) -> Option<&'static str> {
    let why = if key.starts_with("request.auth.") {
        "needs JWT request authentication (RequestAuthentication), which nodemesh does not have yet"
    } else if key.starts_with("request.experimental.inline.headers") {
        "needs the inline headers of the request body, which nodemesh does not read"
    } else if key.starts_with("experimental.envoy.filters.") {
        "reads Envoy filter metadata; nodemesh's proxy is not Envoy"
    } else if key == "destination.namespace" {
        "is replaced by the policy's metadata.namespace (as in Istio)"
    } else if key.starts_with("destination.labels") {
        "is replaced by the workload selector (as in Istio)"
    } else if matches!(key, "destination.name" | "destination.user") {
        "is a deprecated attribute (Istio supports it only in v1alpha1)"
    } else {
        return None;
    };
    Some(why)
}

const KEYS: &str = "request.headers[<name>], source.ip, remote.ip, source.namespace, \
                    source.serviceAccount, source.principal, destination.ip, destination.port \
                    or connection.sni";

impl ConditionKey {
    pub fn parse(key: &str) -> Result<Self, String> {
        if key.is_empty() {
            return Err("`key` must not be empty".to_owned());
        }
        if let Some(rest) = key.strip_prefix("request.headers") {
            let name = rest
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .filter(|name| !name.is_empty() && !name.contains(['[', ']']));
            return match name {
                Some(name) => Ok(Self::RequestHeader(name.to_ascii_lowercase())),
                None => Err(format!(
                    "bad key {key:?}: should have the form request.headers[<name>]"
                )),
            };
        }
        match key {
            "source.ip" => return Ok(Self::SourceIp),
            "remote.ip" => return Ok(Self::RemoteIp),
            "source.namespace" => return Ok(Self::SourceNamespace),
            "source.serviceAccount" => return Ok(Self::SourceServiceAccount),
            "source.principal" => return Ok(Self::SourcePrincipal),
            "destination.ip" => return Ok(Self::DestinationIp),
            "destination.port" => return Ok(Self::DestinationPort),
            "connection.sni" => return Ok(Self::ConnectionSni),
            _ => {}
        }
        match unsupported(key) {
            Some(why) => Err(format!("{key:?} is not supported: it {why}")),
            None => Err(format!("unknown attribute {key:?}; use {KEYS}")),
        }
    }

    /// Whether the key needs the HTTP request.
    pub fn is_http(&self) -> bool {
        matches!(self, Self::RequestHeader(_))
    }

    /// The key as written in policies.
    pub fn name(&self) -> String {
        match self {
            Self::RequestHeader(name) => format!("request.headers[{name}]"),
            Self::SourceIp => "source.ip".to_owned(),
            Self::RemoteIp => "remote.ip".to_owned(),
            Self::SourceNamespace => "source.namespace".to_owned(),
            Self::SourceServiceAccount => "source.serviceAccount".to_owned(),
            Self::SourcePrincipal => "source.principal".to_owned(),
            Self::DestinationIp => "destination.ip".to_owned(),
            Self::DestinationPort => "destination.port".to_owned(),
            Self::ConnectionSni => "connection.sni".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_keys_parse_and_the_unsupported_ones_say_why() {
        assert_eq!(
            ConditionKey::parse("request.headers[:Authority]"),
            Ok(ConditionKey::RequestHeader(":authority".into()))
        );
        assert_eq!(
            ConditionKey::parse("source.serviceAccount"),
            Ok(ConditionKey::SourceServiceAccount)
        );
        let jwt = ConditionKey::parse("request.auth.claims[iss]").expect_err("refused");
        assert!(jwt.contains("JWT"), "{jwt}");
        let ns = ConditionKey::parse("destination.namespace").expect_err("refused");
        assert!(ns.contains("metadata.namespace"), "{ns}");
        let old = ConditionKey::parse("destination.user").expect_err("refused");
        assert!(old.contains("deprecated"), "{old}");
        for bad in [
            "request.headers[]",
            "request.headers",
            "request.headersX[a]",
            "source.foo",
        ] {
            assert!(ConditionKey::parse(bad).is_err(), "{bad}");
        }
        let unknown = ConditionKey::parse("destination.foo").expect_err("refused");
        assert!(unknown.starts_with("unknown attribute"), "{unknown}");
    }
}
