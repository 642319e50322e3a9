use std::{net::Ipv4Addr, time::Duration};

use http::{HeaderMap, Method};
use tower::{Layer as _, ServiceExt as _};

use super::*;
use crate::proxy::http::{
    flags_of,
    testing::{self, Scripted},
};

fn limits(rules: &str) -> Arc<PodRateLimits> {
    let config = testing::mesh_config(
        1,
        &format!(
            "apiVersion: policy.nodemesh.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {{name: rl, namespace: shop}}\nspec:\n  targetRefs: [{{group: \"\", kind: Service, name: web}}]\n  rateLimit:\n    type: Local\n    local:\n      rules:\n{rules}"
        ),
    );
    let workload = &config.workloads["shop/web-1"];
    let limits = Arc::new(PodRateLimits::default());
    limits.set(nodemesh_traffic::rate_limit::for_workload(
        &config, workload,
    ));
    limits
}

fn rate_request<'a>(source: [u8; 4], headers: &'a HeaderMap) -> RateLimitRequest<'a> {
    RateLimitRequest {
        source: IpAddr::V4(Ipv4Addr::from(source)),
        method: &Method::GET,
        path: "/",
        headers,
    }
}

#[test]
fn every_client_of_the_pod_shares_the_bucket_on_the_services_ports() {
    let limits = limits("      - limit: {requests: 50, unit: Second}\n");
    let none = HeaderMap::new();
    let now = Instant::now();
    let admitted = (0..200u8)
        .filter(|i| {
            matches!(
                limits.check(8080, &rate_request([10, 0, 1, *i], &none), now),
                Verdict::Admitted { .. }
            )
        })
        .count();
    assert_eq!(admitted, 50, "200 clients, one bucket");
    assert_eq!(
        limits.check(9999, &rate_request([10, 0, 1, 1], &none), now),
        Verdict::Unlimited,
        "not a port of the Service"
    );
    let later = now + Duration::from_secs(1);
    assert!(matches!(
        limits.check(8080, &rate_request([10, 0, 1, 1], &none), later),
        Verdict::Admitted { remaining: 49, .. }
    ));
}

#[test]
fn a_selected_client_counts_on_its_rule_and_the_rest_on_the_default() {
    let limits = limits(
        "      - clientSelectors: [{sourceCIDR: {value: 10.0.0.9/32}}]\n        limit: {requests: 1, unit: Minute}\n      - limit: {requests: 3, unit: Minute}\n",
    );
    let none = HeaderMap::new();
    let now = Instant::now();
    let check = |source| limits.check(8080, &rate_request(source, &none), now);
    assert!(matches!(
        check([10, 0, 0, 9]),
        Verdict::Admitted { limit: 1, .. }
    ));
    assert!(
        matches!(check([10, 0, 0, 9]), Verdict::Refused { limit: 1, .. }),
        "its own rule, one a minute"
    );
    for _ in 0..3 {
        assert!(
            matches!(check([10, 0, 0, 7]), Verdict::Admitted { limit: 3, .. }),
            "the default is untouched by the selected client"
        );
    }
    assert!(matches!(
        check([10, 0, 0, 7]),
        Verdict::Refused { limit: 3, .. }
    ));
}

#[tokio::test]
async fn a_refused_request_gets_429_rl_with_the_rate_limit_headers() {
    let limits = limits("      - limit: {requests: 1, unit: Hour}\n");
    let metrics = super::super::state::TrafficMetrics::new(&prometheus::Registry::new());
    let inner = Scripted::statuses(&[200]);
    let service = RateLimitLayer::new(metrics.clone()).layer(inner.clone());
    let request = || {
        let mut req = testing::request("/");
        req.extensions_mut().insert(PodLimits {
            workload: Arc::from("shop/web-1"),
            limits: limits.clone(),
        });
        req.extensions_mut().insert(Limited {
            port: 8080,
            source: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        });
        req
    };
    let Ok(first) = service.clone().oneshot(request()).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["x-ratelimit-limit"], "1");
    assert_eq!(first.headers()["x-ratelimit-remaining"], "0");
    let Ok(second) = service.oneshot(request()).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(flags_of(&second), ResponseFlags::RATE_LIMITED);
    assert_eq!(second.headers()["retry-after"], "3600");
    assert_eq!(second.headers()["x-ratelimit-remaining"], "0");
    assert_eq!(second.headers()["x-envoy-ratelimited"], "true");
    assert_eq!(
        inner.calls(),
        1,
        "the refused request never reached the application"
    );
    assert_eq!(
        metrics
            .rate_limited
            .with_label_values(&["shop/web-1", "shop/rl"])
            .get(),
        1
    );
}
