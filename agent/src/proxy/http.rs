//! The proxy's HTTP stack: one tower layer per concern, composed by both directions.
//!
//! ```text
//! outbound (client's node), for Service ports an HTTPRoute attaches to or whose appProtocol
//! is http, h2c or grpc:
//!   detect -> telemetry -> route -> timeout -> retry -> balance -> circuit breaker
//!          -> upstream (pooled per endpoint: HTTP/1.1 keep-alive or HTTP/2, in HBONE or plain)
//! inbound (server's node), for pods whose policies look at HTTP or with HTTP processing on:
//!   detect -> telemetry -> authorization -> rate limit -> the application
//! ```
//!
//! Telemetry is outermost in both directions, so that requests the mesh answers itself (403,
//! 404, 429, 503, 504) are counted and logged with their response flags like any other.
//! Every layer answers with a response, never an error: what went wrong travels as
//! [`ResponseFlags`] and, for an attempt that got no answer, as a [`retry::Attempt`] in the
//! response's extensions.

mod app;
mod authz;
pub mod balance;
mod body;
mod breaker;
pub mod counted;
pub mod detect;
mod filter;
mod flags;
pub mod inbound;
mod normalize;
pub mod outbound;
pub mod prefixed;
mod rate_limit;
mod retry;
mod route;
pub mod state;
mod telemetry;
#[cfg(test)]
mod testing;
mod timeout;
pub mod upstream;

/// The server side of an application's HTTP/1.1 connection through the proxy: a client gets
/// 30 s to send each request's headers (hyper's header read timeout, enforced with a timer).
fn http1_server() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(30));
    builder
}

/// The server side of an application's HTTP/2 connection through the proxy: 60 KiB of
/// headers at most (Envoy's default), 1024 concurrent streams, keepalive pings every 30 s
/// closing a peer silent for 10 s more.
fn http2_server() -> hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
    let mut builder =
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(60 * 1024)
        .max_concurrent_streams(1024)
        .keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(10));
    builder
}

use std::{convert::Infallible, future::Future, pin::Pin};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};

pub use self::{flags::ResponseFlags, rate_limit::PodRateLimits, telemetry::Sinks};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body in the stack, requests and responses. A named type rather than an alias of a
/// boxed trait object, so that the layers' futures are `Send` for every lifetime the compiler
/// asks about.
#[derive(Debug)]
pub struct Body(UnsyncBoxBody<Bytes, BoxError>);

impl Body {
    pub fn new<B>(body: B) -> Self
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self(body.map_err(Into::into).boxed_unsync())
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0.size_hint()
    }
}
pub type HttpRequest = Request<Body>;
pub type HttpResponse = Response<Body>;
/// What each layer's service returns: always a response.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<HttpResponse, Infallible>> + Send>>;

/// A body from hyper's, boxed.
pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Body::new(body)
}

pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    Body::new(Full::new(bytes.into()))
}

/// A response the proxy makes itself, with a text body saying why and the flags that say it
/// in metrics and logs.
pub fn local_reply(
    status: StatusCode,
    flags: ResponseFlags,
    text: impl Into<String>,
) -> HttpResponse {
    let mut text = text.into();
    text.push('\n');
    let mut response = Response::new(full_body(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response.extensions_mut().insert(flags);
    response
}

/// The flags a response carries so far.
pub fn flags_of(response: &HttpResponse) -> ResponseFlags {
    response
        .extensions()
        .get::<ResponseFlags>()
        .copied()
        .unwrap_or_default()
}

/// Adds flags to a response.
pub fn add_flags(response: &mut HttpResponse, flags: ResponseFlags) {
    let current = flags_of(response);
    response.extensions_mut().insert(current | flags);
}

#[cfg(test)]
mod server_limits {
    use std::time::Duration;

    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn answer_ok(
        _: http::Request<hyper::body::Incoming>,
    ) -> std::future::Ready<Result<http::Response<String>, std::convert::Infallible>> {
        std::future::ready(Ok(http::Response::new("ok".to_owned())))
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_finishes_its_headers_is_closed_after_30_s() {
        let (mut client, server) = tokio::io::duplex(4096);
        let started = tokio::time::Instant::now();
        let serving = tokio::spawn(
            super::http1_server()
                .serve_connection(TokioIo::new(server), hyper::service::service_fn(answer_ok)),
        );
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n")
            .await
            .expect("write");
        let result = tokio::time::timeout(Duration::from_secs(120), serving)
            .await
            .expect("the server gives up on the headers")
            .expect("server task");
        assert!(result.is_err(), "a header read timeout, not a request");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_complete_request_is_served() {
        let (mut client, server) = tokio::io::duplex(4096);
        tokio::spawn(
            super::http1_server()
                .serve_connection(TokioIo::new(server), hyper::service::service_fn(answer_ok)),
        );
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[tokio::test]
    async fn an_http2_header_block_past_60_kib_is_refused() {
        let (client_io, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(
            super::http2_server()
                .serve_connection(TokioIo::new(server), hyper::service::service_fn(answer_ok)),
        );
        let (mut sender, connection) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake::<_, http_body_util::Empty<bytes::Bytes>>(TokioIo::new(client_io))
                .await
                .expect("HTTP/2");
        tokio::spawn(connection);
        let small = http::Request::get("http://a/")
            .body(http_body_util::Empty::new())
            .expect("request");
        let ok = sender.send_request(small).await.expect("answered");
        assert_eq!(ok.status(), http::StatusCode::OK);
        let big = http::Request::get("http://a/")
            .header("x-big", "a".repeat(70 * 1024))
            .body(http_body_util::Empty::new())
            .expect("request");
        let refused = sender.send_request(big).await;
        assert!(
            refused.as_ref().map_or(true, |r| r.status()
                == http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
            "{refused:?}"
        );
    }
}
