//! Load balancing, per request (and per connection for plain TCP), at the client's node: an
//! endpoint of the backend Service by the policy's balancer (by default power of two choices
//! over peak-EWMA latency times requests in flight; for plain TCP over connections open, as
//! Envoy's least request counts them), skipping endpoints outlier detection has ejected, and
//! counting each outcome toward their ejection. No endpoint gives 503 `UH`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use http::{HeaderMap, StatusCode};
use nodemesh_traffic::{
    BackendTarget,
    balance::{self, cost},
    outlier::{self, Outcome},
    policy::{Balancer, HashKey},
    retry::Attempt,
};

use super::{
    HttpRequest, HttpResponse, ResponseFlags,
    filter::{FilterLayer, HttpFilter, Inner},
    local_reply,
    route::Routed,
    state::{BackendHealth, ClientWorkload, EndpointStats, TrafficState},
};
use crate::mesh::{Destination, MeshView};

/// The endpoint a request (or connection) was sent to.
#[derive(Debug, Clone)]
pub struct ChosenEndpoint {
    pub addr: SocketAddrV4,
    /// The workload there, when the mesh knows it.
    pub destination: Option<Arc<Destination>>,
}

/// What the balancer needs to know of the caller.
#[derive(Debug, Clone, Copy)]
pub struct PickInput<'a> {
    pub client_ip: IpAddr,
    pub headers: Option<&'a HeaderMap>,
    /// Endpoints this request already tried: a retry goes elsewhere when it can.
    pub avoid: &'a [SocketAddrV4],
    /// Least request weighs latency (HTTP requests) or counts only what is in flight (TCP
    /// connections, whose lifetime says nothing of the endpoint).
    pub by_latency: bool,
}

/// The endpoints a request's earlier attempts went to, shared by its attempts.
#[derive(Debug, Clone, Default)]
pub struct Tried(pub Arc<std::sync::Mutex<Vec<SocketAddrV4>>>);

/// Picks an endpoint of `target` and counts it as in flight; `None` when the backend has no
/// endpoint. Pure apart from the backend's counters.
pub fn pick(
    mesh: &MeshView,
    target: &BackendTarget,
    health: &BackendHealth,
    input: PickInput<'_>,
    now: Instant,
) -> Option<ChosenEndpoint> {
    let service = &mesh.traffic.services[target.service?];
    if service.endpoints.is_empty() {
        return None;
    }
    let port = target.target_port;
    let mut stats = health.endpoints.lock().unwrap_or_else(|e| e.into_inner());
    let all: Vec<SocketAddrV4> = service
        .endpoints
        .iter()
        .map(|e| SocketAddrV4::new(e.ip, port))
        .collect();
    let mut candidates: Vec<SocketAddrV4> = all
        .iter()
        .copied()
        .filter(|addr| !stats.get(addr).is_some_and(|s| s.health.is_ejected(now)))
        .collect();
    if candidates.is_empty() {
        // Every endpoint ejected: Envoy's panic mode, all of them rather than none.
        candidates = all;
    }
    if candidates.iter().any(|c| !input.avoid.contains(c)) {
        candidates.retain(|c| !input.avoid.contains(c));
    }
    // Every endpoint is known from its first pick on, so that all estimates age alike.
    for addr in &candidates {
        stats
            .entry(*addr)
            .or_insert_with(|| EndpointStats::new(now));
    }
    let index = match &target.settings.balancer {
        Balancer::LeastRequest => balance::p2c(
            candidates.len(),
            (fastrand::u64(..), fastrand::u64(..)),
            |i| {
                stats.get(&candidates[i]).map_or(0.0, |s| {
                    if input.by_latency {
                        cost(s.ewma.get(now), s.in_flight)
                    } else {
                        s.in_flight as f64
                    }
                })
            },
        ),
        Balancer::RoundRobin => health.next.fetch_add(1, Ordering::Relaxed) % candidates.len(),
        Balancer::Random => fastrand::usize(..candidates.len()),
        Balancer::ConsistentHash(key) => {
            let ips: Vec<Ipv4Addr> = candidates.iter().map(|a| *a.ip()).collect();
            balance::rendezvous(hash_key(key, input), &ips)
        }
    };
    let addr = candidates[index];
    stats
        .entry(addr)
        .or_insert_with(|| EndpointStats::new(now))
        .in_flight += 1;
    Some(ChosenEndpoint {
        addr,
        destination: mesh.workload(*addr.ip()).cloned(),
    })
}

fn hash_key(key: &HashKey, input: PickInput<'_>) -> u64 {
    match key {
        HashKey::SourceIp => balance::stable_hash(input.client_ip.to_string().as_bytes()),
        HashKey::Headers(names) => {
            let mut text = Vec::new();
            for name in names {
                if let Some(value) = input.headers.and_then(|h| h.get(name.as_str())) {
                    text.extend_from_slice(value.as_bytes());
                }
                text.push(0);
            }
            balance::stable_hash(&text)
        }
    }
}

/// How a request or connection to an endpoint went, for [`record`].
#[derive(Debug, Clone, Copy)]
pub struct Finished {
    /// What outlier detection counts; `None` for what says nothing of the endpoint.
    pub outcome: Option<Outcome>,
    /// The latency the estimate learns from: a request's, never a connection's lifetime.
    pub latency: Option<std::time::Duration>,
    /// Whether it no longer counts as in flight (a TCP connection stays until it closes).
    pub release: bool,
}

/// Gives back an endpoint's in-flight count: a TCP connection closed.
pub fn release(health: &BackendHealth, endpoint: SocketAddrV4) {
    let mut stats = health.endpoints.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(entry) = stats.get_mut(&endpoint) {
        entry.in_flight = entry.in_flight.saturating_sub(1);
    }
}

/// Counts the end of a request (or a connection attempt) to `endpoint`: its latency, and its
/// outcome for outlier detection, ejecting it when it has failed too often.
pub fn record(
    state: &TrafficState,
    target: &BackendTarget,
    health: &BackendHealth,
    endpoint: SocketAddrV4,
    finished: Finished,
) {
    let Finished {
        outcome,
        latency,
        release,
    } = finished;
    let now = Instant::now();
    let mut stats = health.endpoints.lock().unwrap_or_else(|e| e.into_inner());
    let Some(entry) = stats.get_mut(&endpoint) else {
        return;
    };
    if release {
        entry.in_flight = entry.in_flight.saturating_sub(1);
    }
    if let (Some(Outcome::Answered(_)), Some(latency)) = (outcome, latency) {
        entry.ewma.observe(latency, now);
    }
    let Some(settings) = &target.settings.outlier else {
        return;
    };
    let service = target.service_key.as_str();
    let ejected = |stats: &std::collections::HashMap<SocketAddrV4, EndpointStats>| {
        stats.values().filter(|s| s.health.is_ejected(now)).count()
    };
    let Some(outcome) = outcome else {
        return;
    };
    if !entry.health.record(outcome, settings, now) {
        // Ejections end by time: the gauge catches up with each request.
        state
            .metrics
            .ejections_active
            .with_label_values(&[service])
            .set(ejected(&stats) as i64);
        return;
    }
    let total = stats.len();
    let ejected = ejected(&stats);
    if !outlier::may_eject(ejected, total, settings.max_ejection_percent) {
        return;
    }
    if let Some(entry) = stats.get_mut(&endpoint) {
        entry.health.eject(settings, now);
        tracing::info!(
            service = %target.service_key,
            %endpoint,
            times = entry.health.ejections_total,
            "endpoint ejected after consecutive failures"
        );
    }
    state.metrics.ejections.with_label_values(&[service]).inc();
    state
        .metrics
        .ejections_active
        .with_label_values(&[service])
        .set((ejected + 1) as i64);
}

/// What outlier detection counts of a response: `None` for outcomes that say nothing of the
/// endpoint (a circuit breaker refusing before sending).
pub fn outcome_of(response: &HttpResponse) -> Option<Outcome> {
    match super::retry::outcome(response) {
        Attempt::Answered { status, .. } => Some(Outcome::Answered(status)),
        Attempt::Overflow => None,
        Attempt::ConnectFailure | Attempt::Reset | Attempt::RefusedStream | Attempt::Timeout => {
            Some(Outcome::LocalFailure)
        }
    }
}

#[derive(Debug, Clone)]
pub struct Balance {
    state: Arc<TrafficState>,
}

pub type BalanceLayer = FilterLayer<Balance>;

impl BalanceLayer {
    pub fn new(state: Arc<TrafficState>) -> Self {
        FilterLayer(Balance { state })
    }
}

impl HttpFilter for Balance {
    async fn filter<S: Inner>(&self, inner: &S, mut req: HttpRequest) -> HttpResponse {
        let state = self.state.clone();
        let Some(routed) = req.extensions().get::<Routed>().cloned() else {
            return local_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                ResponseFlags::NO_HEALTHY_UPSTREAM,
                "the request reached balancing without a backend",
            );
        };
        let target = &routed.target;
        let health = state.backend(&target.state_key);
        let client_ip = req
            .extensions()
            .get::<ClientWorkload>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.ip);
        let tried = req.extensions().get::<Tried>().cloned();
        let avoid = tried
            .as_ref()
            .map(|t| t.0.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default();
        let input = PickInput {
            client_ip,
            headers: Some(req.headers()),
            avoid: &avoid,
            by_latency: true,
        };
        let started = Instant::now();
        let Some(endpoint) = pick(&routed.mesh, target, &health, input, started) else {
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlags::NO_HEALTHY_UPSTREAM,
                format!(
                    "no healthy upstream: Service {} has no endpoint",
                    target.service_key
                ),
            );
        };
        let addr = endpoint.addr;
        if let Some(tried) = &tried {
            tried.0.lock().unwrap_or_else(|e| e.into_inner()).push(addr);
        }
        req.extensions_mut().insert(endpoint.clone());
        // Counted as finished even when the client goes away mid-request.
        let guard = InFlight {
            state: state.clone(),
            target: target.clone(),
            health: health.clone(),
            addr,
            started,
            outcome: None,
        };
        let mut response = inner.handle(req).await;
        let mut guard = guard;
        guard.outcome = Some(outcome_of(&response));
        response.extensions_mut().insert(endpoint);
        response
    }
}

/// Records the end of a request to an endpoint when dropped.
struct InFlight {
    state: Arc<TrafficState>,
    target: Arc<BackendTarget>,
    health: Arc<BackendHealth>,
    addr: SocketAddrV4,
    started: Instant,
    /// `None` while in flight: dropped then, the request was cancelled.
    outcome: Option<Option<Outcome>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        record(
            &self.state,
            &self.target,
            &self.health,
            self.addr,
            Finished {
                outcome: self.outcome.flatten(),
                latency: Some(self.started.elapsed()),
                release: true,
            },
        );
    }
}

#[cfg(test)]
mod tests;
