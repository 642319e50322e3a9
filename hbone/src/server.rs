//! The server side: answers CONNECT streams on one HTTP/2 connection.

use std::{future::Future, net::SocketAddr};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::{body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW, Tunnel};

/// One CONNECT stream to answer.
#[derive(Debug)]
pub struct ConnectRequest {
    /// The original destination the client asks for.
    pub authority: SocketAddr,
    request: Request<Incoming>,
}

impl ConnectRequest {
    /// The request's headers (`baggage`, `traceparent` and the like).
    pub fn headers(&self) -> &http::HeaderMap {
        self.request.headers()
    }

    /// Accepts the stream: answer with the returned response, and the tunnel's byte stream
    /// arrives from the returned future once the client has it.
    pub fn accept(mut self) -> (Response<Empty<Bytes>>, impl Future<Output = Option<Tunnel>>) {
        let upgrade = hyper::upgrade::on(&mut self.request);
        let tunnel = async move {
            match upgrade.await {
                Ok(upgraded) => Some(TokioIo::new(upgraded)),
                Err(e) => {
                    tracing::debug!(error = %e, "HBONE tunnel was not established");
                    None
                }
            }
        };
        (status(StatusCode::OK), tunnel)
    }
}

/// A bodiless response.
pub fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    Response::builder()
        .status(code)
        .body(Empty::new())
        .unwrap_or_default()
}

/// Serves HTTP/2 on an established (TLS) stream until the client closes it. `handle` answers
/// each well-formed CONNECT; anything else gets 405 or 400 without reaching it.
pub async fn serve<T, F, Fut>(io: T, handle: F) -> Result<(), hyper::Error>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    F: Fn(ConnectRequest) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Response<Empty<Bytes>>> + Send + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let handle = handle.clone();
        async move {
            if request.method() != Method::CONNECT {
                return Ok::<_, std::convert::Infallible>(status(StatusCode::METHOD_NOT_ALLOWED));
            }
            let authority = request
                .uri()
                .authority()
                .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
            match authority {
                Some(authority) => Ok(handle(ConnectRequest { authority, request }).await),
                None => Ok(status(StatusCode::BAD_REQUEST)),
            }
        }
    });
    http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .serve_connection(TokioIo::new(io), service)
        .await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::{handshake, open_tunnel};

    #[tokio::test]
    async fn tunnels_carry_bytes_and_half_close_both_ways() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve(server_io, |connect: ConnectRequest| async move {
            if connect.authority.port() != 9000 {
                return status(StatusCode::SERVICE_UNAVAILABLE);
            }
            let (response, tunnel) = connect.accept();
            tokio::spawn(async move {
                // An echo server behind the tunnel.
                let Some(tunnel) = tunnel.await else { return };
                let (mut read, mut write) = tokio::io::split(tunnel);
                tokio::io::copy(&mut read, &mut write).await.expect("echo");
                write.shutdown().await.expect("half-close");
            });
            response
        }));
        let mut sender = handshake(client_io).await.expect("HTTP/2");

        let mut tunnels = Vec::new();
        for i in 0..3u8 {
            let mut tunnel = open_tunnel(&mut sender, "10.0.0.2:9000".parse().expect("addr"))
                .await
                .expect("tunnel");
            tunnel.write_all(&[i; 100_000]).await.expect("write");
            tunnel.shutdown().await.expect("half-close");
            tunnels.push(tunnel);
        }
        for (i, mut tunnel) in tunnels.into_iter().enumerate() {
            let mut echoed = Vec::new();
            tunnel.read_to_end(&mut echoed).await.expect("read");
            assert_eq!(
                echoed,
                vec![i as u8; 100_000],
                "stream {i} kept its own bytes"
            );
        }

        let refused = open_tunnel(&mut sender, "10.0.0.2:8080".parse().expect("addr")).await;
        assert!(
            matches!(refused, Err(crate::HboneError::Refused { status, .. }) if status == StatusCode::SERVICE_UNAVAILABLE)
        );
    }
}
