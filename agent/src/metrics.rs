//! The agent's Prometheus metrics.

use std::sync::Mutex;

use nodemesh_ebpf_abi::{Stat, capacity};
use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::datapath::DatapathStats;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub workloads_enrolled: IntGauge,
    pub workloads_failed: IntGauge,
    enrollment_failures: IntCounterVec,
    /// Connections closed at accept for being over a cap, by `reason`.
    pub connections_refused: IntCounterVec,
    pub connections_opened: IntCounterVec,
    pub connections_active: IntGaugeVec,
    pub connection_failures: IntCounterVec,
    pub config_loads: IntCounterVec,
    pub config_version: IntGauge,
    pub controller_connected: IntGauge,
    pub authorization_decisions: IntCounterVec,
    pub authorization_audits: IntCounterVec,
    ebpf_events: IntCounterVec,
    ebpf_seen: Mutex<Vec<u64>>,
    ebpf_map_entries: IntGaugeVec,
    ebpf_map_capacity: IntGaugeVec,
    certificate_expiry: GaugeVec,
    config_age: Gauge,
}

/// What a scrape reads besides the registry's own counters.
#[derive(Debug)]
pub struct ScrapeInputs<'a> {
    pub datapath: &'a DatapathStats,
    /// (identity, seconds until its certificate expires)
    pub certificates: Vec<(String, i64)>,
    /// When the snapshot in force was applied.
    pub config_applied_unix_ms: Option<u64>,
    pub enrolled: usize,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let metrics = Self {
            workloads_enrolled: IntGauge::new(
                "nodemesh_workloads_enrolled",
                "Workloads whose traffic this agent captures",
            )
            .expect("valid metric"),
            workloads_failed: IntGauge::new(
                "nodemesh_workloads_enrollment_failed",
                "Workloads assigned to this node that could not be enrolled",
            )
            .expect("valid metric"),
            enrollment_failures: IntCounterVec::new(
                Opts::new(
                    "nodemesh_workload_enrollment_failures_total",
                    "Attempts to enroll a workload that failed, by reason (netns, listen, \
                     routing, identity, datapath); the workload's traffic is refused meanwhile",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            connections_refused: IntCounterVec::new(
                Opts::new(
                    "nodemesh_proxy_connections_refused_total",
                    "Connections closed as they were accepted for being over a cap: node_limit \
                     (--max-connections), source_limit (--max-connections-per-source)",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            connections_opened: IntCounterVec::new(
                Opts::new(
                    "nodemesh_proxy_connections_opened_total",
                    "Connections accepted by the node proxy",
                ),
                &["direction"],
            )
            .expect("valid metric"),
            connections_active: IntGaugeVec::new(
                Opts::new(
                    "nodemesh_proxy_connections_active",
                    "Connections the node proxy is carrying now",
                ),
                &["direction"],
            )
            .expect("valid metric"),
            connection_failures: IntCounterVec::new(
                Opts::new(
                    "nodemesh_proxy_connection_failures_total",
                    "Connections the node proxy could not carry, by reason",
                ),
                &["direction", "reason"],
            )
            .expect("valid metric"),
            config_loads: IntCounterVec::new(
                Opts::new(
                    "nodemesh_config_snapshots_applied_total",
                    "Snapshots put in force, by origin (controller, or saved by the last run)",
                ),
                &["origin"],
            )
            .expect("valid metric"),
            config_version: IntGauge::new(
                "nodemesh_config_version",
                "Version of the snapshot in force (the controller's acceptance time, ms)",
            )
            .expect("valid metric"),
            controller_connected: IntGauge::new(
                "nodemesh_controller_connected",
                "1 while the agent follows the controller's snapshot stream",
            )
            .expect("valid metric"),
            authorization_decisions: IntCounterVec::new(
                Opts::new(
                    "nodemesh_authorization_decisions_total",
                    "Authorization decisions on connections and HTTP requests, by outcome \
                     (allow, deny) and mode (enforced, dry_run)",
                ),
                &["decision", "mode"],
            )
            .expect("valid metric"),
            authorization_audits: IntCounterVec::new(
                Opts::new(
                    "nodemesh_authorization_audits_total",
                    "Requests matched by AUDIT policies, by policy",
                ),
                &["policy"],
            )
            .expect("valid metric"),
            ebpf_events: IntCounterVec::new(
                Opts::new(
                    "nodemesh_ebpf_events_total",
                    "Decisions and failures of the eBPF capture programs",
                ),
                &["event", "error"],
            )
            .expect("valid metric"),
            ebpf_seen: Mutex::new(Vec::new()),
            ebpf_map_entries: IntGaugeVec::new(
                Opts::new(
                    "nodemesh_ebpf_map_entries",
                    "Entries in the datapath's maps (connections in flight for the LRU maps)",
                ),
                &["map"],
            )
            .expect("valid metric"),
            ebpf_map_capacity: IntGaugeVec::new(
                Opts::new("nodemesh_ebpf_map_capacity", "Capacity of the datapath's maps"),
                &["map"],
            )
            .expect("valid metric"),
            certificate_expiry: GaugeVec::new(
                Opts::new(
                    "nodemesh_certificate_expiry_seconds",
                    "Seconds until each workload identity's certificate expires (negative: expired)",
                ),
                &["identity"],
            )
            .expect("valid metric"),
            config_age: Gauge::new(
                "nodemesh_config_age_seconds",
                "Seconds since the snapshot in force was applied",
            )
            .expect("valid metric"),
            registry,
        };
        for collector in [
            Box::new(metrics.workloads_enrolled.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.workloads_failed.clone()),
            Box::new(metrics.enrollment_failures.clone()),
            Box::new(metrics.connections_refused.clone()),
            Box::new(metrics.connections_opened.clone()),
            Box::new(metrics.connections_active.clone()),
            Box::new(metrics.connection_failures.clone()),
            Box::new(metrics.config_loads.clone()),
            Box::new(metrics.config_version.clone()),
            Box::new(metrics.controller_connected.clone()),
            Box::new(metrics.authorization_decisions.clone()),
            Box::new(metrics.authorization_audits.clone()),
            Box::new(metrics.ebpf_events.clone()),
            Box::new(metrics.ebpf_map_entries.clone()),
            Box::new(metrics.ebpf_map_capacity.clone()),
            Box::new(metrics.certificate_expiry.clone()),
            Box::new(metrics.config_age.clone()),
        ] {
            metrics
                .registry
                .register(collector)
                .expect("metric registered once");
        }
        metrics
    }

    /// Connections the proxy carries now, both directions.
    pub fn open_connections(&self) -> i64 {
        ["inbound", "outbound"]
            .iter()
            .map(|d| self.connections_active.with_label_values(&[d]).get())
            .sum()
    }

    /// Counts a failed enrollment of `workload`, whose traffic is refused meanwhile.
    pub fn enrollment_failed(&self, workload: &str, reason: &'static str) {
        tracing::debug!(workload, reason, "enrollment failure counted");
        self.enrollment_failures.with_label_values(&[reason]).inc();
    }

    /// The registry, for the collectors other modules own (Istio's metrics, the access log).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders the text exposition format, reading the eBPF counters, certificates and
    /// configuration age first.
    pub fn render(&self, inputs: &ScrapeInputs<'_>) -> String {
        let stats = self.refresh_ebpf(inputs.datapath);
        let stat = |s: Stat| stats.iter().find(|(x, _)| *x == s).map_or(0, |(_, v)| *v);
        let in_flight = |added: u64, gone: u64| added.saturating_sub(gone) as i64;
        for (map, entries, capacity) in [
            ("ENROLLED", inputs.enrolled as i64, capacity::ENROLLED),
            ("INBOUND", inputs.enrolled as i64, capacity::INBOUND),
            (
                "COOKIE_DST",
                in_flight(
                    stat(Stat::OutboundRedirected),
                    stat(Stat::TupleRecorded) + stat(Stat::TupleInsertFailed),
                ),
                capacity::COOKIE_DST,
            ),
            (
                "TUPLE_DST",
                in_flight(
                    stat(Stat::TupleRecorded),
                    stat(Stat::TupleRemoved) + inputs.datapath.tuples_taken(),
                ),
                capacity::TUPLE_DST,
            ),
        ] {
            self.ebpf_map_entries.with_label_values(&[map]).set(entries);
            self.ebpf_map_capacity
                .with_label_values(&[map])
                .set(i64::from(capacity));
        }
        self.certificate_expiry.reset();
        for (identity, seconds) in &inputs.certificates {
            self.certificate_expiry
                .with_label_values(&[identity])
                .set(*seconds as f64);
        }
        if let Some(applied) = inputs.config_applied_unix_ms {
            let now = crate::state::unix_millis(std::time::SystemTime::now());
            self.config_age
                .set(now.saturating_sub(applied) as f64 / 1000.0);
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn refresh_ebpf(&self, datapath: &DatapathStats) -> Vec<(Stat, u64)> {
        let current = datapath.read();
        let snapshot = current.clone();
        let mut seen = self.ebpf_seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.resize(current.len(), 0);
        for ((stat, value), last) in current.into_iter().zip(seen.iter_mut()) {
            let error = if stat.is_error() { "true" } else { "false" };
            self.ebpf_events
                .with_label_values(&[stat.name(), error])
                .inc_by(value.saturating_sub(*last));
            *last = value;
        }
        snapshot
    }
}
