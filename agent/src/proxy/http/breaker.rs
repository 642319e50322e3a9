//! Circuit breaking with Envoy's thresholds, at the client's node: a request over
//! `maxParallelRequests` in flight to its backend is answered 503 at once, with flag `UO`, and
//! never sent. The upstream pools apply `maxConnections` and `maxPendingRequests` with the same
//! client state, which this layer hands down.

use std::sync::Arc;

use http::StatusCode;
use nodemesh_traffic::retry::Attempt;

use super::{
    HttpRequest, HttpResponse, ResponseFlags,
    filter::{FilterLayer, HttpFilter, Inner},
    local_reply,
    route::Routed,
    state::{ClientState, ClientWorkload, TrafficState},
};

#[derive(Debug, Clone)]
pub struct Breaker {
    state: Arc<TrafficState>,
}

pub type BreakerLayer = FilterLayer<Breaker>;

impl BreakerLayer {
    pub fn new(state: Arc<TrafficState>) -> Self {
        FilterLayer(Breaker { state })
    }
}

/// A 503 `UO` for a limit that is full.
pub fn overflow(service: &str, limit: &str, value: u32) -> HttpResponse {
    let mut response = local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlags::UPSTREAM_OVERFLOW,
        format!("upstream overflow: {limit} ({value}) of Service {service} reached"),
    );
    response.extensions_mut().insert(Attempt::Overflow);
    response
}

impl HttpFilter for Breaker {
    async fn filter<S: Inner>(&self, inner: &S, mut req: HttpRequest) -> HttpResponse {
        let state = self.state.clone();
        let Some(routed) = req.extensions().get::<Routed>().cloned() else {
            return inner.handle(req).await;
        };
        let target = &routed.target;
        // The retry layer above looked the client's state up already, when it retries.
        let client_state = match req.extensions().get::<Arc<ClientState>>() {
            Some(client_state) => client_state.clone(),
            None => {
                let client = req
                    .extensions()
                    .get::<ClientWorkload>()
                    .map_or_else(|| Arc::from("-"), |c| c.key.clone());
                let budget = target
                    .request
                    .retry
                    .as_ref()
                    .map(|r| r.budget)
                    .unwrap_or_default();
                state.client(&client, &target.state_key, budget)
            }
        };
        let limit = target.settings.limits.max_parallel_requests;
        let Some(_held) = client_state.try_hold(|c: &ClientState| &c.requests, limit) else {
            state
                .metrics
                .overflows
                .with_label_values(&[&target.service_key, "max_parallel_requests"])
                .inc();
            return overflow(&target.service_key, "maxParallelRequests", limit);
        };
        req.extensions_mut().insert(client_state);
        inner.handle(req).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::{Layer as _, ServiceExt as _};

    use super::*;
    use crate::proxy::http::{flags_of, testing};

    #[tokio::test(start_paused = true)]
    async fn over_max_parallel_requests_is_answered_503_uo_at_once() {
        let state = Arc::new(TrafficState::new(&prometheus::Registry::new()));
        let mut target = testing::target();
        Arc::make_mut(&mut target.settings)
            .limits
            .max_parallel_requests = 4;
        let service =
            BreakerLayer::new(state.clone()).layer(testing::slow_service(Duration::from_secs(1)));
        let started = tokio::time::Instant::now();
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let service = service.clone();
                let req = testing::routed_request(target.clone());
                tokio::spawn(async move {
                    let Ok(response) = service.oneshot(req).await;
                    (
                        response.status(),
                        flags_of(&response),
                        tokio::time::Instant::now(),
                    )
                })
            })
            .collect();
        let mut refused = 0;
        for call in calls {
            let (status, flags, at) = call.await.expect("task");
            if status == StatusCode::SERVICE_UNAVAILABLE {
                refused += 1;
                assert_eq!(flags, ResponseFlags::UPSTREAM_OVERFLOW);
                assert_eq!(at, started, "refused at once, not after waiting");
            } else {
                assert_eq!(at - started, Duration::from_secs(1));
            }
        }
        assert_eq!(refused, 12);
        let overflows = state
            .metrics
            .overflows
            .with_label_values(&["shop/web", "max_parallel_requests"])
            .get();
        assert_eq!(overflows, 12);
    }
}
