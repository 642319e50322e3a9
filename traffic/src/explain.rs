//! Where a request to a Service would go, with the reasons: the rules considered in
//! precedence order and whether each matched, the rule that decided, the backends and their
//! shares, and the settings each backend gets. `nodemesh explain` prints it; the proxy
//! routes with the same functions.

use serde::Serialize;

use crate::{
    RequestHead, RouteDecision, TrafficTable,
    policy::{BackendSettings, RequestSettings},
    rules_for,
    table::{BackendTarget, Endpoint, ServiceId},
};

#[derive(Debug, Clone, Serialize)]
pub struct RouteExplanation {
    /// `namespace/name` of the Service addressed.
    pub service: String,
    pub port: u16,
    /// Whether the client's proxy reads HTTP on this port, and why (or why not).
    pub reads_http: bool,
    pub http_because: &'static str,
    /// `producer`, `consumer` (the client's namespace has its own routes), or `none`.
    pub routes_from: &'static str,
    /// Every rule match considered, in precedence order.
    pub considered: Vec<RuleConsidered>,
    pub decision: Decision,
    pub backends: Vec<BackendExplanation>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleConsidered {
    pub route: String,
    pub rule: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_name: Option<String>,
    pub match_index: usize,
    /// The match's path as written.
    pub path: String,
    pub matched: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Decision {
    /// No route attaches: the Service's own endpoints.
    Service,
    /// A rule matched.
    Rule {
        route: String,
        rule: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        redirect: Option<String>,
    },
    /// Routes attach and none matches: 404, flag NR.
    NoRoute,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendExplanation {
    pub service: String,
    pub port: u16,
    pub target_port: u16,
    pub weight: u32,
    /// Share of the rule's requests, in percent.
    pub share_percent: f64,
    /// What the mesh state of this backend is kept under (`/endpoints` on the agent).
    pub state_key: String,
    pub settings: BackendSettings,
    pub request: RequestSettings,
    pub endpoints: Vec<Endpoint>,
    /// The Service does not exist: requests get 500.
    pub missing: bool,
}

fn backend(table: &TrafficTable, target: &BackendTarget, share: f64) -> BackendExplanation {
    let endpoints = target
        .service
        .map(|id| table.services[id].endpoints.clone())
        .unwrap_or_default();
    BackendExplanation {
        service: target.service_key.clone(),
        port: target.port,
        target_port: target.target_port,
        weight: target.weight,
        share_percent: share,
        state_key: target.state_key.clone(),
        settings: (*target.settings).clone(),
        request: (*target.request).clone(),
        endpoints,
        missing: target.service.is_none(),
    }
}

/// Explains a request from a client in `client_namespace` to `service` on `port`. `None` when
/// the Service has no such port.
pub fn explain_route(
    table: &TrafficTable,
    service: ServiceId,
    port: u16,
    client_namespace: &str,
    request: &RequestHead<'_>,
) -> Option<RouteExplanation> {
    let entry = &table.services[service];
    let port_entry = entry.port(port)?;
    let http_because = if port_entry.routes.is_some() {
        "an HTTPRoute attaches to the port"
    } else if port_entry.protocol != nodemesh_config::AppProtocol::Opaque {
        "the port's appProtocol is HTTP"
    } else if port_entry.http_policy {
        "the Service's BackendTrafficPolicy retries or times out requests"
    } else {
        "no route, no HTTP appProtocol and no HTTP policy: the connection is carried as bytes \
         to one endpoint"
    };
    let routes_from = match &port_entry.routes {
        None => "none",
        Some(routes) if routes.consumers.contains_key(client_namespace) => "consumer",
        Some(_) => "producer",
    };
    let considered = rules_for(port_entry, client_namespace)
        .unwrap_or_default()
        .iter()
        .map(|m| RuleConsidered {
            route: m.rule.route.to_string(),
            rule: m.rule.rule_index,
            rule_name: m.rule.name.clone(),
            match_index: m.match_index,
            path: m.condition.path_text.clone(),
            matched: m.condition.matches(request),
        })
        .collect();
    let (decision, backends) = match crate::route(port_entry, client_namespace, request) {
        RouteDecision::Service => (
            Decision::Service,
            vec![backend(table, &port_entry.service_target, 100.0)],
        ),
        RouteDecision::NoRoute => (Decision::NoRoute, Vec::new()),
        RouteDecision::Rule(m) => {
            let rule = &m.rule;
            let redirect = rule.redirect.as_ref().map(|r| {
                let uri = http::Uri::default();
                let host = crate::filters::request_host(&uri, request.headers);
                crate::filters::redirect(
                    r,
                    &crate::filters::RedirectInput {
                        scheme: "http",
                        host,
                        port,
                        path: request.path,
                        query: request.query,
                        matched_prefix: m.condition.prefix(),
                    },
                )
                .location
            });
            let backends = rule
                .shares()
                .into_iter()
                .map(|(target, share)| backend(table, target, share))
                .collect();
            (
                Decision::Rule {
                    route: rule.route.to_string(),
                    rule: rule.rule_index,
                    redirect,
                },
                backends,
            )
        }
    };
    Some(RouteExplanation {
        service: entry.key.clone(),
        port,
        reads_http: port_entry.reads_http(),
        http_because,
        routes_from,
        considered,
        decision,
        backends,
    })
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, Method};

    use super::*;
    use crate::fixtures::{route_yaml, with};

    #[test]
    fn explains_the_rules_considered_and_the_backends_chosen() {
        let config = with(&[&route_yaml(
            "name: api\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /api}}]\n    backendRefs: [{name: web-v1, port: 80, weight: 3}, {name: web-v2, port: 80, weight: 1}]\n  - matches: [{path: {type: Exact, value: /login}}]\n",
        )]);
        let table = TrafficTable::new(&config);
        let (web, _) = table.service("shop/web").expect("web");
        let headers = HeaderMap::new();
        let request = RequestHead {
            method: &Method::GET,
            path: "/api/items",
            query: None,
            headers: &headers,
        };
        let explanation = explain_route(&table, web, 80, "shop", &request).expect("port 80");
        assert!(explanation.reads_http);
        assert_eq!(explanation.routes_from, "producer");
        let order: Vec<(&str, bool)> = explanation
            .considered
            .iter()
            .map(|c| (c.path.as_str(), c.matched))
            .collect();
        assert_eq!(
            order,
            [("/login", false), ("/api", true)],
            "exact before prefix"
        );
        let shares: Vec<(&str, f64)> = explanation
            .backends
            .iter()
            .map(|b| (b.service.as_str(), b.share_percent))
            .collect();
        assert_eq!(shares, [("shop/web-v1", 75.0), ("shop/web-v2", 25.0)]);
        assert_eq!(
            explanation.backends[0].endpoints[0].workload.as_deref(),
            Some("shop/web-1")
        );

        let elsewhere = RequestHead {
            path: "/other",
            ..request
        };
        let none = explain_route(&table, web, 80, "shop", &elsewhere).expect("port 80");
        assert!(matches!(none.decision, Decision::NoRoute));
        assert!(none.backends.is_empty());
        assert!(explain_route(&table, web, 9, "shop", &request).is_none());
        let plain = explain_route(&table, web, 81, "shop", &request).expect("port 81");
        assert!(
            matches!(plain.decision, Decision::Service),
            "port 81 has no route"
        );
    }
}
