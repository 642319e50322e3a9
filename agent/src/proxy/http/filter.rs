//! One concern of the stack as an HTTP filter (Envoy's word): an async function of the request
//! and the rest of the stack. [`FilterLayer`] turns any [`HttpFilter`] into a tower `Layer`,
//! so each concern writes only what it does.
//!
//! A request goes down the stack by reference: each layer borrows the layers below it for the
//! time of the request ([`Inner::handle`]), so a request costs no clone of the stack and no
//! boxed future per layer. The stack is shared once, at its top ([`Stack`]).

use std::{future::Future, sync::Arc};

use tower::Layer;

use super::{HttpRequest, HttpResponse, ResponseFuture};

/// The layers below a filter, or a whole stack: answers a request, borrowing itself while it
/// does.
pub trait Inner: Send + Sync + 'static {
    fn handle(&self, req: HttpRequest) -> impl Future<Output = HttpResponse> + Send + '_;
}

/// What one layer does with a request: answer it, or hand it (changed) to `inner` and look at
/// the answer.
pub trait HttpFilter: Clone + Send + Sync + 'static {
    fn filter<S: Inner>(
        &self,
        inner: &S,
        req: HttpRequest,
    ) -> impl Future<Output = HttpResponse> + Send;
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

impl<F: HttpFilter, S: Inner> Inner for Filtered<F, S> {
    fn handle(&self, req: HttpRequest) -> impl Future<Output = HttpResponse> + Send + '_ {
        self.filter.filter(&self.inner, req)
    }
}

/// In unit tests a filter is also a tower service on its own (a copy of it answers each call);
/// the proxy serves a composed stack through [`Stack`], which shares it instead.
#[cfg(test)]
mod as_service {
    use std::{
        convert::Infallible,
        task::{Context, Poll},
    };

    use tower::Service;

    use super::{Filtered, HttpFilter, HttpRequest, HttpResponse, Inner, ResponseFuture};

    impl<F: HttpFilter, S: Inner + Clone> Service<HttpRequest> for Filtered<F, S> {
        type Response = HttpResponse;
        type Error = Infallible;
        type Future = ResponseFuture;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            // Every layer answers each request on its own; none holds requests back.
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: HttpRequest) -> Self::Future {
            let this = self.clone();
            Box::pin(async move { Ok(this.handle(req).await) })
        }
    }
}

/// A composed stack, shared: a clone is one reference count, a request one boxed future for
/// the whole stack.
#[derive(Clone)]
pub struct Stack(Arc<dyn Shared>);

impl Stack {
    pub fn new(stack: impl Inner) -> Self {
        Self(Arc::new(stack))
    }

    /// Answers a request; the future owns a reference to the stack.
    pub fn answer(&self, req: HttpRequest) -> ResponseFuture {
        self.0.clone().answer(req)
    }
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stack")
    }
}

/// [`Inner`] behind a trait object: the future it returns keeps the stack alive.
trait Shared: Send + Sync + 'static {
    fn answer(self: Arc<Self>, req: HttpRequest) -> ResponseFuture;
}

impl<S: Inner> Shared for S {
    fn answer(self: Arc<Self>, req: HttpRequest) -> ResponseFuture {
        Box::pin(async move { Ok(self.handle(req).await) })
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use tower::ServiceBuilder;

    use super::*;
    use crate::proxy::http::testing::{self, Scripted};

    /// Adds its name to `x-down` on the request and to `x-up` on the response.
    #[derive(Debug, Clone)]
    struct Tag(&'static str);

    impl HttpFilter for Tag {
        async fn filter<S: Inner>(&self, inner: &S, mut req: HttpRequest) -> HttpResponse {
            req.headers_mut()
                .append("x-down", HeaderValue::from_static(self.0));
            let mut response = inner.handle(req).await;
            response
                .headers_mut()
                .append("x-up", HeaderValue::from_static(self.0));
            response
        }
    }

    fn values(headers: &http::HeaderMap, name: &str) -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ascii").to_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_shared_stack_passes_each_request_down_its_layers_in_order_and_back_up() {
        let bottom = Scripted::statuses(&[200, 503]);
        let stack = Stack::new(
            ServiceBuilder::new()
                .layer(FilterLayer(Tag("outer")))
                .layer(FilterLayer(Tag("inner")))
                .service(bottom.clone()),
        );
        let (first, second) = tokio::join!(
            stack.answer(testing::request("/a")),
            stack.clone().answer(testing::request("/b")),
        );
        let (Ok(first), Ok(second)) = (first, second);
        // Both handles reach the one bottom, each request once.
        assert_eq!(bottom.calls(), 2);
        let statuses = [first.status().as_u16(), second.status().as_u16()];
        assert!(
            statuses == [200, 503] || statuses == [503, 200],
            "{statuses:?}"
        );
        for response in [&first, &second] {
            assert_eq!(values(response.headers(), "x-up"), ["inner", "outer"]);
        }
        let seen = bottom.seen.lock().expect("lock");
        assert_eq!(seen.len(), 2);
        for parts in seen.iter() {
            assert_eq!(values(&parts.headers, "x-down"), ["outer", "inner"]);
        }
    }
}
