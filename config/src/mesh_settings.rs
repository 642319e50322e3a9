use serde::{Deserialize, Serialize};

use crate::ObjectMeta;

/// Mesh-wide settings (`apiVersion: nodemesh.dev/v1alpha1`, `kind: MeshSettings`): at most one,
/// named `default`, in the root namespace `nodemesh-system`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSettings {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: MeshSettingsSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSettingsSpec {
    #[serde(default)]
    pub egress: Egress,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Egress {
    #[serde(default)]
    pub policy: EgressPolicy,
}

/// What happens to connections from enrolled workloads to destinations outside the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EgressPolicy {
    /// Carried as plain TCP.
    #[default]
    Allow,
    /// Refused: enrolled workloads may only reach enrolled workloads.
    Deny,
}
