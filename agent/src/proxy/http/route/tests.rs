use std::sync::Arc;

use http::{StatusCode, header};
use tower::{Layer as _, ServiceExt as _};

use super::*;
use crate::{
    mesh::SharedMesh,
    proxy::http::{
        flags_of,
        testing::{self, Scripted},
    },
};

const PARENT: &str = "  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n";

fn route(spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n{PARENT}{spec}"
    )
}

/// A route layer over `extra` configuration, and the service below it.
fn stack(
    extra: &str,
) -> (
    super::super::filter::Filtered<Route, Scripted>,
    Scripted,
    Addressed,
) {
    let mesh = Arc::new(SharedMesh::default());
    let config = testing::mesh_config(2, extra);
    let view = MeshView::new(&config, "cluster.local");
    let (service, _) = view.traffic.service("shop/web").expect("web");
    mesh.store(view);
    let inner = Scripted::statuses(&[200]);
    let destination = Addressed {
        service,
        port: 80,
        client_namespace: Arc::from("shop"),
    };
    (
        RouteLayer::new(mesh).layer(inner.clone()),
        inner,
        destination,
    )
}

fn request(path: &str, destination: &Addressed) -> HttpRequest {
    let mut req = testing::request(path);
    req.extensions_mut().insert(destination.clone());
    req
}

#[tokio::test]
async fn without_routes_the_request_goes_to_the_service() {
    let (service, inner, destination) = stack("");
    let Ok(response) = service.oneshot(request("/anything", &destination)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(inner.calls(), 1);
    let routed = response.extensions().get::<Routed>().expect("routed");
    assert_eq!(routed.target.service_key, "shop/web");
    assert_eq!(routed.rule, None);
}

#[tokio::test]
async fn no_matching_rule_is_404_nr_and_never_sent() {
    let (service, inner, destination) = stack(&route(
        "  rules:\n  - matches: [{path: {type: PathPrefix, value: /api}}]\n",
    ));
    let Ok(response) = service
        .clone()
        .oneshot(request("/other", &destination))
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(flags_of(&response), ResponseFlags::NO_ROUTE);
    assert_eq!(inner.calls(), 0);
    let Ok(response) = service.oneshot(request("/api/items", &destination)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let routed = response.extensions().get::<Routed>().expect("routed");
    assert_eq!(routed.rule, Some((Arc::from("shop/r"), 0)));
}

#[tokio::test]
async fn filters_edit_the_request_and_the_response() {
    let (service, inner, destination) = stack(&route(
        "  rules:\n  - matches: [{path: {type: PathPrefix, value: /old}}]\n    filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {set: [{name: x-from, value: mesh}], remove: [x-drop]}\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {add: [{name: x-served-by, value: route}]}\n    - type: URLRewrite\n      urlRewrite: {hostname: web.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}\n",
    ));
    let mut req = request("/old/page?q=1", &destination);
    req.headers_mut()
        .insert("x-drop", "yes".parse().expect("value"));
    let Ok(response) = service.oneshot(req).await;
    assert_eq!(response.headers()["x-served-by"], "route");
    let seen = inner.seen.lock().expect("lock");
    let parts = &seen[0];
    assert_eq!(
        parts.uri.path_and_query().map(|p| p.as_str()),
        Some("/new/page?q=1")
    );
    assert_eq!(parts.headers["x-from"], "mesh");
    assert!(!parts.headers.contains_key("x-drop"));
    assert_eq!(parts.headers[header::HOST], "web.internal");
}

#[tokio::test]
async fn a_redirect_is_answered_by_the_proxy() {
    let (service, inner, destination) = stack(&route(
        "  rules:\n  - filters:\n    - type: RequestRedirect\n      requestRedirect: {scheme: https, statusCode: 301}\n",
    ));
    let Ok(response) = service
        .oneshot(request("/login?next=/", &destination))
        .await;
    assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        response.headers()[header::LOCATION],
        "https://web/login?next=/"
    );
    assert_eq!(inner.calls(), 0);
}

#[tokio::test]
async fn the_backend_chosen_by_weight_is_handed_down() {
    let extra = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web-v2, namespace: shop}}\nspec: {{clusterIP: 10.96.0.11, selector: {{app: web}}, ports: [{{port: 80, targetPort: 9090}}]}}\n---\n{}",
        route(
            "  rules:\n  - backendRefs: [{name: web, port: 80, weight: 0}, {name: web-v2, port: 80, weight: 5}]\n"
        )
    );
    let (service, _, destination) = stack(&extra);
    for _ in 0..20 {
        let Ok(response) = service.clone().oneshot(request("/", &destination)).await;
        let routed = response.extensions().get::<Routed>().expect("routed");
        assert_eq!(
            routed.target.service_key, "shop/web-v2",
            "weight 0 gets nothing"
        );
        assert_eq!(routed.target.target_port, 9090);
    }
}
