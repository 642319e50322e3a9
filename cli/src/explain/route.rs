//! `nodemesh explain` for a Service: where the request goes (route rule, backends, weights,
//! settings), what each endpoint's proxy would decide, and, from the source node's agent,
//! each endpoint's health.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, time::Duration};

use nodemesh_config::MeshConfig;
use nodemesh_policy::{HttpAttributes, PathExplanation, Question, explain_path};
use nodemesh_traffic::{
    RequestHead, TrafficTable,
    explain::{BackendExplanation, Decision, RouteExplanation, explain_route},
    policy::{Backoff, Balancer, HashKey},
};
use serde::Serialize;

/// The whole answer for a request to a Service.
#[derive(Debug, Serialize)]
pub struct ServiceExplanation {
    pub route: RouteExplanation,
    pub endpoints: Vec<EndpointVerdict>,
    /// Whether the request would be served: routed to endpoints that all allow it.
    pub allowed: bool,
    /// Whether an agent was asked for endpoint health.
    #[serde(skip)]
    pub agent_asked: bool,
}

#[derive(Debug, Serialize)]
pub struct EndpointVerdict {
    pub backend: String,
    /// `None` for an address an EndpointSlice lists outside the mesh's pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    pub address: String,
    /// From the source node's agent (`/endpoints`); `None` without `--agent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<serde_json::Value>,
    pub authorization: PathExplanation,
}

/// What the source node's agent reports of endpoint health, by backend and address.
pub type Health = BTreeMap<(String, String), serde_json::Value>;

/// Reads an agent's `/endpoints` answer.
pub fn health_from(report: &serde_json::Value) -> Health {
    let mut health = Health::new();
    for backend in report.as_array().into_iter().flatten() {
        let key = backend["backend"].as_str().unwrap_or_default().to_owned();
        for endpoint in backend["endpoints"].as_array().into_iter().flatten() {
            let address = endpoint["address"].as_str().unwrap_or_default().to_owned();
            health.insert((key.clone(), address), endpoint.clone());
        }
    }
    health
}

#[expect(
    clippy::too_many_arguments,
    reason = "the question has that many parts"
)]
pub fn explain(
    mesh: &MeshConfig,
    trust_domain: &str,
    from: Ipv4Addr,
    client_namespace: &str,
    service: &str,
    port: u16,
    http: Option<&HttpAttributes>,
    sni: Option<&str>,
    health: Option<&Health>,
) -> anyhow::Result<ServiceExplanation> {
    let table = TrafficTable::new(mesh);
    let (id, _) = table
        .service(service)
        .ok_or_else(|| anyhow::anyhow!("no Service {service}"))?;
    let default = HttpAttributes {
        method: "GET".to_owned(),
        path: "/".to_owned(),
        ..HttpAttributes::default()
    };
    // Routed on the path as the client's proxy normalises it.
    let normalized = http
        .unwrap_or(&default)
        .normalized(mesh.settings.path_normalization)
        .map_err(|e| {
            anyhow::anyhow!(
                "the proxy answers 400: invalid path {:?}: {e}",
                http.map_or("/", |h| h.path.as_str())
            )
        })?;
    let attributes = &normalized;
    let mut headers = http::HeaderMap::new();
    for (name, value) in &attributes.headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let method: http::Method = attributes
        .method
        .parse()
        .map_err(|_| anyhow::anyhow!("--method {:?} is not an HTTP method", attributes.method))?;
    let request = RequestHead {
        method: &method,
        path: &attributes.path,
        query: attributes.query.as_deref(),
        headers: &headers,
    };
    let route = explain_route(&table, id, port, client_namespace, &request)
        .ok_or_else(|| anyhow::anyhow!("Service {service} has no port {port}"))?;
    // Each endpoint's proxy judges the request as it arrives there (as TCP when the client's
    // proxy does not read HTTP).
    let judged = if route.reads_http { http } else { None };
    let mut endpoints = Vec::new();
    for backend in &route.backends {
        for endpoint in &backend.endpoints {
            let address = format!("{}:{}", endpoint.ip, backend.target_port);
            endpoints.push(EndpointVerdict {
                backend: backend.service.clone(),
                workload: endpoint.workload.clone(),
                health: health.and_then(|h| {
                    h.get(&(backend.state_key.clone(), address.clone()))
                        .cloned()
                }),
                address,
                authorization: explain_path(
                    mesh,
                    trust_domain,
                    Question {
                        source: from,
                        destination: endpoint.ip,
                        port: backend.target_port,
                        http: judged,
                        sni,
                    },
                ),
            });
        }
    }
    let served = !matches!(route.decision, Decision::NoRoute)
        && !endpoints.is_empty()
        && endpoints.iter().all(|e| e.authorization.allowed);
    let redirect = matches!(
        &route.decision,
        Decision::Rule {
            redirect: Some(_),
            ..
        }
    );
    Ok(ServiceExplanation {
        agent_asked: health.is_some(),
        allowed: served || redirect,
        route,
        endpoints,
    })
}

fn duration(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn settings_line(backend: &BackendExplanation) -> String {
    let mut out = String::new();
    let s = &backend.settings;
    let r = &backend.request;
    let policy = s.policy.as_deref().map_or("defaults".to_owned(), |p| {
        format!("BackendTrafficPolicy {p}")
    });
    let _ = write!(
        out,
        "{policy}: connect timeout {}",
        duration(s.connect_timeout)
    );
    if let Some(t) = r.request_timeout {
        let _ = write!(out, ", request timeout {}", duration(t));
    }
    if let Some(t) = r.attempt_timeout {
        let _ = write!(out, ", attempt timeout {}", duration(t));
    }
    match &r.retry {
        Some(retry) => {
            let triggers: Vec<String> = retry.triggers.iter().map(|t| format!("{t:?}")).collect();
            let backoff = match retry.backoff {
                Backoff::Jittered { base, max } => {
                    format!("back-off {}..{}", duration(base), duration(max))
                }
                Backoff::AtLeast(wait) => format!("back-off at least {}", duration(wait)),
            };
            let _ = write!(
                out,
                ", {} retries on {} {:?}, {backoff}, budget {} % + {}/s over {}",
                retry.num_retries,
                triggers.join("/"),
                retry.status_codes,
                retry.budget.percent,
                retry.budget.min_retries_per_second,
                duration(retry.budget.ttl)
            );
        }
        None => out.push_str(", no retries"),
    }
    let balancer = match &s.balancer {
        Balancer::LeastRequest => "least request (P2C, peak EWMA)".to_owned(),
        Balancer::RoundRobin => "round robin".to_owned(),
        Balancer::Random => "random".to_owned(),
        Balancer::ConsistentHash(HashKey::SourceIp) => "consistent hash by source IP".to_owned(),
        Balancer::ConsistentHash(HashKey::Headers(h)) => {
            format!("consistent hash by {}", h.join(", "))
        }
    };
    let l = &s.limits;
    let _ = write!(
        out,
        ", balancer {balancer}, limits {} connections / {} pending / {} requests / {} retries",
        l.max_connections, l.max_pending_requests, l.max_parallel_requests, l.max_parallel_retries
    );
    if let Some(o) = &s.outlier {
        let _ = write!(
            out,
            ", ejection after {} 5xx (base {}, at most {} %)",
            o.consecutive_5xx,
            duration(o.base_ejection_time),
            o.max_ejection_percent
        );
    }
    out
}

pub fn render(e: &ServiceExplanation, what: &str, from: &str) -> String {
    let r = &e.route;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{what} from {from} to Service {} port {}",
        r.service, r.port
    );
    let _ = writeln!(
        out,
        "  the client's proxy reads HTTP: {} ({})",
        if r.reads_http { "yes" } else { "no" },
        r.http_because
    );
    match r.routes_from {
        "none" => {}
        from => {
            let _ = writeln!(out, "  routes ({from}), in precedence order:");
            for c in &r.considered {
                let name = c
                    .rule_name
                    .as_deref()
                    .map_or(String::new(), |n| format!(" ({n})"));
                let _ = writeln!(
                    out,
                    "    HTTPRoute {} rule {}{name} match {} (path {}): {}",
                    c.route,
                    c.rule,
                    c.match_index,
                    c.path,
                    if c.matched { "matches" } else { "no match" }
                );
            }
        }
    }
    match &r.decision {
        Decision::Service => {
            let _ = writeln!(
                out,
                "  decision: no route attaches; the Service's own endpoints"
            );
        }
        Decision::NoRoute => {
            let _ = writeln!(
                out,
                "  decision: 404 (NR): routes attach to the port and none matches"
            );
        }
        Decision::Rule {
            route,
            rule,
            redirect,
        } => {
            let _ = writeln!(out, "  decision: rule {rule} of HTTPRoute {route}");
            if let Some(location) = redirect {
                let _ = writeln!(out, "  answered by the proxy with a redirect to {location}");
            }
        }
    }
    for backend in &r.backends {
        let _ = writeln!(
            out,
            "  backend Service {} port {} -> {}, weight {} ({:.1} %){}",
            backend.service,
            backend.port,
            backend.target_port,
            backend.weight,
            backend.share_percent,
            if backend.missing {
                ": does not exist (500)"
            } else {
                ""
            }
        );
        let _ = writeln!(out, "    {}", settings_line(backend));
        if backend.endpoints.is_empty() {
            let _ = writeln!(out, "    no endpoint: 503 (UH)");
        }
        for endpoint in e.endpoints.iter().filter(|v| v.backend == backend.service) {
            let health = match &endpoint.health {
                Some(h) => match &h["health"] {
                    serde_json::Value::String(state) => state.clone(),
                    other => format!("ejected ({} s left)", other["ejected"]["seconds_left"]),
                },
                None if e.agent_asked => "healthy (no request seen yet)".to_owned(),
                None => {
                    "health unknown (give --agent with the source node's admin address)".to_owned()
                }
            };
            let verdict = if endpoint.authorization.allowed {
                "allowed"
            } else {
                "denied"
            };
            let _ = writeln!(
                out,
                "    endpoint {} {}: {health}; its proxy: {verdict}",
                endpoint.workload.as_deref().unwrap_or("(outside the mesh)"),
                endpoint.address
            );
        }
    }
    let _ = writeln!(
        out,
        "  verdict: {}",
        if e.allowed { "SERVED" } else { "NOT SERVED" }
    );
    out
}
