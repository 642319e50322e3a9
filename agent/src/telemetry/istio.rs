//! Istio's standard metrics with Istio's names and labels. Label values stay bounded: no
//! paths, no ports, no addresses.

mod labels;

use std::sync::{Arc, Mutex};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use self::labels::LabelCache;
pub use self::labels::Labels;
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
    /// The labels of connections by their ends, shared by connections with the same.
    connection_labels: Arc<Mutex<LabelCache>>,
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
            connection_labels: Arc::default(),
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

    /// The labels of a connection whose ends `record` names: those of an earlier connection
    /// with the same ends, or new ones. Shared, so that their metrics are looked up (every
    /// label value hashed) once per pair of ends rather than four times per connection.
    pub fn connection_labels(&self, record: &ConnectionRecord) -> Arc<Labels> {
        self.connection_labels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(record)
    }

    pub fn tcp_opened(&self, labels: &Labels, flags: &str) {
        self.tcp_handles(labels, flags).opened.inc();
    }

    pub fn tcp_closed(&self, labels: &Labels, flags: &str, received: u64, sent: u64) {
        let handles = self.tcp_handles(labels, flags);
        handles.closed.inc();
        handles.received.inc_by(received);
        handles.sent.inc_by(sent);
    }

    /// The TCP metrics of `labels` with `flags`: resolved once per label set for connections
    /// that end well (`-`), looked up for the others.
    fn tcp_handles<'a>(&self, labels: &'a Labels, flags: &str) -> std::borrow::Cow<'a, TcpHandles> {
        let resolve = |flags: &str| {
            let values = labels.tcp(flags);
            TcpHandles {
                opened: self.tcp_opened.with_label_values(&values),
                closed: self.tcp_closed.with_label_values(&values),
                received: self.tcp_received.with_label_values(&values),
                sent: self.tcp_sent.with_label_values(&values),
            }
        };
        if flags == "-" {
            std::borrow::Cow::Borrowed(labels.common_tcp.get_or_init(|| resolve(flags)))
        } else {
            std::borrow::Cow::Owned(resolve(flags))
        }
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

/// The TCP metrics of one label set.
#[derive(Debug, Clone)]
struct TcpHandles {
    opened: IntCounter,
    closed: IntCounter,
    received: IntCounter,
    sent: IntCounter,
}

/// The request metrics of one label set.
#[derive(Debug, Clone)]
struct HttpHandles {
    requests: IntCounter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
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

    /// `istio_tcp_connections_closed_total` and `istio_tcp_received_bytes_total` by response
    /// flags.
    fn closed(registry: &Registry) -> Vec<(String, u64, u64)> {
        let families = registry.gather();
        let values = |name: &str| -> Vec<(String, u64)> {
            let mut values: Vec<(String, u64)> = families
                .iter()
                .filter(|f| f.name() == name)
                .flat_map(|f| f.get_metric())
                .map(|m| {
                    let flags = m
                        .get_label()
                        .iter()
                        .find(|l| l.name() == "response_flags")
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default();
                    (flags, m.get_counter().get_value() as u64)
                })
                .collect();
            values.sort();
            values
        };
        values("istio_tcp_connections_closed_total")
            .into_iter()
            .zip(values("istio_tcp_received_bytes_total"))
            .map(|((flags, closed), (_, received))| (flags, closed, received))
            .collect()
    }

    #[test]
    fn connections_are_counted_under_labels_shared_by_their_ends() {
        let registry = Registry::new();
        let metrics = IstioMetrics::new(&registry);
        let record = ConnectionRecord {
            direction: "inbound",
            workload: "shop/web".into(),
            destination_workload: Some("shop/web".into()),
            security: "mtls",
            ..ConnectionRecord::example()
        };
        for received in [10, 20] {
            let labels = metrics.connection_labels(&record);
            metrics.tcp_opened(&labels, "-");
            metrics.tcp_closed(&labels, "-", received, 1);
        }
        let labels = metrics.connection_labels(&record);
        metrics.tcp_opened(&labels, "UF");
        metrics.tcp_closed(&labels, "UF", 0, 0);

        assert_eq!(
            closed(&registry),
            [("-".to_owned(), 2, 30), ("UF".to_owned(), 1, 0)]
        );
        assert!(
            labels.common_tcp.get().is_some(),
            "the metrics of connections without flags are kept with the shared labels"
        );
    }
}
