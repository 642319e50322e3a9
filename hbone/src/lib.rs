//! HBONE, the tunnel between node proxies: each TCP connection is an HTTP/2 `CONNECT`
//! stream whose `:authority` is the original destination `ip:port`, many streams per HTTP/2
//! connection, over TLS 1.3 with ALPN `h2` and SPIFFE certificates on both ends (see
//! `nodemesh-identity::tls`), to port 15008 of the destination pod. This is the wire format of
//! Istio's ztunnel, so the two interoperate.
//!
//! This crate speaks the HTTP/2 part over any byte stream; TLS and sockets are the caller's.
#![forbid(unsafe_code)]

mod activity;
mod client;
#[cfg(test)]
mod fuzz;
mod keepalive;
mod server;
mod tunnel;

pub use client::{ClientSettings, Connecting, HboneSender, connect, handshake, open_tunnel};
pub use server::{ConnectRequest, ServerSettings, serve, status};
pub use tunnel::Tunnel;

/// The port HBONE listens on inside every pod.
pub const HBONE_PORT: u16 = 15008;

/// Per-stream flow-control window: large enough that one tunnel reaches full speed on a fast
/// link without waiting for window updates.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection window, shared by the streams of one HTTP/2 connection.
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 DATA frame, so that bulk copies need few frames.
const MAX_FRAME: u32 = 1024 * 1024;
/// Bytes one stream may have queued for sending before its writer waits.
const MAX_SEND_BUFFER: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(h2::Error),
    #[error("no HTTP/2 preface from the client within {0:?}")]
    NoPreface(std::time::Duration),
    #[error("HTTP/2: {0}")]
    Connection(h2::Error),
    #[error("the HBONE connection is closed")]
    Closed,
    #[error("CONNECT {authority} failed: {source}")]
    Connect {
        authority: std::net::SocketAddr,
        source: h2::Error,
    },
    #[error("CONNECT {authority} was answered {status}")]
    Refused {
        authority: std::net::SocketAddr,
        status: http::StatusCode,
    },
}

/// Largest header block either side accepts: a CONNECT carries a few short headers
/// (`baggage`, `forwarded`, `traceparent`).
const MAX_HEADER_LIST: u32 = 16 * 1024;
