//! The HTTP server behind the agent's and the controller's operator endpoints (admin, metrics,
//! readiness): HTTP/1.1, GET only, small JSON or text answers. Never on the traffic path.
#![forbid(unsafe_code)]

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod accept;

pub use accept::{ACCEPT_ERROR_PAUSE, accept};

pub type Body = Full<Bytes>;

/// How long a client of an operator or API endpoint may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Answers one GET: the path in, the response out.
pub type Router = Arc<dyn Fn(&str) -> Response<Body> + Send + Sync>;

/// Binds `addr` now, so that a port in use stops the binary at startup with a clear reason,
/// and serves `router` in the background until `token` is cancelled. Returns the bound address
/// (useful with port 0).
pub async fn spawn(
    what: &'static str,
    addr: SocketAddr,
    router: Router,
    token: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for the {what} endpoint: {e}"),
        )
    })?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        while let Some((stream, _)) = accept(&listener, &token, what).await {
            let router = router.clone();
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = if req.method() == Method::GET {
                    router(req.uri().path())
                } else {
                    text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n")
                };
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "admin connection ended");
                }
            });
        }
    });
    Ok(bound)
}

pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.into())))
        .unwrap_or_default()
}

pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default()
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// The Prometheus text exposition format.
pub fn prometheus(body: String) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// `ready` or 503 with the reason.
pub fn readiness(state: Result<(), String>) -> Response<Body> {
    match state {
        Ok(()) => text(StatusCode::OK, "ready\n"),
        Err(reason) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

pub fn not_found(path: &str) -> Response<Body> {
    text(StatusCode::NOT_FOUND, format!("no endpoint {path}\n"))
}
