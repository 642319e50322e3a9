//! A tunnel's byte stream: one HTTP/2 stream's DATA frames, read and written in place.
//!
//! Writes go straight into the stream's send queue, as far as its flow-control window allows,
//! and reads take the received frames' bytes as they are: no task, channel or extra buffer
//! stands between the caller and the HTTP/2 connection.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.unread.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => this.unread = data,
                Some(Err(e)) if is_end(&e) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        // The window reopens as the bytes are taken, so a reader that stops stops the sender.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        if let Poll::Ready(reason) = send.poll_reset(cx) {
            return Poll::Ready(Err(reason.map_or_else(io_error, reset)));
        }
        // Capacity is asked for only with bytes in hand: a reservation held while idle would
        // pin part of the connection's window.
        send.reserve_capacity(buf.len());
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
        let n = capacity.min(buf.len());
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
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
