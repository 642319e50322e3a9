//! Copying a connection's bytes both ways. Each direction's buffer starts small and is
//! replaced by a large one the first time a read fills it: an idle or chatty connection holds
//! 2 × 1 KiB, a bulk one reads 64 KiB per step. Nothing is done per byte beyond the copy
//! itself. Between a socket and an HBONE tunnel not even that (`tunnel`).

mod tunnel;

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use self::tunnel::with_tunnel;

/// The buffer a direction starts with.
const SMALL: usize = 1024;
/// The buffer a direction moves to once a read has filled the small one. Single-stream
/// throughput through HBONE, measured (iperf3, cross node, release sandbox): 8 KiB about 30%
/// below 16 KiB; 16 KiB 5.0 Gbit/s; 64 KiB 6.1-6.9; 128 KiB 5.4-6.2.
const LARGE: usize = 64 * 1024;

/// Copies `a` to `b` and `b` to `a` until both are done; an end of stream on one side is
/// passed on as a half-close (shutdown) of the other. Returns the bytes copied from `a` and
/// from `b`.
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Direction::Copying(Buffer::new());
    let mut b_to_a = Direction::Copying(Buffer::new());
    poll_fn(|cx| {
        let forward = a_to_b.poll(cx, &mut *a, &mut *b)?;
        let backward = b_to_a.poll(cx, &mut *b, &mut *a)?;
        let (Poll::Ready(forward), Poll::Ready(backward)) = (forward, backward) else {
            return Poll::Pending;
        };
        Poll::Ready(Ok((forward, backward)))
    })
    .await
}

enum Direction {
    Copying(Buffer),
    /// Everything was read and written: the writer is being shut down.
    ShuttingDown(u64),
    Done(u64),
}

impl Direction {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            match self {
                Direction::Copying(buffer) => {
                    let copied = ready!(buffer.poll_copy(cx, Pin::new(reader), Pin::new(writer)))?;
                    *self = Direction::ShuttingDown(copied);
                }
                Direction::ShuttingDown(copied) => {
                    ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                    *self = Direction::Done(*copied);
                }
                Direction::Done(copied) => return Poll::Ready(Ok(*copied)),
            }
        }
    }
}

/// One direction's buffer: bytes `pos..end` are read and not yet written.
struct Buffer {
    bytes: Box<[u8]>,
    pos: usize,
    end: usize,
    /// The last read filled the buffer: take the large one once it is written out.
    grow: bool,
    eof: bool,
    /// Bytes were written since the last flush.
    unflushed: bool,
    copied: u64,
}

impl Buffer {
    fn new() -> Self {
        Self {
            bytes: vec![0; SMALL].into_boxed_slice(),
            pos: 0,
            end: 0,
            grow: false,
            eof: false,
            unflushed: false,
            copied: 0,
        }
    }

    /// Copies until the reader's end of stream, everything written and flushed.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.end && !self.eof {
                if self.grow {
                    self.bytes = vec![0; LARGE].into_boxed_slice();
                    self.grow = false;
                }
                let mut read = ReadBuf::new(&mut self.bytes);
                match reader.as_mut().poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        self.eof = n == 0;
                        self.grow = n == self.bytes.len() && n < LARGE;
                        self.pos = 0;
                        self.end = n;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to read for now: what was written must not wait in the
                        // writer's buffer.
                        if self.unflushed {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.end {
                let n = ready!(
                    writer
                        .as_mut()
                        .poll_write(cx, &self.bytes[self.pos..self.end])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.copied += n as u64;
                self.unflushed = true;
            }
            if self.eof {
                ready!(writer.as_mut().poll_flush(cx))?;
                self.unflushed = false;
                return Poll::Ready(Ok(self.copied));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn both_directions_are_copied_whole_and_each_end_passed_on_as_a_half_close() {
        let (client, mut proxy_client) = tokio::io::duplex(4096);
        let (mut proxy_upstream, mut server) = tokio::io::duplex(4096);
        let proxy =
            tokio::spawn(
                async move { bidirectional(&mut proxy_client, &mut proxy_upstream).await },
            );
        // More than a large buffer each way, so both directions grow and wrap several times.
        let sizes = exchange(client, &mut server, 100_000, 70_000).await;
        assert_eq!(proxy.await.expect("proxy").expect("copy"), sizes);
    }

    /// `client` sends `request_len` bytes and half-closes; `far` reads them all, then answers
    /// `response_len` bytes and closes. Checks that both arrive whole; returns the two sizes.
    pub(super) async fn exchange<C, F>(
        mut client: C,
        far: &mut F,
        request_len: u32,
        response_len: u32,
    ) -> (u64, u64)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: AsyncRead + AsyncWrite + Unpin,
    {
        let request: Vec<u8> = (0..request_len).map(|i| (i % 251) as u8).collect();
        let response: Vec<u8> = (0..response_len).map(|i| (i % 241) as u8).collect();
        let sent = request.clone();
        let client_side = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("half-close");
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            got
        });
        let mut got = Vec::new();
        far.read_to_end(&mut got)
            .await
            .expect("the client's end reaches the far end");
        assert_eq!(got, request);
        // The far end still answers after the client's half-close.
        far.write_all(&response).await.expect("write");
        far.shutdown().await.expect("close");
        assert_eq!(client_side.await.expect("client"), response);
        (u64::from(request_len), u64::from(response_len))
    }

    #[tokio::test]
    async fn an_idle_connection_keeps_small_buffers_a_bulk_one_grows() {
        let (mut writer, mut reader) = tokio::io::duplex(64 * 1024);
        let mut sink = tokio::io::sink();
        let mut buffer = Buffer::new();
        let mut copy_what_is_there = async |buffer: &mut Buffer| {
            let polled = poll_fn(|cx| {
                Poll::Ready(buffer.poll_copy(cx, Pin::new(&mut reader), Pin::new(&mut sink)))
            })
            .await;
            assert!(polled.is_pending(), "waiting for more");
        };
        writer.write_all(&[7; 100]).await.expect("write");
        copy_what_is_there(&mut buffer).await;
        assert_eq!(
            buffer.bytes.len(),
            SMALL,
            "a short read keeps the small buffer"
        );
        writer.write_all(&[7; 8 * SMALL]).await.expect("write");
        copy_what_is_there(&mut buffer).await;
        assert_eq!(
            buffer.bytes.len(),
            LARGE,
            "a full read brings the large buffer"
        );
        assert_eq!(buffer.copied, 100 + 8 * SMALL as u64);
    }

    #[tokio::test]
    async fn a_read_error_ends_the_copy_with_it() {
        let (mut client, proxy_client) = tokio::io::duplex(1024);
        let (mut proxy_upstream, _server) = tokio::io::duplex(1024);
        let mut failing = resetting(proxy_client);
        client.write_all(b"x").await.expect("write");
        let error = bidirectional(&mut failing, &mut proxy_upstream)
            .await
            .expect_err("the reader's error");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }

    /// A stream whose reads fail with a reset once its first byte has been read.
    fn resetting(inner: tokio::io::DuplexStream) -> Resetting {
        Resetting { inner, read: false }
    }

    struct Resetting {
        inner: tokio::io::DuplexStream,
        read: bool,
    }

    impl AsyncRead for Resetting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.read {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
            self.read = true;
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Resetting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }
}
