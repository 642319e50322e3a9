//! A tunnel's byte stream: one HTTP/2 stream's DATA frames, read and written in place.
//!
//! Writes go straight into the stream's send queue, as far as its flow-control window allows,
//! and reads take the received frames' bytes as they are: no task, channel or extra buffer
//! stands between the caller and the HTTP/2 connection. A caller that holds its bytes as
//! `Bytes` hands them over uncopied (`poll_send`), and one that can write from a borrowed
//! slice reads the received frames in place (`AsyncBufRead`).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

use crate::activity::StreamGuard;

/// One CONNECT stream's bytes, as tokio I/O. While it exists its connection counts it open.
/// Dropped before its end was sent, it resets the stream (`CANCEL`).
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not read yet.
    unread: Bytes,
    /// The end of the stream was sent.
    ended: bool,
    _open: StreamGuard,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("unread", &self.unread.len())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, open: StreamGuard) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
            ended: false,
            _open: open,
        }
    }

    /// Sends the front of `data` as far as the stream's window allows, taking what was sent
    /// off `data`; the bytes go out as they are, not copied. Pending while the window is
    /// closed.
    pub fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        if data.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let n = ready!(self.poll_capacity(cx, data.len()))?;
        self.send
            .send_data(data.split_to(n), false)
            .map_err(io_error)?;
        Poll::Ready(Ok(()))
    }

    /// Waits until the stream may send some of `len` bytes; returns how many.
    fn poll_capacity(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        let send = &mut self.send;
        if let Poll::Ready(reason) = send.poll_reset(cx) {
            return Poll::Ready(Err(reason.map_or_else(io_error, reset)));
        }
        // Capacity is asked for only with bytes in hand: a reservation held while idle would
        // pin part of the connection's window.
        send.reserve_capacity(len);
        let mut capacity = send.capacity();
        while capacity == 0 {
            capacity = match ready!(send.poll_capacity(cx)) {
                Some(Ok(capacity)) => capacity,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the tunnel is closed for sending",
                    )));
                }
            };
        }
        Poll::Ready(Ok(capacity.min(len)))
    }

    /// Waits for received bytes, unless some are unread; none left means the end of the
    /// stream.
    fn poll_unread(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.unread = data,
                Some(Err(e)) if is_end(&e) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
        Poll::Ready(Ok(()))
    }

    fn consume_unread(&mut self, n: usize) {
        self.unread.advance(n);
        // The window reopens as the bytes are taken, so a reader that stops stops the sender.
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

/// The peer ended or cancelled the stream: for the reader, the end of its bytes.
fn is_end(e: &h2::Error) -> bool {
    matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL))
}

fn io_error(e: h2::Error) -> io::Error {
    if e.reason() == Some(Reason::STREAM_CLOSED) {
        return io::Error::new(io::ErrorKind::BrokenPipe, e);
    }
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    io::Error::other(e)
}

fn reset(reason: Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("the peer reset the tunnel ({reason})"),
    )
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_unread(cx))?;
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.consume_unread(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncBufRead for Tunnel {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        ready!(this.poll_unread(cx))?;
        Poll::Ready(Ok(&this.unread))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        self.get_mut().consume_unread(amt);
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        let n = ready!(this.poll_capacity(cx, buf.len()))?;
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes the queued frames out.
        Poll::Ready(Ok(()))
    }

    /// Sends the end of the stream: a half-close; the other direction stays open.
    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.ended = true;
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}
