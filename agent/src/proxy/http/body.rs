//! Request bodies kept for a retry: read up to a limit; a body that fits can be sent again, a
//! larger one goes on as a stream (what was read, then the rest) and is not retried.

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame, SizeHint};

use super::{Body, BoxError, full_body};

/// The most of a request body kept to send it again.
pub const RETRY_BUFFER_LIMIT: usize = 64 * 1024;

/// A request body after buffering.
pub enum Buffered {
    /// The whole body: it can be replayed.
    Complete {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Too large (or failed mid-way): forward it once.
    Streaming(Body),
}

/// Reads `body` until it ends or passes `limit` bytes.
pub async fn buffer(mut body: Body, limit: usize) -> Buffered {
    if body.is_end_stream() {
        return Buffered::Complete {
            data: Bytes::new(),
            trailers: None,
        };
    }
    if body.size_hint().lower() > limit as u64 {
        return Buffered::Streaming(body);
    }
    let mut chunks = VecDeque::new();
    let mut size = 0;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    size += data.len();
                    chunks.push_back(data);
                    if size > limit {
                        return Buffered::Streaming(Body::new(Replay { chunks, rest: body }));
                    }
                }
                Err(frame) => {
                    let trailers = frame.into_trailers().ok();
                    return Buffered::Complete {
                        data: join(chunks, size),
                        trailers,
                    };
                }
            },
            Some(Err(e)) => {
                // Forward what came and then the error, once.
                let failed = http_body_util::StreamBody::new(futures_stream_once(e));
                return Buffered::Streaming(Body::new(Replay {
                    chunks,
                    rest: super::boxed(failed),
                }));
            }
        }
    }
    Buffered::Complete {
        data: join(chunks, size),
        trailers: None,
    }
}

fn join(mut chunks: VecDeque<Bytes>, size: usize) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop_front().unwrap_or_default(),
        _ => {
            let mut all = Vec::with_capacity(size);
            for chunk in chunks {
                all.extend_from_slice(&chunk);
            }
            Bytes::from(all)
        }
    }
}

impl Buffered {
    /// A copy of a complete body for one attempt.
    pub fn replay(data: &Bytes, trailers: &Option<HeaderMap>) -> Body {
        match trailers {
            None => full_body(data.clone()),
            Some(trailers) => {
                let frames = [
                    Ok::<_, BoxError>(Frame::data(data.clone())),
                    Ok(Frame::trailers(trailers.clone())),
                ];
                super::boxed(http_body_util::StreamBody::new(StreamOf(
                    frames.into_iter().collect(),
                )))
            }
        }
    }
}

/// Chunks already read, then the rest of the body.
struct Replay {
    chunks: VecDeque<Bytes>,
    rest: Body,
}

impl hyper::body::Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self.chunks.iter().map(|c| c.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + buffered);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + buffered);
        }
        hint
    }
}

/// A fixed list of frames as a stream.
struct StreamOf(VecDeque<Result<Frame<Bytes>, BoxError>>);

impl futures_core::Stream for StreamOf {
    type Item = Result<Frame<Bytes>, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.0.pop_front())
    }
}

fn futures_stream_once(error: BoxError) -> StreamOf {
    StreamOf([Err(error)].into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(body: Body) -> (Vec<u8>, Option<HeaderMap>) {
        let collected = body.collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    fn chunked(chunks: &[&'static [u8]]) -> Body {
        let frames: VecDeque<_> = chunks
            .iter()
            .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from_static(c))))
            .collect();
        super::super::boxed(http_body_util::StreamBody::new(StreamOf(frames)))
    }

    #[tokio::test]
    async fn a_small_body_is_kept_whole_and_replays() {
        let Buffered::Complete { data, trailers } = buffer(chunked(&[b"ab", b"cd"]), 8).await
        else {
            panic!("fits the limit");
        };
        assert_eq!(&data[..], b"abcd");
        for _ in 0..2 {
            assert_eq!(collect(Buffered::replay(&data, &trailers)).await.0, b"abcd");
        }
    }

    #[tokio::test]
    async fn a_large_body_streams_on_whole_and_is_not_kept() {
        let Buffered::Streaming(body) = buffer(chunked(&[b"abcd", b"efgh", b"ij"]), 6).await else {
            panic!("over the limit");
        };
        assert_eq!(collect(body).await.0, b"abcdefghij", "nothing lost");
    }

    #[tokio::test]
    async fn trailers_are_kept() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("value"));
        let body = Buffered::replay(&Bytes::from_static(b"x"), &Some(trailers.clone()));
        let Buffered::Complete {
            data,
            trailers: kept,
        } = buffer(body, 8).await
        else {
            panic!("fits");
        };
        assert_eq!(&data[..], b"x");
        assert_eq!(kept, Some(trailers));
    }
}
