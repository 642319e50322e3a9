//! Routing decisions from whole configurations: GAMMA attachment, precedence across routes,
//! weights, and the settings each backend gets.

use std::time::Duration;

use http::{HeaderMap, Method};

use super::*;
use crate::{
    fixtures::{mesh, policy_yaml, route_yaml, with, with_routes},
    table::TrafficTable,
};

fn request<'a>(method: &'a Method, path: &'a str, headers: &'a HeaderMap) -> RequestHead<'a> {
    RequestHead {
        method,
        path,
        query: None,
        headers,
    }
}

/// (route, rule index) a GET of `path` from `namespace` gets on web:80.
fn routed(
    table: &TrafficTable,
    namespace: &str,
    path: &str,
    headers: &HeaderMap,
) -> Option<(String, usize)> {
    let (_, web) = table.service("shop/web").expect("web");
    let port = web.port(80).expect("port 80");
    match route(port, namespace, &request(&Method::GET, path, headers)) {
        RouteDecision::Rule(m) => Some((m.rule.route.to_string(), m.rule.rule_index)),
        RouteDecision::NoRoute => None,
        RouteDecision::Service => Some(("service".to_owned(), 0)),
    }
}

#[test]
fn without_routes_a_port_goes_to_its_service() {
    let table = TrafficTable::new(&mesh(&[]));
    assert_eq!(
        routed(&table, "shop", "/", &HeaderMap::new()),
        Some(("service".into(), 0))
    );
    let (_, web) = table.service("shop/web").expect("web");
    assert!(
        !web.port(80).expect("port").reads_http(),
        "no route, no appProtocol: bytes"
    );
}

#[test]
fn a_request_matching_no_attached_route_gets_no_route() {
    let table = TrafficTable::new(&with_routes(&[
        "name: api\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /api}}]\n",
    ]));
    assert!(
        table
            .service("shop/web")
            .expect("web")
            .1
            .port(80)
            .expect("port")
            .reads_http()
    );
    assert_eq!(
        routed(&table, "shop", "/api/x", &HeaderMap::new()),
        Some(("shop/api".into(), 0))
    );
    assert_eq!(routed(&table, "shop", "/other", &HeaderMap::new()), None);
}

#[test]
fn a_route_without_a_port_attaches_to_every_port_of_the_service() {
    let table = TrafficTable::new(&with_routes(&[
        "name: all\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web}]\n",
    ]));
    let (_, web) = table.service("shop/web").expect("web");
    assert!(web.ports.iter().all(|p| p.routes.is_some()));
}

#[test]
fn precedence_holds_across_routes_and_ties_go_to_the_older_route() {
    let table = TrafficTable::new(&with_routes(&[
        "name: b-prefix\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /a}}]\n",
        "name: a-exact\n  creationTimestamp: \"2025-01-01T00:00:00Z\"\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  - matches: [{path: {type: Exact, value: /a/b}}]\n",
        "name: c-prefix-older\n  creationTimestamp: \"2023-01-01T00:00:00Z\"\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /a}}]\n",
    ]));
    let none = HeaderMap::new();
    assert_eq!(
        routed(&table, "shop", "/a/b", &none),
        Some(("shop/a-exact".into(), 0))
    );
    assert_eq!(
        routed(&table, "shop", "/a/c", &none),
        Some(("shop/c-prefix-older".into(), 0)),
        "equal prefixes: the oldest route wins"
    );
}

#[test]
fn a_header_match_beats_the_catch_all_whatever_the_rule_order() {
    let table = TrafficTable::new(&with_routes(&[
        "name: canary\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  - backendRefs: [{name: web-v1, port: 80}]\n  - matches: [{headers: [{name: x-canary, value: \"true\"}]}]\n    backendRefs: [{name: web-v2, port: 80}]\n",
    ]));
    let mut canary = HeaderMap::new();
    canary.insert("x-canary", "true".parse().expect("value"));
    assert_eq!(
        routed(&table, "shop", "/", &canary),
        Some(("shop/canary".into(), 1))
    );
    assert_eq!(
        routed(&table, "shop", "/", &HeaderMap::new()),
        Some(("shop/canary".into(), 0))
    );
}

#[test]
fn consumer_routes_apply_only_to_their_namespace_and_replace_producer_routes_there() {
    let config = with(&[
        &route_yaml(
            "name: producer\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  - backendRefs: [{name: web-v1, port: 80}]\n",
        ),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: mine\n  namespace: frontend\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, namespace: shop, port: 80}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /only}}]\n    backendRefs: [{name: web-v2, namespace: shop, port: 80}]\n",
    ]);
    let table = TrafficTable::new(&config);
    let none = HeaderMap::new();
    assert_eq!(
        routed(&table, "shop", "/only", &none),
        Some(("shop/producer".into(), 0))
    );
    assert_eq!(
        routed(&table, "frontend", "/only", &none),
        Some(("frontend/mine".into(), 0))
    );
    assert_eq!(
        routed(&table, "frontend", "/elsewhere", &none),
        None,
        "the consumer's routes replace the producer's for its clients"
    );
    assert_eq!(
        routed(&table, "other", "/elsewhere", &none),
        Some(("shop/producer".into(), 0))
    );
}

#[test]
fn weights_split_requests_and_zero_gets_none() {
    let table = TrafficTable::new(&with_routes(&[
        "name: split\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  - backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}, {name: web, port: 80, weight: 0}]\n",
    ]));
    let (_, web) = table.service("shop/web").expect("web");
    let RouteDecision::Rule(m) = route(
        web.port(80).expect("port"),
        "shop",
        &request(&Method::GET, "/", &HeaderMap::new()),
    ) else {
        panic!("routed");
    };
    let mut counts = std::collections::BTreeMap::new();
    for draw in 0..1000u64 {
        let backend = m.rule.pick_backend(draw).expect("a backend");
        *counts.entry(backend.service_key.clone()).or_insert(0) += 1;
    }
    assert_eq!(counts.get("shop/web-v1"), Some(&900));
    assert_eq!(counts.get("shop/web-v2"), Some(&100));
    assert_eq!(counts.get("shop/web"), None);
    let shares: Vec<f64> = m.rule.shares().iter().map(|(_, s)| *s).collect();
    assert_eq!(shares, [90.0, 10.0, 0.0]);
}

#[test]
fn a_rule_without_backends_sends_to_the_parent_service() {
    let table = TrafficTable::new(&with_routes(&[
        "name: plain\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  - matches: [{path: {value: /}}]\n",
    ]));
    let (_, web) = table.service("shop/web").expect("web");
    let RouteDecision::Rule(m) = route(
        web.port(80).expect("port"),
        "shop",
        &request(&Method::GET, "/", &HeaderMap::new()),
    ) else {
        panic!("routed");
    };
    let backend = m.rule.pick_backend(7).expect("backend");
    assert_eq!(backend.service_key, "shop/web");
    assert_eq!(backend.target_port, 8080);
}

#[test]
fn settings_come_from_the_rule_then_the_route_policy_then_the_backend_service() {
    let config = with(&[
        &route_yaml(
            "name: api\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  - timeouts: {request: 500ms}\n    backendRefs: [{name: web-v1, port: 80}]\n",
        ),
        &policy_yaml(
            "name: route-policy\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: api}]\n  timeout: {http: {requestTimeout: 5s}}\n  retry: {numRetries: 4}\n",
        ),
        &policy_yaml(
            "name: v1-policy\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: web-v1}]\n  circuitBreaker: {maxParallelRequests: 4}\n  loadBalancer: {type: RoundRobin}\n",
        ),
    ]);
    let table = TrafficTable::new(&config);
    let (_, web) = table.service("shop/web").expect("web");
    let RouteDecision::Rule(m) = route(
        web.port(80).expect("port"),
        "shop",
        &request(&Method::GET, "/", &HeaderMap::new()),
    ) else {
        panic!("routed");
    };
    let backend = m.rule.pick_backend(0).expect("backend");
    assert_eq!(
        backend.request.request_timeout,
        Some(Duration::from_millis(500)),
        "the rule's own timeout"
    );
    assert_eq!(
        backend.request.retry.as_ref().map(|r| r.num_retries),
        Some(4),
        "the route's policy"
    );
    assert_eq!(
        backend.settings.limits.max_parallel_requests, 4,
        "the backend Service's policy"
    );
    assert_eq!(
        backend.settings.balancer,
        crate::policy::Balancer::RoundRobin
    );
    assert_eq!(backend.state_key, "shop/route-policy|shop/web-v1");
    let (_, v1) = table.service("shop/web-v1").expect("v1");
    let direct = &v1.port(80).expect("port").service_target;
    assert_eq!(
        direct.state_key, "shop/web-v1",
        "addressed directly: the Service's own state"
    );
    assert_eq!(direct.request.retry, None);
    assert_eq!(direct.settings.limits.max_parallel_requests, 4);
    assert!(
        !v1.port(80).expect("port").reads_http(),
        "limits alone keep the port TCP"
    );
    let retrying = with(&[&policy_yaml(
        "name: p\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: web-v2}]\n  retry: {numRetries: 1}\n",
    )]);
    let table = TrafficTable::new(&retrying);
    let (_, v2) = table.service("shop/web-v2").expect("v2");
    assert!(v2.port(80).expect("port").reads_http(), "retries need HTTP");
}
