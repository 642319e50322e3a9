//! Reading an HBONE connection's socket in large steps. TLS asks its transport for at most
//! 4 KiB at a time, a `recv` per 4 KiB of a bulk transfer; under it, this reads what the
//! socket has, up to 64 KiB, and hands it out from memory. It does so only once a read has
//! filled what the caller asked for (the socket may hold more): request-sized traffic is read
//! straight through, with no buffer to allocate. The buffer exists only while bytes keep
//! coming, so an idle connection keeps none.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most read from the socket at once.
const READ_AHEAD: usize = 64 * 1024;

#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    buffered: BytesMut,
    /// The last read filled the caller's buffer: more is probably waiting, read ahead.
    bulk: bool,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buffered: BytesMut::new(),
            bulk: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buffered.is_empty() {
            // Straight to the caller unless a bulk transfer is under way and it asks for less
            // than a read ahead.
            if !this.bulk || buf.remaining() >= READ_AHEAD {
                let wanted = buf.remaining();
                let read = Pin::new(&mut this.inner).poll_read(cx, buf);
                this.bulk =
                    matches!(read, Poll::Ready(Ok(()))) && wanted > 0 && buf.remaining() == 0;
                return read;
            }
            // Empty: this allocates once, then reuses the allocation from its start.
            this.buffered.reserve(READ_AHEAD);
            let read =
                tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buffered);
            if read.is_pending() {
                // Nothing to read: give the memory back until there is.
                this.buffered = BytesMut::new();
                this.bulk = false;
                return Poll::Pending;
            }
            ready!(read)?;
        }
        let n = this.buffered.len().min(buf.remaining());
        buf.put_slice(&this.buffered[..n]);
        this.buffered.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Counts the reads that reach the transport.
    struct CountingReads {
        inner: tokio::io::DuplexStream,
        reads: usize,
    }

    impl AsyncRead for CountingReads {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads += 1;
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_and_every_byte_arrives_in_order() {
        let (mut writer, inner) = tokio::io::duplex(256 * 1024);
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        writer.write_all(&sent).await.expect("write");
        drop(writer);
        let mut reader = ReadAhead::new(CountingReads { inner, reads: 0 });
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = reader.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, sent);
        let reads = reader.inner.reads;
        assert!(
            reads <= 200_000 / READ_AHEAD + 2,
            "{reads} reads reached the transport for 49 reads of 4 KiB"
        );
    }

    #[tokio::test]
    async fn short_reads_go_straight_through_with_no_buffer() {
        let (mut writer, inner) = tokio::io::duplex(64 * 1024);
        let mut reader = ReadAhead::new(CountingReads { inner, reads: 0 });
        let mut chunk = [0u8; 4096];
        for message in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"HTTP/1.1 200 OK\r\n\r\n"] {
            writer.write_all(message).await.expect("write");
            let n = reader.read(&mut chunk).await.expect("read");
            assert_eq!(&chunk[..n], message);
            assert_eq!(reader.buffered.capacity(), 0, "no buffer for a short read");
        }
        assert_eq!(reader.inner.reads, 2);
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (mut writer, inner) = tokio::io::duplex(1024);
        let mut reader = ReadAhead::new(inner);
        writer.write_all(b"hello").await.expect("write");
        let mut chunk = [0u8; 16];
        assert_eq!(reader.read(&mut chunk).await.expect("read"), 5);
        let pending = futures_poll_once(&mut reader).await;
        assert!(pending, "nothing more to read");
        assert_eq!(reader.buffered.capacity(), 0, "the buffer was given back");
    }

    /// Polls one read once; true when it was pending.
    async fn futures_poll_once(reader: &mut ReadAhead<tokio::io::DuplexStream>) -> bool {
        std::future::poll_fn(|cx| {
            let mut bytes = [0u8; 16];
            let mut buf = ReadBuf::new(&mut bytes);
            Poll::Ready(Pin::new(&mut *reader).poll_read(cx, &mut buf).is_pending())
        })
        .await
    }
}
