//! What the agent knows about itself, shared with the admin endpoints.

use std::{
    collections::VecDeque,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use nodemesh_config::MeshConfig;
use serde::Serialize;

use crate::{
    config::Config,
    datapath::DatapathStats,
    metrics::Metrics,
    telemetry::{AccessLog, IstioMetrics, Tracer},
};

/// How many finished connections `/connections` remembers.
const CONNECTION_LOG_LEN: usize = 256;

#[derive(Debug)]
pub struct AgentState {
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub istio: IstioMetrics,
    pub access_log: Option<Arc<AccessLog>>,
    pub tracer: Arc<Tracer>,
    pub connections: ConnectionLog,
    pub datapath: DatapathView,
    inner: RwLock<Inner>,
}

/// The datapath as the admin endpoints show it.
#[derive(Clone)]
pub struct DatapathView {
    pub stats: DatapathStats,
    pub program_ids: Vec<u32>,
    pub cgroup: String,
}

impl std::fmt::Debug for DatapathView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathView")
            .field("program_ids", &self.program_ids)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Inner {
    mesh: Option<Arc<MeshConfig>>,
    /// The snapshot's version (the controller's acceptance time, ms).
    version: u64,
    /// `controller`, or `saved` for the snapshot kept by the last run.
    origin: &'static str,
    applied_at: Option<u64>,
    /// Why the controller cannot be reached; `None` while following its stream.
    controller_error: Option<String>,
    connected: bool,
    workloads: Vec<WorkloadStatus>,
}

/// One workload assigned to this node, as `/workloads` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadStatus {
    pub name: String,
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    pub netns: String,
    pub service_account: String,
    pub identity: String,
    /// `enrolled`, `failed` with `error` saying why, or `awaiting` its network namespace (the
    /// CNI plugin's handover, or its processes under /proc) with `error` saying what.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
    /// STRICT or PERMISSIVE: whether the workload accepts plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls_mode: Option<String>,
    pub outbound_connections: u64,
    pub inbound_connections: u64,
    /// Live counters of an enrolled workload, read when the status is shown.
    #[serde(skip)]
    pub counters: Option<Arc<WorkloadCounters>>,
}

impl AgentState {
    pub fn new(config: Arc<Config>, datapath: DatapathView) -> std::io::Result<Self> {
        let metrics = Metrics::new();
        let istio = IstioMetrics::new(metrics.registry());
        let access_log = match &config.access_log {
            Some(target) => Some(Arc::new(AccessLog::start(
                target,
                config.access_log_sample,
                metrics.registry(),
            )?)),
            None => None,
        };
        let tracer = Tracer::start(&config.node, metrics.registry());
        Ok(Self {
            config,
            metrics,
            istio,
            access_log,
            tracer,
            connections: ConnectionLog::default(),
            datapath,
            inner: RwLock::default(),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a configuration that was applied.
    /// Records a snapshot put in force.
    pub fn config_applied(
        &self,
        mesh: Arc<MeshConfig>,
        version: u64,
        origin: &'static str,
        workloads: Vec<WorkloadStatus>,
    ) {
        let mut inner = self.write();
        inner.mesh = Some(mesh);
        inner.version = version;
        inner.origin = origin;
        inner.applied_at = Some(unix_millis(SystemTime::now()));
        inner.workloads = workloads;
        self.metrics.config_version.set(version as i64);
        self.metrics.config_loads.with_label_values(&[origin]).inc();
    }

    /// Records whether the controller's stream is followed, and why not.
    pub fn set_controller(&self, error: Option<String>) {
        let mut inner = self.write();
        inner.connected = error.is_none();
        inner.controller_error = error;
        self.metrics
            .controller_connected
            .set(i64::from(inner.connected));
    }

    pub fn set_workloads(&self, workloads: Vec<WorkloadStatus>) {
        let failed = workloads.iter().filter(|w| w.state == "failed").count();
        let enrolled = workloads.iter().filter(|w| w.state == "enrolled").count();
        self.metrics.workloads_enrolled.set(enrolled as i64);
        self.metrics.workloads_failed.set(failed as i64);
        self.write().workloads = workloads;
    }

    /// When the snapshot in force was applied.
    pub fn applied_at(&self) -> Option<u64> {
        self.read().applied_at
    }

    pub fn workloads(&self) -> Vec<WorkloadStatus> {
        let mut workloads = self.read().workloads.clone();
        for w in &mut workloads {
            if let Some(counters) = &w.counters {
                w.outbound_connections = counters.outbound.load(Ordering::Relaxed);
                w.inbound_connections = counters.inbound.load(Ordering::Relaxed);
            }
        }
        workloads
    }

    /// Ready once a configuration is in force and no workload of this node failed to enroll
    /// (one awaiting its namespace from the runtime does not count: its pod is not up yet).
    /// The reason says what is missing.
    pub fn readiness(&self) -> Result<(), String> {
        let inner = self.read();
        if inner.mesh.is_none() {
            return Err(match &inner.controller_error {
                Some(e) => format!("no snapshot yet: {e}"),
                None => "no snapshot received yet".to_owned(),
            });
        }
        let failed: Vec<String> = inner
            .workloads
            .iter()
            .filter(|w| w.state == "failed")
            .map(|w| {
                format!(
                    "{}/{}: {}",
                    w.namespace,
                    w.name,
                    w.error.as_deref().unwrap_or("")
                )
            })
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(format!("workloads not enrolled: {}", failed.join("; ")))
        }
    }

    /// The `/config_dump` document.
    pub fn config_dump(&self) -> serde_json::Value {
        let inner = self.read();
        serde_json::json!({
            "agent": &*self.config,
            "mesh": {
                "version": inner.version,
                "origin": inner.origin,
                "applied_at_unix_ms": inner.applied_at,
                "controller_connected": inner.connected,
                "controller_error": inner.controller_error,
                "config": inner.mesh.as_deref(),
            },
            "datapath": {
                "cgroup": self.datapath.cgroup,
                "program_ids": self.datapath.program_ids,
            },
        })
    }
}

/// Counters kept per enrolled workload.
#[derive(Debug, Default)]
pub struct WorkloadCounters {
    pub outbound: AtomicU64,
    pub inbound: AtomicU64,
}

/// A finished proxied connection, as `/connections` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionRecord {
    pub id: u64,
    pub direction: &'static str,
    /// `namespace/name` of the enrolled workload the connection was captured for.
    pub workload: String,
    /// The client as the proxy saw it.
    pub client: SocketAddr,
    /// Where the client was connecting to.
    pub original_dst: SocketAddr,
    /// `namespace/name` of the client's workload, when the mesh knows its address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_workload: Option<String>,
    /// `namespace/name` of the workload at `original_dst`, when the mesh knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_workload: Option<String>,
    /// `namespace/name` of the Service when the client connected to a Service address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<String>,
    /// The address the proxy connected from, for a connection it made itself (plain TCP out,
    /// or to the application in).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_local: Option<SocketAddr>,
    /// The destination pod's HBONE address, for a connection carried in a tunnel (none
    /// between two pods of one node: the proxy hands those over in-process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hbone: Option<SocketAddr>,
    /// `mtls` when the connection crossed between proxies in an HBONE tunnel, or was handed
    /// over in-process between two enrolled pods of this node, the client's identity known.
    pub security: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_identity: Option<String>,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub started_unix_ms: u64,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
impl ConnectionRecord {
    /// An outbound connection of `shop/client` to 10.96.0.10:80, for tests to change.
    pub fn example() -> Self {
        Self {
            id: 1,
            direction: "outbound",
            workload: "shop/client".into(),
            client: "10.0.0.9:40000".parse().expect("addr"),
            original_dst: "10.96.0.10:80".parse().expect("addr"),
            source_workload: Some("shop/client".into()),
            destination_workload: None,
            destination_service: None,
            upstream_local: None,
            hbone: None,
            security: "plaintext",
            source_identity: None,
            destination_identity: None,
            bytes_from_client: 0,
            bytes_to_client: 0,
            started_unix_ms: 0,
            duration_ms: 0,
            error: None,
        }
    }
}

/// The last finished connections, newest last.
#[derive(Debug, Default)]
pub struct ConnectionLog {
    next_id: AtomicU64,
    recent: Mutex<VecDeque<Arc<ConnectionRecord>>>,
}

impl ConnectionLog {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn push(&self, record: Arc<ConnectionRecord>) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == CONNECTION_LOG_LEN {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    pub fn recent(&self) -> Vec<ConnectionRecord> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .map(|record| ConnectionRecord::clone(record))
            .collect()
    }
}

pub fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
