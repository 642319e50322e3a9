//! Path normalisation before anything judges or routes a request, with Istio's options
//! (`MeshSettings.spec.pathNormalization`), so that `/public/../private`, `/public/%2e%2e/private`
//! and `/%70rivate` are all judged, routed and served as the `/private` they mean.
//!
//! - `NONE`: the path as the client sent it.
//! - `BASE` (the default): RFC 3986 normalisation as Envoy's `normalize_path` does it:
//!   percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) decoded, other escapes kept
//!   exactly as written, characters a path may not hold raw escaped, `\` turned into `/`, then
//!   the dot segments (`.` and `..`, also when written `%2e`) removed. `%2F` and `%5C` stay.
//! - `MERGE_SLASHES`: `BASE`, then runs of `/` merged into one.
//! - `DECODE_AND_MERGE_SLASHES`: `%2F` and `%5C` decoded first (so they separate segments),
//!   then `MERGE_SLASHES`.
//!
//! An encoded NUL (`%00`) cannot be normalised, and a method must be in upper case: such a
//! request is refused with 400, as Istio documents.
//! Case is never changed: `/Private` stays `/Private`, as in Istio.

use std::borrow::Cow;

pub use nodemesh_config::PathNormalization;

/// Why a request cannot be normalised; it is refused with 400, as by Envoy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("the path does not start with `/`")]
    NotAbsolute,
    #[error("the path holds an encoded NUL (`%00`)")]
    Nul,
    #[error("the method {0:?} is not in upper case")]
    MethodCase(String),
    #[error("the authority carries user information (`user@`)")]
    UserInfo,
    #[error("the request has more than one Host header")]
    TwoHosts,
    #[error("the Host header contradicts `:authority`")]
    HostMismatch,
    #[error("the normalised request target cannot be written back")]
    Unrepresentable,
}

/// Istio refuses a method that is not in upper case (`get`) rather than judge it.
pub fn check_method(method: &str) -> Result<(), InvalidRequest> {
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        Err(InvalidRequest::MethodCase(method.to_owned()))
    } else {
        Ok(())
    }
}

/// The path (without its query) normalised as `mode` says; borrowed when nothing changes.
pub fn normalize_path(path: &str, mode: PathNormalization) -> Result<Cow<'_, str>, InvalidRequest> {
    if mode == PathNormalization::None || path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(InvalidRequest::NotAbsolute);
    }
    let merge = mode != PathNormalization::Base;
    if is_normal(path, merge) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path, mode == PathNormalization::DecodeAndMergeSlashes)?;
    let mut normal = remove_dot_segments(&decoded);
    if merge {
        normal = merge_slashes(&normal);
    }
    Ok(Cow::Owned(normal))
}

/// Whether the path has nothing to normalise: the common case, checked without allocating.
fn is_normal(path: &str, merge: bool) -> bool {
    let clean_bytes = !path
        .bytes()
        .any(|b| b == b'%' || b == b'\\' || must_escape(b));
    let no_dots = !path
        .split('/')
        .any(|segment| segment == "." || segment == "..");
    clean_bytes && no_dots && !(merge && path.contains("//"))
}

/// Unreserved characters (RFC 3986 section 2.3): never need escaping, so their escapes mean
/// the character itself.
fn unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Bytes a path may not carry raw; written as escapes, as Envoy's canonicaliser does.
fn must_escape(byte: u8) -> bool {
    byte <= b' ' || byte >= 0x7f || b"\"<>^`{|}".contains(&byte)
}

fn hex(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

fn push_escaped(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0xf)]));
}

/// The escape at `i`, when `bytes[i..]` starts with one: its byte.
fn escape_at(bytes: &[u8], i: usize) -> Option<u8> {
    if bytes.get(i) != Some(&b'%') {
        return None;
    }
    let high = bytes.get(i + 1).copied().and_then(hex)?;
    let low = bytes.get(i + 2).copied().and_then(hex)?;
    Some(high << 4 | low)
}

/// The character at `i` once decoded, and the bytes it takes.
fn decoded_at(bytes: &[u8], i: usize) -> Option<(u8, usize)> {
    match escape_at(bytes, i) {
        Some(byte) if unreserved(byte) => Some((byte, 3)),
        Some(_) => None,
        None => bytes.get(i).map(|b| (*b, 1)),
    }
}

/// Decodes the escapes that normalisation decodes (keeping the others as written), escapes
/// what may not stay raw, turns `\` into `/`.
fn decode(path: &str, slashes: bool) -> Result<String, InvalidRequest> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte == b'%' {
            match escape_at(bytes, i) {
                Some(0) => return Err(InvalidRequest::Nul),
                Some(b'/') if slashes => out.push('/'),
                Some(b'\\') if slashes => out.push('/'),
                Some(c) if unreserved(c) => out.push(char::from(c)),
                Some(_) => out.push_str(&path[i..i + 3]),
                None => {
                    // A `%` that starts no escape stays, unless what follows decodes to two hex
                    // digits: `%%32%65` must not become the escape `%2e` once decoded.
                    let first = decoded_at(bytes, i + 1);
                    let second = first.and_then(|(_, len)| decoded_at(bytes, i + 1 + len));
                    let forms_escape = matches!(
                        (first, second),
                        (Some((a, _)), Some((b, _))) if hex(a).is_some() && hex(b).is_some()
                    );
                    out.push_str(if forms_escape { "%25" } else { "%" });
                }
            }
            i += if escape_at(bytes, i).is_some() { 3 } else { 1 };
        } else if byte == b'\\' {
            out.push('/');
            i += 1;
        } else if byte == 0 {
            return Err(InvalidRequest::Nul);
        } else if must_escape(byte) {
            push_escaped(&mut out, byte);
            i += 1;
        } else {
            // Copy the run up to the next byte that needs a look.
            let end = bytes[i..]
                .iter()
                .position(|b| *b == b'%' || *b == b'\\' || must_escape(*b))
                .map_or(bytes.len(), |p| i + p);
            out.push_str(&path[i..end]);
            i = end;
        }
    }
    Ok(out)
}

/// RFC 3986 section 5.2.4 on an absolute path: `.` segments dropped, `..` removes the segment
/// before it (never above the root).
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = path.split('/').skip(1).peekable();
    // Whether the path ends in a directory (`/a/.` and `/a/..` end with `/`).
    let mut trailing = false;
    while let Some(segment) = parts.next() {
        let last = parts.peek().is_none();
        match segment {
            "." => trailing = last,
            ".." => {
                segments.pop();
                trailing = last;
            }
            _ => {
                segments.push(segment);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    out
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests;
