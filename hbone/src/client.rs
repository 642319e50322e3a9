//! The client side: one HTTP/2 connection, many CONNECT streams.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{CONNECTION_WINDOW, HboneError, MAX_FRAME, STREAM_WINDOW, Tunnel};

/// Sends CONNECT requests on one HTTP/2 connection. Cheap to clone; clones share the
/// connection.
pub type HboneSender = http2::SendRequest<Empty<Bytes>>;

/// Starts HTTP/2 on an established (TLS) stream and drives the connection in the background.
pub async fn handshake<T>(io: T) -> Result<HboneSender, HboneError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .handshake(TokioIo::new(io))
        .await
        .map_err(HboneError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "HBONE connection ended");
        }
    });
    Ok(sender)
}

/// Opens a tunnel to `authority` (the original destination) on an HBONE connection.
pub async fn open_tunnel(
    sender: &mut HboneSender,
    authority: SocketAddr,
) -> Result<Tunnel, HboneError> {
    open_tunnel_with(sender, authority, HeaderMap::new()).await
}

/// Opens a tunnel carrying `headers` on its CONNECT request (ztunnel's `baggage` and
/// `forwarded`, say).
pub async fn open_tunnel_with(
    sender: &mut HboneSender,
    authority: SocketAddr,
    headers: HeaderMap,
) -> Result<Tunnel, HboneError> {
    sender.ready().await.map_err(|_| HboneError::Closed)?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .body(Empty::new())
        .expect("a CONNECT request to a socket address is well-formed");
    *request.headers_mut() = headers;
    let response = sender
        .send_request(request)
        .await
        .map_err(|source| HboneError::Connect { authority, source })?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Refused {
            authority,
            status: response.status(),
        });
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|source| HboneError::Upgrade { authority, source })?;
    Ok(TokioIo::new(upgraded))
}
