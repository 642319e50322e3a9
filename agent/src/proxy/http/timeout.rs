//! The whole request's timeout (HTTPRoute `timeouts.request`, or BackendTrafficPolicy
//! `timeout.http.requestTimeout`), retries and back-off included: when it passes, the client
//! gets 504 with flag `UT` and the attempt in flight is dropped.

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use http::StatusCode;
use tower::{Layer, Service};

use super::{
    HttpRequest, HttpResponse, ResponseFlags, ResponseFuture, local_reply, respond, route::Routed,
};

#[derive(Debug, Clone, Default)]
pub struct TimeoutLayer;

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
}

impl<S> Service<HttpRequest> for Timeout<S>
where
    S: Service<HttpRequest, Response = HttpResponse, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let timeout = req
            .extensions()
            .get::<Routed>()
            .and_then(|r| r.target.request.request_timeout);
        let mut inner = self.inner.clone();
        respond(async move {
            let Some(timeout) = timeout else {
                let Ok(response) = inner.call(req).await;
                return response;
            };
            match tokio::time::timeout(timeout, inner.call(req)).await {
                Ok(Ok(response)) => response,
                Err(_) => local_reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    ResponseFlags::UPSTREAM_TIMEOUT,
                    format!("upstream request timeout: no response within {timeout:?}"),
                ),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::ServiceExt as _;

    use super::*;
    use crate::proxy::http::testing::{routed_request, slow_service, with_request_timeout};

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_becomes_504_ut_at_the_timeout() {
        let service = TimeoutLayer.layer(slow_service(Duration::from_secs(2)));
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
        let service = TimeoutLayer.layer(slow_service(Duration::from_secs(2)));
        let Ok(response) = service
            .oneshot(routed_request(with_request_timeout(None)))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
}
