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

use nodemesh_config::EffectiveMtls;
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
            let verdict = rejudge(tracked, &mtls, policies);
            if let Rejudged::Close { by } = &verdict {
                tracing::info!(
                    workload = %pod.key,
                    peer = tracked.peer.principal.as_deref().unwrap_or("plaintext"),
                    peer_ip = %tracked.peer.ip,
                    port = tracked.dst.port(),
                    by = %by,
                    "closing a connection the new configuration no longer allows"
                );
                shared
                    .state
                    .metrics
                    .authorization_decisions
                    .with_label_values(&["deny", "enforced"])
                    .inc();
                tracked.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }
}

/// What a change of policies or mTLS mode means for one open byte-stream connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rejudged {
    KeepOpen,
    /// `by` names the policy, or the mTLS mode, that no longer allows it.
    Close {
        by: String,
    },
}

/// Judges an open byte-stream connection again, as the proxy would judge the same connection
/// opened now. Its requests were never read, so HTTP attributes are unknown and judged as
/// Istio judges TCP: an ALLOW rule that needs them does not match, a DENY rule matches on
/// the rest of its fields. A connection the new rules leave alone stays open.
fn rejudge(tracked: &Tracked, mtls: &EffectiveMtls, policies: &WorkloadPolicies) -> Rejudged {
    let (mode, policy) = mtls.for_port(tracked.dst.port());
    if tracked.peer.principal.is_none() && !mode.accepts_plaintext() {
        return Rejudged::Close {
            by: format!(
                "mTLS mode {mode:?} ({})",
                policy.unwrap_or("the mesh default")
            ),
        };
    }
    if policies.is_empty() {
        return Rejudged::KeepOpen;
    }
    let decision = policies.decide(&Request {
        peer: &tracked.peer,
        destination_ip: tracked.dst.ip(),
        destination_port: tracked.dst.port(),
        sni: tracked.sni.as_deref(),
        http: None,
    });
    if decision.allowed {
        Rejudged::KeepOpen
    } else {
        Rejudged::Close {
            by: decision.denied_by().unwrap_or_default(),
        }
    }
}

/// The peer of an inbound connection as policies see it.
pub fn peer(identity: Option<&nodemesh_identity::SpiffeId>, addr: SocketAddr) -> Peer {
    match identity {
        Some(id) => Peer::authenticated(&id.to_string(), addr.ip()),
        None => Peer::plaintext(addr.ip()),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use nodemesh_config::{AuthorizationPolicy, MtlsMode, PortMtls};
    use nodemesh_policy::TrustDomains;

    use super::*;

    const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

    fn open(principal: Option<&str>, port: u16) -> Tracked {
        let ip = Ipv4Addr::new(10, 0, 0, 1).into();
        Tracked {
            peer: match principal {
                Some(id) => Peer::authenticated(id, ip),
                None => Peer::plaintext(ip),
            },
            dst: SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2), port)),
            sni: None,
            cancel: CancellationToken::new(),
        }
    }

    fn policies(yaml: &[&str]) -> WorkloadPolicies {
        let parsed: Vec<AuthorizationPolicy> = yaml
            .iter()
            .map(|y| serde_yaml::from_str(y).expect("policy"))
            .collect();
        WorkloadPolicies::new(&parsed, &TrustDomains::new("cluster.local", &[]))
    }

    fn policy(action: &str, rule: &str) -> String {
        format!(
            "apiVersion: security.nodemesh.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  action: {action}\n  rules:\n  - {rule}\n"
        )
    }

    fn permissive() -> EffectiveMtls {
        EffectiveMtls::default()
    }

    #[test]
    fn no_policy_keeps_every_connection() {
        let none = WorkloadPolicies::default();
        assert_eq!(
            rejudge(&open(None, 80), &permissive(), &none),
            Rejudged::KeepOpen
        );
        assert_eq!(
            rejudge(&open(Some(FRONTEND), 80), &permissive(), &none),
            Rejudged::KeepOpen
        );
    }

    #[test]
    fn strict_closes_plaintext_only_and_port_level_modes_count() {
        let strict = EffectiveMtls {
            mode: MtlsMode::Strict,
            policy: Some("shop/strict".into()),
            ports: BTreeMap::new(),
        };
        let none = WorkloadPolicies::default();
        assert!(matches!(
            rejudge(&open(None, 80), &strict, &none),
            Rejudged::Close { by } if by.contains("shop/strict")
        ));
        assert_eq!(
            rejudge(&open(Some(FRONTEND), 80), &strict, &none),
            Rejudged::KeepOpen
        );
        let strict_on_8080 = EffectiveMtls {
            ports: BTreeMap::from([(
                8080,
                PortMtls {
                    mode: MtlsMode::Strict,
                    policy: Some("shop/port".into()),
                },
            )]),
            ..permissive()
        };
        assert_eq!(
            rejudge(&open(None, 80), &strict_on_8080, &none),
            Rejudged::KeepOpen
        );
        assert!(matches!(
            rejudge(&open(None, 8080), &strict_on_8080, &none),
            Rejudged::Close { .. }
        ));
    }

    #[test]
    fn an_http_deny_leaves_the_connections_its_other_fields_do_not_match() {
        // The rule names a peer and a path: connections from anyone else stay open.
        let deny = policies(&[&policy(
            "DENY",
            "{from: [{source: {principals: [cluster.local/ns/shop/sa/batch]}}], to: [{operation: {paths: [/admin]}}]}",
        )]);
        assert_eq!(
            rejudge(&open(Some(FRONTEND), 80), &permissive(), &deny),
            Rejudged::KeepOpen
        );
        assert_eq!(
            rejudge(&open(None, 80), &permissive(), &deny),
            Rejudged::KeepOpen
        );
        // From the peer it names, the path cannot be seen on bytes: it denies, as Istio's
        // TCP filter and as a new connection from that peer is denied.
        let batch = open(Some("spiffe://cluster.local/ns/shop/sa/batch"), 80);
        assert!(matches!(
            rejudge(&batch, &permissive(), &deny),
            Rejudged::Close { by } if by.contains("shop/p")
        ));
    }

    #[test]
    fn an_http_deny_on_another_port_leaves_this_one_alone() {
        let deny = policies(&[&policy(
            "DENY",
            "{to: [{operation: {ports: [\"8080\"], methods: [POST]}}]}",
        )]);
        assert_eq!(
            rejudge(&open(Some(FRONTEND), 9000), &permissive(), &deny),
            Rejudged::KeepOpen
        );
        assert!(matches!(
            rejudge(&open(Some(FRONTEND), 8080), &permissive(), &deny),
            Rejudged::Close { .. }
        ));
    }

    #[test]
    fn an_allow_keeps_the_peers_it_names_and_closes_the_rest() {
        let allow = policies(&[&policy("ALLOW", "{from: [{source: {namespaces: [shop]}}]}")]);
        assert_eq!(
            rejudge(&open(Some(FRONTEND), 80), &permissive(), &allow),
            Rejudged::KeepOpen
        );
        assert!(matches!(
            rejudge(
                &open(Some("spiffe://cluster.local/ns/other/sa/x"), 80),
                &permissive(),
                &allow
            ),
            Rejudged::Close { .. }
        ));
        assert!(matches!(
            rejudge(&open(None, 80), &permissive(), &allow),
            Rejudged::Close { .. }
        ));
    }

    #[test]
    fn an_allow_that_needs_http_cannot_keep_bytes_it_never_read() {
        let allow = policies(&[&policy("ALLOW", "{to: [{operation: {methods: [GET]}}]}")]);
        assert!(matches!(
            rejudge(&open(Some(FRONTEND), 80), &permissive(), &allow),
            Rejudged::Close { .. }
        ));
    }

    #[test]
    fn a_server_name_deny_closes_only_connections_that_sent_that_name() {
        let deny = policies(&[&policy(
            "DENY",
            "{when: [{key: connection.sni, values: [admin.shop.svc]}]}",
        )]);
        let mut admin = open(Some(FRONTEND), 443);
        admin.sni = Some("admin.shop.svc".into());
        let mut web = open(Some(FRONTEND), 443);
        web.sni = Some("web.shop.svc".into());
        assert!(matches!(
            rejudge(&admin, &permissive(), &deny),
            Rejudged::Close { .. }
        ));
        assert_eq!(rejudge(&web, &permissive(), &deny), Rejudged::KeepOpen);
    }
}
