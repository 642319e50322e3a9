//! One concern of the stack as an HTTP filter (Envoy's word): an async function of the request
//! and the rest of the stack. [`FilterLayer`] turns any [`HttpFilter`] into a tower `Layer`,
//! so each concern writes only what it does.

use std::{
    convert::Infallible,
    future::Future,
    task::{Context, Poll},
};

use tower::{Layer, Service};

use super::{HttpRequest, HttpResponse, ResponseFuture};

/// The layers below a filter.
pub trait Inner:
    Service<HttpRequest, Response = HttpResponse, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static
{
}

impl<S> Inner for S where
    S: Service<HttpRequest, Response = HttpResponse, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// What one layer does with a request: answer it, or hand it (changed) to `inner` and look at
/// the answer.
pub trait HttpFilter: Clone + Send + Sync + 'static {
    fn filter<S: Inner>(
        &self,
        inner: S,
        req: HttpRequest,
    ) -> impl Future<Output = HttpResponse> + Send;
}

/// Calls the layers below; they never fail, they answer.
pub async fn forward<S: Inner>(mut inner: S, req: HttpRequest) -> HttpResponse {
    match inner.call(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

#[derive(Debug, Clone, Default)]
pub struct FilterLayer<F>(pub F);

impl<F: HttpFilter, S> Layer<S> for FilterLayer<F> {
    type Service = Filtered<F, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Filtered {
            filter: self.0.clone(),
            inner,
        }
    }
}

/// A filter over the layers below it.
#[derive(Debug, Clone)]
pub struct Filtered<F, S> {
    filter: F,
    inner: S,
}

impl<F: HttpFilter, S: Inner> Service<HttpRequest> for Filtered<F, S> {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Every layer answers each request on its own; none holds requests back.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let filter = self.filter.clone();
        let inner = self.inner.clone();
        Box::pin(async move { Ok(filter.filter(inner, req).await) })
    }
}
