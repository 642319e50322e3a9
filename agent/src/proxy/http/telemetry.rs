//! Reporting each request: Istio's request metrics with the response flags, a JSON access log
//! line, and (at the destination, with tracing on) a server span. The outbound proxy reports
//! as `source`, with the endpoint the balancer chose as destination; the inbound one as
//! `destination`.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use http::header;

use super::{
    HttpRequest, HttpResponse,
    balance::ChosenEndpoint,
    filter::{FilterLayer, HttpFilter, Inner},
    flags_of,
    route::Routed,
};
use crate::{
    state::unix_millis,
    telemetry::{
        AccessLog, FinishedSpan, IstioMetrics, Labels, RequestLine, RequestLogEntry, Tracer,
    },
};

/// Where reports go.
#[derive(Debug, Clone)]
pub struct Sinks {
    pub istio: IstioMetrics,
    pub access_log: Option<Arc<AccessLog>>,
    pub tracer: Option<Arc<Tracer>>,
}

/// Who a request's reports are about, set per connection.
#[derive(Debug, Clone)]
pub struct Reporter {
    pub direction: crate::proxy::Direction,
    /// `namespace/name` of the workload the proxy serves.
    pub workload: Arc<str>,
    pub peer_ip: IpAddr,
    pub peer_identity: Option<Arc<str>>,
    /// Inbound: the connection's labels. Outbound: the client's side of them; the
    /// destination comes from the endpoint each request reaches.
    pub labels: Arc<Labels>,
    /// Outbound: the labels the connection's last request was counted with.
    pub last: Arc<LastLabels>,
}

/// The outbound labels of a connection's last request, by (destination workload, Service):
/// the next request most often reaches the same, and is counted without building a key.
#[derive(Debug, Default)]
pub struct LastLabels(Mutex<Option<Remembered>>);

/// (destination workload, Service, the labels of the pair).
type Remembered = (Option<String>, Option<String>, Arc<Labels>);

/// (client workload, destination workload, Service).
type LabelKey = (Arc<str>, String, String);

#[derive(Debug, Clone)]
pub struct Telemetry {
    sinks: Arc<Sinks>,
    /// Outbound labels by (destination workload, Service): built once per pair.
    labels: Arc<Mutex<HashMap<LabelKey, Arc<Labels>>>>,
}

pub type TelemetryLayer = FilterLayer<Telemetry>;

impl TelemetryLayer {
    pub fn new(sinks: Sinks) -> Self {
        FilterLayer(Telemetry {
            sinks: Arc::new(sinks),
            labels: Arc::default(),
        })
    }
}

/// The size a message announces (Content-Length or an exact body size), else 0.
fn announced_size<B: hyper::body::Body>(headers: &http::HeaderMap, body: &B) -> u64 {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .or_else(|| body.size_hint().exact())
        .unwrap_or(0)
}

impl HttpFilter for Telemetry {
    async fn filter<S: Inner>(&self, inner: &S, mut req: HttpRequest) -> HttpResponse {
        let layer = self;
        let Some(reporter) = req.extensions_mut().remove::<Reporter>() else {
            return inner.handle(req).await;
        };
        let started = Instant::now();
        let started_at = SystemTime::now();
        let line = RequestLine::of(&req);
        let request_bytes = announced_size(req.headers(), req.body());
        let grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let protocol = if grpc { "grpc" } else { "http" };
        let inbound = reporter.direction == crate::proxy::Direction::Inbound;
        let span = match (&layer.sinks.tracer, inbound) {
            (Some(tracer), true) => tracer.begin(req.headers()),
            _ => None,
        };
        if let Some(span) = &span {
            Tracer::propagate(span, req.headers_mut());
        }
        let traceparent = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let response = inner.handle(req).await;
        let code = response.status().as_u16();
        let flags = flags_of(&response).text();
        let response_bytes = announced_size(response.headers(), response.body());
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        let labels = if inbound {
            reporter.labels.clone()
        } else {
            layer.outbound_labels(&reporter, &response)
        };
        layer.sinks.istio.http_request(
            &labels,
            protocol,
            code,
            &flags,
            duration_ms,
            request_bytes,
            response_bytes,
        );
        if let (Some(context), Some(tracer)) = (span, &layer.sinks.tracer) {
            tracer.finish(FinishedSpan {
                context,
                name: format!("{} {}", line.method(), line.authority()),
                start: started_at,
                end: SystemTime::now(),
                attributes: vec![
                    ("http.request.method", line.method().to_owned()),
                    ("url.path", line.path().to_owned()),
                    ("server.address", line.authority().to_owned()),
                    ("http.response.status_code", code.to_string()),
                    ("network.peer.address", reporter.peer_ip.to_string()),
                    ("source.workload", labels.source_workload().to_owned()),
                    ("source.principal", labels.source_principal().to_owned()),
                    (
                        "destination.workload",
                        labels.destination_workload().to_owned(),
                    ),
                    (
                        "destination.principal",
                        labels.destination_principal().to_owned(),
                    ),
                    ("nodemesh.response_flags", flags.to_string()),
                ],
                error: code >= 500,
            });
        }
        if let Some(log) = &layer.sinks.access_log {
            let endpoint = response.extensions().get::<ChosenEndpoint>();
            log.request(RequestLogEntry {
                direction: reporter.direction.as_str(),
                start_unix_ms: unix_millis(started_at),
                duration_ms,
                workload: reporter.workload,
                client: reporter.peer_ip,
                source_identity: reporter.peer_identity,
                request: line,
                protocol,
                response_code: code,
                response_flags: flags,
                request_bytes,
                response_bytes,
                traceparent,
                upstream: endpoint.map(|e| e.addr),
                route: response
                    .extensions()
                    .get::<Routed>()
                    .and_then(|r| r.rule.clone()),
                destination: (!inbound).then_some(labels),
            });
        }
        response
    }
}

impl Telemetry {
    /// The labels of an outbound request: the client's, and the endpoint's workload and
    /// Service it reached (`unknown` when it reached none).
    fn outbound_labels(&self, reporter: &Reporter, response: &HttpResponse) -> Arc<Labels> {
        let destination = response
            .extensions()
            .get::<ChosenEndpoint>()
            .and_then(|e| e.destination.as_deref());
        let service = response
            .extensions()
            .get::<Routed>()
            .map(|r| r.target.service_key.as_str());
        let workload = destination.map(|d| d.key.as_str());
        let mut last = reporter.last.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((last_workload, last_service, labels)) = last.as_ref()
            && last_workload.as_deref() == workload
            && last_service.as_deref() == service
        {
            return labels.clone();
        }
        let key = (
            reporter.workload.clone(),
            workload.unwrap_or_default().to_owned(),
            service.unwrap_or_default().to_owned(),
        );
        let labels = {
            let mut cache = self.labels.lock().unwrap_or_else(|e| e.into_inner());
            match cache.get(&key) {
                Some(labels) => labels.clone(),
                None => {
                    let labels = Arc::new(
                        reporter.labels.with_destination(
                            workload,
                            destination
                                .and_then(|d| d.identity.as_ref())
                                .map(|id| id.to_string()),
                            service,
                        ),
                    );
                    if cache.len() > 10_000 {
                        cache.clear();
                    }
                    cache.insert(key, labels.clone());
                    labels
                }
            }
        };
        *last = Some((
            workload.map(str::to_owned),
            service.map(str::to_owned),
            labels.clone(),
        ));
        labels
    }
}

#[cfg(test)]
mod tests;
