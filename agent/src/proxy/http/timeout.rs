//! The whole request's timeout (HTTPRoute `timeouts.request`, or BackendTrafficPolicy
//! `timeout.http.requestTimeout`), retries and back-off included: when it passes, the client
//! gets 504 with flag `UT` and the attempt in flight is dropped.

use http::StatusCode;

use super::{
    HttpRequest, HttpResponse, ResponseFlags,
    filter::{FilterLayer, HttpFilter, Inner},
    local_reply,
    route::Routed,
};

#[derive(Debug, Clone, Default)]
pub struct Timeout;

pub type TimeoutLayer = FilterLayer<Timeout>;

impl HttpFilter for Timeout {
    async fn filter<S: Inner>(&self, inner: &S, req: HttpRequest) -> HttpResponse {
        let timeout = req
            .extensions()
            .get::<Routed>()
            .and_then(|r| r.target.request.request_timeout);
        let Some(timeout) = timeout else {
            return inner.handle(req).await;
        };
        match tokio::time::timeout(timeout, inner.handle(req)).await {
            Ok(response) => response,
            Err(_) => local_reply(
                StatusCode::GATEWAY_TIMEOUT,
                ResponseFlags::UPSTREAM_TIMEOUT,
                format!("upstream request timeout: no response within {timeout:?}"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::{Layer as _, ServiceExt as _};

    use super::*;
    use crate::proxy::http::testing::{routed_request, slow_service, with_request_timeout};

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_becomes_504_ut_at_the_timeout() {
        let service = TimeoutLayer::default().layer(slow_service(Duration::from_secs(2)));
        let started = tokio::time::Instant::now();
        let req = routed_request(with_request_timeout(Some(Duration::from_millis(500))));
        let Ok(response) = service.oneshot(req).await;
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            super::super::flags_of(&response),
            ResponseFlags::UPSTREAM_TIMEOUT
        );
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_timeout_the_answer_waits() {
        let service = TimeoutLayer::default().layer(slow_service(Duration::from_secs(2)));
        let Ok(response) = service
            .oneshot(routed_request(with_request_timeout(None)))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
}
