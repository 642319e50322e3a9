//! The workloads this agent serves: enrolling them (listeners and routing in their namespace,
//! a certificate for their identity, capture switched on) and releasing them when the
//! configuration no longer assigns them here.
//!
//! A workload's network namespace comes from one of three places: a path the configuration
//! names (local mode), the CNI plugin when the runtime creates the pod (`cni`), or, for a pod
//! that was running before the agent, /proc (`discovery`). Which one, and what to answer the
//! plugin, are pure decisions (`plan`).

mod enroll;
mod handoff;
mod plan;

use std::{
    collections::{BTreeMap, HashSet},
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use nodemesh_config::{MeshConfig, Workload};

use self::{
    enroll::apply_policies,
    handoff::{Handoff, PendingAdd},
    plan::Plan,
};
use crate::{
    config::Config,
    datapath::{CaptureHandle, Datapath, DatapathError},
    inpod::RoutingError,
    mesh::MeshView,
    netns::{NetnsError, NetnsOrigin},
    proxy::{PodContext, ProxyShared},
    state::WorkloadStatus,
};

#[derive(Debug, thiserror::Error)]
enum EnrollError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot use the namespace handed over ({origin}): {source}")]
    Handoff {
        origin: NetnsOrigin,
        source: std::io::Error,
    },
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
    #[error("{0}")]
    Contradiction(String),
}

impl EnrollError {
    /// A short label for the `reason` of the enrollment failure metric.
    fn reason(&self) -> &'static str {
        match self {
            Self::Netns(_) | Self::Handoff { .. } => "netns",
            Self::Listen { .. } => "listen",
            Self::Routing(_) => "routing",
            Self::Identity(_) => "identity",
            Self::Datapath(_) => "datapath",
            Self::Contradiction(_) => "contradiction",
        }
    }
}

/// A workload whose traffic is being captured.
#[derive(Debug)]
struct Enrolled {
    workload: Workload,
    /// Where its namespace came from and the address it listens on: a change of either is a
    /// new enrollment.
    origin: NetnsOrigin,
    ip: Ipv4Addr,
    pod: Arc<PodContext>,
    capture: CaptureHandle,
}

/// A workload that could not be enrolled. While its namespace is known its traffic is
/// refused (`capture`), never let around the mesh.
#[derive(Debug)]
struct Failed {
    workload: Workload,
    error: String,
    capture: Option<CaptureHandle>,
}

/// A workload assigned here whose namespace the agent does not know yet.
#[derive(Debug)]
struct Awaiting {
    workload: Workload,
    reason: String,
}

#[derive(Debug)]
pub struct WorkloadRegistry {
    config: Arc<Config>,
    datapath: Datapath,
    shared: Arc<ProxyShared>,
    enrolled: BTreeMap<String, Enrolled>,
    failed: BTreeMap<String, Failed>,
    awaiting: BTreeMap<String, Awaiting>,
    /// By workload key.
    handoffs: BTreeMap<String, Handoff>,
    /// CNI ADDs for pods the configuration does not have yet.
    pending: Vec<PendingAdd>,
    mesh: Option<Arc<MeshConfig>>,
    last_discovery: Option<Instant>,
}

impl WorkloadRegistry {
    pub fn new(config: Arc<Config>, datapath: Datapath, shared: Arc<ProxyShared>) -> Self {
        Self {
            config,
            datapath,
            shared,
            enrolled: BTreeMap::new(),
            failed: BTreeMap::new(),
            awaiting: BTreeMap::new(),
            handoffs: BTreeMap::new(),
            pending: Vec::new(),
            mesh: None,
            last_discovery: None,
        }
    }

    /// Makes the node match `mesh`: the proxy's view of the mesh, then the enrolled set
    /// (release what left or changed, enroll what is new), then each pod's policies. A
    /// workload that cannot be enrolled is reported and retried by
    /// [`recheck`](Self::recheck); the others are unaffected.
    pub async fn apply(&mut self, mesh: Arc<MeshConfig>) {
        self.shared
            .mesh
            .store(MeshView::new(&mesh, &self.config.trust_domain));
        self.shared
            .state
            .tracer
            .configure(mesh.settings.telemetry.tracing.as_ref());
        self.mesh = Some(mesh.clone());
        let desired: BTreeMap<String, Workload> = mesh
            .enrolled_on(&self.config.node)
            .map(|w| (w.key(), w.clone()))
            .collect();
        // What no longer belongs here: released, its refusal lifted, its handoff dropped.
        let gone: Vec<String> = self
            .enrolled
            .keys()
            .chain(self.failed.keys())
            .chain(self.awaiting.keys())
            .chain(self.handoffs.keys())
            .filter(|key| !desired.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            self.forget(&key).await;
        }
        // Handoffs of an earlier pod of the same name are not this pod's.
        self.handoffs.retain(|key, handoff| {
            desired
                .get(key)
                .is_some_and(|w| plan::same_pod(w, &handoff.view()))
        });
        for (key, workload) in desired {
            self.converge(key, workload).await;
        }
        for enrolled in self.enrolled.values() {
            let strict = apply_policies(
                &mesh,
                &enrolled.workload,
                &enrolled.pod,
                &self.shared,
                &self.config.trust_domain,
            );
            self.datapath.set_strict(&enrolled.capture, strict);
        }
        self.forget_traffic_state();
        self.sweep();
        self.retry_pending().await;
        self.publish_mesh_namespaces(&mesh);
    }

    /// Brings one workload the configuration assigns here to what its plan says.
    async fn converge(&mut self, key: String, workload: Workload) {
        let plan = plan::plan(
            &workload,
            self.handoffs.get(&key).map(Handoff::view).as_ref(),
            self.config.netns_from_config,
        );
        if let Some(enrolled) = self.enrolled.get_mut(&key) {
            let same = matches!(&plan, Plan::Enroll { origin, ip }
                if *origin == enrolled.origin && *ip == enrolled.ip)
                && workload.spec.service_account == enrolled.workload.spec.service_account;
            if same {
                // A label or annotation edit changes which policies and Services select the
                // workload, not its sockets: its connections stay.
                enrolled.workload = workload;
                return;
            }
            self.release(&key).await;
        }
        match plan {
            Plan::Enroll { origin, ip } => {
                self.awaiting.remove(&key);
                self.enroll(key, workload, origin, ip).await;
            }
            Plan::Await(reason) => {
                self.lift_refusal(&key);
                self.awaiting.insert(key, Awaiting { workload, reason });
            }
            Plan::Fail(reason) => {
                self.awaiting.remove(&key);
                let origin = self.handoffs.get(&key).map(|h| h.netns.origin().clone());
                self.record_failure(key, workload, origin, EnrollError::Contradiction(reason));
            }
        }
    }

    /// Removes every trace of a workload no longer assigned here.
    async fn forget(&mut self, key: &str) {
        self.release(key).await;
        self.lift_refusal(key);
        self.awaiting.remove(key);
        self.handoffs.remove(key);
    }

    fn lift_refusal(&mut self, key: &str) {
        if let Some(Failed {
            capture: Some(capture),
            ..
        }) = self.failed.remove(key)
        {
            self.datapath.release(&capture);
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

    /// Removes what a previous agent left pinned for pods this node no longer has.
    fn sweep(&mut self) {
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

    /// Tries again to enroll the workloads that failed (their namespace may exist now),
    /// enrolls again each workload whose namespace was replaced at the same path (a pod
    /// sandbox recreated: the proxy's sockets live in the old one), looks in /proc for the
    /// namespaces of pods still awaited, and answers CNI requests that waited too long.
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
            self.converge(key, workload).await;
        }
        let failed: Vec<(String, Workload)> = self
            .failed
            .iter()
            .map(|(k, f)| (k.clone(), f.workload.clone()))
            .collect();
        for (key, workload) in failed {
            self.converge(key, workload).await;
        }
        self.discover().await;
        self.expire_pending();
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

    /// Every workload assigned to this node, enrolled, failed or awaited, for `/workloads`.
    pub fn status(&self) -> Vec<WorkloadStatus> {
        let enrolled = self.enrolled.values().map(|e| {
            let mut status = describe(&self.config, &e.workload, "enrolled", None);
            status.ip = Some(e.ip);
            status.netns = e.origin.to_string();
            status.netns_cookie = Some(e.pod.netns.cookie());
            status.counters = Some(e.pod.counters.clone());
            status.mtls_mode = Some(format!("{:?}", e.pod.mtls().mode).to_uppercase());
            status
        });
        let failed = self
            .failed
            .values()
            .map(|f| describe(&self.config, &f.workload, "failed", Some(f.error.clone())));
        let awaiting = self.awaiting.values().map(|a| {
            describe(
                &self.config,
                &a.workload,
                "awaiting",
                Some(a.reason.clone()),
            )
        });
        let mut all: Vec<WorkloadStatus> = enrolled.chain(failed).chain(awaiting).collect();
        all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        all
    }

    /// Tells the CNI plugin, in a file beside its socket, which namespaces are in the mesh:
    /// what it goes by while this agent is away.
    fn publish_mesh_namespaces(&self, mesh: &MeshConfig) {
        let Some(socket) = &self.config.cni_socket else {
            return;
        };
        let enrolled = mesh
            .namespaces
            .values()
            .filter(|ns| ns.enrolls_workloads())
            .map(|ns| ns.name().to_owned())
            .collect();
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::cni::publish_mesh_namespaces(&socket, enrolled) {
                tracing::warn!(error = %e, "cannot write the mesh's namespaces for the CNI plugin");
            }
        });
    }
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
        ip: w.ip(),
        netns: w
            .spec
            .netns
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
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
