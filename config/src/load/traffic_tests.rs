//! HTTPRoute and BackendTrafficPolicy: files users bring load; mistakes are refused naming the
//! file, object and field.

use std::path::Path;

use crate::{ConfigError, MeshConfig, load_str};

const BASE: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodemesh.dev/enabled: \"true\"}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080, appProtocol: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: web, version: v2}, ports: [{port: 80, targetPort: 8080}]}
";

fn load(extra: &str) -> Result<MeshConfig, Vec<ConfigError>> {
    load_str(Path::new("mesh.yaml"), &format!("{BASE}---\n{extra}")).map_err(|e| e.0)
}

fn route(spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web-route, namespace: shop}}\nspec:\n{spec}"
    )
}

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: policy.nodemesh.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {{name: web-policy, namespace: shop}}\nspec:\n{spec}"
    )
}

/// The one error of a refused configuration: (field, message).
fn refused(extra: &str) -> (String, String) {
    let errors = load(extra).expect_err("refused");
    assert_eq!(errors.len(), 1, "{errors:?}");
    let error = &errors[0];
    assert_eq!(error.file, Path::new("mesh.yaml"));
    assert!(error.object.is_some(), "{error}");
    (
        error.field.clone().unwrap_or_default(),
        error.message.clone(),
    )
}

const PARENT: &str = "  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n";

#[test]
fn a_gamma_route_from_the_gateway_api_documentation_loads() {
    let config = load(&route(&format!(
        "{PARENT}  rules:\n  - matches:\n    - path: {{type: PathPrefix, value: /api}}\n      headers: [{{name: x-canary, value: \"true\"}}]\n      queryParams: [{{type: RegularExpression, name: v, value: '[0-9]+'}}]\n      method: GET\n    filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {{set: [{{name: x-a, value: b}}], remove: [x-c]}}\n    - type: URLRewrite\n      urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}}\n    backendRefs: [{{name: web, port: 80, weight: 90}}, {{name: web-v2, port: 80, weight: 10}}]\n    timeouts: {{request: 10s, backendRequest: 2s}}\n    retry: {{codes: [503], attempts: 2, backoff: 100ms}}\n  - backendRefs: [{{name: web, port: 80}}]\n"
    )))
    .expect("valid");
    let route = &config.http_routes["shop/web-route"];
    assert_eq!(route.spec.rules[0].backend_refs[1].weight, 10);
    assert_eq!(
        route.spec.rules[1].backend_refs[0].weight, 1,
        "weight defaults to 1"
    );
    assert_eq!(
        config.services["shop/web"].spec.ports[0].app_protocol(),
        crate::AppProtocol::Http
    );
}

#[test]
fn exported_routes_with_status_and_v1beta1_load() {
    let exported = route(PARENT).replace(
        "gateway.networking.k8s.io/v1",
        "gateway.networking.k8s.io/v1beta1",
    ) + "status:\n  parents:\n  - parentRef: {name: web}\n    controllerName: example.com/mesh\n    conditions: []\n";
    load(&exported).expect("status is ignored, v1beta1 is the same schema");
}

#[test]
fn route_mistakes_name_their_field() {
    for (spec, field, says) in [
        (
            "  parentRefs: [{name: web}]\n",
            "spec.parentRefs[0]",
            "set group: \"\" and kind: Service",
        ),
        (
            "  parentRefs: [{group: \"\", kind: Service, name: nope}]\n",
            "spec.parentRefs[0].name",
            "no Service shop/nope",
        ),
        (
            "  parentRefs: [{group: \"\", kind: Service, name: web, port: 81}]\n",
            "spec.parentRefs[0].port",
            "has no port 81",
        ),
        (
            &format!("{PARENT}  rules:\n  - backendRefs: [{{name: missing, port: 80}}]\n"),
            "spec.rules[0].backendRefs[0].name",
            "no Service shop/missing",
        ),
        (
            &format!("{PARENT}  rules:\n  - backendRefs: [{{name: web}}]\n"),
            "spec.rules[0].backendRefs[0].port",
            "needs the Service port",
        ),
        (
            &format!(
                "{PARENT}  rules:\n  - backendRefs: [{{name: web, port: 80, weight: 0}}, {{name: web-v2, port: 80, weight: 0}}]\n"
            ),
            "spec.rules[0].backendRefs",
            "every weight is 0",
        ),
        (
            &format!(
                "{PARENT}  rules:\n  - matches: [{{path: {{type: RegularExpression, value: '/(unclosed'}}}}]\n"
            ),
            "spec.rules[0].matches[0].path.value",
            "not a valid regular expression",
        ),
        (
            &format!("{PARENT}  rules:\n  - matches: [{{path: {{value: api}}}}]\n"),
            "spec.rules[0].matches[0].path.value",
            "starting with '/'",
        ),
        (
            &format!("{PARENT}  rules:\n  - timeouts: {{request: 1s, backendRequest: 2s}}\n"),
            "spec.rules[0].timeouts.backendRequest",
            "longer than timeouts.request",
        ),
        (
            &format!("{PARENT}  rules:\n  - timeouts: {{request: 1.5s}}\n"),
            "spec.rules[0].timeouts.request",
            "is not a duration",
        ),
        (
            &format!("{PARENT}  rules:\n  - matches: [{{method: get}}]\n"),
            "spec.rules[0].matches[0].method",
            "is not one of",
        ),
        (
            &format!(
                "{PARENT}  rules:\n  - filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: web}}}}}}]\n"
            ),
            "spec.rules[0].filters[0].type",
            "not supported",
        ),
        (
            &format!(
                "{PARENT}  rules:\n  - filters: [{{type: RequestRedirect, requestRedirect: {{scheme: https}}}}]\n    backendRefs: [{{name: web, port: 80}}]\n"
            ),
            "spec.rules[0].filters",
            "remove the rule's backendRefs",
        ),
        (
            &format!(
                "{PARENT}  rules:\n  - matches: [{{path: {{type: Exact, value: /a}}}}]\n    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /b}}}}}}]\n"
            ),
            "spec.rules[0].filters[0].path.replacePrefixMatch",
            "exactly one match",
        ),
        (
            &format!("{PARENT}  rules:\n  - filters: [{{type: RequestHeaderModifier}}]\n"),
            "spec.rules[0].filters[0].requestHeaderModifier",
            "is missing",
        ),
        (
            &format!("{PARENT}  rules:\n  - retry: {{codes: [200]}}\n"),
            "spec.rules[0].retry.codes[0]",
            "from 400 to 599",
        ),
        (
            &format!(
                "{PARENT}  rules:\n  - matches: [{{headers: [{{name: a, value: x}}, {{name: A, value: y}}]}}]\n"
            ),
            "spec.rules[0].matches[0].headers[1].name",
            "matched twice",
        ),
    ] {
        let (got_field, message) = refused(&route(spec));
        assert_eq!(got_field, field, "{spec}: {message}");
        assert!(message.contains(says), "{spec}: {message}");
    }
}

#[test]
fn an_envoy_gateway_policy_loads_after_the_api_version_change() {
    let config = load(&policy(
        "  targetRefs: [{group: \"\", kind: Service, name: web}]\n  timeout:\n    tcp: {connectTimeout: 2s}\n    http: {requestTimeout: 5s, connectionIdleTimeout: 60s}\n  retry:\n    numRetries: 2\n    retryOn:\n      triggers: [connect-failure, reset, retriable-status-codes, unavailable, cancelled, deadline-exceeded]\n      httpStatusCodes: [503]\n    perRetry:\n      timeout: 500ms\n      backOff: {baseInterval: 100ms, maxInterval: 1s}\n  circuitBreaker: {maxConnections: 100, maxPendingRequests: 10, maxParallelRequests: 4, maxParallelRetries: 2, maxRequestsPerConnection: 1000}\n  healthCheck:\n    passive: {consecutive5XxErrors: 3, consecutiveGatewayErrors: 0, consecutiveLocalOriginFailures: 5, interval: 2s, baseEjectionTime: 30s, maxEjectionPercent: 50, splitExternalLocalOriginErrors: false}\n  loadBalancer:\n    type: ConsistentHash\n    consistentHash: {type: Header, header: {name: x-user}}\n  rateLimit:\n    type: Local\n    local:\n      rules:\n      - clientSelectors: [{sourceCIDR: {type: Distinct, value: 10.88.0.0/16}}]\n        limit: {requests: 50, unit: Second}\n",
    ))
    .expect("valid");
    let p = &config.backend_traffic_policies["shop/web-policy"];
    assert_eq!(
        p.spec
            .circuit_breaker
            .as_ref()
            .and_then(|c| c.max_parallel_requests),
        Some(4)
    );
}

#[test]
fn policy_mistakes_name_their_field() {
    let web = "  targetRefs: [{group: \"\", kind: Service, name: web}]\n";
    for (spec, field, says) in [
        (
            "  timeout: {tcp: {connectTimeout: 1s}}\n".to_owned(),
            "spec.targetRefs",
            "is empty",
        ),
        (
            "  targetRefs: [{group: \"\", kind: Service, name: nope}]\n".to_owned(),
            "spec.targetRefs[0].name",
            "no Service shop/nope",
        ),
        (
            "  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: eg}]\n"
                .to_owned(),
            "spec.targetRefs[0]",
            "attaches to a Service",
        ),
        (
            format!("{web}  retry: {{retryOn: {{triggers: [retriable-status-codes]}}}}\n"),
            "spec.retry.retryOn.httpStatusCodes",
            "needs the codes",
        ),
        (
            format!("{web}  retry: {{retryOn: {{triggers: [sometimes]}}}}\n"),
            "spec.retry.retryOn.triggers[0]",
            "unknown variant",
        ),
        (
            format!("{web}  loadBalancer: {{type: ConsistentHash}}\n"),
            "spec.loadBalancer.consistentHash",
            "is missing",
        ),
        (
            format!("{web}  rateLimit: {{type: Global}}\n"),
            "spec.rateLimit.type",
            "use type Local",
        ),
        (
            format!(
                "{web}  rateLimit: {{type: Local, local: {{rules: [{{limit: {{requests: 0, unit: Second}}}}]}}}}\n"
            ),
            "spec.rateLimit.local.rules[0].limit.requests",
            "give at least 1",
        ),
        (
            format!("{web}  healthCheck: {{active: {{type: HTTP}}}}\n"),
            "spec.healthCheck.active",
            "not supported",
        ),
        (
            format!("{web}  faultInjection: {{abort: {{httpStatus: 500}}}}\n"),
            "spec.faultInjection",
            "does not implement",
        ),
        (
            format!("{web}  retry: {{budget: {{percent: 150}}}}\n"),
            "spec.retry.budget.percent",
            "percentage",
        ),
        (
            format!("{web}  circuitBreaker: {{maxParalelRequests: 4}}\n"),
            "spec.circuitBreaker",
            "unknown field `maxParalelRequests`",
        ),
    ] {
        let (got_field, message) = refused(&policy(&spec));
        assert!(
            got_field.starts_with(field),
            "{spec}: field {got_field}: {message}"
        );
        assert!(message.contains(says), "{spec}: {message}");
    }
}

#[test]
fn a_rate_limit_belongs_on_a_service_and_one_policy_per_target() {
    let with_route = format!(
        "{}---\n{}",
        route(PARENT),
        policy(
            "  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: web-route}]\n  rateLimit: {type: Local, local: {rules: [{limit: {requests: 1, unit: Second}}]}}\n"
        )
    );
    let (field, message) = refused(&with_route);
    assert_eq!(field, "spec.rateLimit");
    assert!(
        message.contains("attach the rate limit to the Service"),
        "{message}"
    );

    let twice = format!(
        "{}---\n{}",
        policy("  targetRefs: [{group: \"\", kind: Service, name: web}]\n"),
        policy("  targetRefs: [{group: \"\", kind: Service, name: web}]\n")
            .replace("web-policy", "other")
    );
    let (field, message) = refused(&twice);
    assert_eq!(field, "spec.targetRefs[0]");
    assert!(
        message.contains("already has BackendTrafficPolicy"),
        "{message}"
    );
}
