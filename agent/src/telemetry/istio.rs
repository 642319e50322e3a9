//! Istio's standard metrics with Istio's names and labels. Label values stay bounded: no
//! paths, no ports, no addresses.

use std::sync::OnceLock;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use crate::state::ConnectionRecord;

const TCP_LABELS: [&str; 11] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

const HTTP_LABELS: [&str; 12] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
];

#[derive(Debug, Clone)]
pub struct IstioMetrics {
    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
    tcp_sent: IntCounterVec,
    tcp_received: IntCounterVec,
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets),
        &HTTP_LABELS,
    )
    .expect("valid metric")
}

impl IstioMetrics {
    pub fn new(registry: &Registry) -> Self {
        let bytes_buckets = prometheus::exponential_buckets(1.0, 10.0, 8).expect("valid buckets");
        let metrics = Self {
            tcp_opened: counter(
                "istio_tcp_connections_opened_total",
                "TCP connections opened",
                &TCP_LABELS,
            ),
            tcp_closed: counter(
                "istio_tcp_connections_closed_total",
                "TCP connections closed",
                &TCP_LABELS,
            ),
            tcp_sent: counter(
                "istio_tcp_sent_bytes_total",
                "Bytes sent back to the client on TCP connections",
                &TCP_LABELS,
            ),
            tcp_received: counter(
                "istio_tcp_received_bytes_total",
                "Bytes received from the client on TCP connections",
                &TCP_LABELS,
            ),
            requests: counter("istio_requests_total", "HTTP requests", &HTTP_LABELS),
            duration: histogram(
                "istio_request_duration_milliseconds",
                "HTTP request duration, until the response headers",
                vec![
                    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                    10000.0,
                ],
            ),
            request_bytes: histogram(
                "istio_request_bytes",
                "HTTP request sizes",
                bytes_buckets.clone(),
            ),
            response_bytes: histogram("istio_response_bytes", "HTTP response sizes", bytes_buckets),
        };
        for collector in [
            Box::new(metrics.tcp_opened.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.tcp_closed.clone()),
            Box::new(metrics.tcp_sent.clone()),
            Box::new(metrics.tcp_received.clone()),
            Box::new(metrics.requests.clone()),
            Box::new(metrics.duration.clone()),
            Box::new(metrics.request_bytes.clone()),
            Box::new(metrics.response_bytes.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric registered once");
        }
        metrics
    }

    pub fn tcp_opened(&self, labels: &Labels, flags: &str) {
        self.tcp_opened.with_label_values(&labels.tcp(flags)).inc();
    }

    pub fn tcp_closed(&self, labels: &Labels, flags: &str, received: u64, sent: u64) {
        let values = labels.tcp(flags);
        self.tcp_closed.with_label_values(&values).inc();
        self.tcp_received
            .with_label_values(&values)
            .inc_by(received);
        self.tcp_sent.with_label_values(&values).inc_by(sent);
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one value per Istio label and measurement"
    )]
    pub fn http_request(
        &self,
        labels: &Labels,
        protocol: &str,
        code: u16,
        flags: &str,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let looked_up;
        let handles = if (protocol, code, flags) == COMMON_REQUEST {
            labels
                .common_request
                .get_or_init(|| self.http_handles(labels, COMMON_REQUEST))
        } else {
            looked_up = self.http_handles(labels, (protocol, code, flags));
            &looked_up
        };
        handles.requests.inc();
        handles.duration.observe(duration_ms);
        handles.request_bytes.observe(request_bytes as f64);
        handles.response_bytes.observe(response_bytes as f64);
    }

    /// The request metrics of one label set, looked up (hashing every label value) once.
    fn http_handles(&self, labels: &Labels, (protocol, code, flags): RequestKind) -> HttpHandles {
        let code = code.to_string();
        let values = labels.http(protocol, &code, flags);
        HttpHandles {
            requests: self.requests.with_label_values(&values),
            duration: self.duration.with_label_values(&values),
            request_bytes: self.request_bytes.with_label_values(&values),
            response_bytes: self.response_bytes.with_label_values(&values),
        }
    }
}

/// (protocol, response code, response flags) of a request.
type RequestKind<'a> = (&'a str, u16, &'a str);

/// What nearly every request is: its metrics are resolved once per label set.
const COMMON_REQUEST: RequestKind<'static> = ("http", 200, "-");

/// The request metrics of one label set.
#[derive(Debug, Clone)]
struct HttpHandles {
    requests: IntCounter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// The label values of one connection, as its reporter sees it.
#[derive(Debug)]
pub struct Labels {
    reporter: &'static str,
    source_workload: String,
    source_namespace: String,
    source_principal: String,
    destination_workload: String,
    destination_namespace: String,
    destination_principal: String,
    destination_service: String,
    security: &'static str,
    /// The request metrics of these labels for [`COMMON_REQUEST`], once one was counted.
    common_request: OnceLock<HttpHandles>,
}

impl Clone for Labels {
    /// The same label values; metrics resolved for them are not carried over, as a clone is
    /// made to change some.
    fn clone(&self) -> Self {
        Self {
            reporter: self.reporter,
            source_workload: self.source_workload.clone(),
            source_namespace: self.source_namespace.clone(),
            source_principal: self.source_principal.clone(),
            destination_workload: self.destination_workload.clone(),
            destination_namespace: self.destination_namespace.clone(),
            destination_principal: self.destination_principal.clone(),
            destination_service: self.destination_service.clone(),
            security: self.security,
            common_request: OnceLock::new(),
        }
    }
}

/// A Service's host name as Istio labels it, from its `namespace/name`.
fn service_host(key: &str) -> String {
    match key.split_once('/') {
        Some((ns, name)) => format!("{name}.{ns}.svc.cluster.local"),
        None => "unknown".to_owned(),
    }
}

/// `namespace/name` split into (name, namespace), `unknown` when absent.
fn workload(key: Option<&str>) -> (String, String) {
    match key.and_then(|k| k.split_once('/')) {
        Some((namespace, name)) => (name.to_owned(), namespace.to_owned()),
        None => ("unknown".to_owned(), "unknown".to_owned()),
    }
}

impl Labels {
    /// The labels of a connection from its record. The outbound proxy reports as `source`,
    /// the inbound one as `destination`.
    pub fn of(record: &ConnectionRecord) -> Self {
        let (source_workload, source_namespace) = workload(record.source_workload.as_deref());
        let (destination_workload, destination_namespace) =
            workload(record.destination_workload.as_deref());
        let destination_service = record
            .destination_service
            .as_deref()
            .map_or_else(|| "unknown".to_owned(), service_host);
        let principal = |id: &Option<String>| id.clone().unwrap_or_else(|| "unknown".to_owned());
        Self {
            reporter: if record.direction == "outbound" {
                "source"
            } else {
                "destination"
            },
            source_workload,
            source_namespace,
            source_principal: principal(&record.source_identity),
            destination_workload,
            destination_namespace,
            destination_principal: principal(&record.destination_identity),
            destination_service,
            security: if record.security == "mtls" {
                "mutual_tls"
            } else {
                "none"
            },
            common_request: OnceLock::new(),
        }
    }

    /// The labels of an outbound request: these (the client's side) with the destination the
    /// request reached.
    pub fn with_destination(
        &self,
        workload: Option<&str>,
        principal: Option<String>,
        service: Option<&str>,
    ) -> Self {
        let (destination_workload, destination_namespace) = self::workload(workload);
        Self {
            destination_workload,
            destination_namespace,
            security: if principal.is_some() {
                "mutual_tls"
            } else {
                "none"
            },
            destination_principal: principal.unwrap_or_else(|| "unknown".to_owned()),
            destination_service: service.map_or_else(|| "unknown".to_owned(), service_host),
            ..self.clone()
        }
    }

    pub fn destination_service(&self) -> &str {
        &self.destination_service
    }

    pub fn source_workload(&self) -> &str {
        &self.source_workload
    }

    pub fn source_principal(&self) -> &str {
        &self.source_principal
    }

    pub fn destination_workload(&self) -> &str {
        &self.destination_workload
    }

    pub fn destination_principal(&self) -> &str {
        &self.destination_principal
    }

    fn tcp<'a>(&'a self, flags: &'a str) -> [&'a str; 11] {
        [
            self.reporter,
            &self.source_workload,
            &self.source_namespace,
            &self.source_principal,
            &self.destination_workload,
            &self.destination_namespace,
            &self.destination_principal,
            &self.destination_service,
            "tcp",
            flags,
            self.security,
        ]
    }

    fn http<'a>(&'a self, protocol: &'a str, code: &'a str, flags: &'a str) -> [&'a str; 12] {
        [
            self.reporter,
            &self.source_workload,
            &self.source_namespace,
            &self.source_principal,
            &self.destination_workload,
            &self.destination_namespace,
            &self.destination_principal,
            &self.destination_service,
            protocol,
            code,
            flags,
            self.security,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Labels {
        Labels::of(&ConnectionRecord {
            direction: "inbound",
            workload: "shop/web".into(),
            original_dst: "10.0.0.1:8080".parse().expect("addr"),
            destination_workload: Some("shop/web".into()),
            security: "mtls",
            ..ConnectionRecord::example()
        })
    }

    /// `istio_requests_total` by (response code, destination workload).
    fn counted(registry: &Registry) -> Vec<(String, String, u64)> {
        let mut rows = Vec::new();
        for family in registry.gather() {
            if family.name() != "istio_requests_total" {
                continue;
            }
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                let value = metric.get_counter().get_value() as u64;
                rows.push((label("response_code"), label("destination_workload"), value));
            }
        }
        rows.sort();
        rows
    }

    #[test]
    fn requests_are_counted_under_their_own_labels_with_handles_resolved_once() {
        let registry = Registry::new();
        let metrics = IstioMetrics::new(&registry);
        let labels = labels();

        metrics.http_request(&labels, "http", 200, "-", 1.0, 10, 20);
        metrics.http_request(&labels, "http", 200, "-", 1.0, 10, 20);
        metrics.http_request(&labels, "http", 503, "UF", 1.0, 10, 0);
        let other = labels.with_destination(Some("shop/db"), None, None);
        metrics.http_request(&other, "http", 200, "-", 1.0, 10, 20);

        assert_eq!(
            counted(&registry),
            [
                ("200".to_owned(), "db".to_owned(), 1),
                ("200".to_owned(), "web".to_owned(), 2),
                ("503".to_owned(), "web".to_owned(), 1),
            ]
        );
        assert!(
            labels.common_request.get().is_some(),
            "the common label set is kept"
        );
    }
}
