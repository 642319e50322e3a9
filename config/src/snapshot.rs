//! Per-node snapshots: what the controller pushes to each agent, and the agent's answer.
//!
//! The agent opens `GET /v1/snapshots` on the controller (HTTPS, its node token as bearer)
//! and reads newline-delimited JSON [`SnapshotMessage`]s for as long as the connection
//! lasts: the current snapshot at once, then each new one, with heartbeats in between. It
//! answers every snapshot with `POST /v1/acks` ([`SnapshotAck`]).

use serde::{Deserialize, Serialize};

use crate::MeshConfig;

pub const SNAPSHOTS_PATH: &str = "/v1/snapshots";
pub const ACKS_PATH: &str = "/v1/acks";

/// One line of the snapshot stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMessage {
    /// When the controller accepted this configuration, in milliseconds since the Unix epoch:
    /// it grows across controller restarts.
    pub version: u64,
    /// The node's view of the mesh; absent in heartbeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<MeshConfig>,
}

/// The agent's answer to a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAck {
    pub version: u64,
    /// Whether the agent put it in force; when not, `error` says why and the agent keeps its
    /// last good snapshot.
    pub applied: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MeshConfig {
    /// What the agent of `node` needs: every namespace, workload with an address, service and
    /// endpoint slice (any of them may be a destination), the mesh settings, and only the
    /// policies that apply to a workload on this node.
    pub fn for_node(&self, node: &str) -> MeshConfig {
        let local: Vec<_> = self
            .workloads
            .values()
            .filter(|w| w.spec.node == node)
            .collect();
        let peer_authentications = self
            .peer_authentications
            .iter()
            .filter(|(_, p)| {
                let ns = p.metadata.namespace();
                ns == self.settings.root_namespace()
                    || local.iter().any(|w| {
                        w.namespace() == ns
                            && p.spec
                                .selector
                                .as_ref()
                                .is_none_or(|s| s.matches(&w.metadata.labels))
                    })
            })
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        let authorization_policies = self
            .authorization_policies
            .iter()
            .filter(|(_, p)| {
                local.iter().any(|w| {
                    self.authorization_policies_for(w)
                        .any(|q| q.key() == p.key())
                })
            })
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        // Another node's pod without an address yet is no destination: it travels only to its
        // own node, whose agent enrolls it when the CNI plugin hands its namespace over.
        let workloads = self
            .workloads
            .iter()
            .filter(|(_, w)| w.spec.node == node || w.ip().is_some())
            .map(|(k, w)| (k.clone(), w.clone()))
            .collect();
        MeshConfig {
            namespaces: self.namespaces.clone(),
            workloads,
            services: self.services.clone(),
            endpoint_slices: self.endpoint_slices.clone(),
            // Any client on the node may address any Service, and rate limits are enforced at
            // the destination: routes and traffic policies all travel.
            http_routes: self.http_routes.clone(),
            backend_traffic_policies: self.backend_traffic_policies.clone(),
            settings: self.settings.clone(),
            peer_authentications,
            authorization_policies,
        }
    }
}
