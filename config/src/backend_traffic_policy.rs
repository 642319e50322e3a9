//! BackendTrafficPolicy (`apiVersion: policy.nodemesh.dev/v1alpha1`) with Envoy Gateway's
//! field names, so that a user's file ports by changing its apiVersion: timeouts, retries (with
//! a retry budget, on by default), circuit breaking, passive health checking (outlier
//! ejection), load balancing and local rate limits for the Service or HTTPRoute its
//! `targetRefs` name (Gateway API policy attachment).
//!
//! Client-side settings act in the client's node proxy; `rateLimit` acts in the destination's
//! node proxy, on the pods the Service selects.

use serde::{Deserialize, Serialize};

use crate::{GatewayDuration, GoDuration, ObjectMeta, meta::Ignored};

mod rate_limit;
mod validate;

pub use self::rate_limit::{
    HeaderMatch, HeaderMatchType, LocalRateLimit, MethodMatch, PathMatch, PathMatchKind, RateLimit,
    RateLimitRule, RateLimitSelectCondition, RateLimitType, RateLimitUnit, RateLimitValue,
    SourceMatch, SourceMatchType, StringMatchType,
};

/// The API group and version of BackendTrafficPolicy.
pub const POLICY_API_VERSION: &str = "policy.nodemesh.dev/v1alpha1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendTrafficPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: BackendTrafficPolicySpec,
    #[serde(default, skip_serializing)]
    pub status: Option<Ignored>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema, kube::CustomResource))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "policy.nodemesh.dev",
        version = "v1alpha1",
        kind = "BackendTrafficPolicy",
        doc = "Envoy Gateway's BackendTrafficPolicy: timeouts, retries within a budget, circuit breaking, outlier ejection, load balancing and local rate limits of the Services it targets.",
        root = "BackendTrafficPolicyResource",
        namespaced,
        status = "crate::ObjectStatus",
        shortname = "btp",
        category = "nodemesh",
        printcolumn(
            name = "Accepted",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
        )
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendTrafficPolicySpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Envoy Gateway's older, single form of `targetRefs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Timeout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Envoy Gateway fields nodemesh does not implement; read so that the refusal names them.
    #[serde(default, skip_serializing)]
    pub fault_injection: Option<Ignored>,
    #[serde(default, skip_serializing)]
    pub tcp_keepalive: Option<Ignored>,
    #[serde(default, skip_serializing)]
    pub proxy_protocol: Option<Ignored>,
    #[serde(default, skip_serializing)]
    pub compression: Option<Ignored>,
    #[serde(default, skip_serializing)]
    pub connection: Option<Ignored>,
    #[serde(default, skip_serializing)]
    pub dns: Option<Ignored>,
    #[serde(default, skip_serializing)]
    pub http2: Option<Ignored>,
    #[serde(default, skip_serializing)]
    pub use_client_protocol: Option<Ignored>,
    #[serde(default, skip_serializing)]
    pub response_override: Option<Ignored>,
}

/// What a policy attaches to: a Service (group `""`) or an HTTPRoute (group
/// `gateway.networking.k8s.io`) in the policy's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// The kinds of object a BackendTrafficPolicy can attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum TargetKind {
    Service,
    HttpRoute,
}

impl PolicyTargetReference {
    pub fn target_kind(&self) -> Option<TargetKind> {
        match (self.group.as_str(), self.kind.as_str()) {
            ("", "Service") => Some(TargetKind::Service),
            ("gateway.networking.k8s.io", "HTTPRoute") => Some(TargetKind::HttpRoute),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeout {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpTimeout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpTimeout>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpTimeout {
    /// Time to establish a connection to an endpoint (10s when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<GatewayDuration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpTimeout {
    /// The whole request, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<GatewayDuration>,
    /// How long an upstream connection may stay unused before it is closed (1h when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_idle_timeout: Option<GatewayDuration>,
    /// The longest an upstream connection is kept, busy or not (unlimited when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<GatewayDuration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// Retries of one request (2 when unset, as Envoy Gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<RetryOn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_retry: Option<PerRetryPolicy>,
    /// nodemesh's addition: how many retries the client may add to its requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryOn {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<RetryTrigger>,
    /// Codes retried with the `retriable-status-codes` trigger (implied when codes are given).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_status_codes: Vec<u16>,
}

/// Envoy Gateway's retry triggers (Envoy's `retry_on` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum RetryTrigger {
    /// Any 5xx answer, or no answer at all (connect failure, reset, timeout).
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503, 504, or no answer at all.
    GatewayError,
    /// The connection was reset, or closed, before a response.
    Reset,
    /// The endpoint could not be connected to (refused, unreachable, timed out).
    ConnectFailure,
    /// 409.
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    /// The upstream refused the HTTP/2 stream (REFUSED_STREAM).
    RefusedStream,
    /// A code from `httpStatusCodes`.
    RetriableStatusCodes,
    /// gRPC status CANCELLED.
    Cancelled,
    /// gRPC status DEADLINE_EXCEEDED.
    DeadlineExceeded,
    /// gRPC status INTERNAL.
    Internal,
    /// gRPC status RESOURCE_EXHAUSTED.
    ResourceExhausted,
    /// gRPC status UNAVAILABLE.
    Unavailable,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PerRetryPolicy {
    /// Each attempt, the first included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<GatewayDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_off: Option<BackOffPolicy>,
}

/// Exponential back-off with full jitter between `baseInterval` and `maxInterval` (ten times
/// the base when unset), as Envoy's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackOffPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_interval: Option<GatewayDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<GatewayDuration>,
}

/// Linkerd's retry budget: over a window of `ttl`, retries may add at most `percent` of the
/// original requests, plus `minRetriesPerSecond`. On by default with 20 %, 10/s, 10s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    #[serde(default = "budget_percent")]
    pub percent: u32,
    #[serde(default = "budget_min_per_second")]
    pub min_retries_per_second: u32,
    #[serde(default = "budget_ttl")]
    pub ttl: GatewayDuration,
}

fn budget_percent() -> u32 {
    20
}

fn budget_min_per_second() -> u32 {
    10
}

fn budget_ttl() -> GatewayDuration {
    GatewayDuration::from(std::time::Duration::from_secs(10))
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: budget_percent(),
            min_retries_per_second: budget_min_per_second(),
            ttl: budget_ttl(),
        }
    }
}

/// Envoy's circuit breaker thresholds: what is over a limit is answered 503 at once (flag UO).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Connections to all endpoints of the backend (1024 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection (1024 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight (1024 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel_requests: Option<u32>,
    /// Retries in flight (1024 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel_retries: Option<u32>,
    /// Requests one upstream connection carries before it is replaced (unlimited when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive: Option<PassiveHealthCheck>,
    /// Not supported; read so that the refusal says so.
    #[serde(default, skip_serializing)]
    pub active: Option<Ignored>,
}

/// Envoy's outlier detection, with Envoy Gateway's names and defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PassiveHealthCheck {
    /// Count connect failures, resets and timeouts apart from answers (false when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_external_local_origin_errors: Option<bool>,
    /// How often ejections are reviewed (3s when unset). Go's duration format, as
    /// Envoy Gateway's `metav1.Duration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<GoDuration>,
    /// With split errors: local failures in a row that eject (5 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_local_origin_failures: Option<u32>,
    /// 502, 503, 504 (and local failures unless split) in a row that eject (0, off, when
    /// unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// 5xx answers (and local failures unless split) in a row that eject (5 when unset).
    #[serde(
        rename = "consecutive5XxErrors",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_5xx_errors: Option<u32>,
    /// An ejection lasts this times the number of times the endpoint was ejected (30s when
    /// unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<GoDuration>,
    /// The most endpoints of the backend that may be ejected at once, in percent (10 when
    /// unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    #[serde(rename = "type")]
    pub kind: LoadBalancerType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
    #[serde(default, skip_serializing)]
    pub slow_start: Option<Ignored>,
    #[serde(default, skip_serializing)]
    pub zone_aware: Option<Ignored>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum LoadBalancerType {
    /// Power of two choices over peak-EWMA latency and requests in flight.
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    ConsistentHash,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    #[serde(rename = "type")]
    pub kind: ConsistentHashType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HashHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HashHeader>,
    #[serde(default, skip_serializing)]
    pub cookie: Option<Ignored>,
    /// Accepted for compatibility; nodemesh hashes by rendezvous, which needs no table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum ConsistentHashType {
    #[serde(rename = "SourceIP")]
    SourceIp,
    Header,
    Headers,
    Cookie,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashHeader {
    pub name: String,
}

impl BackendTrafficPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }

    /// Every target, from `targetRefs` and the older `targetRef`.
    pub fn targets(&self) -> impl Iterator<Item = &PolicyTargetReference> {
        self.spec
            .target_refs
            .iter()
            .chain(self.spec.target_ref.as_ref())
    }
}
