//! What the proxy needs to know of the whole mesh, rebuilt at every configuration change:
//! which addresses belong to enrolled workloads and as which identity, the Services with their
//! routes, policies and endpoints (`nodemesh-traffic`'s table), and the egress policy.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, RwLock},
};

use nodemesh_config::{EgressPolicy, MeshConfig, PathNormalization};
use nodemesh_identity::SpiffeId;
use nodemesh_policy::TrustDomains;
use nodemesh_traffic::{PortEntry, ServiceEntry, ServiceId, TrafficTable};

/// A workload the proxy may send traffic to.
#[derive(Debug, Clone)]
pub struct Destination {
    /// `namespace/name`.
    pub key: String,
    /// Set when the workload is in the mesh: traffic to it goes through HBONE, and its proxy
    /// must prove this identity.
    pub identity: Option<SpiffeId>,
}

#[derive(Debug, Default)]
pub struct MeshView {
    by_ip: HashMap<Ipv4Addr, Arc<Destination>>,
    pub traffic: TrafficTable,
    pub egress: EgressPolicy,
    /// Read HTTP on every inbound connection (MeshSettings telemetry).
    pub reads_http: bool,
    /// How request paths are normalised before they are judged and routed.
    pub path_normalization: PathNormalization,
    /// The trust domains whose identities the HBONE server admits: the mesh's own, then the
    /// aliases MeshSettings federates.
    pub trust_domains: TrustDomains,
}

/// A Service port a connection was addressed to.
#[derive(Debug, Clone, Copy)]
pub struct ServicePort<'a> {
    pub id: ServiceId,
    pub service: &'a ServiceEntry,
    /// `None` when the Service has no such port.
    pub port: Option<&'a PortEntry>,
}

impl MeshView {
    pub fn new(mesh: &MeshConfig, trust_domain: &str) -> Self {
        let by_ip = mesh
            .workloads
            .values()
            .filter_map(|w| {
                let identity = mesh
                    .is_enrolled(w)
                    .then(|| {
                        SpiffeId::new(trust_domain, w.namespace(), &w.spec.service_account).ok()
                    })
                    .flatten();
                Some((
                    w.ip()?,
                    Arc::new(Destination {
                        key: w.key(),
                        identity,
                    }),
                ))
            })
            .collect();
        Self {
            by_ip,
            traffic: TrafficTable::new(mesh),
            egress: mesh.egress(),
            reads_http: mesh.settings.telemetry.reads_http(),
            path_normalization: mesh.settings.path_normalization,
            trust_domains: TrustDomains::new(trust_domain, &mesh.settings.trust_domain_aliases),
        }
    }

    /// The workload at an address, if the mesh knows one.
    pub fn workload(&self, ip: Ipv4Addr) -> Option<&Arc<Destination>> {
        self.by_ip.get(&ip)
    }

    /// The Service port at `dst`, when `dst` is a Service address.
    pub fn service_port(&self, dst: SocketAddrV4) -> Option<ServicePort<'_>> {
        let (id, service) = self.traffic.service_at(*dst.ip())?;
        Some(ServicePort {
            id,
            service,
            port: service.port(dst.port()),
        })
    }
}

/// The current [`MeshView`], swapped whole on every configuration change.
#[derive(Debug, Default)]
pub struct SharedMesh(RwLock<Arc<MeshView>>);

impl SharedMesh {
    pub fn load(&self) -> Arc<MeshView> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn store(&self, view: MeshView) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }
}
