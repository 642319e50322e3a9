//! A response body from a pooled connection, which gives the connection back to its pool (or
//! counts it unused) when the body ends.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::{
    body::{Frame, Incoming, SizeHint},
    client::conn::http1,
};
use tokio::time::Instant;

use super::{ConnInfo, EndpointPool, Reuse};
use crate::proxy::http::{Body, BoxError};

/// An HTTP/1.1 connection going back to its pool when the response it carries has ended.
pub(super) struct Return {
    pub(super) pool: Arc<EndpointPool>,
    pub(super) sender: http1::SendRequest<Body>,
    pub(super) info: Arc<ConnInfo>,
    pub(super) reuse: Reuse,
}

/// A response body from a pooled connection: at its end the connection is free again.
pub(super) struct Pooled {
    body: Incoming,
    back: Option<Return>,
    /// An HTTP/2 stream's connection, to count it unused at the end.
    watched: Option<Arc<ConnInfo>>,
}

impl Pooled {
    pub(super) fn new(body: Incoming, back: Option<Return>) -> Self {
        let mut pooled = Self {
            body,
            back,
            watched: None,
        };
        if hyper::body::Body::is_end_stream(&pooled.body) {
            pooled.done();
        }
        pooled
    }

    pub(super) fn watching(mut self, info: Arc<ConnInfo>) -> Self {
        if hyper::body::Body::is_end_stream(&self.body) {
            info.finish();
        } else {
            self.watched = Some(info);
        }
        self
    }

    /// The body ended whole: the connection can carry another request.
    fn done(&mut self) {
        if let Some(back) = self.back.take() {
            back.info.finish();
            if back.info.reusable(back.reuse, Instant::now()) {
                back.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((back.sender, back.info));
                back.pool.changed.notify_one();
            }
        }
        if let Some(info) = self.watched.take() {
            info.finish();
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // Dropped before its end: an HTTP/1.1 connection cannot be reused, hyper closes it
        // when its sender goes.
        if let Some(back) = self.back.take() {
            back.info.finish();
        }
        if let Some(info) = self.watched.take() {
            info.finish();
        }
    }
}

impl hyper::body::Body for Pooled {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.done(),
            Poll::Ready(Some(Ok(_))) if hyper::body::Body::is_end_stream(&self.body) => {
                self.done();
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(back) = self.back.take() {
                    back.info.finish();
                }
            }
            _ => {}
        }
        polled.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        hyper::body::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> SizeHint {
        hyper::body::Body::size_hint(&self.body)
    }
}
