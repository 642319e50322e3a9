//! Closing byte-stream connections that carried nothing for a while. The copy counts its
//! reads (one relaxed add per read, nothing per byte); a timer per connection looks at the
//! count once per period and closes the connection when it has not moved, so a connection is
//! closed after one to two periods of silence.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One side of a copy, its reads counted.
pub(super) struct Counted<'a, T: ?Sized> {
    pub(super) inner: &'a mut T,
    pub(super) reads: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if polled.is_ready() {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Resolves once `reads` has not moved for a whole `period`.
pub(super) async fn silent_for(reads: &AtomicU64, period: Duration) {
    let mut seen = reads.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(period).await;
        let now = reads.load(Ordering::Relaxed);
        if now == seen {
            return;
        }
        seen = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silence_is_noticed_after_one_to_two_periods_and_reads_put_it_off() {
        let reads = AtomicU64::new(0);
        let started = tokio::time::Instant::now();
        silent_for(&reads, Duration::from_secs(10)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));

        let started = tokio::time::Instant::now();
        let watcher = silent_for(&reads, Duration::from_secs(10));
        let reader = async {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(7)).await;
                reads.fetch_add(1, Ordering::Relaxed);
            }
        };
        tokio::join!(watcher, reader);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(45) && waited <= Duration::from_secs(55),
            "silent from 35 s on, noticed at {waited:?}"
        );
    }

    #[tokio::test]
    async fn reads_are_counted_whatever_they_return() {
        let reads = AtomicU64::new(0);
        let (mut a, mut b) = tokio::io::duplex(64);
        let mut counted = Counted {
            inner: &mut a,
            reads: &reads,
        };
        tokio::io::AsyncWriteExt::write_all(&mut b, b"x")
            .await
            .expect("write");
        drop(b);
        let mut sink = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut counted, &mut sink)
            .await
            .expect("read");
        assert_eq!(sink, b"x");
        assert_eq!(reads.load(Ordering::Relaxed), 2, "the byte, then the end");
    }
}
