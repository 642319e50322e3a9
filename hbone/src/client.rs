//! The client side: one HTTP/2 connection, many CONNECT streams.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use h2::{
    Reason, SendStream,
    client::{ResponseFuture, SendRequest},
};
use http::{HeaderMap, Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    CONNECTION_WINDOW, HboneError, MAX_FRAME, MAX_HEADER_LIST, MAX_SEND_BUFFER, STREAM_WINDOW,
    Tunnel,
    activity::{Activity, StreamGuard},
    keepalive,
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
    connect(sender, authority, HeaderMap::new()).await?.await
}

/// Sends a CONNECT to `authority` carrying `headers` (ztunnel's `baggage` and `forwarded`,
/// say), without waiting for its answer: the returned [`Connecting`] resolves to the tunnel
/// once the server accepts.
pub async fn connect(
    sender: &mut HboneSender,
    authority: SocketAddr,
    headers: HeaderMap,
) -> Result<Connecting, HboneError> {
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
    Ok(Connecting {
        stream: Some((send, open)),
        response,
        authority,
        closed: sender.closed.clone(),
    })
}

/// A CONNECT sent, its answer still to come. Bytes may go ahead of the answer
/// ([`Connecting::send_early`]): the server reads them once it has connected to the
/// destination, so a client that speaks first waits no round trip for the answer. Dropped
/// before the answer, it cancels the stream.
pub struct Connecting {
    /// Taken when the answer arrives.
    stream: Option<(SendStream<Bytes>, StreamGuard)>,
    response: ResponseFuture,
    authority: SocketAddr,
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Connecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connecting")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl Connecting {
    /// Queues `data` on the stream ahead of the answer. The caller bounds what it sends this
    /// way: the stream's window is not waited for.
    pub fn send_early(&mut self, data: Bytes) -> Result<(), HboneError> {
        let (send, _) = self
            .stream
            .as_mut()
            .expect("no early bytes after the answer");
        send.send_data(data, false).map_err(|e| self.failed(e))
    }

    /// A refusal before the server looked at the stream (a GOAWAY raced the request) closes
    /// the connection for new streams and is safe to send again on another one.
    fn failed(&self, source: h2::Error) -> HboneError {
        if source.is_go_away() || source.reason() == Some(Reason::REFUSED_STREAM) {
            self.closed.store(true, Ordering::Release);
            HboneError::Closed
        } else {
            HboneError::Connect {
                authority: self.authority,
                source,
            }
        }
    }
}

impl Future for Connecting {
    type Output = Result<Tunnel, HboneError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let response = ready!(Pin::new(&mut this.response).poll(cx)).map_err(|e| this.failed(e))?;
        if response.status() != StatusCode::OK {
            return Poll::Ready(Err(HboneError::Refused {
                authority: this.authority,
                status: response.status(),
            }));
        }
        let (send, open) = this.stream.take().expect("polled after the answer");
        Poll::Ready(Ok(Tunnel::new(send, response.into_body(), open)))
    }
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

    /// A CONNECT sent to a server that answers `answer` only when the test says so (`go`) and
    /// hands the test each accepted tunnel's far end.
    async fn held_connect(
        answer: StatusCode,
    ) -> (
        HboneSender,
        Connecting,
        tokio::sync::mpsc::UnboundedSender<()>,
        tokio::sync::mpsc::UnboundedReceiver<Tunnel>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (go, go_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
        let (ends, far_ends) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let settings = ServerSettings::default();
            let handle = move |c: ConnectRequest| {
                let (go_rx, ends) = (go_rx.clone(), ends.clone());
                async move {
                    let _ = go_rx.lock().await.recv().await;
                    if answer != StatusCode::OK {
                        return crate::status(answer);
                    }
                    let (response, tunnel) = c.accept();
                    tokio::spawn(async move {
                        if let Some(tunnel) = tunnel.await {
                            let _ = ends.send(tunnel);
                        }
                    });
                    response
                }
            };
            serve(server_io, &settings, std::future::pending(), handle).await
        });
        let mut sender = handshake(client_io, &ClientSettings::default())
            .await
            .expect("HTTP/2");
        let dst = "10.0.0.2:9000".parse().expect("addr");
        let connecting = connect(&mut sender, dst, HeaderMap::new())
            .await
            .expect("CONNECT sent");
        (sender, connecting, go, far_ends)
    }

    #[tokio::test]
    async fn bytes_sent_ahead_of_the_answer_reach_the_far_end_first_and_in_order() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (_sender, mut connecting, go, mut far_ends) = held_connect(StatusCode::OK).await;
        // The server has not answered, and cannot until told: sending must not wait for it.
        connecting
            .send_early(Bytes::from_static(b"GET / HTTP/1.1\r\n"))
            .expect("sent ahead");
        go.send(()).expect("server");
        let mut tunnel = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .expect("answered")
            .expect("accepted");
        tunnel.write_all(b"\r\n").await.expect("write");
        tunnel.shutdown().await.expect("end");
        let mut far = far_ends.recv().await.expect("far end");
        let mut received = Vec::new();
        far.read_to_end(&mut received).await.expect("read");
        assert_eq!(received, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_refused_connect_is_an_error_even_with_bytes_sent_ahead() {
        let (sender, mut connecting, go, _far_ends) = held_connect(StatusCode::FORBIDDEN).await;
        connecting
            .send_early(Bytes::from_static(b"hello"))
            .expect("sent ahead");
        go.send(()).expect("server");
        let answer = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .expect("answered");
        assert!(
            matches!(answer, Err(HboneError::Refused { status, .. }) if status == StatusCode::FORBIDDEN),
            "{answer:?}"
        );
        assert!(
            !sender.is_closed(),
            "a refused stream leaves the connection open"
        );
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
