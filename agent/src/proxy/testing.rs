//! Test support: an HBONE connection in memory.

use std::future::Future;

use nodemesh_hbone::{ClientSettings, ConnectRequest, HboneSender, ServerSettings, Tunnel};
use tokio::sync::mpsc;

/// An HBONE connection in memory: the client's sender, and the server's end of each tunnel it
/// accepts. The server answers each CONNECT once `answer()` (one call per CONNECT) is done.
pub async fn hbone_in_memory<A, F>(answer: A) -> (HboneSender, mpsc::UnboundedReceiver<Tunnel>)
where
    A: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send,
{
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let (ends, far_ends) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let handle = move |connect: ConnectRequest| {
            let (answer, ends) = (answer.clone(), ends.clone());
            async move {
                answer().await;
                let (response, tunnel) = connect.accept();
                tokio::spawn(async move {
                    if let Some(tunnel) = tunnel.await {
                        let _ = ends.send(tunnel);
                    }
                });
                response
            }
        };
        let settings = ServerSettings::default();
        nodemesh_hbone::serve(server_io, &settings, std::future::pending(), handle).await
    });
    let sender = nodemesh_hbone::handshake(client_io, &ClientSettings::default())
        .await
        .expect("HTTP/2");
    (sender, far_ends)
}
