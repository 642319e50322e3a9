//! Opening a byte stream to an endpoint: a pipe to the proxy's own inbound side for a pod of
//! this node, an HBONE tunnel to an endpoint in the mesh elsewhere, plain TCP from the client's
//! pod otherwise. A trait, so that the pools are tested over in-memory streams.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::proxy::{
    PodContext, ProxyError, ProxyShared, http::balance::ChosenEndpoint, local, outbound,
};

/// A connected byte stream.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

pub type UpstreamIo = Box<dyn Io>;

/// What a new connection is for.
#[derive(Debug, Clone)]
pub struct ConnectTarget {
    pub endpoint: ChosenEndpoint,
    /// The client's pod: connections leave from its namespace, with its identity.
    pub pod: Option<Arc<PodContext>>,
    pub connect_timeout: Duration,
    /// `namespace/name` of the Service, for the tunnel's `forwarded` header.
    pub service: Option<String>,
}

pub type ConnectFuture = Pin<Box<dyn Future<Output = Result<UpstreamIo, ProxyError>> + Send>>;

/// Opens connections to endpoints.
pub trait Connector: Send + Sync + std::fmt::Debug + 'static {
    fn connect(&self, target: ConnectTarget) -> ConnectFuture;
}

/// The mesh's connector: in-process to enrolled endpoints of this node, HBONE to enrolled
/// endpoints elsewhere, plain TCP to the others.
#[derive(Debug)]
pub struct MeshConnector {
    shared: std::sync::Weak<ProxyShared>,
}

impl MeshConnector {
    pub fn new(shared: std::sync::Weak<ProxyShared>) -> Self {
        Self { shared }
    }
}

impl Connector for MeshConnector {
    fn connect(&self, target: ConnectTarget) -> ConnectFuture {
        let shared = self.shared.upgrade();
        Box::pin(async move {
            let (Some(shared), Some(pod)) = (shared, target.pod) else {
                return Err(ProxyError::Http(
                    "the proxy is stopping or the client workload is gone".to_owned(),
                ));
            };
            let dst = SocketAddr::V4(target.endpoint.addr);
            let identity = target
                .endpoint
                .destination
                .as_ref()
                .and_then(|d| d.identity.clone());
            let connect = async {
                match identity {
                    Some(identity) => {
                        let client = SocketAddr::new(pod.ip.into(), 0);
                        if let Some(destination) = shared
                            .local
                            .destination(*target.endpoint.addr.ip(), &identity)
                        {
                            let pipe = local::pipe(&pod, client, dst, destination, &shared).await?;
                            return Ok(Box::new(pipe) as UpstreamIo);
                        }
                        let service = target.service.as_deref();
                        let tunnel = outbound::open_hbone_tunnel(
                            &pod, &shared, dst, identity, client, service,
                        )
                        .await?;
                        Ok(Box::new(tunnel) as UpstreamIo)
                    }
                    None if shared.mesh.load().egress == nodemesh_config::EgressPolicy::Deny => {
                        Err(ProxyError::EgressDenied { dst })
                    }
                    None => {
                        let stream = crate::proxy::connect_from_pod(&pod, shared.mark, dst).await?;
                        Ok(Box::new(stream) as UpstreamIo)
                    }
                }
            };
            match tokio::time::timeout(target.connect_timeout, connect).await {
                Ok(result) => result,
                Err(_) => Err(ProxyError::ConnectTimeout {
                    dst,
                    timeout: target.connect_timeout,
                }),
            }
        })
    }
}
