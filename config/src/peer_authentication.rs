use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ObjectMeta;

/// Istio's PeerAuthentication (`apiVersion: security.nodemesh.dev/v1`): whether a workload
/// accepts plaintext. Scope: a workload (with `selector`), a namespace (no selector), or the
/// whole mesh (no selector, in the root namespace `nodemesh-system`). The narrowest wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

/// Istio's mTLS modes. In nodemesh every hop between node proxies is mTLS; the mode only
/// decides whether plaintext from outside the mesh is accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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
}
