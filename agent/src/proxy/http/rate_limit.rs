//! Local rate limits at the destination: every client of a pod takes from the same buckets (or
//! from its own, where a `Distinct` selector says so), so that the limit holds however many
//! clients and nodes call. A refused request gets 429 with `retry-after` and
//! `x-ratelimit-limit`, `-remaining` and `-reset`, flag `RL`.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use http::{HeaderValue, StatusCode};
use nodemesh_traffic::rate_limit::{PodRateLimit, RateLimitRequest, TokenBucket};

use super::{
    HttpRequest, HttpResponse, ResponseFlags,
    filter::{FilterLayer, HttpFilter, Inner},
    local_reply,
    state::TrafficMetrics,
};

/// The rate limits of one pod and their buckets. The buckets outlive configuration changes
/// that leave their rule as it was.
#[derive(Debug, Default)]
pub struct PodRateLimits {
    limits: RwLock<Arc<Vec<PodRateLimit>>>,
    buckets: Mutex<HashMap<(String, usize, String), TokenBucket>>,
}

/// Most buckets kept per pod: `Distinct` selectors make one per client or header value.
const MAX_BUCKETS: usize = 100_000;

/// What a request is judged on: the port it reached and who sent it.
#[derive(Debug, Clone, Copy)]
pub struct Limited {
    pub port: u16,
    pub source: IpAddr,
}

/// The verdict on one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No limit applies.
    Unlimited,
    /// Within every limit; the first matching rule's figures.
    Admitted {
        limit: u32,
        remaining: u32,
        reset: Duration,
    },
    /// Over a limit.
    Refused {
        policy: String,
        limit: u32,
        retry_after: Duration,
    },
}

impl PodRateLimits {
    pub fn set(&self, limits: Vec<PodRateLimit>) {
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(limits);
    }

    pub fn is_empty(&self) -> bool {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Judges a request and takes its tokens: from every applicable bucket, or from none when
    /// one of them is empty.
    pub fn check(&self, port: u16, request: &RateLimitRequest<'_>, now: Instant) -> Verdict {
        let limits = self
            .limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut keys = Vec::new();
        for limit in limits.iter().filter(|l| l.ports.contains(&port)) {
            let policy = &limit.limit.policy;
            let before = keys.len();
            for (index, rule) in limit.limit.rules.iter().enumerate() {
                if rule.selects()
                    && let Some(key) = rule.bucket_key(request)
                {
                    keys.push(((policy.clone(), index, key), rule));
                }
            }
            // Only what no rule selects counts against the rule without selectors.
            if keys.len() == before
                && let Some((index, rule)) = limit
                    .limit
                    .rules
                    .iter()
                    .enumerate()
                    .find(|(_, r)| !r.selects())
            {
                keys.push(((policy.clone(), index, String::new()), rule));
            }
        }
        if keys.is_empty() {
            return Verdict::Unlimited;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > MAX_BUCKETS {
            buckets.clear();
        }
        for (key, rule) in &keys {
            let bucket = buckets
                .entry(key.clone())
                .or_insert_with(|| TokenBucket::new(rule.requests, rule.interval, now));
            if bucket.max() != rule.requests || bucket.interval() != rule.interval {
                *bucket = TokenBucket::new(rule.requests, rule.interval, now);
            }
            if !bucket.has_token(now) {
                let retry_after = bucket
                    .take(now)
                    .err()
                    .map_or(rule.interval, |l| l.retry_after);
                return Verdict::Refused {
                    policy: key.0.clone(),
                    limit: rule.requests,
                    retry_after,
                };
            }
        }
        // The headers show the first matching rule, as Envoy's do.
        let mut first: Option<(u32, u32, Duration)> = None;
        for (key, rule) in &keys {
            if let Some(Ok(admitted)) = buckets.get_mut(key).map(|b| b.take(now))
                && first.is_none()
            {
                first = Some((rule.requests, admitted.remaining, admitted.reset));
            }
        }
        first.map_or(Verdict::Unlimited, |(limit, remaining, reset)| {
            Verdict::Admitted {
                limit,
                remaining,
                reset,
            }
        })
    }
}

/// Whole seconds, rounded up, for headers.
fn seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

fn set(response: &mut HttpResponse, name: &'static str, value: u64) {
    if let Ok(value) = HeaderValue::from_str(&value.to_string()) {
        response.headers_mut().insert(name, value);
    }
}

#[derive(Debug, Clone)]
pub struct RateLimit {
    metrics: TrafficMetrics,
}

pub type RateLimitLayer = FilterLayer<RateLimit>;

impl RateLimitLayer {
    pub fn new(metrics: TrafficMetrics) -> Self {
        FilterLayer(RateLimit { metrics })
    }
}

/// The pod's limits, set per connection with the workload's name for metrics.
#[derive(Debug, Clone)]
pub struct PodLimits {
    pub workload: Arc<str>,
    pub limits: Arc<PodRateLimits>,
}

impl HttpFilter for RateLimit {
    async fn filter<S: Inner>(&self, inner: &S, req: HttpRequest) -> HttpResponse {
        let metrics = self.metrics.clone();
        let extensions = req.extensions();
        let (Some(pod), Some(limited)) = (
            extensions.get::<PodLimits>().cloned(),
            extensions.get::<Limited>().copied(),
        ) else {
            return inner.handle(req).await;
        };
        let verdict = pod.limits.check(
            limited.port,
            &RateLimitRequest {
                source: limited.source,
                method: req.method(),
                path: req.uri().path(),
                headers: req.headers(),
            },
            Instant::now(),
        );
        match verdict {
            Verdict::Unlimited => inner.handle(req).await,
            Verdict::Refused {
                policy,
                limit,
                retry_after,
            } => {
                metrics
                    .rate_limited
                    .with_label_values(&[&*pod.workload, policy.as_str()])
                    .inc();
                let mut response = local_reply(
                    StatusCode::TOO_MANY_REQUESTS,
                    ResponseFlags::RATE_LIMITED,
                    format!("local rate limit of BackendTrafficPolicy {policy} reached"),
                );
                response
                    .headers_mut()
                    .insert("x-envoy-ratelimited", HeaderValue::from_static("true"));
                set(&mut response, "retry-after", seconds(retry_after));
                set(&mut response, "x-ratelimit-limit", u64::from(limit));
                set(&mut response, "x-ratelimit-remaining", 0);
                set(&mut response, "x-ratelimit-reset", seconds(retry_after));
                response
            }
            Verdict::Admitted {
                limit,
                remaining,
                reset,
            } => {
                let mut response = inner.handle(req).await;
                set(&mut response, "x-ratelimit-limit", u64::from(limit));
                set(&mut response, "x-ratelimit-remaining", u64::from(remaining));
                set(&mut response, "x-ratelimit-reset", seconds(reset));
                response
            }
        }
    }
}

#[cfg(test)]
mod tests;
