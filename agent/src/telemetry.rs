//! What the proxy reports about the traffic it carries: Istio's standard metrics, so that
//! existing dashboards work unchanged, a JSON access log written off the traffic path, and
//! traces exported over OTLP.

mod access_log;
mod istio;
mod traces;

pub use self::{
    access_log::{AccessLog, AccessLogTarget, RequestLine, RequestLogEntry},
    istio::{IstioMetrics, Labels},
    traces::{FinishedSpan, Tracer},
};
