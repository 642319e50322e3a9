//! The bottom of the inbound stack: the application, over the one connection the proxy opened
//! to it for this client connection (HTTP/1.1 one request at a time, HTTP/2 multiplexed).

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use http::{StatusCode, header};
use hyper::client::conn::{http1, http2};
use tokio::sync::Mutex;
use tower::Service;

use super::{
    Body, HttpRequest, HttpResponse, ResponseFlags, ResponseFuture, boxed, local_reply, respond,
};

/// The application's side of one client connection.
#[derive(Debug)]
pub enum AppConnection {
    Http1(Mutex<http1::SendRequest<Body>>),
    Http2(http2::SendRequest<Body>),
}

#[derive(Debug, Clone)]
pub struct App {
    connection: Arc<AppConnection>,
    workload: Arc<str>,
}

impl App {
    pub fn new(connection: AppConnection, workload: Arc<str>) -> Self {
        Self {
            connection: Arc::new(connection),
            workload,
        }
    }
}

impl Service<HttpRequest> for App {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let app = self.clone();
        respond(async move {
            if req.headers().contains_key(header::UPGRADE) {
                return local_reply(
                    StatusCode::NOT_IMPLEMENTED,
                    ResponseFlags::NONE,
                    "HTTP upgrades are not carried yet for workloads with HTTP processing",
                );
            }
            let forwarded = match &*app.connection {
                AppConnection::Http1(sender) => {
                    let mut sender = sender.lock().await;
                    match sender.ready().await {
                        Ok(()) => sender.send_request(req).await,
                        Err(e) => Err(e),
                    }
                }
                AppConnection::Http2(sender) => sender.clone().send_request(req).await,
            };
            match forwarded {
                Ok(response) => response.map(boxed),
                Err(e) => {
                    tracing::info!(workload = %app.workload, error = %e, "the application did not answer");
                    let mut response = local_reply(
                        StatusCode::BAD_GATEWAY,
                        ResponseFlags::UPSTREAM_CONNECT_FAILURE,
                        format!("the application did not answer: {e}"),
                    );
                    response
                        .extensions_mut()
                        .insert(nodemesh_traffic::retry::Attempt::Reset);
                    response
                }
            }
        })
    }
}
