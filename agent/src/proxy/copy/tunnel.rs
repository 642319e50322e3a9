//! Between a socket and an HBONE tunnel, the bytes are not copied at all: what the socket
//! gives becomes the tunnel's frames as it is, and the tunnel's frames are written to the
//! socket from where they were received.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll, ready},
};

use bytes::{BufMut as _, Bytes, BytesMut};
use nodemesh_hbone::Tunnel;
use tokio::io::{AsyncBufRead as _, AsyncRead, AsyncWrite};

use super::{LARGE, SMALL};

/// A bulk read into the tunnel: one HTTP/2 DATA frame of it, head included, is exactly
/// [`LARGE`], four full TLS records, all of which TLS takes in one write (its send buffer
/// holds 64 KiB). A 64 KiB read made a 64 KiB + 9 byte frame, whose last 9 bytes went out
/// as a TLS record and a `writev` of their own.
const LARGE_READ: usize = LARGE - FRAME_HEAD;

/// The length of an HTTP/2 frame's head (RFC 9113, section 4.1).
const FRAME_HEAD: usize = 9;

/// Copies between `socket` and `tunnel` until both directions are done, with a half-close
/// passed on each way, like `bidirectional`, but without copying the bytes in between. Every
/// read on either side is counted in `reads` (for the idle timeout). Returns the bytes from
/// the socket and from the tunnel.
pub async fn with_tunnel<S>(
    socket: &mut S,
    tunnel: &mut Tunnel,
    reads: Option<&AtomicU64>,
) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let count = || {
        if let Some(reads) = reads {
            reads.fetch_add(1, Ordering::Relaxed);
        }
    };
    let mut up = IntoTunnel::new();
    let mut down = OutOfTunnel::default();
    poll_fn(|cx| {
        let forward = up.poll(cx, &mut *socket, &mut *tunnel, count)?;
        let backward = down.poll(cx, &mut *tunnel, &mut *socket, count)?;
        let (Poll::Ready(forward), Poll::Ready(backward)) = (forward, backward) else {
            return Poll::Pending;
        };
        Poll::Ready(Ok((forward, backward)))
    })
    .await
}

/// Socket to tunnel: reads land in a shared buffer whose filled part is handed to the tunnel
/// whole; the buffer's rest takes the next read, and a new one is made only once the tunnel
/// still holds bytes of the old.
struct IntoTunnel {
    buffer: BytesMut,
    /// Read and not yet taken by the tunnel.
    pending: Bytes,
    /// How much room the next read gets: small until a read fills what it was given.
    room: usize,
    eof: bool,
    done: bool,
    copied: u64,
}

impl IntoTunnel {
    fn new() -> Self {
        Self {
            buffer: BytesMut::new(),
            pending: Bytes::new(),
            room: SMALL,
            eof: false,
            done: false,
            copied: 0,
        }
    }

    fn poll<S>(
        &mut self,
        cx: &mut Context<'_>,
        socket: &mut S,
        tunnel: &mut Tunnel,
        count: impl Fn(),
    ) -> Poll<io::Result<u64>>
    where
        S: AsyncRead + Unpin + ?Sized,
    {
        loop {
            if !self.pending.is_empty() {
                let before = self.pending.len();
                ready!(tunnel.poll_send(cx, &mut self.pending))?;
                self.copied += (before - self.pending.len()) as u64;
                continue;
            }
            if self.done {
                return Poll::Ready(Ok(self.copied));
            }
            if self.eof {
                ready!(Pin::new(&mut *tunnel).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            self.buffer.reserve(self.room);
            // The allocation may be larger than asked: read no more than `room`.
            let offered = (self.buffer.capacity() - self.buffer.len()).min(self.room);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *socket),
                cx,
                &mut (&mut self.buffer).limit(offered)
            ))?;
            count();
            if n == 0 {
                self.eof = true;
                continue;
            }
            if n == offered {
                self.room = LARGE_READ;
            }
            self.pending = self.buffer.split().freeze();
        }
    }
}

/// Tunnel to socket: the received frames are written from where they are.
#[derive(Default)]
struct OutOfTunnel {
    unflushed: bool,
    /// The tunnel has ended: the socket's writer is being shut down.
    shutting_down: bool,
    done: bool,
    copied: u64,
}

impl OutOfTunnel {
    fn poll<S>(
        &mut self,
        cx: &mut Context<'_>,
        tunnel: &mut Tunnel,
        socket: &mut S,
        count: impl Fn(),
    ) -> Poll<io::Result<u64>>
    where
        S: AsyncWrite + Unpin + ?Sized,
    {
        let mut socket = Pin::new(socket);
        loop {
            if self.done {
                return Poll::Ready(Ok(self.copied));
            }
            if self.shutting_down {
                ready!(socket.as_mut().poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let chunk = match Pin::new(&mut *tunnel).poll_fill_buf(cx) {
                Poll::Ready(chunk) => chunk?,
                Poll::Pending => {
                    // Nothing more to read for now: what was written must not wait in the
                    // socket's buffer.
                    if self.unflushed {
                        ready!(socket.as_mut().poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            };
            count();
            if chunk.is_empty() {
                ready!(socket.as_mut().poll_flush(cx))?;
                self.unflushed = false;
                self.shutting_down = true;
                continue;
            }
            let n = ready!(socket.as_mut().poll_write(cx, chunk))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            Pin::new(&mut *tunnel).consume(n);
            self.copied += n as u64;
            self.unflushed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{copy::tests::exchange, testing::hbone_in_memory};

    /// A tunnel over HBONE on an in-memory connection, and the server's end of it.
    async fn tunnel_pair() -> (Tunnel, Tunnel) {
        let (mut sender, mut far_ends) = hbone_in_memory(|| async {}).await;
        let dst = "10.0.0.2:9000".parse().expect("address");
        let tunnel = nodemesh_hbone::open_tunnel(&mut sender, dst)
            .await
            .expect("tunnel");
        let far = far_ends.recv().await.expect("the server's end");
        (tunnel, far)
    }

    #[tokio::test]
    async fn a_tunnel_and_a_socket_are_copied_whole_both_ways_with_their_half_closes() {
        let (mut tunnel, mut far) = tunnel_pair().await;
        let (app, mut socket) = tokio::io::duplex(4096);
        let proxy = tokio::spawn(async move {
            let reads = AtomicU64::new(0);
            let copied = with_tunnel(&mut socket, &mut tunnel, Some(&reads)).await;
            (copied, reads.load(Ordering::Relaxed))
        });
        // More than a large buffer each way.
        let sizes = exchange(app, &mut far, 150_000, 90_000).await;
        let (copied, reads) = proxy.await.expect("proxy");
        assert_eq!(copied.expect("copy"), sizes);
        assert!(reads > 2, "every read is counted for the idle timeout");
    }

    #[tokio::test]
    async fn a_bulk_read_becomes_one_data_frame_of_64_kib_with_its_head() {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
        assert_eq!(LARGE_READ + FRAME_HEAD, 64 * 1024);
        let (mut tunnel, mut far) = tunnel_pair().await;
        let (mut app, mut socket) = tokio::io::duplex(1 << 20);
        let sent = 300_000;
        app.write_all(&vec![7; sent]).await.expect("write");
        app.shutdown().await.expect("shutdown");
        tokio::spawn(async move { with_tunnel(&mut socket, &mut tunnel, None).await });
        // Each chunk the far end reads is one DATA frame as it arrived.
        let mut frames = Vec::new();
        loop {
            let frame = far.fill_buf().await.expect("read").len();
            if frame == 0 {
                break;
            }
            far.consume(frame);
            frames.push(frame);
        }
        assert_eq!(frames.iter().sum::<usize>(), sent);
        assert!(frames.iter().all(|&f| f <= LARGE_READ), "{frames:?}");
        assert!(
            frames.iter().filter(|&&f| f == LARGE_READ).count() >= 3,
            "bulk reads fill a frame to 64 KiB with its head: {frames:?}"
        );
    }
}
