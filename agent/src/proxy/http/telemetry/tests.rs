use std::{convert::Infallible, net::Ipv4Addr};

use prometheus::Registry;
use tower::{Layer as _, ServiceExt as _};

use super::*;
use crate::{
    mesh::Destination,
    proxy::{
        Direction,
        http::{ResponseFlags, local_reply, testing},
    },
    state::ConnectionRecord,
};

fn client_labels() -> Arc<Labels> {
    Arc::new(Labels::of(&ConnectionRecord {
        destination_service: Some("shop/web".into()),
        source_identity: Some("spiffe://cluster.local/ns/shop/sa/client".into()),
        ..ConnectionRecord::example()
    }))
}

/// The outbound reporter of one connection of shop/client.
fn client_reporter() -> Reporter {
    Reporter {
        direction: Direction::Outbound,
        workload: Arc::from("shop/client"),
        peer_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)),
        peer_identity: None,
        labels: client_labels(),
        last: Default::default(),
    }
}

/// The layers below telemetry: answers `reply()`, as if routed to the Service web and
/// balanced to the endpoint `shop/<endpoint(request)>`.
fn routed_to(
    endpoint: fn(&HttpRequest) -> String,
    reply: fn() -> HttpResponse,
) -> testing::TestService {
    let mesh = testing::mesh(1, "");
    let target = Arc::new(testing::web_target(&mesh));
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |req: HttpRequest| {
        let (mesh, target) = (mesh.clone(), target.clone());
        let key = format!("shop/{}", endpoint(&req));
        async move {
            let mut response = reply();
            response.extensions_mut().insert(ChosenEndpoint {
                addr: "10.0.0.1:8080".parse().expect("addr"),
                destination: Some(Arc::new(Destination {
                    key,
                    identity: None,
                })),
            });
            response.extensions_mut().insert(Routed {
                mesh,
                target,
                rule: None,
            });
            Ok::<_, Infallible>(response)
        }
    }))
}

#[tokio::test]
async fn an_outbound_request_is_counted_with_the_endpoint_it_reached_and_its_flags() {
    let registry = Registry::new();
    let istio = IstioMetrics::new(&registry);
    let layer = TelemetryLayer::new(Sinks {
        istio,
        access_log: None,
        tracer: None,
    });
    let inner = routed_to(
        |_| "web-1".to_owned(),
        || {
            local_reply(
                http::StatusCode::GATEWAY_TIMEOUT,
                ResponseFlags::UPSTREAM_TIMEOUT,
                "timeout",
            )
        },
    );
    let mut req = testing::request("/x");
    req.extensions_mut().insert(client_reporter());
    let Ok(response) = layer.layer(inner).oneshot(req).await;
    assert_eq!(response.status(), http::StatusCode::GATEWAY_TIMEOUT);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("exposition");
    let line = text
        .lines()
        .find(|l| l.starts_with("istio_requests_total{"))
        .expect("a request counted");
    for label in [
        "reporter=\"source\"",
        "source_workload=\"client\"",
        "destination_workload=\"web-1\"",
        "destination_service=\"web.shop.svc.cluster.local\"",
        "response_code=\"504\"",
        "response_flags=\"UT\"",
    ] {
        assert!(line.contains(label), "{label} in {line}");
    }
}

#[tokio::test]
async fn requests_of_one_connection_to_different_endpoints_are_counted_under_each() {
    let registry = Registry::new();
    let layer = TelemetryLayer::new(Sinks {
        istio: IstioMetrics::new(&registry),
        access_log: None,
        tracer: None,
    });
    // Each request reaches the endpoint its path names.
    let inner = routed_to(
        |req| req.uri().path().trim_start_matches('/').to_owned(),
        || local_reply(http::StatusCode::OK, ResponseFlags::NONE, "ok"),
    );
    let service = layer.layer(inner);
    let reporter = client_reporter();
    for endpoint in ["web-1", "web-2", "web-1", "web-1"] {
        let mut req = testing::request(&format!("/{endpoint}"));
        req.extensions_mut().insert(reporter.clone());
        let Ok(response) = service.clone().oneshot(req).await;
        assert_eq!(response.status(), http::StatusCode::OK);
    }

    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("exposition");
    let count = |workload: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!("destination_workload=\"{workload}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    assert_eq!(count("web-1"), Some(3));
    assert_eq!(count("web-2"), Some(1));
}
