//! The client side: one HTTP/2 connection, many CONNECT streams.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::{Reason, client::SendRequest};
use http::{HeaderMap, Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    CONNECTION_WINDOW, HboneError, MAX_FRAME, MAX_HEADER_LIST, MAX_SEND_BUFFER, STREAM_WINDOW,
    Tunnel, activity::Activity, keepalive,
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
#[derive(Clone)]
pub struct HboneSender {
    send: SendRequest<Bytes>,
    activity: Activity,
    /// Set when the connection ended or refused new streams (a GOAWAY).
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for HboneSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneSender")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl HboneSender {
    /// Whether the connection has closed (the peer went away or sent GOAWAY, or it was idle
    /// too long).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The connection takes no new stream: callers should open another.
    fn close(&self) -> HboneError {
        self.closed.store(true, Ordering::Release);
        HboneError::Closed
    }
}

/// Marks the connection closed when the task driving it ends, however it ends.
struct ClosedOnDrop(Arc<AtomicBool>);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Starts HTTP/2 on an established (TLS) stream and drives the connection in the background
/// until the server closes it, stops answering pings, or it has carried no tunnel for
/// `settings.idle_timeout`.
pub async fn handshake<T>(io: T, settings: &ClientSettings) -> Result<HboneSender, HboneError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (send, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(HboneError::Handshake)?;
    let keepalive = keepalive::run(
        connection.ping_pong(),
        settings.keepalive_interval,
        settings.keepalive_timeout,
    );
    let activity = Activity::new();
    let idle = {
        let (activity, timeout) = (activity.clone(), settings.idle_timeout);
        async move { activity.idle(timeout, timeout).await }
    };
    let closed = Arc::new(AtomicBool::new(false));
    let on_end = ClosedOnDrop(closed.clone());
    tokio::spawn(async move {
        let _on_end = on_end;
        tokio::select! {
            result = connection => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HBONE connection ended");
                }
            }
            // Dropping the connection closes it; its senders see it closed.
            () = idle => tracing::debug!("closing an idle HBONE connection"),
            () = keepalive => {}
        }
    });
    Ok(HboneSender {
        send,
        activity,
        closed,
    })
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
    // Waits while the server's cap on concurrent streams is reached.
    let mut ready = sender
        .send
        .clone()
        .ready()
        .await
        .map_err(|_| sender.close())?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .body(())
        .expect("a CONNECT request to a socket address is well-formed");
    *request.headers_mut() = headers;
    let (response, send) = ready
        .send_request(request, false)
        .map_err(|_| sender.close())?;
    let response = response.await.map_err(|source| {
        // Refused before the server looked at it (a GOAWAY raced the request): safe to send
        // again on another connection.
        if source.is_go_away() || source.reason() == Some(Reason::REFUSED_STREAM) {
            sender.close()
        } else {
            HboneError::Connect { authority, source }
        }
    })?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Refused {
            authority,
            status: response.status(),
        });
    }
    Ok(Tunnel::new(send, response.into_body(), open))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConnectRequest, ServerSettings, serve};

    #[tokio::test]
    async fn a_connection_whose_server_stops_answering_pings_is_closed() {
        // The server end takes the bytes and never answers: no SETTINGS, no PING ack.
        let (client_io, _silent_server) = tokio::io::duplex(64 * 1024);
        let settings = ClientSettings {
            keepalive_interval: Duration::from_millis(50),
            keepalive_timeout: Duration::from_millis(50),
            ..ClientSettings::default()
        };
        let sender = handshake(client_io, &settings).await.expect("HTTP/2");
        tokio::time::timeout(Duration::from_secs(10), async {
            while !sender.is_closed() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("closed once a ping went unanswered");
    }

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
