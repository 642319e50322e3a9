//! The client's first bytes on a new tunnel, sent ahead of the CONNECT's answer.

use std::{future::Future as _, mem::MaybeUninit, pin::Pin, task::Poll};

use bytes::Bytes;
use nodemesh_hbone::{Connecting, Tunnel};
use tokio::io::{AsyncRead, ReadBuf};

use crate::proxy::ProxyError;

/// Most of the client's first bytes that go ahead of a tunnel's answer: a request's head, a TLS
/// ClientHello. The rest follows the answer.
const FIRST_BYTES: usize = 16 * 1024;

/// The client's first bytes, sent on a new tunnel ahead of the CONNECT's answer, so that a
/// client that speaks first (HTTP, TLS) waits no round trip more than without the mesh: the
/// destination's proxy reads them once it has connected to the application.
pub(super) struct FirstBytes<'a> {
    client: &'a mut (dyn AsyncRead + Send + Unpin + 'a),
    /// What was read and sent; kept to send again when the CONNECT has to go on another
    /// connection (one that closed before its server looked at the stream).
    sent: Bytes,
}

impl<'a> FirstBytes<'a> {
    pub(super) fn new(client: &'a mut (dyn AsyncRead + Send + Unpin + 'a)) -> Self {
        Self {
            client,
            sent: Bytes::new(),
        }
    }

    /// How many bytes of the client went ahead of the answer; they are let go, not held for
    /// the connection's life.
    pub(super) fn finish(self) -> u64 {
        self.sent.len() as u64
    }

    /// Waits for the answer to `connecting`, sending ahead of it the client's first bytes if
    /// they come first (or those already sent once, on a connection that refused the stream).
    pub(super) async fn ahead_of(
        &mut self,
        mut connecting: Connecting,
    ) -> Result<Tunnel, ProxyError> {
        if !self.sent.is_empty() {
            connecting.send_early(self.sent.clone())?;
            return Ok(connecting.await?);
        }
        let mut reading = true;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(answer) = Pin::new(&mut connecting).poll(cx) {
                return Poll::Ready(answer.map_err(ProxyError::from));
            }
            if reading {
                let mut buffer = [MaybeUninit::uninit(); FIRST_BYTES];
                let mut read = ReadBuf::uninit(&mut buffer);
                match Pin::new(&mut *self.client).poll_read(cx, &mut read) {
                    Poll::Pending => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(ProxyError::Io(e))),
                    Poll::Ready(Ok(())) => {
                        reading = false;
                        if !read.filled().is_empty() {
                            self.sent = Bytes::copy_from_slice(read.filled());
                            if let Err(e) = connecting.send_early(self.sent.clone()) {
                                return Poll::Ready(Err(e.into()));
                            }
                        }
                    }
                }
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use nodemesh_hbone::HboneSender;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        sync::mpsc,
    };

    use super::*;
    use crate::proxy::testing::hbone_in_memory;

    /// An HBONE connection in memory whose server answers each CONNECT only when the test
    /// says so, and hands the test the server's end of each tunnel.
    async fn held_hbone() -> (
        HboneSender,
        mpsc::UnboundedSender<()>,
        mpsc::UnboundedReceiver<Tunnel>,
    ) {
        let (go, go_rx) = mpsc::unbounded_channel::<()>();
        let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
        let (sender, far_ends) = hbone_in_memory(move || {
            let go_rx = go_rx.clone();
            async move {
                let _ = go_rx.lock().await.recv().await;
            }
        })
        .await;
        (sender, go, far_ends)
    }

    async fn connecting(sender: &mut HboneSender) -> Connecting {
        let dst = "10.0.0.2:9000".parse().expect("address");
        nodemesh_hbone::connect(sender, dst, ::http::HeaderMap::new())
            .await
            .expect("CONNECT sent")
    }

    /// Reads what the far end has received, up to `len` bytes.
    async fn received(far: &mut Tunnel, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        tokio::time::timeout(Duration::from_secs(10), far.read_exact(&mut bytes))
            .await
            .expect("received in time")
            .expect("read");
        bytes
    }

    #[tokio::test]
    async fn a_clients_first_bytes_go_ahead_of_the_answer_and_the_rest_follows() {
        let (mut sender, go, mut far_ends) = held_hbone().await;
        let (mut app, mut socket) = tokio::io::duplex(64 * 1024);
        app.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        let mut first = FirstBytes::new(&mut socket);
        let connecting = connecting(&mut sender).await;
        let answer = tokio::time::timeout(Duration::from_secs(10), first.ahead_of(connecting));
        // The server answers only a while after the bytes could have been taken.
        let answer_later = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            go.send(()).expect("server");
        };
        let (tunnel, ()) = tokio::join!(answer, answer_later);
        let mut tunnel = tunnel.expect("answered").expect("tunnel");
        assert_eq!(&first.sent[..], b"GET / HTTP/1.1\r\n");
        drop(first);
        app.write_all(b"\r\n").await.expect("write");
        let mut rest = [0; 2];
        socket.read_exact(&mut rest).await.expect("read");
        tunnel.write_all(&rest).await.expect("forward");
        let mut far = far_ends.recv().await.expect("far end");
        assert_eq!(received(&mut far, 18).await, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_client_that_waits_for_the_server_to_speak_first_gets_its_tunnel() {
        let (mut sender, go, _far_ends) = held_hbone().await;
        let (_app, mut socket) = tokio::io::duplex(64 * 1024);
        let mut first = FirstBytes::new(&mut socket);
        let connecting = connecting(&mut sender).await;
        go.send(()).expect("server");
        tokio::time::timeout(Duration::from_secs(10), first.ahead_of(connecting))
            .await
            .expect("answered without the client speaking")
            .expect("tunnel");
        assert_eq!(first.finish(), 0);
    }

    #[tokio::test]
    async fn on_another_connection_the_bytes_sent_ahead_go_again_and_nothing_more_is_read() {
        let (mut sender, go, mut far_ends) = held_hbone().await;
        let (mut app, mut socket) = tokio::io::duplex(64 * 1024);
        app.write_all(b"later").await.expect("write");
        let mut first = FirstBytes::new(&mut socket);
        // As left by a first attempt whose connection closed before its server answered.
        first.sent = Bytes::from_static(b"first");
        let connecting = connecting(&mut sender).await;
        go.send(()).expect("server");
        tokio::time::timeout(Duration::from_secs(10), first.ahead_of(connecting))
            .await
            .expect("answered")
            .expect("tunnel");
        let mut far = far_ends.recv().await.expect("far end");
        assert_eq!(received(&mut far, 5).await, b"first");
        let mut unread = [0; 5];
        socket.read_exact(&mut unread).await.expect("read");
        assert_eq!(
            &unread, b"later",
            "the client's next bytes stay for the copy"
        );
    }

    #[tokio::test]
    async fn a_client_gone_while_waiting_for_the_answer_fails_the_tunnel() {
        let (mut sender, _go, _far_ends) = held_hbone().await;
        let mut socket = ResetOnRead;
        let mut first = FirstBytes::new(&mut socket);
        let connecting = connecting(&mut sender).await;
        let answer = tokio::time::timeout(Duration::from_secs(10), first.ahead_of(connecting))
            .await
            .expect("failed without waiting for the answer");
        assert!(matches!(answer, Err(ProxyError::Io(_))), "{answer:?}");
    }

    /// A client socket the peer has reset.
    struct ResetOnRead;

    impl AsyncRead for ResetOnRead {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
        }
    }
}
