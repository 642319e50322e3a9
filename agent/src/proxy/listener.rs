//! The accept loop shared by the inbound and outbound listeners.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Pause after an accept error (out of file descriptors, say) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Accepts connections until `token` is cancelled and runs `handle` for each in its own task.
/// Cancelling the token also ends the connections' tasks, closing their sockets.
pub async fn accept_loop<F, Fut>(listener: TcpListener, token: CancellationToken, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            biased;
            () = token.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(
                    token
                        .clone()
                        .run_until_cancelled_owned(handle(stream, peer)),
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                if token
                    .run_until_cancelled(tokio::time::sleep(ACCEPT_ERROR_PAUSE))
                    .await
                    .is_none()
                {
                    return;
                }
            }
        }
    }
}
