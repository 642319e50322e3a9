use std::collections::BTreeMap;

use serde::Serialize;

use crate::{ENROLLED_LABEL, Namespace, Workload};

/// A whole, validated configuration: what one load of a directory (or one snapshot of the
/// Kubernetes API) says the mesh is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MeshConfig {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Workloads by `namespace/name`.
    pub workloads: BTreeMap<String, Workload>,
}

impl MeshConfig {
    /// Whether a workload is in the mesh: its namespace opts in and the workload does not opt
    /// out.
    pub fn is_enrolled(&self, workload: &Workload) -> bool {
        let namespace_in = self
            .namespaces
            .get(workload.namespace())
            .is_some_and(Namespace::enrolls_workloads);
        namespace_in && workload.metadata.label(ENROLLED_LABEL) != Some("false")
    }

    /// The enrolled workloads that the agent of `node` serves.
    pub fn enrolled_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads
            .values()
            .filter(move |w| w.spec.node == node && self.is_enrolled(w))
    }
}
