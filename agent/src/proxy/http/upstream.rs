//! The bottom of the outbound stack: the request goes to its endpoint on a pooled connection,
//! HTTP/1.1 kept alive or HTTP/2 multiplexed, never one connection per request. Connections
//! are per (client workload, backend, endpoint, protocol); to an endpoint in the mesh they run
//! inside an HBONE tunnel, else over plain TCP from the client's pod.
//!
//! A failure to connect is 503 `UF`, a connection that ends before the response 503 `UC`; both
//! carry the [`Attempt`] for the retry and outlier layers above.

mod connect;
mod pool;

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, StatusCode, Uri, Version, header};
use nodemesh_traffic::retry::Attempt;

pub use self::{
    connect::{ConnectTarget, Connector, MeshConnector, UpstreamIo},
    pool::UpstreamPools,
};
use super::{
    HttpRequest, HttpResponse, ResponseFlags,
    balance::ChosenEndpoint,
    filter::Inner,
    local_reply,
    route::Routed,
    state::{ClientState, ClientWorkload},
};
use crate::proxy::PodContext;

/// Which protocol to speak to the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

/// The protocol chosen for a request: HTTP/2 when the client spoke it or the Service port says
/// h2c or gRPC, else HTTP/1.1.
#[derive(Debug, Clone, Copy)]
pub struct Protocol(pub UpstreamProtocol);

#[derive(Debug, Clone)]
pub struct Upstream {
    pools: Arc<UpstreamPools>,
}

impl Upstream {
    pub fn new(pools: Arc<UpstreamPools>) -> Self {
        Self { pools }
    }
}

impl Inner for Upstream {
    async fn handle(&self, req: HttpRequest) -> HttpResponse {
        let extensions = req.extensions();
        let (Some(backend), Some(endpoint)) = (
            extensions.get::<Routed>().map(|r| r.target.clone()),
            extensions.get::<ChosenEndpoint>().cloned(),
        ) else {
            return local_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                ResponseFlags::NO_HEALTHY_UPSTREAM,
                "the request reached the upstream without an endpoint",
            );
        };
        let protocol = extensions
            .get::<Protocol>()
            .map_or(UpstreamProtocol::Http1, |p| p.0);
        let client = extensions
            .get::<ClientWorkload>()
            .map_or_else(|| Arc::from("-"), |c| c.key.clone());
        let client_state = extensions.get::<Arc<ClientState>>().cloned();
        let pod = extensions.get::<Arc<PodContext>>().cloned();
        let target = ConnectTarget {
            endpoint,
            pod,
            connect_timeout: backend.settings.connect_timeout,
            service: Some(backend.service_key.clone()),
        };
        let req = prepare(req, protocol);
        self.pools
            .send(&client, &backend, target, protocol, client_state, req)
            .await
    }
}

/// Headers that belong to one connection, never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [header::HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the Connection header names; keeps `te:
/// trailers`, which gRPC needs.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| header::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The request as the endpoint's protocol wants it: HTTP/1.1 in origin form with a Host
/// header; HTTP/2 in absolute form, the host as `:authority`.
pub fn prepare(mut req: HttpRequest, protocol: UpstreamProtocol) -> HttpRequest {
    strip_hop_by_hop(req.headers_mut());
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    match protocol {
        UpstreamProtocol::Http1 => {
            if let Ok(uri) = path.parse::<Uri>() {
                *req.uri_mut() = uri;
            }
            if !req.headers().contains_key(header::HOST)
                && let Some(value) = authority.and_then(|a| HeaderValue::from_str(&a).ok())
            {
                req.headers_mut().insert(header::HOST, value);
            }
            *req.version_mut() = Version::HTTP_11;
        }
        UpstreamProtocol::Http2 => {
            let authority = authority.unwrap_or_else(|| "localhost".to_owned());
            if let Ok(uri) = format!("http://{authority}{path}").parse::<Uri>() {
                *req.uri_mut() = uri;
            }
            req.headers_mut().remove(header::HOST);
            *req.version_mut() = Version::HTTP_2;
        }
    }
    req
}

/// The 503 for an endpoint that could not be connected to.
pub fn connect_failed(endpoint: &ChosenEndpoint, error: &dyn std::fmt::Display) -> HttpResponse {
    let mut response = local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlags::UPSTREAM_CONNECT_FAILURE,
        format!("upstream connect error to {}: {error}", endpoint.addr),
    );
    response.extensions_mut().insert(Attempt::ConnectFailure);
    response
}

/// The 503 for a connection that ended before the response.
pub fn reset(endpoint: &ChosenEndpoint, error: &dyn std::fmt::Display) -> HttpResponse {
    let mut response = local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
        format!(
            "upstream connection to {} ended before the response: {error}",
            endpoint.addr
        ),
    );
    response.extensions_mut().insert(Attempt::Reset);
    response
}

#[cfg(test)]
mod tests;
