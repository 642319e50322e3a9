//! What the controller holds: the last good configuration, what went wrong since, and its
//! metrics.

use std::{
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use nodemesh_config::{ConfigErrors, MeshConfig};
use nodemesh_identity::SpiffeId;
use prometheus::{Encoder as _, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::config::Config;

#[derive(Debug)]
pub struct ControllerState {
    config: Config,
    inner: RwLock<Inner>,
    metrics: Metrics,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub config_loads: IntCounterVec,
    pub config_errors: IntGauge,
    pub workloads: IntGauge,
    pub certificates_signed: IntCounter,
    pub certificates_refused: IntCounterVec,
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
        };
        for collector in [
            Box::new(metrics.config_loads.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.config_errors.clone()),
            Box::new(metrics.workloads.clone()),
            Box::new(metrics.certificates_signed.clone()),
            Box::new(metrics.certificates_refused.clone()),
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
}

impl ControllerState {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            inner: RwLock::default(),
            metrics: Metrics::new(),
        }
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
        let mut inner = self.write();
        inner.mesh = Some(Arc::new(mesh));
        inner.generation += 1;
        inner.accepted_at_unix_ms = Some(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        );
        inner.last_error = None;
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
        match (&inner.mesh, &inner.last_error) {
            (Some(_), _) => Ok(()),
            (None, Some(errors)) => {
                Err(format!("no valid configuration yet: {}", errors.join("; ")))
            }
            (None, None) => Err("no configuration loaded yet".to_owned()),
        }
    }

    pub fn config_dump(&self) -> serde_json::Value {
        let inner = self.read();
        serde_json::json!({
            "controller": self.config,
            "generation": inner.generation,
            "accepted_at_unix_ms": inner.accepted_at_unix_ms,
            "last_error": inner.last_error,
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
