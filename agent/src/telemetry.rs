//! What the proxy reports about the traffic it carries: Istio's standard metrics, so that
//! existing dashboards work unchanged, and a JSON access log written off the traffic path.

mod access_log;
mod istio;

pub use self::{
    access_log::{AccessLog, AccessLogTarget, RequestLogEntry},
    istio::{IstioMetrics, Labels},
};
