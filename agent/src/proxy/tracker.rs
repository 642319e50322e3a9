//! Bookkeeping of one proxied connection: nodemesh's and Istio's metrics, the record kept for
//! `/connections`, and the access log.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use prometheus::IntGauge;

use super::{Direction, PodContext, ProxyError, ProxyShared};
use crate::{
    state::{ConnectionRecord, unix_millis},
    telemetry::Labels,
};

pub(super) struct ConnectionTracker {
    shared: Arc<ProxyShared>,
    direction: Direction,
    pub(super) record: ConnectionRecord,
    started: Instant,
    /// Istio's labels, fixed once the connection's ends are known (see [`open`](Self::open)).
    labels: Option<Arc<Labels>>,
    _active: Active,
}

/// Counts the connection in `nodemesh_proxy_connections_active` while it lives.
struct Active(IntGauge);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Envoy's response flags for why a connection failed, as Istio's metrics carry them.
fn response_flags(error: &ProxyError) -> &'static str {
    match error {
        ProxyError::Denied { .. }
        | ProxyError::Revoked
        | ProxyError::PlaintextRefused { .. }
        | ProxyError::ForeignTrustDomain { .. }
        | ProxyError::EgressDenied { .. } => "RBAC",
        ProxyError::NoEndpoint { .. } => "UH",
        ProxyError::Overflow { .. } => "UO",
        ProxyError::Connect { .. }
        | ProxyError::ConnectTimeout { .. }
        | ProxyError::HboneTimeout { .. }
        | ProxyError::Tls { .. }
        | ProxyError::Hbone(_)
        | ProxyError::Identity(_)
        | ProxyError::Socket { .. } => "UF",
        ProxyError::NoOriginalDst { .. }
        | ProxyError::Http(_)
        | ProxyError::Io(_)
        | ProxyError::Idle { .. } => "-",
    }
}

impl ConnectionTracker {
    pub(super) fn start(
        shared: &Arc<ProxyShared>,
        pod: &PodContext,
        direction: Direction,
        client: SocketAddr,
        original_dst: SocketAddr,
    ) -> Self {
        let metrics = &shared.state.metrics;
        metrics
            .connections_opened
            .with_label_values(&[direction.as_str()])
            .inc();
        let active = metrics
            .connections_active
            .with_label_values(&[direction.as_str()]);
        active.inc();
        let local = Some(pod.identity.to_string());
        let (source_identity, destination_identity) = match direction {
            Direction::Outbound => (local, None),
            Direction::Inbound => (None, local),
        };
        let source_workload = match (direction, client) {
            (Direction::Outbound, _) => Some(pod.key.clone()),
            (Direction::Inbound, SocketAddr::V4(client)) => shared
                .mesh
                .load()
                .workload(*client.ip())
                .map(|w| w.key.clone()),
            (Direction::Inbound, SocketAddr::V6(_)) => None,
        };
        Self {
            shared: shared.clone(),
            direction,
            record: ConnectionRecord {
                id: shared.state.connections.next_id(),
                direction: direction.as_str(),
                workload: pod.key.clone(),
                client,
                original_dst,
                source_workload,
                destination_workload: (direction == Direction::Inbound).then(|| pod.key.clone()),
                destination_service: None,
                upstream_local: None,
                hbone: None,
                security: "plaintext",
                source_identity,
                destination_identity,
                bytes_from_client: 0,
                bytes_to_client: 0,
                started_unix_ms: unix_millis(SystemTime::now()),
                duration_ms: 0,
                error: None,
            },
            started: Instant::now(),
            labels: None,
            _active: Active(active),
        }
    }

    /// The connection's ends are known: counts it as opened in Istio's metrics and returns
    /// its labels (for the requests of an HTTP connection).
    pub(super) fn open(&mut self) -> Arc<Labels> {
        if let Some(labels) = &self.labels {
            return labels.clone();
        }
        let labels = self.shared.state.istio.connection_labels(&self.record);
        self.shared.state.istio.tcp_opened(&labels, "-");
        self.labels = Some(labels.clone());
        labels
    }

    pub(super) fn finish(self, result: Result<(u64, u64), ProxyError>) {
        let Self {
            shared,
            direction,
            mut record,
            started,
            labels,
            ..
        } = self;
        let direction = direction.as_str();
        let state = &shared.state;
        let mut flags = "-";
        match result {
            Ok((from_client, to_client)) => {
                record.bytes_from_client = from_client;
                record.bytes_to_client = to_client;
            }
            Err(e) => {
                flags = response_flags(&e);
                state
                    .metrics
                    .connection_failures
                    .with_label_values(&[direction, e.reason()])
                    .inc();
                tracing::info!(
                    direction,
                    workload = %record.workload,
                    client = %record.client,
                    dst = %record.original_dst,
                    error = %e,
                    "connection failed"
                );
                record.error = Some(e.to_string());
            }
        }
        record.duration_ms = started.elapsed().as_millis() as u64;
        let labels = labels.unwrap_or_else(|| {
            // Failed before its ends were settled: still opened and closed once.
            let labels = state.istio.connection_labels(&record);
            state.istio.tcp_opened(&labels, flags);
            labels
        });
        state.istio.tcp_closed(
            &labels,
            flags,
            record.bytes_from_client,
            record.bytes_to_client,
        );
        // One record for the access log and `/connections`.
        let record = Arc::new(record);
        if let Some(log) = &state.access_log {
            log.connection(&record, flags);
        }
        state.connections.push(record);
    }
}
