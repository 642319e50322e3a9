//! Authorization at the destination: each inbound connection (and, where policies look at
//! HTTP, each request) is judged by the pod's AuthorizationPolicies. Denials, audits and
//! dry-run verdicts are logged and counted; connections that a policy change no longer
//! allows are closed.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use nodemesh_policy::{Decision, Peer, Request, WorkloadPolicies};
use tokio_util::sync::CancellationToken;

use super::{PodContext, ProxyError, ProxyShared};

/// Judges `req` for the pod and accounts for it: metrics for every decision, a log line for
/// denials, audits and dry-run verdicts that differ.
pub fn decide(
    pod: &PodContext,
    shared: &ProxyShared,
    policies: &WorkloadPolicies,
    req: &Request<'_>,
) -> Decision {
    let decision = policies.decide(req);
    let metrics = &shared.state.metrics;
    let outcome = if decision.allowed { "allow" } else { "deny" };
    metrics
        .authorization_decisions
        .with_label_values(&[outcome, "enforced"])
        .inc();
    let what = req.http.map_or_else(
        || format!("connection to port {}", req.destination_port),
        |h| format!("{} {}", h.method, h.path),
    );
    let peer = req.peer.principal.as_deref().unwrap_or("plaintext");
    if !decision.allowed {
        tracing::info!(
            workload = %pod.key,
            peer,
            peer_ip = %req.peer.ip,
            request = %what,
            by = decision.denied_by().unwrap_or_default(),
            "denied by authorization policy"
        );
    }
    for audit in &decision.audited {
        metrics
            .authorization_audits
            .with_label_values(&[&audit.policy])
            .inc();
        tracing::info!(workload = %pod.key, peer, request = %what, policy = %audit.policy, rule = audit.rule, "audit");
    }
    if let Some(shadow) = &decision.dry_run {
        let outcome = if shadow.allowed { "allow" } else { "deny" };
        metrics
            .authorization_decisions
            .with_label_values(&[outcome, "dry_run"])
            .inc();
        if shadow.allowed != decision.allowed {
            tracing::info!(
                workload = %pod.key,
                peer,
                request = %what,
                would = outcome,
                by = shadow.denied_by().unwrap_or_default(),
                "dry-run policy would change the decision"
            );
        }
    }
    decision
}

/// The decision for a whole connection, when the pod's policies can decide without reading
/// HTTP; `Ok` also when they need HTTP (each request is judged then).
pub fn authorize_connection(
    pod: &PodContext,
    shared: &ProxyShared,
    peer: &Peer,
    dst: SocketAddr,
) -> Result<(), ProxyError> {
    let policies = pod.policies();
    // HTTP attributes are judged per request, a TLS server name once the hello is read.
    if policies.is_empty() || policies.needs_http() || policies.needs_sni() {
        return Ok(());
    }
    let decision = decide(
        pod,
        shared,
        &policies,
        &Request {
            peer,
            destination_ip: dst.ip(),
            destination_port: dst.port(),
            sni: None,
            http: None,
        },
    );
    if decision.allowed {
        Ok(())
    } else {
        Err(ProxyError::Denied {
            by: decision.denied_by().unwrap_or_default(),
        })
    }
}

/// A connection carried as bytes (not HTTP), remembered so that a policy change can close it.
#[derive(Debug)]
struct Tracked {
    peer: Peer,
    dst: SocketAddr,
    sni: Option<Box<str>>,
    cancel: CancellationToken,
}

/// The pod's open byte-stream connections.
#[derive(Debug, Default)]
pub struct ActiveConnections {
    next: AtomicU64,
    connections: Mutex<HashMap<u64, Tracked>>,
}

/// Keeps a connection in [`ActiveConnections`] while it lives.
#[derive(Debug)]
pub struct Registration<'a> {
    set: &'a ActiveConnections,
    id: u64,
    pub cancel: CancellationToken,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.set
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl ActiveConnections {
    pub fn register(
        &self,
        peer: Peer,
        dst: SocketAddr,
        sni: Option<&str>,
        parent: &CancellationToken,
    ) -> Registration<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = parent.child_token();
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                Tracked {
                    peer,
                    dst,
                    sni: sni.map(Box::from),
                    cancel: cancel.clone(),
                },
            );
        Registration {
            set: self,
            id,
            cancel,
        }
    }

    /// Closes the connections that `policies` and the pod's mTLS mode no longer allow (a
    /// plaintext one on a port now STRICT); returns how many.
    pub fn close_denied(
        &self,
        pod: &PodContext,
        shared: &ProxyShared,
        policies: &WorkloadPolicies,
    ) -> usize {
        let mtls = pod.mtls();
        let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        for tracked in connections.values() {
            let plaintext = tracked.peer.principal.is_none();
            if plaintext && !mtls.for_port(tracked.dst.port()).0.accepts_plaintext() {
                tracked.cancel.cancel();
                closed += 1;
                continue;
            }
            let req = Request {
                peer: &tracked.peer,
                destination_ip: tracked.dst.ip(),
                destination_port: tracked.dst.port(),
                sni: tracked.sni.as_deref(),
                http: None,
            };
            if !policies.is_empty() && !decide(pod, shared, policies, &req).allowed {
                tracked.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }
}

/// The peer of an inbound connection as policies see it.
pub fn peer(identity: Option<&nodemesh_identity::SpiffeId>, addr: SocketAddr) -> Peer {
    match identity {
        Some(id) => Peer::authenticated(&id.to_string(), addr.ip()),
        None => Peer::plaintext(addr.ip()),
    }
}
