use std::collections::BTreeMap;

use tower::{Layer as _, ServiceExt as _};

use super::*;
use crate::proxy::http::{
    flags_of,
    testing::{self, Scripted},
};

fn layer() -> (BalanceLayer, Arc<TrafficState>) {
    let state = Arc::new(TrafficState::new(&prometheus::Registry::new()));
    (BalanceLayer::new(state.clone()), state)
}

const FAIL_FAST: &str = "apiVersion: policy.nodemesh.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {name: eject, namespace: shop}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: web}]\n  loadBalancer: {type: RoundRobin}\n  healthCheck:\n    passive: {consecutive5XxErrors: 3, baseEjectionTime: 30s, maxEjectionPercent: 50}\n";

/// Answers 500 from 10.0.0.1 and 200 from the others, counting requests per endpoint.
#[derive(Debug, Clone, Default)]
struct FirstFails(Arc<std::sync::Mutex<BTreeMap<SocketAddrV4, usize>>>);

impl Inner for FirstFails {
    async fn handle(&self, req: HttpRequest) -> HttpResponse {
        let endpoint = req
            .extensions()
            .get::<ChosenEndpoint>()
            .expect("an endpoint")
            .addr;
        *self.0.lock().expect("lock").entry(endpoint).or_default() += 1;
        let status = if endpoint.ip().octets()[3] == 1 {
            500
        } else {
            200
        };
        testing::response(status)
    }
}

#[tokio::test]
async fn no_endpoint_is_503_uh() {
    let (layer, _) = layer();
    let mesh = testing::mesh(0, "");
    let target = testing::web_target(&mesh);
    let inner = Scripted::statuses(&[200]);
    let Ok(response) = layer
        .layer(inner.clone())
        .oneshot(testing::routed_request_in(mesh, target))
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(flags_of(&response), ResponseFlags::NO_HEALTHY_UPSTREAM);
    assert_eq!(inner.calls(), 0);
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_the_others_serve() {
    let (layer, state) = layer();
    let mesh = testing::mesh(2, FAIL_FAST);
    let target = testing::web_target(&mesh);
    let inner = FirstFails::default();
    let service = layer.layer(inner.clone());
    let mut failures = 0;
    for _ in 0..200 {
        let req = testing::routed_request_in(mesh.clone(), target.clone());
        let Ok(response) = service.clone().oneshot(req).await;
        failures += usize::from(response.status() != StatusCode::OK);
    }
    assert_eq!(failures, 3, "ejected after its third failure in a row");
    let counts = inner.0.lock().expect("lock").clone();
    assert_eq!(
        counts.get(&"10.0.0.1:8080".parse().expect("addr")),
        Some(&3)
    );
    assert_eq!(
        counts.get(&"10.0.0.2:8080".parse().expect("addr")),
        Some(&197)
    );
    assert_eq!(
        state
            .metrics
            .ejections
            .with_label_values(&["shop/web"])
            .get(),
        1
    );
    let report = state.report();
    let ejected = report[0]
        .endpoints
        .iter()
        .find(|e| e.address == "10.0.0.1:8080")
        .expect("endpoint");
    assert!(matches!(
        ejected.health,
        nodemesh_traffic::outlier::HealthState::Ejected { .. }
    ));
}

#[tokio::test]
async fn round_robin_takes_turns() {
    let (layer, _) = layer();
    let mesh = testing::mesh(
        3,
        "apiVersion: policy.nodemesh.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {name: rr, namespace: shop}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: web}]\n  loadBalancer: {type: RoundRobin}\n",
    );
    let target = testing::web_target(&mesh);
    let inner = FirstFails::default();
    let service = layer.layer(inner.clone());
    for _ in 0..9 {
        let Ok(_) = service
            .clone()
            .oneshot(testing::routed_request_in(mesh.clone(), target.clone()))
            .await;
    }
    let counts: Vec<usize> = inner.0.lock().expect("lock").values().copied().collect();
    assert_eq!(counts, [3, 3, 3]);
}

#[tokio::test]
async fn consistent_hashing_keeps_a_key_on_one_endpoint() {
    let (layer, _) = layer();
    let mesh = testing::mesh(
        4,
        "apiVersion: policy.nodemesh.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {name: sticky, namespace: shop}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: web}]\n  loadBalancer: {type: ConsistentHash, consistentHash: {type: Header, header: {name: x-user}}}\n",
    );
    let target = testing::web_target(&mesh);
    let inner = FirstFails::default();
    let service = layer.layer(inner.clone());
    for _ in 0..20 {
        let mut req = testing::routed_request_in(mesh.clone(), target.clone());
        req.headers_mut()
            .insert("x-user", "alice".parse().expect("value"));
        let Ok(_) = service.clone().oneshot(req).await;
    }
    assert_eq!(
        inner.0.lock().expect("lock").len(),
        1,
        "every request of alice on one endpoint"
    );
}

#[test]
fn least_request_avoids_the_busy_endpoint() {
    let mesh = testing::mesh(2, "");
    let target = testing::web_target(&mesh);
    let health = BackendHealth::default();
    let now = Instant::now();
    let input = PickInput {
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        headers: None,
        avoid: &[],
        by_latency: true,
    };
    let first = pick(&mesh, &target, &health, input, now).expect("endpoint");
    // The first stays in flight: with two endpoints, power of two choices sees both.
    for _ in 0..10 {
        let next = pick(&mesh, &target, &health, input, now).expect("endpoint");
        assert_ne!(
            next.addr, first.addr,
            "the other endpoint has fewer requests in flight"
        );
        let mut stats = health.endpoints.lock().expect("lock");
        stats.get_mut(&next.addr).expect("stats").in_flight -= 1;
    }
    assert_eq!(
        first
            .destination
            .map(|d| d.key.clone())
            .as_deref()
            .map(|k| k.starts_with("shop/web-")),
        Some(true)
    );
}

#[test]
fn a_retry_goes_to_another_endpoint_when_there_is_one() {
    let mesh = testing::mesh(3, "");
    let target = testing::web_target(&mesh);
    let health = BackendHealth::default();
    let now = Instant::now();
    let tried: Vec<SocketAddrV4> = ["10.0.0.1:8080", "10.0.0.2:8080"]
        .iter()
        .map(|a| a.parse().expect("addr"))
        .collect();
    for _ in 0..20 {
        let input = PickInput {
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            headers: None,
            avoid: &tried,
            by_latency: true,
        };
        let chosen = pick(&mesh, &target, &health, input, now).expect("endpoint");
        assert_eq!(chosen.addr.to_string(), "10.0.0.3:8080");
    }
    let all: Vec<SocketAddrV4> = (1..=3)
        .map(|i| format!("10.0.0.{i}:8080").parse().expect("addr"))
        .collect();
    let input = PickInput {
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        headers: None,
        avoid: &all,
        by_latency: true,
    };
    assert!(
        pick(&mesh, &target, &health, input, now).is_some(),
        "all tried: any will do"
    );
}

#[test]
fn tcp_connections_spread_over_endpoints_with_as_many_open() {
    let mesh = testing::mesh(2, "");
    let target = testing::web_target(&mesh);
    let health = BackendHealth::default();
    let now = Instant::now();
    let input = PickInput {
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        headers: None,
        avoid: &[],
        by_latency: false,
    };
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let chosen = pick(&mesh, &target, &health, input, now).expect("endpoint");
        seen.insert(chosen.addr);
        release(&health, chosen.addr);
    }
    assert_eq!(seen.len(), 2, "sequential connections reach both endpoints");
    let first = pick(&mesh, &target, &health, input, now).expect("endpoint");
    let second = pick(&mesh, &target, &health, input, now).expect("endpoint");
    assert_ne!(
        first.addr, second.addr,
        "the one with a connection open is avoided"
    );
}
