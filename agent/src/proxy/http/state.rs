//! What the traffic layers remember between requests: per client workload and backend, the
//! circuit breaker counts and the retry budget; per backend, each endpoint's latency estimate,
//! requests in flight and health. Also their metrics.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Instant,
};

use nodemesh_traffic::{
    balance::PeakEwma, budget::RetryBudget, outlier::EndpointHealth, policy::BudgetSettings,
};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// Everything the traffic layers share on one node.
#[derive(Debug)]
pub struct TrafficState {
    pub metrics: TrafficMetrics,
    /// By client workload, then by backend: looked up by reference, without building a key.
    clients: Mutex<HashMap<String, HashMap<String, Arc<ClientState>>>>,
    backends: Mutex<HashMap<String, Arc<BackendHealth>>>,
}

/// One client workload's use of one backend: what its circuit breakers count and its retry
/// budget. Per client, as each pod's own sidecar would count, so that one busy pod does not
/// use up the limits of the others on its node.
#[derive(Debug)]
pub struct ClientState {
    pub requests: Counter,
    pub pending: Counter,
    pub retries: Counter,
    pub connections: Counter,
    budget: Mutex<RetryBudget>,
}

/// A count of things in use, with a guard that gives back on drop.
#[derive(Debug, Default)]
pub struct Counter(AtomicU32);

/// Holds one unit of a [`Counter`].
pub struct Held(Arc<ClientState>, fn(&ClientState) -> &Counter);

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Held")
    }
}

/// The client of a request: its workload (`namespace/name`), for the state it is counted in,
/// and its address, for hashing.
#[derive(Debug, Clone)]
pub struct ClientWorkload {
    pub key: Arc<str>,
    pub ip: std::net::IpAddr,
}

/// Tokio's clock (which tests can pause) as a std instant.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl ClientState {
    pub fn new(budget: BudgetSettings) -> Self {
        Self {
            requests: Counter::default(),
            pending: Counter::default(),
            retries: Counter::default(),
            connections: Counter::default(),
            budget: Mutex::new(RetryBudget::new(budget, now())),
        }
    }

    /// Takes one unit of `which` if fewer than `limit` are in use.
    pub fn try_hold(
        self: &Arc<Self>,
        which: fn(&ClientState) -> &Counter,
        limit: u32,
    ) -> Option<Held> {
        let counter = &which(self).0;
        let mut current = counter.load(Ordering::Relaxed);
        loop {
            if current >= limit {
                return None;
            }
            match counter.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Held(self.clone(), which)),
                Err(now) => current = now,
            }
        }
    }

    /// An original request: it earns retries for the budget.
    pub fn deposit(&self) {
        self.budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .deposit(now());
    }

    /// Whether the budget allows one more retry (and spends it).
    pub fn withdraw(&self) -> bool {
        self.budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .withdraw(now())
    }

    fn budget_settings(&self) -> BudgetSettings {
        self.budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .settings()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        (self.1)(&self.0).0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The endpoints of one backend (a Service under one set of policies), as this node sees them.
#[derive(Debug, Default)]
pub struct BackendHealth {
    pub endpoints: Mutex<HashMap<SocketAddrV4, EndpointStats>>,
    /// Round-robin position.
    pub next: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Clone)]
pub struct EndpointStats {
    pub ewma: PeakEwma,
    pub in_flight: u64,
    pub health: EndpointHealth,
}

impl EndpointStats {
    pub fn new(now: Instant) -> Self {
        Self {
            ewma: PeakEwma::new(now),
            in_flight: 0,
            health: EndpointHealth::default(),
        }
    }
}

impl TrafficState {
    pub fn new(registry: &Registry) -> Self {
        Self {
            metrics: TrafficMetrics::new(registry),
            clients: Mutex::default(),
            backends: Mutex::default(),
        }
    }

    /// The state of `client` (a workload key) toward the backend `state_key`.
    pub fn client(
        &self,
        client: &str,
        state_key: &str,
        budget: BudgetSettings,
    ) -> Arc<ClientState> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = clients.get(client).and_then(|states| states.get(state_key))
            && state.budget_settings() == budget
        {
            return state.clone();
        }
        let state = Arc::new(ClientState::new(budget));
        clients
            .entry(client.to_owned())
            .or_default()
            .insert(state_key.to_owned(), state.clone());
        state
    }

    pub fn backend(&self, state_key: &str) -> Arc<BackendHealth> {
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(backend) = backends.get(state_key) {
            return backend.clone();
        }
        let backend = Arc::new(BackendHealth::default());
        backends.insert(state_key.to_owned(), backend.clone());
        backend
    }

    /// Every backend's endpoints as this node sees them, for `/endpoints` and `nodemesh
    /// explain`.
    pub fn report(&self) -> Vec<BackendReport> {
        let now = Instant::now();
        let backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<BackendReport> = backends
            .iter()
            .map(|(key, backend)| {
                let stats = backend.endpoints.lock().unwrap_or_else(|e| e.into_inner());
                let mut endpoints: Vec<EndpointReport> = stats
                    .iter()
                    .map(|(addr, s)| EndpointReport {
                        address: addr.to_string(),
                        health: s.health.state(now),
                        ejections_total: s.health.ejections_total,
                        in_flight: s.in_flight,
                        latency_ewma_ms: s.ewma.get(now) / 1e6,
                    })
                    .collect();
                endpoints.sort_by(|a, b| a.address.cmp(&b.address));
                BackendReport {
                    backend: key.clone(),
                    endpoints,
                }
            })
            .collect();
        all.sort_by(|a, b| a.backend.cmp(&b.backend));
        all
    }

    /// Forgets backends and clients the configuration no longer has, and clients that left.
    pub fn retain(
        &self,
        state_keys: &std::collections::HashSet<String>,
        clients: &std::collections::HashSet<String>,
    ) {
        self.backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| state_keys.contains(key));
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|client, states| {
                states.retain(|key, _| state_keys.contains(key));
                clients.contains(client) && !states.is_empty()
            });
    }
}

/// One backend (policies and Service, as `state_key`) in `/endpoints`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendReport {
    pub backend: String,
    pub endpoints: Vec<EndpointReport>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointReport {
    pub address: String,
    pub health: nodemesh_traffic::outlier::HealthState,
    pub ejections_total: u64,
    pub in_flight: u64,
    pub latency_ewma_ms: f64,
}

/// Metrics of the traffic layers. Labels are Services and policies, bounded by configuration.
#[derive(Debug, Clone)]
pub struct TrafficMetrics {
    /// Retries by backend Service and outcome: `sent`, `budget_exhausted`, `overflow`.
    pub retries: IntCounterVec,
    /// Endpoints ejected now, by backend Service.
    pub ejections_active: IntGaugeVec,
    pub ejections: IntCounterVec,
    /// Requests and connections refused at once by a circuit breaker, by Service and limit.
    pub overflows: IntCounterVec,
    /// Requests refused by a local rate limit, by destination workload and policy.
    pub rate_limited: IntCounterVec,
}

impl TrafficMetrics {
    pub fn new(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("metric registered once");
            metric
        };
        let ejections_active = IntGaugeVec::new(
            Opts::new(
                "nodemesh_outlier_ejections_active",
                "Endpoints out of service after failing, by backend Service",
            ),
            &["service"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(ejections_active.clone()))
            .expect("metric registered once");
        Self {
            retries: counter(
                "nodemesh_http_retries_total",
                "Retries by backend Service and outcome (sent, budget_exhausted, overflow)",
                &["service", "outcome"],
            ),
            ejections_active,
            ejections: counter(
                "nodemesh_outlier_ejections_total",
                "Endpoints taken out of service after failing, by backend Service",
                &["service"],
            ),
            overflows: counter(
                "nodemesh_circuit_breaker_overflows_total",
                "Requests and connections refused at once by a circuit breaker, by Service and \
                 limit",
                &["service", "limit"],
            ),
            rate_limited: counter(
                "nodemesh_rate_limited_requests_total",
                "Requests refused by a local rate limit, by destination workload and policy",
                &["workload", "policy"],
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn set(items: &[&str]) -> HashSet<String> {
        items.iter().map(|i| (*i).to_owned()).collect()
    }

    #[test]
    fn a_client_has_one_state_per_backend_until_its_budget_changes_or_it_is_forgotten() {
        let state = TrafficState::new(&Registry::new());
        let budget = BudgetSettings::default();
        let web = state.client("shop/a", "web", budget);
        assert!(Arc::ptr_eq(&web, &state.client("shop/a", "web", budget)));
        let other_backend = state.client("shop/a", "api", budget);
        let other_client = state.client("shop/b", "web", budget);
        assert!(!Arc::ptr_eq(&web, &other_backend));
        assert!(!Arc::ptr_eq(&web, &other_client));

        // A new retry budget starts a new state (its counts start over).
        let changed = BudgetSettings {
            min_retries_per_second: budget.min_retries_per_second + 1,
            ..budget
        };
        let renewed = state.client("shop/a", "web", changed);
        assert!(!Arc::ptr_eq(&web, &renewed));
        assert!(Arc::ptr_eq(
            &renewed,
            &state.client("shop/a", "web", changed)
        ));

        // Forgotten: the backend `api`, and the client `shop/b`.
        state.retain(&set(&["web"]), &set(&["shop/a"]));
        assert!(Arc::ptr_eq(
            &renewed,
            &state.client("shop/a", "web", changed)
        ));
        assert!(!Arc::ptr_eq(
            &other_backend,
            &state.client("shop/a", "api", budget)
        ));
        assert!(!Arc::ptr_eq(
            &other_client,
            &state.client("shop/b", "web", budget)
        ));
    }
}
