//! Routing, at the client's node: the HTTPRoute rule a request gets (or the Service itself
//! when no route attaches), the backend by weight, and the rule's filters. A request no rule
//! matches gets 404 (`NR`); a redirect is answered here; a backend that names no Service gets
//! 500.

use std::sync::Arc;

use http::{HeaderValue, StatusCode, Uri, header};
use nodemesh_traffic::{
    BackendTarget, RequestHead, RouteDecision,
    filters::{self, RedirectInput},
};

use super::{
    HttpRequest, HttpResponse, ResponseFlags,
    filter::{FilterLayer, HttpFilter, Inner},
    local_reply,
};
use crate::mesh::MeshView;

/// What routing decided, for the layers below and for telemetry.
#[derive(Debug, Clone)]
pub struct Routed {
    pub mesh: Arc<MeshView>,
    pub target: Arc<BackendTarget>,
    /// `namespace/name` of the route and the rule's index, when a route decided.
    pub rule: Option<(Arc<str>, usize)>,
}

/// Where the client sent the request: a Service port, from a workload of `client_namespace`.
#[derive(Debug, Clone)]
pub struct Addressed {
    pub service: nodemesh_traffic::ServiceId,
    pub port: u16,
    pub client_namespace: Arc<str>,
}

#[derive(Debug, Clone)]
pub struct Route {
    mesh: Arc<crate::mesh::SharedMesh>,
}

pub type RouteLayer = FilterLayer<Route>;

impl RouteLayer {
    pub fn new(mesh: Arc<crate::mesh::SharedMesh>) -> Self {
        FilterLayer(Route { mesh })
    }
}

impl HttpFilter for Route {
    async fn filter<S: Inner>(&self, inner: &S, mut req: HttpRequest) -> HttpResponse {
        // The mesh as it is now: a weight change applies to the next request.
        let mesh = self.mesh.load();
        let Some(destination) = req.extensions_mut().remove::<Addressed>() else {
            return local_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                ResponseFlags::NO_ROUTE,
                "the request reached routing without a destination",
            );
        };
        let plan = match plan(&mesh, &destination, &mut req) {
            Ok(plan) => plan,
            Err(reply) => return *reply,
        };
        let Plan {
            target,
            rule,
            response_headers,
        } = plan;
        let routed = Routed {
            mesh: mesh.clone(),
            target,
            rule,
        };
        req.extensions_mut().insert(routed.clone());
        let mut response = inner.handle(req).await;
        if let Some(edit) = response_headers {
            edit.apply(response.headers_mut());
        }
        // For telemetry: which Service the request went to.
        response.extensions_mut().insert(routed);
        response
    }
}

struct Plan {
    target: Arc<BackendTarget>,
    rule: Option<(Arc<str>, usize)>,
    response_headers: Option<nodemesh_traffic::filters::HeaderEdit>,
}

/// Decides the request's backend and applies the rule's request filters; `Err` is the answer
/// when routing answers itself.
fn plan(
    mesh: &MeshView,
    destination: &Addressed,
    req: &mut HttpRequest,
) -> Result<Plan, Box<HttpResponse>> {
    let service = &mesh.traffic.services[destination.service];
    let Some(port) = service.port(destination.port) else {
        return Err(Box::new(local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlags::NO_HEALTHY_UPSTREAM,
            format!("Service {} has no port {}", service.key, destination.port),
        )));
    };
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let head = RequestHead {
        method: req.method(),
        path: &path,
        query: query.as_deref(),
        headers: req.headers(),
    };
    let matched = match nodemesh_traffic::route(port, &destination.client_namespace, &head) {
        RouteDecision::Service => {
            return Ok(Plan {
                target: port.service_target.clone(),
                rule: None,
                response_headers: None,
            });
        }
        RouteDecision::NoRoute => {
            return Err(Box::new(local_reply(
                StatusCode::NOT_FOUND,
                ResponseFlags::NO_ROUTE,
                format!(
                    "no HTTPRoute rule for {} {path} matches on Service {} port {}",
                    req.method(),
                    service.key,
                    port.port
                ),
            )));
        }
        RouteDecision::Rule(matched) => matched,
    };
    let rule = &matched.rule;
    let prefix = matched.condition.prefix();
    if let Some(redirect) = &rule.redirect {
        let host = filters::request_host(req.uri(), req.headers()).to_owned();
        let to = filters::redirect(
            redirect,
            &RedirectInput {
                scheme: req.uri().scheme_str().unwrap_or("http"),
                host: &host,
                port: port.port,
                path: &path,
                query: query.as_deref(),
                matched_prefix: prefix,
            },
        );
        let mut response = local_reply(to.status, ResponseFlags::NONE, "");
        if let Ok(location) = HeaderValue::from_str(&to.location) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        return Err(Box::new(response));
    }
    if let Some(edit) = &rule.request_headers {
        edit.apply(req.headers_mut());
    }
    if let Some(rewrite) = &rule.rewrite {
        let (new_path, host) = filters::rewrite(rewrite, &path, query.as_deref(), prefix);
        if let Some(new_path) = new_path {
            set_path(req, &new_path);
        }
        if let Some(host) = host
            && let Ok(value) = HeaderValue::from_str(&host)
        {
            req.headers_mut().insert(header::HOST, value);
            set_authority(req, &host);
        }
    }
    let Some(target) = rule.pick_backend(fastrand::u64(..)) else {
        return Err(Box::new(local_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            ResponseFlags::NO_ROUTE,
            format!(
                "rule {} of HTTPRoute {} has no backend to send to",
                rule.rule_index, rule.route
            ),
        )));
    };
    let target = target.clone();
    if target.service.is_none() {
        return Err(Box::new(local_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            ResponseFlags::NO_HEALTHY_UPSTREAM,
            format!("backend Service {} does not exist", target.service_key),
        )));
    }
    Ok(Plan {
        target,
        rule: Some((rule.route.clone(), rule.rule_index)),
        response_headers: rule.response_headers.clone(),
    })
}

/// Replaces the request's `path?query`, keeping scheme and authority.
fn set_path(req: &mut HttpRequest, path_and_query: &str) {
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// Replaces the request's authority when its URI carries one (HTTP/2).
fn set_authority(req: &mut HttpRequest, host: &str) {
    if req.uri().authority().is_none() {
        return;
    }
    let mut parts = req.uri().clone().into_parts();
    parts.authority = host.parse().ok();
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

#[cfg(test)]
mod tests;
