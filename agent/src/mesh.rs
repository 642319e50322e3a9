//! What the proxy needs to know of the whole mesh, rebuilt at every configuration change:
//! which addresses belong to enrolled workloads and as which identity, and the egress policy.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{Arc, RwLock},
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

#[derive(Debug, Default)]
pub struct MeshView {
    by_ip: HashMap<Ipv4Addr, Destination>,
    pub egress: EgressPolicy,
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
        Self {
            by_ip,
            egress: mesh.egress(),
        }
    }

    pub fn destination(&self, ip: Ipv4Addr) -> Option<&Destination> {
        self.by_ip.get(&ip)
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
