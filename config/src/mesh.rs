use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::{
    AuthorizationPolicy, BackendTrafficPolicy, ENROLLED_LABEL, EgressPolicy, EndpointSlice,
    HttpRoute, MeshSettingsSpec, MtlsMode, Namespace, PeerAuthentication, Service, Workload,
    selects_all,
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
    /// EndpointSlices by `namespace/name`: where a Service has any, its endpoints.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoint_slices: BTreeMap<String, EndpointSlice>,
    /// The mesh-wide settings (defaults when no MeshSettings object exists).
    pub settings: MeshSettingsSpec,
}

/// One endpoint of a Service: an address, and the workload that holds it when the mesh knows
/// one (an EndpointSlice may list addresses outside the cluster's pods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceEndpoint<'a> {
    pub ip: Ipv4Addr,
    pub workload: Option<&'a Workload>,
}

/// The mTLS mode in force for a workload and the policy that decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveMtls {
    pub mode: MtlsMode,
    /// `namespace/name` of the deciding PeerAuthentication; `None` for the default.
    pub policy: Option<String>,
    /// Ports of the workload with a mode of their own (`portLevelMtls`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, PortMtls>,
}

/// The mode of one port and the policy that set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortMtls {
    pub mode: MtlsMode,
    pub policy: Option<String>,
}

impl Default for EffectiveMtls {
    fn default() -> Self {
        Self {
            mode: MtlsMode::Permissive,
            policy: None,
            ports: BTreeMap::new(),
        }
    }
}

impl EffectiveMtls {
    /// The mode for a connection to the workload's `port`, and the policy that set it.
    pub fn for_port(&self, port: u16) -> (MtlsMode, Option<&str>) {
        match self.ports.get(&port) {
            Some(p) => (p.mode, p.policy.as_deref()),
            None => (self.mode, self.policy.as_deref()),
        }
    }
}

/// The oldest of several policies at one scope (creation time, then name), as Istio picks.
fn oldest<'a>(
    policies: impl Iterator<Item = &'a PeerAuthentication>,
) -> Option<&'a PeerAuthentication> {
    policies.min_by(|a, b| {
        let key = |p: &'a PeerAuthentication| {
            (
                p.metadata.creation_timestamp.as_deref().unwrap_or(""),
                &p.metadata.name,
            )
        };
        key(a).cmp(&key(b))
    })
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

    /// The mTLS mode of a workload, composed as Istio does: PERMISSIVE, then the mesh-wide
    /// PeerAuthentication (root namespace, no selector), then the namespace's, then the oldest
    /// one selecting the workload, each overriding when it sets a mode; the workload's policy
    /// also sets `portLevelMtls` (an UNSET port takes the workload's mode). A policy with a
    /// selector in the root namespace has no effect, as in Istio.
    pub fn mtls_mode(&self, workload: &Workload) -> EffectiveMtls {
        let root = self.settings.root_namespace();
        let namespace = workload.namespace();
        let at = |ns: &'_ str| {
            let ns = ns.to_owned();
            self.peer_authentications
                .values()
                .filter(move |p| p.metadata.namespace() == ns)
        };
        let mesh = oldest(at(root).filter(|p| selects_all(p.spec.selector.as_ref())));
        let in_namespace = (namespace != root)
            .then(|| oldest(at(namespace).filter(|p| selects_all(p.spec.selector.as_ref()))))
            .flatten();
        let selecting = (namespace != root)
            .then(|| {
                oldest(at(namespace).filter(|p| {
                    p.spec.selector.as_ref().is_some_and(|s| {
                        !s.match_labels.is_empty() && s.matches(&workload.metadata.labels)
                    })
                }))
            })
            .flatten();
        let mut effective = EffectiveMtls::default();
        for policy in [mesh, in_namespace, selecting].into_iter().flatten() {
            if policy.mode() != MtlsMode::Unset {
                effective.mode = policy.mode();
                effective.policy = Some(policy.key());
            }
        }
        if let Some(policy) = selecting {
            for (port, mtls) in policy.spec.port_level_mtls.iter().flatten() {
                let Ok(port) = u16::try_from(port.0) else {
                    continue;
                };
                let port_mtls = match mtls.mode {
                    MtlsMode::Unset => PortMtls {
                        mode: effective.mode,
                        policy: effective.policy.clone(),
                    },
                    mode => PortMtls {
                        mode,
                        policy: Some(policy.key()),
                    },
                };
                effective.ports.insert(port, port_mtls);
            }
        }
        effective
    }

    /// The AuthorizationPolicies that apply to a workload, as Istio selects them: those of its
    /// namespace and of the root namespace whose selector matches its labels (or that have
    /// none); a root-namespace policy with a selector applies in every namespace. A policy
    /// attached to Services by `targetRefs` applies to the workloads behind them.
    pub fn authorization_policies_for<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a AuthorizationPolicy> + 'a {
        let root = self.settings.root_namespace();
        self.authorization_policies.values().filter(move |p| {
            let ns = p.metadata.namespace();
            if p.spec.has_targets() {
                return ns == workload.namespace()
                    && p.spec.target_services().any(|name| {
                        self.services
                            .get(&format!("{ns}/{name}"))
                            .is_some_and(|svc| self.serves(svc, workload))
                    });
            }
            let selected = p
                .spec
                .selector
                .as_ref()
                .is_none_or(|s| s.matches(&workload.metadata.labels));
            (ns == workload.namespace() || ns == root) && selected
        })
    }

    /// The endpoints of a Service. Where EndpointSlices name the Service (Kubernetes), the
    /// ready IPv4 addresses they list, each with the workload holding it if the mesh knows
    /// one; otherwise (local mode) the workloads of its namespace whose labels match its
    /// selector. A Service with neither has none.
    pub fn endpoints<'a>(&'a self, service: &'a Service) -> Vec<ServiceEndpoint<'a>> {
        let key = service.key();
        let mut sliced: Vec<Ipv4Addr> = self
            .endpoint_slices
            .values()
            .filter(|s| s.service_key().as_deref() == Some(key.as_str()))
            .flat_map(EndpointSlice::ready_addresses)
            .collect();
        let has_slices = self
            .endpoint_slices
            .values()
            .any(|s| s.service_key().as_deref() == Some(key.as_str()));
        if has_slices {
            sliced.sort_unstable();
            sliced.dedup();
            return sliced
                .into_iter()
                .map(|ip| ServiceEndpoint {
                    ip,
                    workload: self.workloads.values().find(|w| w.ip() == Some(ip)),
                })
                .collect();
        }
        self.workloads
            .values()
            .filter(|w| {
                !service.spec.selector.is_empty()
                    && w.namespace() == service.metadata.namespace()
                    && service
                        .spec
                        .selector
                        .iter()
                        .all(|(k, v)| w.metadata.labels.get(k) == Some(v))
            })
            .filter_map(|w| {
                Some(ServiceEndpoint {
                    ip: w.ip()?,
                    workload: Some(w),
                })
            })
            .collect()
    }

    /// Whether `workload` is behind `service`, for what attaches to a Service (policies by
    /// `targetRefs`, rate limits): the Service's selector picks it, whether it is ready or
    /// not, so that a pod starting, failing its probe or terminating stays under them. A
    /// Service without a selector is behind the addresses its EndpointSlices list, ready or
    /// not.
    pub fn serves(&self, service: &Service, workload: &Workload) -> bool {
        if workload.namespace() != service.metadata.namespace() {
            return false;
        }
        if !service.spec.selector.is_empty() {
            return service
                .spec
                .selector
                .iter()
                .all(|(k, v)| workload.metadata.labels.get(k) == Some(v));
        }
        let Some(ip) = workload.ip() else {
            return false;
        };
        let key = service.key();
        self.endpoint_slices
            .values()
            .filter(|s| s.service_key().as_deref() == Some(key.as_str()))
            .any(|s| s.addresses().any(|a| a == ip))
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
