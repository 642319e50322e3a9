use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    ISTIO_DRY_RUN_ANNOTATION, ObjectMeta, authorization_policy::DRY_RUN_ANNOTATION, meta::Ignored,
};

/// Istio's PeerAuthentication (`apiVersion: security.nodemesh.dev/v1`): whether a workload
/// accepts plaintext. Scope: a workload (with `selector`), a namespace (no selector), or the
/// whole mesh (no selector, in the root namespace, `nodemesh-system` unless MeshSettings names
/// another). The narrowest that sets a mode wins; `portLevelMtls` of the workload's policy
/// overrides per port. As in Istio, a policy with a selector in the root namespace has no
/// effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
    /// What a cluster wrote back; objects exported from one carry it. Never read.
    #[serde(default, skip_serializing)]
    pub status: Option<Ignored>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema, kube::CustomResource))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "security.nodemesh.dev",
        version = "v1",
        kind = "PeerAuthentication",
        doc = "Istio's PeerAuthentication: whether the workloads it selects accept plaintext (STRICT: mTLS only).",
        root = "PeerAuthenticationResource",
        namespaced,
        status = "crate::ObjectStatus",
        shortname = "pa",
        category = "nodemesh",
        printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mtls.mode"),
        printcolumn(
            name = "Accepted",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
        )
    )
)]
#[cfg_attr(
    feature = "kube",
    expect(
        clippy::duplicated_attributes,
        reason = "each printcolumn has its own type_; the lint reads them as one attribute"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Modes for single ports of the selected workloads (the workload's port, not a Service's);
    /// only with a selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_level_mtls: Option<BTreeMap<PortKey, Mtls>>,
}

/// A port as a map key: a number in YAML, a string in JSON exported from a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct PortKey(pub u32);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortKey;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port number")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortKey, E> {
                u32::try_from(v)
                    .map(PortKey)
                    .map_err(|_| E::custom(format!("{v} is not a port number")))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortKey, E> {
                u32::try_from(v)
                    .map(PortKey)
                    .map_err(|_| E::custom(format!("{v} is not a port number")))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortKey, E> {
                v.parse()
                    .map(PortKey)
                    .map_err(|_| E::custom(format!("{v:?} is not a port number")))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }

    /// Istio's checks: no empty key, no `*` in keys or values.
    pub fn validate(&self, at: &str) -> Result<(), (String, String)> {
        for (key, value) in &self.match_labels {
            let field = format!("{at}.matchLabels[{key}]");
            if key.is_empty() {
                return Err((field, "an empty label key is not allowed".to_owned()));
            }
            if key.contains('*') || value.contains('*') {
                return Err((
                    field,
                    format!("{key}={value}: wildcards are not supported in a selector"),
                ));
            }
        }
        Ok(())
    }
}

/// Whether a selector is absent or selects by nothing: the policy is namespace- or mesh-wide.
pub fn selects_all(selector: Option<&WorkloadSelector>) -> bool {
    selector.is_none_or(|s| s.match_labels.is_empty())
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

/// Istio's mTLS modes. In nodemesh every hop between node proxies is mTLS; the mode only
/// decides whether plaintext from outside the mesh is accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the wider scope.
    #[default]
    Unset,
    /// mTLS and plaintext accepted.
    Permissive,
    /// Only mTLS (HBONE) accepted; plaintext connections are refused.
    Strict,
    /// Plaintext accepted; treated as PERMISSIVE, since mesh traffic stays mTLS.
    Disable,
}

impl MtlsMode {
    /// Whether a workload in this mode accepts plaintext connections.
    pub fn accepts_plaintext(self) -> bool {
        self != MtlsMode::Strict
    }
}

impl PeerAuthentication {
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }

    pub fn mode(&self) -> MtlsMode {
        self.spec.mtls.as_ref().map_or(MtlsMode::Unset, |m| m.mode)
    }

    /// Istio's validation: `portLevelMtls` only with a selector, not empty, ports 1-65535.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for annotation in [ISTIO_DRY_RUN_ANNOTATION, DRY_RUN_ANNOTATION] {
            if self.metadata.annotations.contains_key(annotation) {
                return Err((
                    format!("metadata.annotations[{annotation}]"),
                    "dry-run is only for AuthorizationPolicies; remove the annotation".to_owned(),
                ));
            }
        }
        if let Some(selector) = &self.spec.selector {
            selector.validate("spec.selector")?;
        }
        let Some(ports) = &self.spec.port_level_mtls else {
            return Ok(());
        };
        if selects_all(self.spec.selector.as_ref()) {
            return Err((
                "spec.portLevelMtls".to_owned(),
                "a mesh- or namespace-wide PeerAuthentication cannot set port-level mTLS; add a \
                 selector naming the workloads"
                    .to_owned(),
            ));
        }
        if ports.is_empty() {
            return Err((
                "spec.portLevelMtls".to_owned(),
                "must have at least one port if defined".to_owned(),
            ));
        }
        for PortKey(port) in ports.keys() {
            if !(1..=65535).contains(port) {
                return Err((
                    format!("spec.portLevelMtls[{port}]"),
                    "the port must be in the range 1..65535".to_owned(),
                ));
            }
        }
        Ok(())
    }
}
