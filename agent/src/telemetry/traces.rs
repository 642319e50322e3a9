//! Tracing: W3C trace context (`traceparent`, `tracestate`) carried through the proxy, one
//! server span per proxied HTTP request, exported in batches over OTLP/HTTP (JSON) to the
//! collector MeshSettings names. Without a collector configured nothing is touched.

use std::{
    sync::RwLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use nodemesh_config::Tracing;
use prometheus::{IntCounter, Registry};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Spans waiting for export before new ones are dropped.
const QUEUE: usize = 4096;
const BATCH: usize = 256;
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The trace a request belongs to and the proxy's span in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The caller's span, when the request came with a trace context.
    pub parent_span_id: Option<[u8; 8]>,
}

impl SpanContext {
    /// The `traceparent` to send on: the proxy's span as the parent of what follows.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-01", hex(&self.trace_id), hex(&self.span_id))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A `traceparent` value: (trace id, parent span id, sampled). Invalid values are `None`.
pub fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], bool)> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let trace_id = unhex::<16>(trace)?;
    let span_id = unhex::<8>(span)?;
    let flags = unhex::<1>(flags)?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((trace_id, span_id, flags & 1 == 1))
}

/// A finished span, for export.
#[derive(Debug)]
pub struct FinishedSpan {
    pub context: SpanContext,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, String)>,
    pub error: bool,
}

#[derive(Debug)]
struct Settings {
    collector: String,
    /// Start a trace when a draw falls below this.
    threshold: u64,
}

#[derive(Debug)]
pub struct Tracer {
    settings: RwLock<Option<Settings>>,
    spans: mpsc::Sender<FinishedSpan>,
    dropped: IntCounter,
}

impl Tracer {
    /// Starts the exporter; tracing stays off until [`configure`](Self::configure) names a
    /// collector.
    pub fn start(node: &str, registry: &Registry) -> std::sync::Arc<Self> {
        let (spans, queue) = mpsc::channel(QUEUE);
        let dropped = IntCounter::new(
            "nodemesh_tracing_spans_dropped_total",
            "Spans dropped: export queue full or the collector unreachable",
        )
        .expect("valid metric");
        registry
            .register(Box::new(dropped.clone()))
            .expect("metric registered once");
        let tracer = std::sync::Arc::new(Self {
            settings: RwLock::new(None),
            spans,
            dropped,
        });
        tokio::spawn(export(tracer.clone(), node.to_owned(), queue));
        tracer
    }

    /// Follows the mesh's tracing settings.
    pub fn configure(&self, tracing: Option<&Tracing>) {
        let settings = tracing.and_then(|t| {
            let collector = t.collector().ok()?.to_owned();
            let share = (t.random_sampling_percentage / 100.0).clamp(0.0, 1.0);
            Some(Settings {
                collector,
                threshold: (share * u64::MAX as f64) as u64,
            })
        });
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = settings;
    }

    fn random(&self) -> u64 {
        fastrand::u64(..)
    }

    fn span_id(&self) -> [u8; 8] {
        loop {
            let id = self.random();
            if id != 0 {
                return id.to_be_bytes();
            }
        }
    }

    /// Whether this request is traced, and its span context. A sampled incoming trace is
    /// continued, an unsampled one left alone, and a request without one starts a trace at
    /// the configured rate.
    pub fn begin(&self, headers: &HeaderMap) -> Option<SpanContext> {
        let settings = self.settings.read().unwrap_or_else(|e| e.into_inner());
        let settings = settings.as_ref()?;
        let incoming = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        match incoming {
            Some((trace_id, parent, true)) => Some(SpanContext {
                trace_id,
                span_id: self.span_id(),
                parent_span_id: Some(parent),
            }),
            Some((_, _, false)) => None,
            None if self.random() < settings.threshold => {
                let mut trace_id = [0u8; 16];
                trace_id[..8].copy_from_slice(&self.span_id());
                trace_id[8..].copy_from_slice(&self.span_id());
                Some(SpanContext {
                    trace_id,
                    span_id: self.span_id(),
                    parent_span_id: None,
                })
            }
            None => None,
        }
    }

    /// Puts the proxy's span into the request's trace context.
    pub fn propagate(context: &SpanContext, headers: &mut HeaderMap) {
        if let Ok(value) = HeaderValue::from_str(&context.traceparent()) {
            headers.insert("traceparent", value);
        }
    }

    pub fn finish(&self, span: FinishedSpan) {
        if self.spans.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn collector(&self) -> Option<String> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| s.collector.clone())
    }
}

fn nanos(time: SystemTime) -> String {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

/// The OTLP/HTTP JSON body for a batch of spans.
pub fn otlp_json(node: &str, spans: &[FinishedSpan]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": hex(&s.context.trace_id),
                "spanId": hex(&s.context.span_id),
                "name": s.name,
                "kind": 2,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": s.attributes.iter().map(|(k, v)| json!({"key": k, "value": {"stringValue": v}})).collect::<Vec<_>>(),
                "status": {"code": if s.error { 2 } else { 1 }},
            });
            if let Some(parent) = s.context.parent_span_id {
                span["parentSpanId"] = json!(hex(&parent));
            }
            span
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": "nodemesh-agent"}},
                {"key": "k8s.node.name", "value": {"stringValue": node}},
            ]},
            "scopeSpans": [{
                "scope": {"name": "nodemesh", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }],
    })
}

async fn export(
    tracer: std::sync::Arc<Tracer>,
    node: String,
    mut queue: mpsc::Receiver<FinishedSpan>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let more = tokio::time::timeout(FLUSH_EVERY, queue.recv()).await;
        match more {
            Ok(Some(span)) => {
                batch.push(span);
                if batch.len() < BATCH {
                    continue;
                }
            }
            Ok(None) => return,
            Err(_) => {}
        }
        if batch.is_empty() {
            continue;
        }
        let Some(collector) = tracer.collector() else {
            batch.clear();
            continue;
        };
        let body = otlp_json(&node, &batch).to_string();
        if let Err(e) = post(&collector, body).await {
            tracer.dropped.inc_by(batch.len() as u64);
            tracing::debug!(%collector, error = %e, "span export failed");
        }
        batch.clear();
    }
}

async fn post(collector: &str, body: String) -> Result<(), String> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(collector)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/traces")
            .header(header::HOST, collector)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("the collector answered {}", response.status()))
        }
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "the collector did not answer within 5 s".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing() {
        let (trace, span, sampled) =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .expect("valid");
        assert_eq!(hex(&trace), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&span), "00f067aa0ba902b7");
        assert!(sampled);
        assert!(
            !parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .expect("valid")
                .2
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[tokio::test]
    async fn continues_sampled_traces_and_starts_new_ones_at_the_rate() {
        let registry = Registry::new();
        let tracer = Tracer::start("n1", &registry);
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(tracer.begin(&headers), None, "off until configured");
        tracer.configure(Some(&Tracing {
            otlp_endpoint: "http://127.0.0.1:4318".into(),
            random_sampling_percentage: 0.0,
        }));
        let child = tracer
            .begin(&headers)
            .expect("a sampled trace is continued");
        assert_eq!(hex(&child.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            child.parent_span_id.map(|p| hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert!(
            child
                .traceparent()
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
        assert_eq!(tracer.begin(&HeaderMap::new()), None, "0 % starts no trace");
        tracer.configure(Some(&Tracing {
            otlp_endpoint: "http://127.0.0.1:4318".into(),
            random_sampling_percentage: 100.0,
        }));
        let fresh = tracer.begin(&HeaderMap::new()).expect("100 % starts one");
        assert_eq!(fresh.parent_span_id, None);
        let body = otlp_json(
            "n1",
            &[FinishedSpan {
                context: fresh,
                name: "GET".into(),
                start: SystemTime::now(),
                end: SystemTime::now(),
                attributes: vec![("http.request.method", "GET".into())],
                error: false,
            }],
        );
        assert_eq!(
            body["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"],
            hex(&fresh.trace_id)
        );
    }
}
