//! Protocol detection from the client's first bytes.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::prefixed::Prefixed;
use crate::proxy::ProxyError;

/// How long to wait for the client's first bytes. A protocol where the server speaks first
/// (SMTP, MySQL) sends nothing: after this it is treated as opaque TCP.
const DETECT_TIMEOUT: Duration = Duration::from_millis(100);
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

/// What the bytes so far say: a protocol, or `None` while they could still start either.
fn classify(bytes: &[u8]) -> Option<Protocol> {
    let could_be = |expected: &[u8]| {
        let n = bytes.len().min(expected.len());
        bytes[..n] == expected[..n]
    };
    // A method in the wrong case is still HTTP: it is answered 400, not carried as bytes.
    let could_be_method = |method: &[u8]| {
        let n = bytes.len().min(method.len());
        bytes[..n].eq_ignore_ascii_case(&method[..n])
    };
    if bytes.len() >= H2_PREFACE.len() && bytes.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if METHODS
        .iter()
        .any(|m| bytes.len() >= m.len() && could_be_method(m))
    {
        return Some(Protocol::Http1);
    }
    if could_be(H2_PREFACE) || METHODS.iter().any(|m| could_be_method(m)) {
        return None;
    }
    Some(Protocol::Opaque)
}

/// Reads until the protocol is known (or the client pauses), and returns the stream with
/// those bytes put back.
pub async fn detect<S: AsyncRead + Unpin>(
    mut stream: S,
) -> Result<(Protocol, Prefixed<S>), ProxyError> {
    let mut buffer = BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let protocol = loop {
        if let Some(protocol) = classify(&buffer) {
            break protocol;
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buffer)).await {
            Ok(Ok(0)) | Err(_) => break Protocol::Opaque,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(ProxyError::Io(e)),
        }
    };
    Ok((protocol, Prefixed::new(Bytes::from(buffer), stream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(Protocol::Http1));
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"GE"), None, "could still be GET");
        assert_eq!(
            classify(b"PRI * HTTP/2"),
            None,
            "could still be the preface"
        );
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Opaque), "TLS");
        assert_eq!(classify(b"GETX"), Some(Protocol::Opaque));
        assert_eq!(classify(b"ping"), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn puts_the_bytes_back() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let (protocol, mut stream) = detect(server).await.expect("detect");
        assert_eq!(protocol, Protocol::Http1);
        let mut all = vec![0; 18];
        stream.read_exact(&mut all).await.expect("read");
        assert_eq!(&all, b"GET / HTTP/1.1\r\n\r\n");

        let (_quiet, server) = tokio::io::duplex(64);
        let (protocol, _) = detect(server).await.expect("detect");
        assert_eq!(
            protocol,
            Protocol::Opaque,
            "a silent client is opaque after the timeout"
        );
    }

    proptest::proptest! {
        /// Whatever a client sends first, detection classifies it without panicking, and a
        /// verdict once given does not change as more bytes arrive.
        #[test]
        fn classification_is_stable(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
            let verdict = (0..=bytes.len()).find_map(|n| classify(&bytes[..n]).map(|p| (n, p)));
            if let Some((n, protocol)) = verdict {
                for more in n..=bytes.len() {
                    proptest::prop_assert_eq!(classify(&bytes[..more]), Some(protocol));
                }
            }
        }
    }
}
