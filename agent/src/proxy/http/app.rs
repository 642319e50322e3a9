//! The bottom of the inbound stack: the application, over the one connection the proxy opened
//! to it for this client connection (HTTP/1.1 one request at a time, HTTP/2 multiplexed).

use std::sync::Arc;

use http::{StatusCode, header};
use hyper::client::conn::{http1, http2};
use tokio::sync::Mutex;

use super::{Body, HttpRequest, HttpResponse, ResponseFlags, boxed, filter::Inner, local_reply};

/// The application's side of one client connection.
#[derive(Debug)]
pub enum AppConnection {
    Http1(Mutex<http1::SendRequest<Body>>),
    Http2(http2::SendRequest<Body>),
}

#[derive(Debug)]
pub struct App {
    connection: AppConnection,
    workload: Arc<str>,
}

impl App {
    pub fn new(connection: AppConnection, workload: Arc<str>) -> Self {
        Self {
            connection,
            workload,
        }
    }
}

impl Inner for App {
    async fn handle(&self, req: HttpRequest) -> HttpResponse {
        if req.headers().contains_key(header::UPGRADE) {
            return local_reply(
                StatusCode::NOT_IMPLEMENTED,
                ResponseFlags::NONE,
                "HTTP upgrades are not carried yet for workloads with HTTP processing",
            );
        }
        let forwarded = match &self.connection {
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
                tracing::info!(workload = %self.workload, error = %e, "the application did not answer");
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
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::Response;
    use hyper::{body::Incoming, service::service_fn};
    use hyper_util::rt::TokioIo;

    use super::*;
    use crate::proxy::http::{flags_of, full_body, testing};

    /// An application on the other end of an in-memory connection, answering with its path.
    async fn app() -> App {
        let (client, server) = tokio::io::duplex(16 * 1024);
        tokio::spawn(async move {
            let service = service_fn(|req: http::Request<Incoming>| async move {
                Ok::<_, Infallible>(Response::new(full_body(req.uri().path().to_owned())))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        let (sender, connection) = http1::handshake(TokioIo::new(client))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        App::new(
            AppConnection::Http1(Mutex::new(sender)),
            Arc::from("shop/web-1"),
        )
    }

    #[tokio::test]
    async fn requests_reach_the_application_one_after_another_on_its_connection() {
        let app = app().await;
        for path in ["/a", "/b"] {
            let response = app.handle(testing::request(path)).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(testing::body_text(response).await, path);
        }
    }

    #[tokio::test]
    async fn an_upgrade_is_refused_and_a_gone_application_is_502() {
        let app = app().await;
        let mut upgrade = testing::request("/ws");
        upgrade
            .headers_mut()
            .insert(header::UPGRADE, "websocket".parse().expect("value"));
        let response = app.handle(upgrade).await;
        assert_eq!(response.status(), StatusCode::NOT_IMPLEMENTED);

        let (client, server) = tokio::io::duplex(1024);
        drop(server);
        let (sender, connection) = http1::handshake(TokioIo::new(client))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        let gone = App::new(
            AppConnection::Http1(Mutex::new(sender)),
            Arc::from("shop/web-1"),
        );
        let response = gone.handle(testing::request("/")).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(flags_of(&response), ResponseFlags::UPSTREAM_CONNECT_FAILURE);
    }
}
