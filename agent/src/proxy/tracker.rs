//! Bookkeeping of one proxied connection: nodemesh's and Istio's metrics, the record kept for
//! `/connections`, and the access log.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use super::{Direction, PodContext, ProxyError, ProxyShared};
use crate::state::{ConnectionRecord, unix_millis};

/// Bookkeeping of one proxied connection: metrics while it runs, a record when it ends.
pub(super) struct ConnectionTracker {
    shared: Arc<ProxyShared>,
    direction: Direction,
    pub(super) record: ConnectionRecord,
    started: Instant,
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
        metrics
            .connections_active
            .with_label_values(&[direction.as_str()])
            .inc();
        let local = Some(pod.identity.to_string());
        let (source_identity, destination_identity) = match direction {
            Direction::Outbound => (local, None),
            Direction::Inbound => (None, local),
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
        }
    }

    pub(super) fn finish(mut self, result: Result<(u64, u64), ProxyError>) {
        let direction = self.direction.as_str();
        match result {
            Ok((from_client, to_client)) => {
                self.record.bytes_from_client = from_client;
                self.record.bytes_to_client = to_client;
            }
            Err(e) => {
                self.shared
                    .state
                    .metrics
                    .connection_failures
                    .with_label_values(&[direction, e.reason()])
                    .inc();
                tracing::info!(
                    direction,
                    workload = %self.record.workload,
                    client = %self.record.client,
                    dst = %self.record.original_dst,
                    error = %e,
                    "connection failed"
                );
                self.record.error = Some(e.to_string());
            }
        }
        self.record.duration_ms = self.started.elapsed().as_millis() as u64;
        self.shared.state.connections.push(self.record.clone());
    }
}

impl Drop for ConnectionTracker {
    fn drop(&mut self) {
        self.shared
            .state
            .metrics
            .connections_active
            .with_label_values(&[self.direction.as_str()])
            .dec();
    }
}

