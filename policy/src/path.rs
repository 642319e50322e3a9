//! The whole path of a connection through the mesh, as the proxies judge it: egress at the
//! source, then at the destination the peer authentication (mTLS or plaintext) and the
//! authorization policies. `nodemesh explain` shows this; the agents apply the same steps.

use std::net::{IpAddr, Ipv4Addr};

use nodemesh_config::{EgressPolicy, MeshConfig, MtlsMode, Workload};
use serde::Serialize;

use crate::{Explanation, HttpAttributes, Peer, Request, TrustDomains, WorkloadPolicies};

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
    /// The request cannot be normalised (its path, or its method's case): the proxy answers 400.
    InvalidRequest { reason: String },
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
    /// The destination's mTLS mode on this port and the policy that set it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_mtls: Option<(MtlsMode, Option<String>)>,
    /// The request as the policies judged it: its path normalised.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judged_path: Option<String>,
    pub allowed: bool,
    pub step: Step,
}

fn endpoint<'a>(
    mesh: &'a MeshConfig,
    trust_domain: &str,
    ip: Ipv4Addr,
) -> (Endpoint, Option<&'a Workload>) {
    let workload = mesh.workloads.values().find(|w| w.ip() == Some(ip));
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

/// What is asked of [`explain_path`]: a connection from `source` to `destination:port`, an
/// HTTP request when `http` is given (its path as the client sends it), with the application's
/// TLS server name when `sni` is given.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    pub port: u16,
    pub http: Option<&'a HttpAttributes>,
    pub sni: Option<&'a str>,
}

/// The policies of `target` compiled as its node's agent compiles them.
pub fn workload_policies(
    mesh: &MeshConfig,
    trust_domain: &str,
    target: &Workload,
) -> WorkloadPolicies {
    WorkloadPolicies::new(
        mesh.authorization_policies_for(target),
        &TrustDomains::new(trust_domain, &mesh.settings.trust_domain_aliases),
    )
}

/// Judges a connection or request the way the mesh would.
pub fn explain_path(
    mesh: &MeshConfig,
    trust_domain: &str,
    question: Question<'_>,
) -> PathExplanation {
    let Question {
        source: source_ip,
        destination: destination_ip,
        port,
        http,
        sni,
    } = question;
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
        judged_path: None,
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
    let (mode, mode_policy) = mtls.for_port(port);
    result.destination_mtls = Some((mode, mode_policy.map(str::to_owned)));
    if security == "plaintext" && !mode.accepts_plaintext() {
        result.allowed = false;
        result.step = Step::PlaintextRefused {
            policy: mode_policy.map(str::to_owned),
        };
        return result;
    }
    let peer = match &result.source.identity {
        Some(id) => Peer::authenticated(id, IpAddr::V4(source_ip)),
        None => Peer::plaintext(IpAddr::V4(source_ip)),
    };
    let policies = workload_policies(mesh, trust_domain, target);
    let request = |http| Request {
        peer: &peer,
        destination_ip: IpAddr::V4(destination_ip),
        destination_port: port,
        sni,
        http,
    };
    // As the destination's proxy: HTTP is read only when its policies or the mesh's telemetry
    // need it, and policies that do not look at HTTP decide for the whole connection first.
    let reads_http = policies.needs_http() || mesh.settings.telemetry.reads_http();
    let http = http.filter(|_| reads_http);
    if http.is_some() && !policies.needs_http() {
        let connection = policies.explain(&request(None));
        if !connection.decision.allowed {
            result.allowed = false;
            result.step = Step::Authorization {
                explanation: Box::new(connection),
            };
            return result;
        }
    }
    let http = match http.map(|h| h.normalized(mesh.settings.path_normalization)) {
        Some(Err(e)) => {
            result.allowed = false;
            result.step = Step::InvalidRequest {
                reason: e.to_string(),
            };
            return result;
        }
        Some(Ok(h)) => Some(h),
        None => None,
    };
    result.judged_path = http.as_ref().map(|h| h.path.clone());
    let explanation = policies.explain(&request(http.as_ref()));
    result.allowed = explanation.decision.allowed;
    result.step = Step::Authorization {
        explanation: Box::new(explanation),
    };
    result
}
