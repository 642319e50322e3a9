//! The outbound HTTP stack, composed once per node, and serving one captured client connection
//! with it: each request is routed, timed, retried, balanced and limited on its own.

use std::{
    net::{IpAddr, SocketAddrV4},
    sync::Arc,
};

use http::{Request, Version};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceBuilder;

use super::{
    balance::BalanceLayer,
    boxed,
    breaker::BreakerLayer,
    detect::Protocol as Detected,
    filter::Stack,
    normalize::NormalizeLayer,
    retry::RetryLayer,
    route::{Addressed, RouteLayer},
    state::{ClientWorkload, TrafficState},
    telemetry::{Reporter, Sinks, TelemetryLayer},
    timeout::TimeoutLayer,
    upstream::{Connector, Protocol, Upstream, UpstreamPools, UpstreamProtocol},
};
use crate::{
    mesh::SharedMesh,
    proxy::{Direction, PodContext, ProxyError},
    telemetry::Labels,
};

/// The traffic state and the outbound stack of the node proxy.
#[derive(Debug)]
pub struct HttpStacks {
    pub traffic: Arc<TrafficState>,
    pub pools: Arc<UpstreamPools>,
    pub sinks: Sinks,
    outbound: Stack,
}

impl HttpStacks {
    pub fn new(
        mesh: Arc<SharedMesh>,
        traffic: Arc<TrafficState>,
        connector: Arc<dyn Connector>,
        sinks: Sinks,
    ) -> Self {
        let pools = Arc::new(UpstreamPools::new(connector));
        let outbound = ServiceBuilder::new()
            .layer(TelemetryLayer::new(sinks.clone()))
            .layer(NormalizeLayer::new(mesh.clone()))
            .layer(RouteLayer::new(mesh))
            .layer(TimeoutLayer::default())
            .layer(RetryLayer::new(traffic.clone()))
            .layer(BalanceLayer::new(traffic.clone()))
            .layer(BreakerLayer::new(traffic.clone()))
            .service(Upstream::new(pools.clone()));
        Self {
            traffic,
            pools,
            sinks,
            outbound: Stack::new(outbound),
        }
    }

    pub fn outbound(&self) -> Stack {
        self.outbound.clone()
    }
}

/// One client connection to a Service port that reads HTTP.
#[derive(Debug)]
pub struct OutboundConnection {
    pub pod: Arc<PodContext>,
    pub client_ip: IpAddr,
    pub service: nodemesh_traffic::ServiceId,
    pub dst: SocketAddrV4,
    /// HTTP/2 to the endpoints even for HTTP/1.1 clients (the port says h2c or gRPC).
    pub http2_upstream: bool,
    pub labels: Arc<Labels>,
}

/// Serves a client connection already detected as HTTP/1.1 or HTTP/2, until it closes.
pub async fn serve<S>(
    client: S,
    protocol: Detected,
    connection: OutboundConnection,
    stack: Stack,
) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let namespace: Arc<str> = Arc::from(
        connection
            .pod
            .key
            .split_once('/')
            .map_or("default", |(ns, _)| ns),
    );
    let downstream_h2 = protocol == Detected::Http2;
    let upstream = if downstream_h2 || connection.http2_upstream {
        UpstreamProtocol::Http2
    } else {
        UpstreamProtocol::Http1
    };
    let workload: Arc<str> = Arc::from(connection.pod.key.as_str());
    let destination = Addressed {
        service: connection.service,
        port: connection.dst.port(),
        client_namespace: namespace,
    };
    let client_workload = ClientWorkload {
        key: workload.clone(),
        ip: connection.client_ip,
    };
    let reporter = Reporter {
        direction: Direction::Outbound,
        workload,
        peer_ip: connection.client_ip,
        peer_identity: Some(Arc::from(connection.pod.identity.to_string().as_str())),
        labels: connection.labels.clone(),
        last: Default::default(),
    };
    let pod = connection.pod.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let mut req = req.map(boxed);
        let extensions = req.extensions_mut();
        extensions.insert(destination.clone());
        extensions.insert(client_workload.clone());
        extensions.insert(reporter.clone());
        extensions.insert(pod.clone());
        extensions.insert(Protocol(upstream));
        let answer = stack.answer(req);
        async move {
            let Ok(mut response) = answer.await;
            *response.version_mut() = if downstream_h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            };
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let io = TokioIo::new(client);
    let served = if downstream_h2 {
        super::http2_server().serve_connection(io, service).await
    } else {
        super::http1_server().serve_connection(io, service).await
    };
    served.map_err(|e| ProxyError::Http(e.to_string()))
}
