//! Enrolling one workload (listeners and routing in its namespace, its identity, capture
//! switched on), refusing the traffic of one that cannot be, and releasing it again.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use nodemesh_config::{MeshConfig, MtlsMode, Workload};
use nodemesh_identity::SpiffeId;

use super::{EnrollError, Enrolled, Failed, WorkloadRegistry};
use crate::{
    datapath::CaptureHandle,
    inpod,
    netns::{NetnsOrigin, PodNetns},
    proxy::{Placement, PodContext, ProxyShared, handlers, serve},
};

impl WorkloadRegistry {
    /// The namespace to enroll in: the path's, or a new handle on the one handed over.
    pub(super) fn open_netns(
        &self,
        key: &str,
        origin: &NetnsOrigin,
    ) -> Result<PodNetns, EnrollError> {
        match origin {
            NetnsOrigin::Path(path) => Ok(PodNetns::open(path)?),
            _ => {
                let handoff = self.handoffs.get(key).ok_or_else(|| {
                    EnrollError::Contradiction(format!(
                        "the namespace handed over ({origin}) is no longer held"
                    ))
                })?;
                handoff
                    .netns
                    .try_clone()
                    .map_err(|source| EnrollError::Handoff {
                        origin: origin.clone(),
                        source,
                    })
            }
        }
    }

    pub(super) async fn enroll(
        &mut self,
        key: String,
        workload: Workload,
        origin: NetnsOrigin,
        ip: Ipv4Addr,
    ) {
        let previous = self.failed.remove(&key).and_then(|f| f.capture);
        let attempt = match self.open_netns(&key, &origin) {
            Ok(netns) => self.try_enroll(&workload, netns, origin.clone(), ip).await,
            Err(e) => Err(e),
        };
        match attempt {
            Ok(enrolled) => {
                if let Some(previous) = previous
                    && previous.netns_cookie() != enrolled.capture.netns_cookie()
                {
                    // The refusal was pinned in a namespace since replaced.
                    self.datapath.forget_namespace(previous.netns_cookie());
                }
                tracing::info!(
                    workload = %key,
                    %ip,
                    identity = %enrolled.pod.identity,
                    netns = %enrolled.pod.netns,
                    cookie = enrolled.pod.netns.cookie(),
                    "workload enrolled"
                );
                self.enrolled.insert(key, enrolled);
            }
            Err(e) => {
                if let Some(previous) = previous {
                    self.failed.insert(
                        key.clone(),
                        Failed {
                            workload: workload.clone(),
                            error: String::new(),
                            capture: Some(previous),
                        },
                    );
                }
                self.record_failure(key, workload, Some(origin), e);
            }
        }
    }

    /// Reports a workload that cannot be enrolled and refuses its traffic, if its namespace
    /// can be found at all.
    pub(super) fn record_failure(
        &mut self,
        key: String,
        workload: Workload,
        origin: Option<NetnsOrigin>,
        error: EnrollError,
    ) {
        let capture = match self.failed.remove(&key).and_then(|f| f.capture) {
            Some(capture) => Some(capture),
            None => origin.and_then(|origin| self.refuse(&key, &workload, &origin)),
        };
        let refused = if capture.is_some() {
            "its traffic is refused until it enrolls"
        } else {
            "it has no network namespace to capture"
        };
        tracing::warn!(workload = %key, error = %error, "cannot enroll workload: {refused}");
        self.shared
            .state
            .metrics
            .enrollment_failed(&key, error.reason());
        self.failed.insert(
            key,
            Failed {
                workload,
                error: error.to_string(),
                capture,
            },
        );
    }

    /// Captures a workload that failed to enroll so that its traffic is refused.
    fn refuse(
        &mut self,
        key: &str,
        workload: &Workload,
        origin: &NetnsOrigin,
    ) -> Option<CaptureHandle> {
        let netns = self.open_netns(key, origin).ok()?;
        let ip = workload
            .ip()
            .or_else(|| self.handoffs.get(key).and_then(|h| h.ips.first().copied()))?;
        match self.datapath.refuse(&netns, ip) {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::error!(
                    workload = %key,
                    error = %e,
                    "cannot refuse the traffic of a workload that failed to enroll"
                );
                None
            }
        }
    }

    async fn try_enroll(
        &mut self,
        workload: &Workload,
        netns: PodNetns,
        origin: NetnsOrigin,
        ip: Ipv4Addr,
    ) -> Result<Enrolled, EnrollError> {
        let identity = SpiffeId::new(
            &self.config.trust_domain,
            workload.namespace(),
            &workload.spec.service_account,
        )
        .map_err(|e| EnrollError::Identity(e.to_string()))?;
        let ports = self.config.ports;
        let mark = self.config.proxy_mark;
        let listen = |port: u16| {
            let addr = SocketAddr::from((ip, port));
            inpod::listen(&netns, addr, mark).map_err(|source| EnrollError::Listen {
                addr,
                ip,
                netns: netns.to_string(),
                source,
            })
        };
        // A set of listeners per worker, in one SO_REUSEPORT group per port.
        let mut listeners = Vec::with_capacity(self.shared.workers.len());
        for _ in &self.shared.workers {
            listeners.push((
                listen(ports.outbound)?,
                listen(ports.inbound)?,
                listen(ports.hbone)?,
            ));
        }
        let (_, inbound, hbone) = &listeners[0];
        inpod::install_routing(&netns, self.config.transparent_mark).await?;
        let strict = self
            .mesh
            .as_ref()
            .is_some_and(|mesh| mesh.mtls_mode(workload).mode == MtlsMode::Strict);
        // Listeners first, capture last: no connection is redirected before the proxy is there.
        // sk_lookup picks the group by its first listener; the kernel then picks within it.
        let capture = self.datapath.enroll(&netns, ip, inbound, hbone, strict)?;
        self.shared.identities.acquire(identity.clone());
        let pod = Arc::new(PodContext::new(workload.key(), ip, identity, netns));
        let shared = &self.shared;
        // Policies in force before the first connection is accepted.
        if let Some(mesh) = &self.mesh {
            apply_policies(mesh, workload, &pod, shared, &self.config.trust_domain);
        }
        for (worker, (outbound, inbound, hbone)) in shared.workers.iter().zip(listeners) {
            worker.spawn(serve(
                outbound,
                pod.clone(),
                shared.clone(),
                Placement::Accepting,
                handlers::outbound,
            ));
            worker.spawn(serve(
                inbound,
                pod.clone(),
                shared.clone(),
                Placement::Accepting,
                handlers::plaintext_inbound,
            ));
            worker.spawn(serve(
                hbone,
                pod.clone(),
                shared.clone(),
                Placement::FewestHbone,
                handlers::hbone,
            ));
        }
        shared.local.insert(pod.clone());
        Ok(Enrolled {
            workload: workload.clone(),
            origin,
            ip,
            pod,
            capture,
        })
    }

    pub(super) async fn release(&mut self, key: &str) {
        let Some(enrolled) = self.enrolled.remove(key) else {
            return;
        };
        // Capture off first, so no new connection reaches listeners about to close.
        self.datapath.release(&enrolled.capture);
        self.shared.local.remove(enrolled.pod.ip, &enrolled.pod.key);
        enrolled.pod.cancel.cancel();
        self.shared.identities.release(&enrolled.pod.identity);
        self.shared.pool.forget_source(key);
        inpod::remove_routing(&enrolled.pod.netns, self.config.transparent_mark).await;
        tracing::info!(workload = %key, "workload released");
    }
}

/// Puts the workload's mTLS mode and authorization policies from `mesh` in force. Returns
/// whether the workload is STRICT.
pub(super) fn apply_policies(
    mesh: &MeshConfig,
    workload: &Workload,
    pod: &PodContext,
    shared: &ProxyShared,
    trust_domain: &str,
) -> bool {
    let mtls = mesh.mtls_mode(workload);
    let strict = mtls.mode == MtlsMode::Strict;
    *pod.mtls.write().unwrap_or_else(|e| e.into_inner()) = mtls;
    let policies = nodemesh_policy::workload_policies(mesh, trust_domain, workload);
    pod.set_policies(shared, policies);
    pod.rate_limits
        .set(nodemesh_traffic::rate_limit::for_workload(mesh, workload));
    strict
}
