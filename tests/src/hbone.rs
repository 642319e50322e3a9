//! An HBONE client for tests, presenting whatever certificate a test gives it.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// From inside `netns`, opens an HBONE tunnel to `authority` through `hbone` with `tls`,
/// sends `message`, half-closes and returns what came back.
pub fn hbone_echo(
    netns: &str,
    hbone: SocketAddr,
    tls: rustls::ClientConfig,
    authority: SocketAddr,
    message: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let tcp = nodemesh_sandbox::in_netns(netns, move || {
        let tcp = std::net::TcpStream::connect_timeout(&hbone, Duration::from_secs(5))?;
        tcp.set_nonblocking(true)?;
        Ok(tcp)
    })?;
    let message = message.to_vec();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let exchange = async {
            let tcp = tokio::net::TcpStream::from_std(tcp)?;
            let name = ServerName::IpAddress(hbone.ip().into());
            let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            let settings = nodemesh_hbone::ClientSettings::default();
            let mut sender = nodemesh_hbone::handshake(tls, &settings).await?;
            let mut tunnel = nodemesh_hbone::open_tunnel(&mut sender, authority).await?;
            tunnel.write_all(&message).await?;
            tunnel.shutdown().await?;
            let mut reply = Vec::new();
            tunnel.read_to_end(&mut reply).await?;
            anyhow::Ok(reply)
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .context("HBONE exchange timed out")?
    })
}
