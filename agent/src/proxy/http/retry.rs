//! Retries, at the client's node, within a budget. Each attempt has the attempt timeout
//! (`timeouts.backendRequest` or `perRetry.timeout`; 504 `UT` when it passes). An attempt whose
//! outcome the retry settings name is tried again, after the back-off, while retries are left,
//! the budget allows one (Linkerd's: at most `percent` of the original requests over `ttl`,
//! plus `minRetriesPerSecond`), and fewer than `maxParallelRetries` retries are in flight.
//! Request bodies are kept for a retry up to 64 KiB; a larger one is sent once. Retries used
//! up on a failure add flag `URX`.

use std::{sync::Arc, time::Duration};

use http::{Request, StatusCode, request::Parts};
use nodemesh_traffic::retry::{Attempt, backoff, retriable};

use super::{
    HttpRequest, HttpResponse, ResponseFlags, add_flags,
    body::{Buffered, RETRY_BUFFER_LIMIT, buffer},
    filter::{FilterLayer, HttpFilter, Inner},
    local_reply,
    route::Routed,
    state::{ClientState, ClientWorkload, TrafficState},
};

/// Which attempt a request is: 0 for the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptNumber(pub u32);

#[derive(Debug, Clone)]
pub struct Retry {
    state: Arc<TrafficState>,
}

pub type RetryLayer = FilterLayer<Retry>;

impl RetryLayer {
    pub fn new(state: Arc<TrafficState>) -> Self {
        FilterLayer(Retry { state })
    }
}

/// The outcome of a response for retrying: a local failure the layers below recorded, else
/// the status and gRPC status.
pub fn outcome(response: &HttpResponse) -> Attempt {
    if let Some(attempt) = response.extensions().get::<Attempt>() {
        return *attempt;
    }
    Attempt::Answered {
        status: response.status().as_u16(),
        grpc_status: response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse().ok()),
    }
}

fn failed(attempt: Attempt) -> bool {
    !matches!(attempt, Attempt::Answered { status, grpc_status } if status < 500 && grpc_status.is_none_or(|c| c == 0))
}

impl HttpFilter for Retry {
    async fn filter<S: Inner>(&self, inner: &S, req: HttpRequest) -> HttpResponse {
        let state = self.state.clone();
        let Some(routed) = req.extensions().get::<Routed>().cloned() else {
            return attempt(inner, req, None).await;
        };
        let request = routed.target.request.clone();
        let Some(retry) = request.retry.clone() else {
            return attempt(inner, req, request.attempt_timeout).await;
        };
        let client = req
            .extensions()
            .get::<ClientWorkload>()
            .map_or_else(|| Arc::from("-"), |c| c.key.clone());
        let budget = state.client(&client, &routed.target.state_key, retry.budget);
        budget.deposit();
        let (mut parts, body) = req.into_parts();
        // Retries go to endpoints not tried yet, when there are any (Envoy's
        // previous_hosts predicate, which Istio sets by default).
        parts.extensions.insert(super::balance::Tried::default());
        // The circuit breaker below counts in the same state.
        parts.extensions.insert(budget.clone());
        let (data, trailers) = match buffer(body, RETRY_BUFFER_LIMIT).await {
            Buffered::Complete { data, trailers } => (data, trailers),
            Buffered::Streaming(body) => {
                // Too large to keep: sent once.
                let req = Request::from_parts(parts, body);
                return attempt(inner, req, request.attempt_timeout).await;
            }
        };
        let service = routed.target.service_key.as_str();
        let mut held_retry = None;
        let mut n = 0;
        loop {
            let mut req =
                Request::from_parts(copy_parts(&parts), Buffered::replay(&data, &trailers));
            req.extensions_mut().insert(AttemptNumber(n));
            let mut response = attempt(inner, req, request.attempt_timeout).await;
            drop(held_retry.take());
            let result = outcome(&response);
            if !retriable(&retry, result) {
                return response;
            }
            if n >= retry.num_retries {
                if n > 0 && failed(result) {
                    add_flags(&mut response, ResponseFlags::RETRY_LIMIT_EXCEEDED);
                }
                return response;
            }
            if !budget.withdraw() {
                state
                    .metrics
                    .retries
                    .with_label_values(&[service, "budget_exhausted"])
                    .inc();
                return response;
            }
            let limit = routed.target.settings.limits.max_parallel_retries;
            let Some(held) = budget.try_hold(|c: &ClientState| &c.retries, limit) else {
                state
                    .metrics
                    .retries
                    .with_label_values(&[service, "overflow"])
                    .inc();
                state
                    .metrics
                    .overflows
                    .with_label_values(&[service, "max_parallel_retries"])
                    .inc();
                return response;
            };
            held_retry = Some(held);
            state
                .metrics
                .retries
                .with_label_values(&[service, "sent"])
                .inc();
            n += 1;
            let wait = backoff(retry.backoff, n, fastrand::f64());
            if wait > Duration::ZERO {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// One attempt, with its timeout.
async fn attempt<S: Inner>(inner: &S, req: HttpRequest, timeout: Option<Duration>) -> HttpResponse {
    let Some(timeout) = timeout else {
        return inner.handle(req).await;
    };
    match tokio::time::timeout(timeout, inner.handle(req)).await {
        Ok(response) => response,
        Err(_) => {
            let mut response = local_reply(
                StatusCode::GATEWAY_TIMEOUT,
                ResponseFlags::UPSTREAM_TIMEOUT,
                format!("upstream request timeout: the attempt had no response within {timeout:?}"),
            );
            response.extensions_mut().insert(Attempt::Timeout);
            response
        }
    }
}

/// A request head again, extensions included.
fn copy_parts(parts: &Parts) -> Parts {
    let mut copy = Request::new(());
    *copy.method_mut() = parts.method.clone();
    *copy.uri_mut() = parts.uri.clone();
    *copy.version_mut() = parts.version;
    *copy.headers_mut() = parts.headers.clone();
    *copy.extensions_mut() = parts.extensions.clone();
    copy.into_parts().0
}

#[cfg(test)]
mod tests;
