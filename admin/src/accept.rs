//! One accept loop step for every listener of the mesh's binaries: an error (out of
//! descriptors, say) is logged and followed by a pause, so that no loop spins on it.

use std::{net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long to wait after a failed accept before trying again. EMFILE and ENFILE clear only
/// when connections close; retrying at once would burn a CPU doing nothing.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The next connection of `listener`; `None` once `token` is cancelled.
pub async fn accept(
    listener: &TcpListener,
    token: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            biased;
            () = token.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(accepted) => return Some(accepted),
            Err(e) => {
                tracing::warn!(error = %e, what, "accept failed; pausing before the next one");
                token
                    .run_until_cancelled(tokio::time::sleep(ACCEPT_ERROR_PAUSE))
                    .await?;
            }
        }
    }
}
