//! The server name of an application's own TLS handshake, read from its ClientHello before any
//! byte goes on, for policies with `connection.sni` conditions. The bytes are handed on
//! unchanged: nodemesh does not terminate the application's TLS.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::{ProxyError, http::prefixed::Prefixed};

/// TLS clients speak first; one that has said nothing by then is judged without a name.
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// A ClientHello fits one TLS record.
const MAX_RECORD: usize = 5 + (1 << 14);

/// What the first bytes of a connection say about its server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not all of the first record yet.
    Incomplete,
    /// A ClientHello naming this server.
    Name(String),
    /// TLS without a server name, or not TLS at all.
    NoName,
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

/// Finds the server name in a ClientHello.
pub fn server_name(bytes: &[u8]) -> Hello {
    // Record header: handshake (22), version, length.
    if bytes.first().is_some_and(|b| *b != 22) {
        return Hello::NoName;
    }
    let Some(record_len) = bytes
        .get(3..5)
        .map(|l| usize::from(l[0]) << 8 | usize::from(l[1]))
    else {
        return Hello::Incomplete;
    };
    if bytes.len() < 5 + record_len {
        return Hello::Incomplete;
    }
    let record = &bytes[5..5 + record_len];
    parse_hello(record).map_or(Hello::NoName, |name| match name {
        Some(name) => Hello::Name(name),
        None => Hello::NoName,
    })
}

fn parse_hello(record: &[u8]) -> Option<Option<String>> {
    let mut at = 0;
    // ClientHello (1), its length, version, random.
    (number(record, &mut at, 1)? == 1).then_some(())?;
    at += 3 + 2 + 32;
    skip_vector(record, &mut at, 1)?; // session id
    skip_vector(record, &mut at, 2)?; // cipher suites
    skip_vector(record, &mut at, 1)?; // compression methods
    if at == record.len() {
        return Some(None);
    }
    let extensions_end = at + 2 + number(record, &mut at, 2)?;
    while at + 4 <= extensions_end.min(record.len()) {
        let kind = number(record, &mut at, 2)?;
        let len = number(record, &mut at, 2)?;
        let data = record.get(at..at + len)?;
        at += len;
        if kind != 0 {
            continue;
        }
        // server_name: a list of (type, name); type 0 is a host name.
        let mut i = 2;
        while i + 3 <= data.len() {
            let name_type = data[i];
            let name_len = usize::from(data[i + 1]) << 8 | usize::from(data[i + 2]);
            let name = data.get(i + 3..i + 3 + name_len)?;
            if name_type == 0 {
                return Some(Some(String::from_utf8_lossy(name).to_ascii_lowercase()));
            }
            i += 3 + name_len;
        }
    }
    Some(None)
}

/// Reads the client's first record (briefly) and returns its server name, if any, with the
/// stream those bytes are put back into.
pub async fn read_server_name<S: AsyncRead + Unpin>(
    mut stream: S,
) -> Result<(Option<String>, Prefixed<S>), ProxyError> {
    let mut buffer = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let name = loop {
        match server_name(&buffer) {
            Hello::Name(name) => break Some(name),
            Hello::NoName if !buffer.is_empty() => break None,
            _ if buffer.len() >= MAX_RECORD => break None,
            _ => {}
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buffer)).await {
            Ok(Ok(0)) | Err(_) => break None,
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
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n"), Hello::NoName);
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
}
