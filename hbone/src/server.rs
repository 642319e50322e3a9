//! The server side: answers CONNECT streams on one HTTP/2 connection.

use std::{future::Future, net::SocketAddr, time::Duration};

use bytes::Bytes;
use h2::{
    RecvStream, SendStream,
    server::{Builder, SendResponse},
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Empty;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::oneshot,
};

use crate::{
    CONNECTION_WINDOW, HboneError, MAX_FRAME, MAX_HEADER_LIST, MAX_SEND_BUFFER, STREAM_WINDOW,
    Tunnel,
    activity::{Activity, StreamGuard},
    keepalive,
};

/// The bounds of one server connection.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Tunnels one client may have open at once on one connection (SETTINGS_MAX_CONCURRENT_
    /// STREAMS); each is one of its application's TCP connections, so the HTTP library's
    /// default of 200 would make the 201st connection between two pods wait.
    pub max_concurrent_streams: u32,
    /// How long a connection may go without its first CONNECT (the HTTP/2 preface included).
    pub first_request_timeout: Duration,
    /// How long a connection may stay open with no stream.
    pub idle_timeout: Duration,
    /// How often to ping a client, and how long to wait for its answer before closing.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 16_384,
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// One CONNECT stream to answer.
#[derive(Debug)]
pub struct ConnectRequest {
    /// The original destination the client asks for.
    pub authority: SocketAddr,
    headers: HeaderMap,
    recv: RecvStream,
    open: StreamGuard,
    /// The stream's sending half, once the answer has been sent.
    answered: oneshot::Receiver<SendStream<Bytes>>,
}

impl ConnectRequest {
    /// The request's headers (`baggage`, `traceparent` and the like).
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Accepts the stream: answer with the returned response, and the tunnel's byte stream
    /// arrives from the returned future once the answer is on its way.
    pub fn accept(self) -> (Response<Empty<Bytes>>, impl Future<Output = Option<Tunnel>>) {
        let Self {
            recv,
            open,
            answered,
            ..
        } = self;
        let tunnel = async move {
            match answered.await {
                Ok(send) => Some(Tunnel::new(send, recv, open)),
                Err(_) => {
                    tracing::debug!("HBONE tunnel was not established");
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

/// Serves HTTP/2 on an established (TLS) stream until the client closes it, the connection
/// has been idle past `settings`, the client stops answering pings, or `shutdown` resolves:
/// then a GOAWAY lets the open streams finish while no new one starts. `handle` answers each
/// well-formed CONNECT; anything else gets 405 or 400 without reaching it.
pub async fn serve<T, F, Fut>(
    io: T,
    settings: &ServerSettings,
    shutdown: impl Future<Output = ()>,
    handle: F,
) -> Result<(), HboneError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    F: Fn(ConnectRequest) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Response<Empty<Bytes>>> + Send + 'static,
{
    let handshake = Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .handshake::<_, Bytes>(io);
    let mut connection = tokio::time::timeout(settings.first_request_timeout, handshake)
        .await
        .map_err(|_| HboneError::NoPreface(settings.first_request_timeout))?
        .map_err(HboneError::Handshake)?;
    let keepalive = keepalive::run(
        connection.ping_pong(),
        settings.keepalive_interval,
        settings.keepalive_timeout,
    );
    let mut keepalive = std::pin::pin!(keepalive);
    let activity = Activity::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let idle = activity.idle(settings.first_request_timeout, settings.idle_timeout);
    let mut idle = std::pin::pin!(idle);
    let mut closing = false;
    loop {
        // Accepting also drives the connection: the open tunnels' frames move only while
        // this loop runs.
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, respond))) => {
                    tokio::spawn(answer(request, respond, activity.open(), handle.clone()));
                }
                Some(Err(e)) => return Err(HboneError::Connection(e)),
                None => return Ok(()),
            },
            () = &mut shutdown, if !closing => {
                connection.graceful_shutdown();
                closing = true;
            }
            () = &mut idle, if !closing => {
                tracing::debug!("closing an idle HBONE connection");
                connection.graceful_shutdown();
                closing = true;
            }
            () = &mut keepalive => return Ok(()),
        }
    }
}

/// Answers one stream: a well-formed CONNECT goes to `handle`, whose answer is sent; the
/// stream's sending half then goes to the tunnel if `handle` accepted it.
async fn answer<F, Fut>(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    open: StreamGuard,
    handle: F,
) where
    F: Fn(ConnectRequest) -> Fut,
    Fut: Future<Output = Response<Empty<Bytes>>>,
{
    let (parts, recv) = request.into_parts();
    let authority = parts
        .uri
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
    let (response, accepted) = match (parts.method == Method::CONNECT, authority) {
        (false, _) => (status(StatusCode::METHOD_NOT_ALLOWED), None),
        (true, None) => (status(StatusCode::BAD_REQUEST), None),
        (true, Some(authority)) => {
            let (accepted, answered) = oneshot::channel();
            let connect = ConnectRequest {
                authority,
                headers: parts.headers,
                recv,
                open,
                answered,
            };
            (handle(connect).await, Some(accepted))
        }
    };
    let (head, _) = response.into_parts();
    let tunnel = head.status == StatusCode::OK && accepted.is_some();
    match respond.send_response(Response::from_parts(head, ()), !tunnel) {
        Ok(send) => {
            if let Some(accepted) = accepted.filter(|_| tunnel) {
                // The tunnel's future may be gone (the handler dropped it): the stream is
                // then reset as its halves drop.
                let _ = accepted.send(send);
            }
        }
        Err(e) => tracing::debug!(error = %e, "HBONE answer not sent"),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::{handshake, open_tunnel};

    #[tokio::test]
    async fn tunnels_carry_bytes_and_half_close_both_ways() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let settings = ServerSettings::default();
        tokio::spawn(async move {
            serve(
                server_io,
                &settings,
                std::future::pending(),
                |connect: ConnectRequest| async move {
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
                },
            )
            .await
        });
        let mut sender = handshake(client_io, &crate::ClientSettings::default())
            .await
            .expect("HTTP/2");

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

    /// A server with `settings` whose every CONNECT is answered by an echo behind the tunnel,
    /// and the client's sender; `shutdown` fires the server's GOAWAY.
    async fn echo_server(
        settings: ServerSettings,
        shutdown: tokio::sync::oneshot::Receiver<()>,
    ) -> (crate::HboneSender, tokio::task::JoinHandle<()>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let shutdown = async move {
                let _ = shutdown.await;
            };
            let _ = serve(
                server_io,
                &settings,
                shutdown,
                |connect: ConnectRequest| async move {
                    let (response, tunnel) = connect.accept();
                    tokio::spawn(async move {
                        let Some(tunnel) = tunnel.await else { return };
                        let (mut read, mut write) = tokio::io::split(tunnel);
                        let _ = tokio::io::copy(&mut read, &mut write).await;
                        let _ = write.shutdown().await;
                    });
                    response
                },
            )
            .await;
        });
        let sender = handshake(client_io, &crate::ClientSettings::default())
            .await
            .expect("HTTP/2");
        (sender, server)
    }

    async fn round_trip(tunnel: &mut Tunnel, message: &[u8]) {
        tunnel.write_all(message).await.expect("write");
        let mut echoed = vec![0; message.len()];
        tunnel.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(echoed, message);
    }

    #[tokio::test]
    async fn a_tunnel_the_far_end_drops_ends_reads_and_fails_writes_with_the_reset() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let settings = ServerSettings::default();
            serve(
                server_io,
                &settings,
                std::future::pending(),
                |connect: ConnectRequest| async move {
                    let (response, tunnel) = connect.accept();
                    // Taken and dropped at once, its end never sent: a reset (CANCEL).
                    tokio::spawn(async move { drop(tunnel.await) });
                    response
                },
            )
            .await
        });
        let mut sender = handshake(client_io, &crate::ClientSettings::default())
            .await
            .expect("HTTP/2");
        let mut tunnel = open_tunnel(&mut sender, "10.0.0.2:9000".parse().expect("addr"))
            .await
            .expect("tunnel");
        let mut rest = Vec::new();
        tunnel
            .read_to_end(&mut rest)
            .await
            .expect("a cancelled stream reads as its end");
        assert!(rest.is_empty());
        let error = tunnel
            .write_all(b"too late")
            .await
            .expect_err("nothing can be sent on a reset stream");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    }

    #[tokio::test]
    async fn a_connection_that_never_asks_for_a_tunnel_is_closed() {
        let settings = ServerSettings {
            first_request_timeout: Duration::from_millis(50),
            ..ServerSettings::default()
        };
        let (_shutdown, never) = tokio::sync::oneshot::channel();
        let (sender, server) = echo_server(settings, never).await;
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server ends the connection")
            .expect("server task");
        tokio::time::timeout(Duration::from_secs(10), async {
            while !sender.is_closed() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the client sees it closed");
    }

    #[tokio::test]
    async fn shutdown_lets_open_tunnels_finish_and_refuses_new_ones() {
        let (shutdown, on_shutdown) = tokio::sync::oneshot::channel();
        let (mut sender, server) = echo_server(ServerSettings::default(), on_shutdown).await;
        let dst: SocketAddr = "10.0.0.2:9000".parse().expect("addr");
        let mut open = open_tunnel(&mut sender, dst).await.expect("tunnel");
        round_trip(&mut open, b"before").await;

        shutdown.send(()).expect("server running");
        tokio::time::sleep(Duration::from_millis(50)).await;
        round_trip(&mut open, b"draining").await;
        assert!(
            open_tunnel(&mut sender, dst).await.is_err(),
            "no new tunnel after the GOAWAY"
        );
        assert!(
            !server.is_finished(),
            "the open tunnel keeps the connection"
        );
        open.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        open.read_to_end(&mut rest).await.expect("end of the echo");
        drop(open);
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the connection ends with its last tunnel")
            .expect("server task");
    }

    #[tokio::test]
    async fn a_tunnel_past_the_stream_cap_waits_for_a_slot() {
        let settings = ServerSettings {
            max_concurrent_streams: 2,
            ..ServerSettings::default()
        };
        let (_shutdown, never) = tokio::sync::oneshot::channel();
        let (mut sender, _server) = echo_server(settings, never).await;
        let dst: SocketAddr = "10.0.0.2:9000".parse().expect("addr");
        let mut first = open_tunnel(&mut sender, dst).await.expect("first");
        let _second = open_tunnel(&mut sender, dst).await.expect("second");
        let third = {
            let mut sender = sender.clone();
            tokio::spawn(async move { open_tunnel(&mut sender, dst).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!third.is_finished(), "a third tunnel over a cap of two");
        round_trip(&mut first, b"still carried").await;
        drop(first);
        let mut third = tokio::time::timeout(Duration::from_secs(10), third)
            .await
            .expect("a slot freed")
            .expect("task")
            .expect("third tunnel");
        round_trip(&mut third, b"third").await;
    }
}
