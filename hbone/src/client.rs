//! The client side: one HTTP/2 connection, many CONNECT streams.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    CONNECTION_WINDOW, HboneError, MAX_FRAME, MAX_HEADER_LIST, STREAM_WINDOW, Tunnel,
    activity::Activity,
};

/// The bounds of one client connection.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// How long a connection stays open with no tunnel before it is closed.
    pub idle_timeout: Duration,
    /// How often to ping the server, and how long to wait for its answer before closing.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// Sends CONNECT requests on one HTTP/2 connection. Cheap to clone; clones share the
/// connection.
#[derive(Debug, Clone)]
pub struct HboneSender {
    send: http2::SendRequest<Empty<Bytes>>,
    activity: Activity,
}

impl HboneSender {
    /// Whether the connection has closed (the peer went away, or it was idle too long).
    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }
}

/// Starts HTTP/2 on an established (TLS) stream and drives the connection in the background
/// until the server closes it or it has carried no tunnel for `settings.idle_timeout`.
pub async fn handshake<T>(io: T, settings: &ClientSettings) -> Result<HboneSender, HboneError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (send, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .handshake(TokioIo::new(io))
        .await
        .map_err(HboneError::Handshake)?;
    let activity = Activity::new();
    let idle = {
        let (activity, timeout) = (activity.clone(), settings.idle_timeout);
        async move { activity.idle(timeout, timeout).await }
    };
    tokio::spawn(async move {
        tokio::select! {
            result = connection => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HBONE connection ended");
                }
            }
            // Dropping the connection closes it; its senders see it closed.
            () = idle => tracing::debug!("closing an idle HBONE connection"),
        }
    });
    Ok(HboneSender { send, activity })
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
    let open = sender.activity.open();
    sender.send.ready().await.map_err(|_| HboneError::Closed)?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .body(Empty::new())
        .expect("a CONNECT request to a socket address is well-formed");
    *request.headers_mut() = headers;
    let response = sender
        .send
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
    Ok(Tunnel::new(upgraded, open))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConnectRequest, ServerSettings, serve};

    #[tokio::test]
    async fn a_connection_unused_past_its_idle_timeout_is_closed_not_one_in_use() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let settings = ServerSettings::default();
            serve(
                server_io,
                &settings,
                std::future::pending(),
                |c: ConnectRequest| async move {
                    let (response, tunnel) = c.accept();
                    tokio::spawn(async move {
                        // Held open until the client closes it.
                        let Some(mut tunnel) = tunnel.await else {
                            return;
                        };
                        let mut sink = Vec::new();
                        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tunnel, &mut sink).await;
                    });
                    response
                },
            )
            .await
        });
        let settings = ClientSettings {
            idle_timeout: Duration::from_millis(100),
            ..ClientSettings::default()
        };
        let mut sender = handshake(client_io, &settings).await.expect("HTTP/2");
        let tunnel = open_tunnel(&mut sender, "10.0.0.2:9000".parse().expect("addr"))
            .await
            .expect("tunnel");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!sender.is_closed(), "a connection carrying a tunnel stays");
        drop(tunnel);
        tokio::time::timeout(Duration::from_secs(10), async {
            while !sender.is_closed() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("closed once idle");
    }
}
