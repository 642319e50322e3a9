use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    AuthorizationPolicy, BackendTrafficPolicy, ENROLLED_LABEL, EgressPolicy, HttpRoute,
    MeshSettingsSpec, MtlsMode, Namespace, PeerAuthentication, ROOT_NAMESPACE, Service, Workload,
};

/// A whole, validated configuration: what one load of a directory (or one snapshot of the
/// Kubernetes API) says the mesh is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MeshConfig {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Workloads by `namespace/name`.
    pub workloads: BTreeMap<String, Workload>,
    /// PeerAuthentications by `namespace/name`.
    pub peer_authentications: BTreeMap<String, PeerAuthentication>,
    /// AuthorizationPolicies by `namespace/name`.
    pub authorization_policies: BTreeMap<String, AuthorizationPolicy>,
    /// Services by `namespace/name`.
    pub services: BTreeMap<String, Service>,
    /// HTTPRoutes by `namespace/name`.
    pub http_routes: BTreeMap<String, HttpRoute>,
    /// BackendTrafficPolicies by `namespace/name`.
    pub backend_traffic_policies: BTreeMap<String, BackendTrafficPolicy>,
    /// The mesh-wide settings (defaults when no MeshSettings object exists).
    pub settings: MeshSettingsSpec,
}

/// The mTLS mode in force for a workload and the policy that decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveMtls {
    pub mode: MtlsMode,
    /// `namespace/name` of the deciding PeerAuthentication; `None` for the default.
    pub policy: Option<String>,
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

    /// The mTLS mode of a workload: a PeerAuthentication selecting it, else its namespace's,
    /// else the mesh-wide one, else PERMISSIVE. Among several at one scope the first by name
    /// wins. UNSET defers to the wider scope.
    pub fn mtls_mode(&self, workload: &Workload) -> EffectiveMtls {
        let namespace = workload.namespace();
        let scoped = |ns: &str, with_selector: bool| {
            self.peer_authentications
                .values()
                .filter(|p| p.metadata.namespace() == ns && p.mode() != MtlsMode::Unset)
                .find(|p| match (&p.spec.selector, with_selector) {
                    (Some(selector), true) => selector.matches(&workload.metadata.labels),
                    (None, false) => true,
                    _ => false,
                })
        };
        scoped(namespace, true)
            .or_else(|| scoped(namespace, false))
            .or_else(|| scoped(ROOT_NAMESPACE, false))
            .map_or(
                EffectiveMtls {
                    mode: MtlsMode::Permissive,
                    policy: None,
                },
                |p| EffectiveMtls {
                    mode: p.mode(),
                    policy: Some(p.key()),
                },
            )
    }

    /// The AuthorizationPolicies that apply to a workload: those of its namespace whose
    /// selector matches it (or that have none), and the mesh-wide ones of the root namespace.
    pub fn authorization_policies_for<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a AuthorizationPolicy> + 'a {
        self.authorization_policies.values().filter(move |p| {
            let ns = p.metadata.namespace();
            let selected = p
                .spec
                .selector
                .as_ref()
                .is_none_or(|s| s.matches(&workload.metadata.labels));
            (ns == workload.namespace() && selected)
                || (ns == ROOT_NAMESPACE && p.spec.selector.is_none())
        })
    }

    /// The workloads behind a Service: its namespace's workloads whose labels match its
    /// selector. A Service without a selector has none.
    pub fn endpoints<'a>(
        &'a self,
        service: &'a Service,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.values().filter(move |w| {
            !service.spec.selector.is_empty()
                && w.namespace() == service.metadata.namespace()
                && service
                    .spec
                    .selector
                    .iter()
                    .all(|(k, v)| w.metadata.labels.get(k) == Some(v))
        })
    }

    pub fn egress(&self) -> EgressPolicy {
        self.settings.egress.policy
    }

    /// The enrolled workloads that the agent of `node` serves.
    pub fn enrolled_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads
            .values()
            .filter(move |w| w.spec.node == node && self.is_enrolled(w))
    }
}
