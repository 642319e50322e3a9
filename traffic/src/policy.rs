//! BackendTrafficPolicies resolved into the settings the proxy acts on, with Envoy Gateway's
//! defaults filled in. Two halves: what applies to the endpoints of a backend
//! ([`BackendSettings`]: connections, limits, health, balancing) and what applies to a request
//! ([`RequestSettings`]: timeouts and retries).

use std::{collections::BTreeSet, time::Duration};

use nodemesh_config::{
    BackendTrafficPolicy, ConsistentHashType, HttpRouteRule, LoadBalancerType, RetryTrigger,
};
use serde::Serialize;

/// Envoy's default connect timeout, which Envoy Gateway keeps.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Envoy Gateway's default idle timeout of upstream connections.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Envoy's default circuit breaker thresholds.
pub const DEFAULT_BREAKER_LIMIT: u32 = 1024;
/// Envoy Gateway's default number of retries when a retry policy gives none.
pub const DEFAULT_NUM_RETRIES: u32 = 2;
/// Envoy's default base back-off interval.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);

/// How a backend's endpoints are reached and judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendSettings {
    /// The BackendTrafficPolicy these come from (`namespace/name`); `None` for the defaults.
    pub policy: Option<String>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connection_duration: Option<Duration>,
    pub limits: Limits,
    pub outlier: Option<OutlierSettings>,
    pub balancer: Balancer,
}

/// Envoy's circuit breaker thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_parallel_requests: u32,
    pub max_parallel_retries: u32,
    pub max_requests_per_connection: Option<u32>,
}

/// Outlier detection (passive health checks).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutlierSettings {
    pub split_local_origin: bool,
    pub interval: Duration,
    pub consecutive_local_origin_failures: u32,
    pub consecutive_gateway_errors: u32,
    pub consecutive_5xx: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Balancer {
    /// Power of two choices over peak-EWMA latency times requests in flight.
    LeastRequest,
    RoundRobin,
    Random,
    /// The same key goes to the same endpoint while the endpoint set is the same.
    ConsistentHash(HashKey),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HashKey {
    SourceIp,
    /// Header names, lower case; their values together are the key.
    Headers(Vec<String>),
}

/// Timeouts and retries of one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RequestSettings {
    /// The whole request, retries and back-off included.
    pub request_timeout: Option<Duration>,
    /// Each attempt.
    pub attempt_timeout: Option<Duration>,
    pub retry: Option<RetrySettings>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetrySettings {
    pub num_retries: u32,
    pub triggers: BTreeSet<Trigger>,
    pub status_codes: Vec<u16>,
    pub backoff: Backoff,
    pub budget: BudgetSettings,
}

/// What makes an attempt worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Trigger {
    FiveXx,
    GatewayError,
    Reset,
    ConnectFailure,
    Retriable4xx,
    RefusedStream,
    RetriableStatusCodes,
    GrpcCancelled,
    GrpcDeadlineExceeded,
    GrpcInternal,
    GrpcResourceExhausted,
    GrpcUnavailable,
}

impl From<RetryTrigger> for Trigger {
    fn from(trigger: RetryTrigger) -> Self {
        match trigger {
            RetryTrigger::FiveXx => Trigger::FiveXx,
            RetryTrigger::GatewayError => Trigger::GatewayError,
            RetryTrigger::Reset => Trigger::Reset,
            RetryTrigger::ConnectFailure => Trigger::ConnectFailure,
            RetryTrigger::Retriable4xx => Trigger::Retriable4xx,
            RetryTrigger::RefusedStream => Trigger::RefusedStream,
            RetryTrigger::RetriableStatusCodes => Trigger::RetriableStatusCodes,
            RetryTrigger::Cancelled => Trigger::GrpcCancelled,
            RetryTrigger::DeadlineExceeded => Trigger::GrpcDeadlineExceeded,
            RetryTrigger::Internal => Trigger::GrpcInternal,
            RetryTrigger::ResourceExhausted => Trigger::GrpcResourceExhausted,
            RetryTrigger::Unavailable => Trigger::GrpcUnavailable,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Backoff {
    /// Envoy's: a random wait from 0 to `base × (2^n − 1)`, at most `max`, before retry n.
    Jittered { base: Duration, max: Duration },
    /// Gateway API's `backoff`: the least time between attempts.
    AtLeast(Duration),
}

/// Linkerd's retry budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BudgetSettings {
    pub percent: u32,
    pub min_retries_per_second: u32,
    pub ttl: Duration,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        let budget = nodemesh_config::RetryBudget::default();
        Self {
            percent: budget.percent,
            min_retries_per_second: budget.min_retries_per_second,
            ttl: budget.ttl.get(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_BREAKER_LIMIT,
            max_pending_requests: DEFAULT_BREAKER_LIMIT,
            max_parallel_requests: DEFAULT_BREAKER_LIMIT,
            max_parallel_retries: DEFAULT_BREAKER_LIMIT,
            max_requests_per_connection: None,
        }
    }
}

impl Default for BackendSettings {
    fn default() -> Self {
        Self {
            policy: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connection_duration: None,
            limits: Limits::default(),
            outlier: None,
            balancer: Balancer::LeastRequest,
        }
    }
}

impl BackendSettings {
    /// The endpoint settings a policy gives, over `base` (the defaults, or the backend
    /// Service's policy when this one is attached to a route): each setting the policy gives
    /// replaces the base's.
    pub fn from_policy(policy: &BackendTrafficPolicy, base: &BackendSettings) -> Self {
        let spec = &policy.spec;
        let mut settings = base.clone();
        settings.policy = Some(policy.key());
        if let Some(timeout) = &spec.timeout {
            if let Some(connect) = timeout
                .tcp
                .as_ref()
                .and_then(|t| t.connect_timeout.as_ref())
            {
                settings.connect_timeout = connect.get();
            }
            if let Some(http) = &timeout.http {
                if let Some(idle) = &http.connection_idle_timeout {
                    settings.idle_timeout = idle.get();
                }
                if let Some(max) = &http.max_connection_duration {
                    settings.max_connection_duration = Some(max.get());
                }
            }
        }
        if let Some(breaker) = &spec.circuit_breaker {
            let limits = &mut settings.limits;
            let or = |value: Option<u32>, current: u32| value.unwrap_or(current);
            limits.max_connections = or(breaker.max_connections, limits.max_connections);
            limits.max_pending_requests =
                or(breaker.max_pending_requests, limits.max_pending_requests);
            limits.max_parallel_requests =
                or(breaker.max_parallel_requests, limits.max_parallel_requests);
            limits.max_parallel_retries =
                or(breaker.max_parallel_retries, limits.max_parallel_retries);
            if breaker.max_requests_per_connection.is_some() {
                limits.max_requests_per_connection = breaker.max_requests_per_connection;
            }
        }
        if let Some(passive) = spec.health_check.as_ref().and_then(|h| h.passive.as_ref()) {
            settings.outlier = Some(OutlierSettings {
                split_local_origin: passive.split_external_local_origin_errors.unwrap_or(false),
                interval: passive
                    .interval
                    .as_ref()
                    .map_or(Duration::from_secs(3), nodemesh_config::GoDuration::get),
                consecutive_local_origin_failures: passive
                    .consecutive_local_origin_failures
                    .unwrap_or(5),
                consecutive_gateway_errors: passive.consecutive_gateway_errors.unwrap_or(0),
                consecutive_5xx: passive.consecutive_5xx_errors.unwrap_or(5),
                base_ejection_time: passive
                    .base_ejection_time
                    .as_ref()
                    .map_or(Duration::from_secs(30), nodemesh_config::GoDuration::get),
                max_ejection_percent: passive.max_ejection_percent.unwrap_or(10).clamp(0, 100)
                    as u32,
            });
        }
        if let Some(lb) = &spec.load_balancer {
            settings.balancer = match lb.kind {
                LoadBalancerType::LeastRequest => Balancer::LeastRequest,
                LoadBalancerType::RoundRobin => Balancer::RoundRobin,
                LoadBalancerType::Random => Balancer::Random,
                LoadBalancerType::ConsistentHash => {
                    let hash = lb.consistent_hash.as_ref();
                    match hash.map(|h| h.kind) {
                        Some(ConsistentHashType::Header | ConsistentHashType::Headers) => {
                            let hash = hash.map(|h| {
                                h.header
                                    .iter()
                                    .chain(&h.headers)
                                    .map(|h| h.name.to_ascii_lowercase())
                                    .collect()
                            });
                            Balancer::ConsistentHash(HashKey::Headers(hash.unwrap_or_default()))
                        }
                        _ => Balancer::ConsistentHash(HashKey::SourceIp),
                    }
                }
            };
        }
        settings
    }
}

impl RequestSettings {
    /// The request settings of a BackendTrafficPolicy, over `base`.
    pub fn from_policy(policy: &BackendTrafficPolicy, base: &RequestSettings) -> Self {
        let spec = &policy.spec;
        let mut settings = base.clone();
        if let Some(timeout) = spec
            .timeout
            .as_ref()
            .and_then(|t| t.http.as_ref())
            .and_then(|h| h.request_timeout.as_ref())
        {
            settings.request_timeout = nonzero(timeout.get());
        }
        if let Some(retry) = &spec.retry {
            let on = retry.retry_on.clone().unwrap_or_default();
            let mut triggers: BTreeSet<Trigger> =
                on.triggers.iter().copied().map(Trigger::from).collect();
            if !on.http_status_codes.is_empty() {
                triggers.insert(Trigger::RetriableStatusCodes);
            }
            if retry.retry_on.is_none() {
                // Envoy Gateway's default when retryOn is left out.
                triggers.extend([Trigger::ConnectFailure, Trigger::RefusedStream]);
                triggers.insert(Trigger::GrpcUnavailable);
                triggers.insert(Trigger::GrpcCancelled);
                triggers.insert(Trigger::RetriableStatusCodes);
            }
            let status_codes = if retry.retry_on.is_none() {
                vec![503]
            } else {
                on.http_status_codes.clone()
            };
            let per_retry = retry.per_retry.clone().unwrap_or_default();
            if let Some(timeout) = &per_retry.timeout {
                settings.attempt_timeout = nonzero(timeout.get());
            }
            let base_interval = per_retry
                .back_off
                .as_ref()
                .and_then(|b| b.base_interval.as_ref())
                .map_or(DEFAULT_BACKOFF_BASE, |d| d.get());
            let max_interval = per_retry
                .back_off
                .as_ref()
                .and_then(|b| b.max_interval.as_ref())
                .map_or(base_interval * 10, |d| d.get());
            settings.retry = Some(RetrySettings {
                num_retries: retry.num_retries.unwrap_or(DEFAULT_NUM_RETRIES),
                triggers,
                status_codes,
                backoff: Backoff::Jittered {
                    base: base_interval,
                    max: max_interval,
                },
                budget: retry
                    .budget
                    .as_ref()
                    .map_or_else(BudgetSettings::default, |b| BudgetSettings {
                        percent: b.percent,
                        min_retries_per_second: b.min_retries_per_second,
                        ttl: b.ttl.get(),
                    }),
            });
        }
        settings
    }

    /// The route rule's own `timeouts` and `retry` (Gateway API), over `base`: the route's
    /// author wrote them for this rule, so they win over a policy's.
    pub fn with_rule(mut self, rule: &HttpRouteRule) -> Self {
        if let Some(timeouts) = &rule.timeouts {
            if let Some(request) = &timeouts.request {
                self.request_timeout = nonzero(request.get());
            }
            if let Some(backend) = &timeouts.backend_request {
                self.attempt_timeout = nonzero(backend.get());
            }
        }
        if let Some(retry) = &rule.retry {
            let mut triggers: BTreeSet<Trigger> = [
                Trigger::ConnectFailure,
                Trigger::Reset,
                Trigger::RefusedStream,
            ]
            .into();
            if !retry.codes.is_empty() {
                triggers.insert(Trigger::RetriableStatusCodes);
            }
            let budget = self.retry.as_ref().map(|r| r.budget).unwrap_or_default();
            self.retry = Some(RetrySettings {
                num_retries: retry.attempts.unwrap_or(DEFAULT_NUM_RETRIES),
                triggers,
                status_codes: retry.codes.clone(),
                backoff: match &retry.backoff {
                    Some(backoff) => Backoff::AtLeast(backoff.get()),
                    None => Backoff::Jittered {
                        base: DEFAULT_BACKOFF_BASE,
                        max: DEFAULT_BACKOFF_BASE * 10,
                    },
                },
                budget,
            });
        }
        self
    }
}

fn nonzero(duration: Duration) -> Option<Duration> {
    (!duration.is_zero()).then_some(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: &str) -> BackendTrafficPolicy {
        serde_yaml::from_str(&format!(
            "apiVersion: policy.nodemesh.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata:\n  \
             name: p\n  namespace: shop\nspec:\n  targetRefs: [{{group: \"\", kind: Service, \
             name: web}}]\n{spec}"
        ))
        .expect("policy")
    }

    #[test]
    fn defaults_are_envoy_gateways() {
        let settings = BackendSettings::from_policy(&policy(""), &BackendSettings::default());
        assert_eq!(settings.connect_timeout, Duration::from_secs(10));
        assert_eq!(settings.limits.max_parallel_requests, 1024);
        assert_eq!(
            settings.outlier, None,
            "passive health checks are off unless set"
        );
        assert_eq!(settings.balancer, Balancer::LeastRequest);
        assert_eq!(settings.policy.as_deref(), Some("shop/p"));
        let request = RequestSettings::from_policy(&policy(""), &RequestSettings::default());
        assert_eq!(
            request,
            RequestSettings::default(),
            "no retries unless asked for"
        );
    }

    #[test]
    fn passive_health_defaults_fill_what_is_left_out() {
        let p = policy("  healthCheck:\n    passive:\n      consecutive5XxErrors: 1\n");
        let outlier = BackendSettings::from_policy(&p, &BackendSettings::default())
            .outlier
            .expect("on");
        assert_eq!(outlier.consecutive_5xx, 1);
        assert_eq!(outlier.base_ejection_time, Duration::from_secs(30));
        assert_eq!(outlier.interval, Duration::from_secs(3));
        assert_eq!(outlier.max_ejection_percent, 10);
        assert_eq!(outlier.consecutive_gateway_errors, 0);
    }

    #[test]
    fn retry_with_codes_implies_retriable_status_codes_and_a_default_budget() {
        let p = policy(
            "  retry:\n    numRetries: 3\n    retryOn:\n      httpStatusCodes: [500]\n      \
             triggers: [connect-failure]\n    perRetry:\n      timeout: 250ms\n      backOff:\n        \
             baseInterval: 100ms\n",
        );
        let request = RequestSettings::from_policy(&p, &RequestSettings::default());
        let retry = request.retry.expect("retry");
        assert_eq!(retry.num_retries, 3);
        assert!(retry.triggers.contains(&Trigger::RetriableStatusCodes));
        assert!(retry.triggers.contains(&Trigger::ConnectFailure));
        assert!(!retry.triggers.contains(&Trigger::FiveXx));
        assert_eq!(retry.status_codes, [500]);
        assert_eq!(request.attempt_timeout, Some(Duration::from_millis(250)));
        assert_eq!(
            retry.backoff,
            Backoff::Jittered {
                base: Duration::from_millis(100),
                max: Duration::from_secs(1)
            }
        );
        assert_eq!(retry.budget, BudgetSettings::default());
        assert_eq!(retry.budget.percent, 20);
    }

    #[test]
    fn a_route_rule_wins_over_its_policy() {
        let p = policy("  timeout:\n    http:\n      requestTimeout: 5s\n");
        let rule: HttpRouteRule = serde_yaml::from_str(
            "timeouts: {request: 500ms, backendRequest: 200ms}\nretry: {codes: [503], attempts: 1, backoff: 10ms}\n",
        )
        .expect("rule");
        let request =
            RequestSettings::from_policy(&p, &RequestSettings::default()).with_rule(&rule);
        assert_eq!(request.request_timeout, Some(Duration::from_millis(500)));
        assert_eq!(request.attempt_timeout, Some(Duration::from_millis(200)));
        let retry = request.retry.expect("retry");
        assert_eq!(retry.num_retries, 1);
        assert_eq!(retry.backoff, Backoff::AtLeast(Duration::from_millis(10)));
        assert!(
            retry.triggers.contains(&Trigger::ConnectFailure),
            "Gateway API retries connection errors"
        );
    }

    #[test]
    fn zero_timeouts_disable() {
        let rule: HttpRouteRule = serde_yaml::from_str("timeouts: {request: 0s}\n").expect("rule");
        let base = RequestSettings {
            request_timeout: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        assert_eq!(base.with_rule(&rule).request_timeout, None);
    }
}
