//! What the proxy needs to know of the whole mesh, rebuilt at every configuration change:
//! which addresses belong to enrolled workloads and as which identity, which are Service
//! addresses and what is behind them, and the egress policy.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use nodemesh_config::{EgressPolicy, MeshConfig};
use nodemesh_identity::SpiffeId;

/// A workload the proxy may send traffic to.
#[derive(Debug, Clone)]
pub struct Destination {
    /// `namespace/name`.
    pub key: String,
    /// Set when the workload is in the mesh: traffic to it goes through HBONE, and its proxy
    /// must prove this identity.
    pub identity: Option<SpiffeId>,
}

/// A Service's address: its ports and the workloads behind it.
#[derive(Debug)]
struct ServiceView {
    /// `namespace/name`.
    key: String,
    /// Service port to the workloads' port.
    ports: HashMap<u16, u16>,
    endpoints: Vec<Ipv4Addr>,
    /// Round-robin position.
    next: AtomicUsize,
}

/// Where a captured connection goes.
#[derive(Debug)]
pub enum Route<'a> {
    /// A workload's own address, or an address the mesh does not know (`None`).
    Direct(Option<&'a Destination>),
    /// A Service address, resolved to one of its workloads.
    Service {
        service: &'a str,
        endpoint: SocketAddrV4,
        destination: Option<&'a Destination>,
    },
    /// A Service address that cannot be served: why.
    Unavailable { service: &'a str, reason: String },
}

#[derive(Debug, Default)]
pub struct MeshView {
    by_ip: HashMap<Ipv4Addr, Destination>,
    services: HashMap<Ipv4Addr, ServiceView>,
    pub egress: EgressPolicy,
    /// Read HTTP on every inbound connection (MeshSettings telemetry).
    pub reads_http: bool,
}

impl MeshView {
    pub fn new(mesh: &MeshConfig, trust_domain: &str) -> Self {
        let by_ip = mesh
            .workloads
            .values()
            .map(|w| {
                let identity = mesh
                    .is_enrolled(w)
                    .then(|| {
                        SpiffeId::new(trust_domain, w.namespace(), &w.spec.service_account).ok()
                    })
                    .flatten();
                (
                    w.spec.ip,
                    Destination {
                        key: w.key(),
                        identity,
                    },
                )
            })
            .collect();
        let services = mesh
            .services
            .values()
            .map(|svc| {
                let ports = svc
                    .spec
                    .ports
                    .iter()
                    .filter_map(|p| svc.target_port(p.port).map(|t| (p.port, t)))
                    .collect();
                let view = ServiceView {
                    key: svc.key(),
                    ports,
                    endpoints: mesh.endpoints(svc).map(|w| w.spec.ip).collect(),
                    next: AtomicUsize::new(0),
                };
                (svc.spec.cluster_ip, view)
            })
            .collect();
        Self {
            by_ip,
            services,
            egress: mesh.egress(),
            reads_http: mesh.settings.telemetry.reads_http(),
        }
    }

    /// The workload at an address, if the mesh knows one.
    pub fn workload(&self, ip: Ipv4Addr) -> Option<&Destination> {
        self.by_ip.get(&ip)
    }

    /// Where a connection to `dst` goes: a Service address is resolved to one of its
    /// workloads, in turn.
    pub fn route(&self, dst: SocketAddrV4) -> Route<'_> {
        let Some(service) = self.services.get(dst.ip()) else {
            return Route::Direct(self.by_ip.get(dst.ip()));
        };
        let Some(&target_port) = service.ports.get(&dst.port()) else {
            return Route::Unavailable {
                service: &service.key,
                reason: format!("Service {} has no port {}", service.key, dst.port()),
            };
        };
        if service.endpoints.is_empty() {
            return Route::Unavailable {
                service: &service.key,
                reason: format!("Service {} selects no workload", service.key),
            };
        }
        let index = service.next.fetch_add(1, Ordering::Relaxed) % service.endpoints.len();
        let ip = service.endpoints[index];
        Route::Service {
            service: &service.key,
            endpoint: SocketAddrV4::new(ip, target_port),
            destination: self.by_ip.get(&ip),
        }
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
