use serde::{Deserialize, Serialize};

use crate::{ENROLLED_LABEL, ObjectMeta};

/// A Kubernetes Namespace (`apiVersion: v1`). Labelled `nodemesh.dev/enabled: "true"`, its
/// workloads join the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Namespace {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    /// Kubernetes' Namespace spec (finalizers) is accepted and ignored.
    #[serde(default, skip_serializing)]
    pub spec: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing)]
    pub status: Option<serde_yaml::Value>,
}

impl Namespace {
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// Whether the namespace opts its workloads into the mesh.
    pub fn enrolls_workloads(&self) -> bool {
        self.metadata.label(ENROLLED_LABEL) == Some("true")
    }
}
