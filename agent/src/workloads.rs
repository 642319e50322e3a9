//! The workloads this agent serves: enrolling them (listeners and routing in their namespace,
//! a certificate for their identity, capture switched on) and releasing them when the
//! configuration no longer assigns them here.

use std::{
    collections::{BTreeMap, HashSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use nodemesh_config::{MeshConfig, MtlsMode, Workload};
use nodemesh_identity::SpiffeId;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    datapath::{CaptureHandle, Datapath, DatapathError},
    inpod::{self, RoutingError},
    mesh::MeshView,
    netns::{NetnsError, PodNetns},
    proxy::{PodContext, ProxyShared, default_mtls, handlers, serve},
    state::WorkloadStatus,
};

impl EnrollError {
    /// A short label for the `reason` of the enrollment failure metric.
    fn reason(&self) -> &'static str {
        match self {
            Self::Netns(_) => "netns",
            Self::Listen { .. } => "listen",
            Self::Routing(_) => "routing",
            Self::Identity(_) => "identity",
            Self::Datapath(_) => "datapath",
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum EnrollError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(
        "cannot listen on {addr} in {netns}: {source}; check that {ip} is configured in that \
         namespace and that nothing else uses the port"
    )]
    Listen {
        addr: SocketAddr,
        ip: Ipv4Addr,
        netns: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error("{0}")]
    Identity(String),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// A workload whose traffic is being captured.
#[derive(Debug)]
struct Enrolled {
    workload: Workload,
    pod: Arc<PodContext>,
    capture: CaptureHandle,
}

/// A workload that could not be enrolled. While its namespace exists its traffic is refused
/// (`capture`), never let around the mesh.
#[derive(Debug)]
struct Failed {
    workload: Workload,
    error: String,
    capture: Option<CaptureHandle>,
}

#[derive(Debug)]
pub struct WorkloadRegistry {
    config: Arc<Config>,
    datapath: Datapath,
    shared: Arc<ProxyShared>,
    enrolled: BTreeMap<String, Enrolled>,
    failed: BTreeMap<String, Failed>,
    mesh: Option<Arc<MeshConfig>>,
}

impl WorkloadRegistry {
    pub fn new(config: Arc<Config>, datapath: Datapath, shared: Arc<ProxyShared>) -> Self {
        Self {
            config,
            datapath,
            shared,
            enrolled: BTreeMap::new(),
            failed: BTreeMap::new(),
            mesh: None,
        }
    }

    /// Makes the node match `mesh`: the proxy's view of the mesh, then the enrolled set
    /// (release what left or changed, enroll what is new), then each pod's policies. A
    /// workload that cannot be enrolled is reported and retried by
    /// [`retry_failed`](Self::retry_failed); the others are unaffected.
    pub async fn apply(&mut self, mesh: Arc<MeshConfig>) {
        self.shared
            .mesh
            .store(MeshView::new(&mesh, &self.config.trust_domain));
        self.shared
            .state
            .tracer
            .configure(mesh.settings.telemetry.tracing.as_ref());
        self.mesh = Some(mesh.clone());
        let config = self.config.clone();
        let desired: BTreeMap<String, &Workload> = mesh
            .enrolled_on(&config.node)
            .map(|w| (w.key(), w))
            .collect();
        let stale: Vec<String> = self
            .enrolled
            .iter()
            // Only what enrollment is made of counts: a label or annotation edit changes which
            // policies and Services select the workload, not its sockets, so its connections
            // stay.
            .filter(|(key, e)| desired.get(*key).is_none_or(|w| w.spec != e.workload.spec))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.release(&key).await;
        }
        let gone: Vec<String> = self
            .failed
            .keys()
            .filter(|key| !desired.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            if let Some(Failed {
                capture: Some(capture),
                ..
            }) = self.failed.remove(&key)
            {
                self.datapath.release(&capture);
            }
        }
        for (key, workload) in desired {
            match self.enrolled.get_mut(&key) {
                Some(enrolled) => enrolled.workload = workload.clone(),
                None => self.enroll(key, workload.clone()).await,
            }
        }
        for enrolled in self.enrolled.values() {
            let strict = apply_policies(&mesh, enrolled, &self.shared, &self.config.trust_domain);
            self.datapath.set_strict(&enrolled.capture, strict);
        }
        self.forget_traffic_state();
        // What a previous agent left pinned for pods this configuration does not have here.
        let keep: HashSet<u64> = self
            .enrolled
            .values()
            .map(|e| e.capture.netns_cookie())
            .chain(
                self.failed
                    .values()
                    .filter_map(|f| f.capture.as_ref().map(CaptureHandle::netns_cookie)),
            )
            .collect();
        let swept = self.datapath.sweep(&keep);
        if swept > 0 {
            tracing::info!(
                pods = swept,
                "removed the capture of pods no longer on this node"
            );
        }
    }

    /// Drops the traffic state (limits, budgets, endpoint health, pooled connections) of
    /// backends the configuration no longer has and of clients no longer here.
    fn forget_traffic_state(&self) {
        let view = self.shared.mesh.load();
        let mut keys = std::collections::HashSet::new();
        for service in &view.traffic.services {
            for port in &service.ports {
                keys.insert(port.service_target.state_key.clone());
                let Some(routes) = &port.routes else { continue };
                for m in routes
                    .producer
                    .iter()
                    .chain(routes.consumers.values().flatten())
                {
                    keys.extend(m.rule.backends.iter().map(|b| b.state_key.clone()));
                }
            }
        }
        let clients: std::collections::HashSet<String> = self.enrolled.keys().cloned().collect();
        self.shared.http.traffic.retain(&keys, &clients);
        self.shared.http.pools.retain(&keys, &clients);
    }

    /// Tries again to enroll the workloads that failed (their namespace may exist now), and
    /// enrolls again each workload whose namespace was replaced at the same path (a pod
    /// sandbox recreated): the proxy's sockets live in the old one.
    pub async fn recheck(&mut self) {
        let replaced: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(_, e)| e.pod.netns.replaced())
            .map(|(key, _)| key.clone())
            .collect();
        for key in replaced {
            tracing::warn!(
                workload = %key,
                "the workload's network namespace was replaced; enrolling it again"
            );
            let workload = self.enrolled[&key].workload.clone();
            self.release(&key).await;
            self.enroll(key, workload).await;
        }
        let failed: Vec<String> = self.failed.keys().cloned().collect();
        for key in failed {
            let workload = self.failed[&key].workload.clone();
            self.enroll(key, workload).await;
        }
    }

    /// Stops every pod's listeners, so that no new connection is taken; open connections go
    /// on. Capture stays pinned: until the next agent takes over, connections are refused.
    pub fn stop_accepting(&self) {
        for enrolled in self.enrolled.values() {
            enrolled.pod.stop_accepting.cancel();
        }
    }

    /// Closes every connection still open.
    pub fn close_all(&self) {
        for enrolled in self.enrolled.values() {
            enrolled.pod.cancel.cancel();
        }
    }

    async fn enroll(&mut self, key: String, workload: Workload) {
        let previous = self.failed.remove(&key).and_then(|f| f.capture);
        match self.try_enroll(&workload).await {
            Ok(enrolled) => {
                if let Some(previous) = previous
                    && previous.netns_cookie() != enrolled.capture.netns_cookie()
                {
                    // The refusal was pinned in a namespace since replaced.
                    self.datapath.forget_namespace(previous.netns_cookie());
                }
                if let Some(mesh) = &self.mesh {
                    apply_policies(mesh, &enrolled, &self.shared, &self.config.trust_domain);
                }
                tracing::info!(
                    workload = %key,
                    ip = %workload.spec.ip,
                    identity = %enrolled.pod.identity,
                    netns = %workload.spec.netns.display(),
                    cookie = enrolled.pod.netns.cookie(),
                    "workload enrolled"
                );
                self.enrolled.insert(key, enrolled);
            }
            Err(e) => {
                let capture = match previous {
                    Some(capture) => Some(capture),
                    None => self.refuse(&workload),
                };
                let refused = if capture.is_some() {
                    "its traffic is refused until it enrolls"
                } else {
                    "it has no network namespace to capture"
                };
                tracing::warn!(workload = %key, error = %e, "cannot enroll workload: {refused}");
                self.shared
                    .state
                    .metrics
                    .enrollment_failed(&key, e.reason());
                self.failed.insert(
                    key,
                    Failed {
                        workload,
                        error: e.to_string(),
                        capture,
                    },
                );
            }
        }
    }

    /// Captures a workload that failed to enroll so that its traffic is refused, if its
    /// namespace can be opened at all.
    fn refuse(&mut self, workload: &Workload) -> Option<CaptureHandle> {
        let netns = PodNetns::open(&workload.spec.netns).ok()?;
        match self.datapath.refuse(&netns, workload.spec.ip) {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::error!(
                    workload = %workload.key(),
                    error = %e,
                    "cannot refuse the traffic of a workload that failed to enroll"
                );
                None
            }
        }
    }

    async fn try_enroll(&mut self, workload: &Workload) -> Result<Enrolled, EnrollError> {
        let identity = SpiffeId::new(
            &self.config.trust_domain,
            workload.namespace(),
            &workload.spec.service_account,
        )
        .map_err(|e| EnrollError::Identity(e.to_string()))?;
        let netns = PodNetns::open(&workload.spec.netns)?;
        let ip = workload.spec.ip;
        let ports = self.config.ports;
        let mark = self.config.proxy_mark;
        let listen = |port: u16| {
            let addr = SocketAddr::from((ip, port));
            inpod::listen(&netns, addr, mark).map_err(|source| EnrollError::Listen {
                addr,
                ip,
                netns: workload.spec.netns.display().to_string(),
                source,
            })
        };
        let outbound = listen(ports.outbound)?;
        let inbound = listen(ports.inbound)?;
        let hbone = listen(ports.hbone)?;
        inpod::install_routing(&netns, self.config.transparent_mark).await?;
        let strict = self
            .mesh
            .as_ref()
            .is_some_and(|mesh| mesh.mtls_mode(workload).mode == MtlsMode::Strict);
        // Listeners first, capture last: no connection is redirected before the proxy is there.
        let capture = self.datapath.enroll(&netns, ip, &inbound, &hbone, strict)?;
        self.shared.identities.acquire(identity.clone());
        let cancel = CancellationToken::new();
        let pod = Arc::new(PodContext {
            key: workload.key(),
            ip,
            identity,
            netns,
            counters: Default::default(),
            mtls: RwLock::new(default_mtls()),
            policies: RwLock::default(),
            active: Default::default(),
            stop_accepting: cancel.child_token(),
            cancel,
            rate_limits: Default::default(),
            baggage: crate::proxy::baggage::baggage(&workload.key()),
        });
        let shared = &self.shared;
        tokio::spawn(serve(
            outbound,
            pod.clone(),
            shared.clone(),
            handlers::outbound,
        ));
        tokio::spawn(serve(
            inbound,
            pod.clone(),
            shared.clone(),
            handlers::plaintext_inbound,
        ));
        tokio::spawn(serve(hbone, pod.clone(), shared.clone(), handlers::hbone));
        Ok(Enrolled {
            workload: workload.clone(),
            pod,
            capture,
        })
    }

    async fn release(&mut self, key: &str) {
        let Some(enrolled) = self.enrolled.remove(key) else {
            return;
        };
        // Capture off first, so no new connection reaches listeners about to close.
        self.datapath.release(&enrolled.capture);
        enrolled.pod.cancel.cancel();
        self.shared.identities.release(&enrolled.pod.identity);
        self.shared.pool.forget_source(key);
        inpod::remove_routing(&enrolled.pod.netns, self.config.transparent_mark).await;
        tracing::info!(workload = %key, "workload released");
    }

    /// Every workload assigned to this node, enrolled or failed, for `/workloads`.
    pub fn status(&self) -> Vec<WorkloadStatus> {
        let enrolled = self.enrolled.values().map(|e| {
            let mut status = describe(&self.config, &e.workload, "enrolled", None);
            status.netns_cookie = Some(e.pod.netns.cookie());
            status.counters = Some(e.pod.counters.clone());
            status.mtls_mode = Some(format!("{:?}", e.pod.mtls().mode).to_uppercase());
            status
        });
        let failed = self
            .failed
            .values()
            .map(|f| describe(&self.config, &f.workload, "failed", Some(f.error.clone())));
        let mut all: Vec<WorkloadStatus> = enrolled.chain(failed).collect();
        all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        all
    }
}

/// Puts the workload's mTLS mode and authorization policies from `mesh` in force. Returns
/// whether the workload is STRICT.
fn apply_policies(
    mesh: &MeshConfig,
    enrolled: &Enrolled,
    shared: &ProxyShared,
    trust_domain: &str,
) -> bool {
    let mtls = mesh.mtls_mode(&enrolled.workload);
    let strict = mtls.mode == MtlsMode::Strict;
    *enrolled.pod.mtls.write().unwrap_or_else(|e| e.into_inner()) = mtls;
    let policies = nodemesh_policy::workload_policies(mesh, trust_domain, &enrolled.workload);
    enrolled.pod.set_policies(shared, policies);
    enrolled
        .pod
        .rate_limits
        .set(nodemesh_traffic::rate_limit::for_workload(
            mesh,
            &enrolled.workload,
        ));
    strict
}

fn describe(
    config: &Config,
    w: &Workload,
    state: &'static str,
    error: Option<String>,
) -> WorkloadStatus {
    WorkloadStatus {
        name: w.name().to_owned(),
        namespace: w.namespace().to_owned(),
        ip: w.spec.ip,
        netns: w.spec.netns.display().to_string(),
        service_account: w.spec.service_account.clone(),
        identity: w.identity(&config.trust_domain),
        state,
        error,
        netns_cookie: None,
        mtls_mode: None,
        outbound_connections: 0,
        inbound_connections: 0,
        counters: None,
    }
}
