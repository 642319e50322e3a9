//! The whole path of a connection through the mesh, as the proxies judge it: egress at the
//! source, then at the destination the peer authentication (mTLS or plaintext) and the
//! authorization policies. `nodemesh explain` shows this; the agents apply the same steps.

use std::net::{IpAddr, Ipv4Addr};

use nodemesh_config::{EgressPolicy, MeshConfig, MtlsMode, Workload};
use serde::Serialize;

use crate::{Explanation, HttpAttributes, Peer, Request, WorkloadPolicies};

/// One side of a connection, as the mesh knows it.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    /// `namespace/name`, when the address belongs to a known workload.
    pub workload: Option<String>,
    pub ip: Ipv4Addr,
    /// The SPIFFE ID, when the workload is enrolled.
    pub identity: Option<String>,
    pub node: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// The source is not in the mesh: its connection leaves as plain TCP, untouched.
    SourceOutsideMesh,
    /// The source's proxy refuses: the destination is outside the mesh and egress is denied.
    EgressDenied,
    /// Plain TCP from the source's proxy to a destination outside the mesh: nothing judges it.
    DestinationOutsideMesh,
    /// The destination refuses plaintext (STRICT), decided by this PeerAuthentication.
    PlaintextRefused { policy: Option<String> },
    /// The destination's AuthorizationPolicies decided.
    Authorization { explanation: Box<Explanation> },
}

#[derive(Debug, Clone, Serialize)]
pub struct PathExplanation {
    pub source: Endpoint,
    pub destination: Endpoint,
    pub port: u16,
    /// `mtls` when both ends are in the mesh (HBONE), else `plaintext`.
    pub security: &'static str,
    /// The destination's mTLS mode and the policy that set it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_mtls: Option<(MtlsMode, Option<String>)>,
    pub allowed: bool,
    pub step: Step,
}

fn endpoint<'a>(
    mesh: &'a MeshConfig,
    trust_domain: &str,
    ip: Ipv4Addr,
) -> (Endpoint, Option<&'a Workload>) {
    let workload = mesh.workloads.values().find(|w| w.spec.ip == ip);
    let endpoint = Endpoint {
        workload: workload.map(Workload::key),
        ip,
        identity: workload
            .filter(|w| mesh.is_enrolled(w))
            .map(|w| w.identity(trust_domain)),
        node: workload.map(|w| w.spec.node.clone()),
    };
    (endpoint, workload.filter(|w| mesh.is_enrolled(w)))
}

/// Judges a connection from `source_ip` to `destination_ip:port` (an HTTP request when
/// `http` is given) the way the mesh would.
pub fn explain_path(
    mesh: &MeshConfig,
    trust_domain: &str,
    source_ip: Ipv4Addr,
    destination_ip: Ipv4Addr,
    port: u16,
    http: Option<&HttpAttributes>,
) -> PathExplanation {
    let (source, source_enrolled) = endpoint(mesh, trust_domain, source_ip);
    let (destination, destination_enrolled) = endpoint(mesh, trust_domain, destination_ip);
    let security = if source_enrolled.is_some() && destination_enrolled.is_some() {
        "mtls"
    } else {
        "plaintext"
    };
    let mut result = PathExplanation {
        source,
        destination,
        port,
        security,
        destination_mtls: None,
        allowed: true,
        step: Step::SourceOutsideMesh,
    };
    let Some(target) = destination_enrolled else {
        result.step = match source_enrolled {
            Some(_) if mesh.egress() == EgressPolicy::Deny => {
                result.allowed = false;
                Step::EgressDenied
            }
            Some(_) => Step::DestinationOutsideMesh,
            None => Step::SourceOutsideMesh,
        };
        return result;
    };
    let mtls = mesh.mtls_mode(target);
    result.destination_mtls = Some((mtls.mode, mtls.policy.clone()));
    if security == "plaintext" && !mtls.mode.accepts_plaintext() {
        result.allowed = false;
        result.step = Step::PlaintextRefused {
            policy: mtls.policy,
        };
        return result;
    }
    let peer = match &result.source.identity {
        Some(id) => Peer::authenticated(id, IpAddr::V4(source_ip)),
        None => Peer::plaintext(IpAddr::V4(source_ip)),
    };
    let explanation =
        WorkloadPolicies::new(mesh.authorization_policies_for(target)).explain(&Request {
            peer: &peer,
            destination_port: port,
            http,
        });
    result.allowed = explanation.decision.allowed;
    result.step = Step::Authorization {
        explanation: Box::new(explanation),
    };
    result
}
