//! What the controller holds: the last good configuration, what went wrong since, and its
//! metrics.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use nodemesh_config::{ConfigErrors, MeshConfig, snapshot::SnapshotAck};
use nodemesh_identity::SpiffeId;
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use serde::Serialize;
use tokio::sync::watch;

use crate::config::Config;

#[derive(Debug)]
pub struct ControllerState {
    config: Config,
    inner: RwLock<Inner>,
    metrics: Metrics,
    /// The configuration in force, for the snapshot streams.
    accepted: watch::Sender<Option<Arc<Accepted>>>,
    agents: Mutex<BTreeMap<String, AgentRecord>>,
}

/// A configuration the controller accepted, and its version.
#[derive(Debug)]
pub struct Accepted {
    /// Milliseconds since the Unix epoch when accepted; grows across restarts.
    pub version: u64,
    pub mesh: Arc<MeshConfig>,
}

/// What the controller knows of one node's agent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentRecord {
    /// Open snapshot streams (normally 0 or 1).
    pub streams: usize,
    pub sent_version: Option<u64>,
    pub acked_version: Option<u64>,
    pub applied: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub acked_at_unix_ms: Option<u64>,
}

/// Counts an open snapshot stream while it lives.
#[derive(Debug)]
pub struct StreamGuard {
    state: Arc<ControllerState>,
    node: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut agents = self.state.agents();
        if let Some(record) = agents.get_mut(&self.node) {
            record.streams = record.streams.saturating_sub(1);
        }
        self.state
            .metrics
            .agents_connected
            .set(agents.values().filter(|a| a.streams > 0).count() as i64);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub config_loads: IntCounterVec,
    pub config_errors: IntGauge,
    pub workloads: IntGauge,
    pub certificates_signed: IntCounter,
    pub certificates_refused: IntCounterVec,
    pub agents_connected: IntGauge,
    pub snapshot_version: IntGauge,
    pub snapshot_acks: IntCounterVec,
    pub push_latency: Histogram,
}

impl Metrics {
    fn new() -> Self {
        let metrics = Self {
            registry: Registry::new(),
            config_loads: IntCounterVec::new(
                Opts::new(
                    "nodemesh_controller_config_loads_total",
                    "Configuration loads, by result (accepted or refused)",
                ),
                &["result"],
            )
            .expect("valid metric"),
            config_errors: IntGauge::new(
                "nodemesh_controller_config_errors",
                "Errors in the configuration on disk now (0 when it is valid)",
            )
            .expect("valid metric"),
            workloads: IntGauge::new(
                "nodemesh_controller_workloads",
                "Workloads in the configuration in force",
            )
            .expect("valid metric"),
            certificates_signed: IntCounter::new(
                "nodemesh_controller_certificates_signed_total",
                "Workload certificates issued",
            )
            .expect("valid metric"),
            certificates_refused: IntCounterVec::new(
                Opts::new(
                    "nodemesh_controller_certificates_refused_total",
                    "Certificate requests refused, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            agents_connected: IntGauge::new(
                "nodemesh_controller_agents_connected",
                "Agents with an open snapshot stream",
            )
            .expect("valid metric"),
            snapshot_version: IntGauge::new(
                "nodemesh_controller_snapshot_version",
                "Version (acceptance time, ms) of the configuration in force",
            )
            .expect("valid metric"),
            snapshot_acks: IntCounterVec::new(
                Opts::new(
                    "nodemesh_controller_snapshot_acks_total",
                    "Snapshot acknowledgements from agents, by result (applied, rejected)",
                ),
                &["result"],
            )
            .expect("valid metric"),
            push_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "nodemesh_controller_snapshot_push_seconds",
                    "From accepting a configuration to an agent acknowledging it applied",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )
            .expect("valid metric"),
        };
        for collector in [
            Box::new(metrics.config_loads.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.config_errors.clone()),
            Box::new(metrics.workloads.clone()),
            Box::new(metrics.certificates_signed.clone()),
            Box::new(metrics.certificates_refused.clone()),
            Box::new(metrics.agents_connected.clone()),
            Box::new(metrics.snapshot_version.clone()),
            Box::new(metrics.snapshot_acks.clone()),
            Box::new(metrics.push_latency.clone()),
        ] {
            metrics
                .registry
                .register(collector)
                .expect("metric registered once");
        }
        metrics
    }
}

#[derive(Debug, Default)]
struct Inner {
    mesh: Option<Arc<MeshConfig>>,
    generation: u64,
    accepted_at_unix_ms: Option<u64>,
    last_error: Option<Vec<String>>,
    /// What the source waits for before its first configuration (Kubernetes mode).
    waiting: Option<String>,
    /// Objects of the cluster that are refused or name what is missing (Kubernetes mode).
    problems: Vec<ObjectProblem>,
}

/// An object of the cluster that is not in force as written, or names what is missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectProblem {
    /// `Kind namespace/name`.
    pub object: String,
    /// Not in force as written (its previous version may be).
    pub refused: bool,
    pub message: String,
}

impl ControllerState {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            inner: RwLock::default(),
            metrics: Metrics::new(),
            accepted: watch::Sender::new(None),
            agents: Mutex::default(),
        }
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, AgentRecord>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows the configuration in force.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Accepted>>> {
        self.accepted.subscribe()
    }

    pub fn agent_connected(self: &Arc<Self>, node: &str) -> StreamGuard {
        let mut agents = self.agents();
        agents.entry(node.to_owned()).or_default().streams += 1;
        self.metrics
            .agents_connected
            .set(agents.values().filter(|a| a.streams > 0).count() as i64);
        StreamGuard {
            state: self.clone(),
            node: node.to_owned(),
        }
    }

    pub fn snapshot_sent(&self, node: &str, version: u64) {
        self.agents()
            .entry(node.to_owned())
            .or_default()
            .sent_version = Some(version);
    }

    pub fn snapshot_acked(&self, node: &str, ack: &SnapshotAck) {
        let result = if ack.applied { "applied" } else { "rejected" };
        self.metrics
            .snapshot_acks
            .with_label_values(&[result])
            .inc();
        if ack.applied {
            let age_ms = now_ms().saturating_sub(ack.version);
            self.metrics.push_latency.observe(age_ms as f64 / 1000.0);
        }
        let mut agents = self.agents();
        let record = agents.entry(node.to_owned()).or_default();
        record.acked_version = Some(ack.version);
        record.applied = Some(ack.applied);
        record.error = ack.error.clone();
        record.acked_at_unix_ms = Some(now_ms());
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn accepted(&self, mesh: MeshConfig) {
        self.metrics
            .config_loads
            .with_label_values(&["accepted"])
            .inc();
        self.metrics.config_errors.set(0);
        self.metrics.workloads.set(mesh.workloads.len() as i64);
        let mesh = Arc::new(mesh);
        let mut inner = self.write();
        // The acceptance time is the version; bumped when two loads share a millisecond.
        let version = now_ms().max(inner.accepted_at_unix_ms.unwrap_or(0) + 1);
        inner.mesh = Some(mesh.clone());
        inner.generation += 1;
        inner.accepted_at_unix_ms = Some(version);
        inner.last_error = None;
        drop(inner);
        self.metrics.snapshot_version.set(version as i64);
        self.accepted
            .send_replace(Some(Arc::new(Accepted { version, mesh })));
    }

    /// Kubernetes mode: what the first configuration waits for.
    pub fn waiting(&self, what: String) {
        self.write().waiting = Some(what);
    }

    /// Kubernetes mode: the objects refused (or naming what is missing) in the last build;
    /// the rest of the cluster's configuration is in force regardless.
    pub fn object_problems(&self, problems: Vec<ObjectProblem>) {
        let refused = problems.iter().filter(|p| p.refused).count();
        self.metrics.config_errors.set(refused as i64);
        let mut inner = self.write();
        if inner.problems != problems {
            for problem in problems.iter().filter(|p| !inner.problems.contains(p)) {
                tracing::warn!(object = %problem.object, refused = problem.refused, "{}", problem.message);
            }
            inner.problems = problems;
        }
    }

    pub fn refused(&self, errors: &ConfigErrors) {
        self.metrics
            .config_loads
            .with_label_values(&["refused"])
            .inc();
        self.metrics.config_errors.set(errors.0.len() as i64);
        self.write().last_error = Some(errors.0.iter().map(ToString::to_string).collect());
    }

    /// Whether the agent of `node` may obtain a certificate for `id`: only when an enrolled
    /// workload on that node runs as `id`. The error is a metric label and what to do.
    pub fn authorize(&self, node: &str, id: &SpiffeId) -> Result<(), (&'static str, String)> {
        if id.trust_domain() != self.config.trust_domain {
            return Err((
                "unknown_identity",
                format!(
                    "{id} is not in this mesh's trust domain {}",
                    self.config.trust_domain
                ),
            ));
        }
        let inner = self.read();
        let Some(mesh) = &inner.mesh else {
            return Err((
                "unknown_identity",
                "the controller has no valid configuration yet".to_owned(),
            ));
        };
        let wanted = id.to_string();
        let holders: Vec<_> = mesh
            .workloads
            .values()
            .filter(|w| mesh.is_enrolled(w) && w.identity(&self.config.trust_domain) == wanted)
            .collect();
        if holders.iter().any(|w| w.spec.node == node) {
            return Ok(());
        }
        match holders.first() {
            Some(w) => Err((
                "not_on_node",
                format!(
                    "{id} belongs to workloads on node {} (such as {}), not on node {node}; an \
                     agent may only obtain the identities of its own node's workloads",
                    w.spec.node,
                    w.key()
                ),
            )),
            None => Err((
                "unknown_identity",
                format!("no enrolled workload runs as {id}"),
            )),
        }
    }

    /// Ready once a valid configuration is in force.
    pub fn readiness(&self) -> Result<(), String> {
        let inner = self.read();
        match (&inner.mesh, &inner.last_error, &inner.waiting) {
            (Some(_), _, _) => Ok(()),
            (None, Some(errors), _) => {
                Err(format!("no valid configuration yet: {}", errors.join("; ")))
            }
            (None, None, Some(waiting)) => Err(format!("no configuration yet: {waiting}")),
            (None, None, None) => Err("no configuration loaded yet".to_owned()),
        }
    }

    pub fn config_dump(&self) -> serde_json::Value {
        let inner = self.read();
        serde_json::json!({
            "controller": self.config,
            "generation": inner.generation,
            "accepted_at_unix_ms": inner.accepted_at_unix_ms,
            "last_error": inner.last_error,
            "problems": inner.problems,
            "version": inner.accepted_at_unix_ms,
            "agents": &*self.agents(),
            "config": inner.mesh.as_deref(),
        })
    }

    pub fn render_metrics(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.metrics.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
