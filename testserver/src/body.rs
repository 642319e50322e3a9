//! Response bodies: a whole buffer, or `n` bytes produced in chunks without holding them.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

const CHUNK: &[u8] = &[b'x'; 64 * 1024];

#[derive(Debug, Default)]
pub struct ResponseBody {
    whole: Option<Bytes>,
    remaining: u64,
}

pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    let bytes = bytes.into();
    ResponseBody {
        remaining: bytes.len() as u64,
        whole: Some(bytes),
    }
}

impl ResponseBody {
    pub fn repeat(n: u64) -> Self {
        Self {
            whole: None,
            remaining: n,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(whole) = self.whole.take() {
            self.remaining = 0;
            return Poll::Ready(Some(Ok(Frame::data(whole))));
        }
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK.len() as u64);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &CHUNK[..n as usize],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.whole.is_none() && self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
