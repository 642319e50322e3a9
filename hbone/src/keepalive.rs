//! HTTP/2 PING keepalive: a connection whose peer stops answering is closed, so that a pooled
//! connection to a vanished node is not handed to new tunnels.

use std::time::Duration;

use h2::{Ping, PingPong};

/// Pings every `interval` with a new connection's ping handle; resolves when an answer has not
/// come within `timeout`, or the connection can no longer send pings.
pub(crate) async fn run(ping_pong: Option<PingPong>, interval: Duration, timeout: Duration) {
    let mut ping_pong =
        ping_pong.expect("a new connection's ping handle is taken once, by its keepalive");
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "HBONE keepalive ping failed");
                return;
            }
            Err(_) => {
                tracing::debug!(?timeout, "no answer to an HBONE keepalive ping");
                return;
            }
        }
    }
}
