//! What the controller holds: the last good configuration and what went wrong since.

use std::{
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use nodemesh_config::{ConfigErrors, MeshConfig};
use prometheus::{Encoder as _, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::Config;

#[derive(Debug)]
pub struct ControllerState {
    config: Config,
    inner: RwLock<Inner>,
    registry: Registry,
    loads: IntCounterVec,
    errors: IntGauge,
    workloads: IntGauge,
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
        let loads = IntCounterVec::new(
            Opts::new(
                "nodemesh_controller_config_loads_total",
                "Configuration loads, by result (accepted or refused)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let errors = IntGauge::new(
            "nodemesh_controller_config_errors",
            "Errors in the configuration on disk now (0 when it is valid)",
        )
        .expect("valid metric");
        let workloads = IntGauge::new(
            "nodemesh_controller_workloads",
            "Workloads in the configuration in force",
        )
        .expect("valid metric");
        let registry = Registry::new();
        for collector in [
            Box::new(loads.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(workloads.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric registered once");
        }
        Self {
            config,
            inner: RwLock::default(),
            registry,
            loads,
            errors,
            workloads,
        }
    }

    pub fn accepted(&self, mesh: MeshConfig) {
        self.loads.with_label_values(&["accepted"]).inc();
        self.errors.set(0);
        self.workloads.set(mesh.workloads.len() as i64);
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
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
        self.loads.with_label_values(&["refused"]).inc();
        self.errors.set(errors.0.len() as i64);
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.last_error = Some(errors.0.iter().map(ToString::to_string).collect());
    }

    /// Ready once a valid configuration is in force.
    pub fn readiness(&self) -> Result<(), String> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        match (&inner.mesh, &inner.last_error) {
            (Some(_), _) => Ok(()),
            (None, Some(errors)) => {
                Err(format!("no valid configuration yet: {}", errors.join("; ")))
            }
            (None, None) => Err("no configuration loaded yet".to_owned()),
        }
    }

    pub fn config_dump(&self) -> serde_json::Value {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "controller": self.config,
            "generation": inner.generation,
            "accepted_at_unix_ms": inner.accepted_at_unix_ms,
            "last_error": inner.last_error,
            "config": inner.mesh.as_deref(),
        })
    }

    pub fn metrics(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
