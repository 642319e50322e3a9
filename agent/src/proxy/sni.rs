//! The server name of an application's own TLS handshake, read from its ClientHello before any
//! byte goes on, for policies with `connection.sni` conditions. The bytes are handed on
//! unchanged: nodemesh does not terminate the application's TLS.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::{ProxyError, http::prefixed::Prefixed};

/// TLS clients speak first; one that has said nothing by then is not speaking TLS.
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// The most a ClientHello may take, over however many records (as Envoy's TLS inspector).
const MAX_HELLO: usize = 64 * 1024;

/// What the first bytes of a connection say about its server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not all of the ClientHello yet.
    Incomplete,
    /// A ClientHello naming this server (lower-cased: names compare without case).
    Name(String),
    /// A whole ClientHello without a server name.
    NoName,
    /// Not TLS at all.
    NotTls,
    /// TLS, but no ClientHello that can be read: refused, never judged as nameless.
    Malformed,
}

/// Reads the big-endian number of `n` bytes at `at`, moving `at` on.
fn number(bytes: &[u8], at: &mut usize, n: usize) -> Option<usize> {
    let value = bytes
        .get(*at..*at + n)?
        .iter()
        .fold(0usize, |v, b| v << 8 | usize::from(*b));
    *at += n;
    Some(value)
}

/// Skips a field whose length takes `n` bytes.
fn skip_vector(bytes: &[u8], at: &mut usize, n: usize) -> Option<()> {
    let len = number(bytes, at, n)?;
    *at += len;
    (*at <= bytes.len()).then_some(())
}

/// Finds the server name in the ClientHello the bytes start with, reassembled from as many
/// handshake records as it spans.
pub fn server_name(bytes: &[u8]) -> Hello {
    match bytes.first() {
        None => return Hello::Incomplete,
        Some(22) => {}
        Some(_) => return Hello::NotTls,
    }
    let mut handshake = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = bytes.get(at..at + 5) else {
            return Hello::Incomplete;
        };
        if header[0] != 22 {
            return Hello::Malformed;
        }
        let len = usize::from(header[3]) << 8 | usize::from(header[4]);
        let Some(fragment) = bytes.get(at + 5..at + 5 + len) else {
            return Hello::Incomplete;
        };
        handshake.extend_from_slice(fragment);
        at += 5 + len;
        // The handshake message: type, 3-byte length, body.
        if let Some(head) = handshake.get(..4) {
            let message_len =
                usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]);
            if handshake.len() >= 4 + message_len {
                return match parse_hello(&handshake[..4 + message_len]) {
                    Some(Some(name)) => Hello::Name(name),
                    Some(None) => Hello::NoName,
                    None => Hello::Malformed,
                };
            }
        }
    }
}

fn parse_hello(message: &[u8]) -> Option<Option<String>> {
    let mut at = 0;
    // ClientHello (1), its length, version, random.
    (number(message, &mut at, 1)? == 1).then_some(())?;
    at += 3 + 2 + 32;
    skip_vector(message, &mut at, 1)?; // session id
    skip_vector(message, &mut at, 2)?; // cipher suites
    skip_vector(message, &mut at, 1)?; // compression methods
    if at == message.len() {
        return Some(None);
    }
    let extensions_len = number(message, &mut at, 2)?;
    let extensions = message.get(at..at + extensions_len)?;
    let mut at = 0;
    while at < extensions.len() {
        let kind = number(extensions, &mut at, 2)?;
        let len = number(extensions, &mut at, 2)?;
        let data = extensions.get(at..at + len)?;
        at += len;
        if kind != 0 {
            continue;
        }
        // server_name: a list of (type, name); type 0 is a host name.
        let mut i = 2;
        while i < data.len() {
            let name_type = *data.get(i)?;
            let name_len = number(data, &mut (i + 1), 2)?;
            let name = data.get(i + 3..i + 3 + name_len)?;
            if name_type == 0 {
                return Some(Some(String::from_utf8_lossy(name).to_ascii_lowercase()));
            }
            i += 3 + name_len;
        }
    }
    Some(None)
}

/// Reads the client's ClientHello (briefly) and returns its server name, if any, with the
/// stream those bytes are put back into. A connection that starts as TLS but whose hello cannot
/// be read in time, whole and well formed, is refused: judging it without a name would let it
/// past a DENY on `connection.sni`.
pub async fn read_server_name<S: AsyncRead + Unpin>(
    mut stream: S,
) -> Result<(Option<String>, Prefixed<S>), ProxyError> {
    let mut buffer = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let unreadable = || ProxyError::Denied {
        by: "connection.sni: the TLS ClientHello could not be read whole".to_owned(),
    };
    let name = loop {
        match server_name(&buffer) {
            Hello::Name(name) => break Some(name),
            Hello::NoName | Hello::NotTls => break None,
            Hello::Malformed => return Err(unreadable()),
            Hello::Incomplete if buffer.len() >= MAX_HELLO => return Err(unreadable()),
            Hello::Incomplete => {}
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buffer)).await {
            // Nothing at all: a protocol where the server speaks first, not TLS.
            Ok(Ok(0)) | Err(_) if buffer.is_empty() => break None,
            Ok(Ok(0)) | Err(_) => return Err(unreadable()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(ProxyError::Io(e)),
        }
    };
    Ok((name, Prefixed::new(Bytes::from(buffer), stream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as a TLS client writes it, naming `name`.
    fn client_hello(name: Option<&str>) -> Vec<u8> {
        let mut extensions = Vec::new();
        // A supported_versions extension first, so the name is not the only one.
        extensions.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        if let Some(name) = name {
            let n = u16::try_from(name.len()).expect("short name");
            let mut list = vec![0u8];
            list.extend_from_slice(&n.to_be_bytes());
            list.extend_from_slice(name.as_bytes());
            let list_len = u16::try_from(list.len()).expect("short");
            extensions.extend_from_slice(&[0x00, 0x00]);
            extensions.extend_from_slice(&(list_len + 2).to_be_bytes());
            extensions.extend_from_slice(&list_len.to_be_bytes());
            extensions.extend_from_slice(&list);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0]); // no session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
        body.extend_from_slice(&[0x01, 0x00]);
        body.extend_from_slice(
            &u16::try_from(extensions.len())
                .expect("short")
                .to_be_bytes(),
        );
        body.extend_from_slice(&extensions);
        let mut handshake = vec![0x01, 0x00];
        handshake.extend_from_slice(&u16::try_from(body.len()).expect("short").to_be_bytes());
        handshake.extend_from_slice(&body);
        let mut record = vec![22, 0x03, 0x01];
        record.extend_from_slice(&u16::try_from(handshake.len()).expect("short").to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[test]
    fn the_server_name_of_a_client_hello() {
        let hello = client_hello(Some("Api.Example.com"));
        assert_eq!(server_name(&hello), Hello::Name("api.example.com".into()));
        assert_eq!(server_name(&hello[..hello.len() - 1]), Hello::Incomplete);
        assert_eq!(server_name(&hello[..3]), Hello::Incomplete);
        assert_eq!(server_name(&client_hello(None)), Hello::NoName);
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(
            server_name(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"),
            Hello::Malformed,
            "a handshake that is not a ClientHello"
        );
    }

    /// The same hello cut into records of `size` bytes, as TLS allows.
    fn fragmented(hello: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in hello[5..].chunks(size) {
            out.extend_from_slice(&hello[..3]);
            out.extend_from_slice(&u16::try_from(chunk.len()).expect("short").to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn a_hello_over_several_records_is_reassembled() {
        let hello = fragmented(&client_hello(Some("db.internal")), 7);
        assert_eq!(server_name(&hello), Hello::Name("db.internal".into()));
        assert_eq!(server_name(&hello[..hello.len() - 3]), Hello::Incomplete);
    }

    #[tokio::test]
    async fn a_tls_client_that_stalls_mid_hello_is_refused_not_judged_nameless() {
        let (mut client, server) = tokio::io::duplex(1024);
        let hello = client_hello(Some("admin.internal"));
        tokio::io::AsyncWriteExt::write_all(&mut client, &hello[..10])
            .await
            .expect("write");
        let refused = read_server_name(server).await;
        assert!(
            matches!(refused, Err(ProxyError::Denied { .. })),
            "{refused:?}"
        );
        drop(client);
    }

    #[tokio::test]
    async fn a_silent_client_is_not_tls() {
        let (_client, server) = tokio::io::duplex(64);
        let (name, _) = read_server_name(server)
            .await
            .expect("judged without a name");
        assert_eq!(name, None);
    }

    #[tokio::test]
    async fn the_bytes_read_go_on_unchanged() {
        let mut hello = client_hello(Some("db.internal"));
        hello.extend_from_slice(b"more");
        let (name, mut stream) = read_server_name(&hello[..]).await.expect("read");
        assert_eq!(name.as_deref(), Some("db.internal"));
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.expect("read back");
        assert_eq!(all, hello);
    }

    proptest::proptest! {
        /// The client's first bytes, whatever they are: an answer, never a panic.
        #[test]
        fn any_first_bytes_get_an_answer(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = server_name(&bytes);
            let mut tls = vec![22, 3, 1];
            tls.extend_from_slice(&bytes);
            let _ = server_name(&tls);
        }

        /// A hello cut into records of any size still gives its name.
        #[test]
        fn a_fragmented_hello_gives_its_name(size in 1usize..64) {
            let hello = fragmented(&client_hello(Some("db.internal")), size);
            proptest::prop_assert_eq!(server_name(&hello), Hello::Name("db.internal".into()));
        }
    }
}
