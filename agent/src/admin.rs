//! The agent's HTTP endpoints: admin (:15000), Prometheus metrics (:15020) and readiness
//! (:15021). Small JSON or text answers for operators and tools; never on the traffic path.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::AgentState;

/// Which of the three endpoints a listener serves.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

/// Binds the endpoint now, so that a port in use stops the agent at startup, and serves it in
/// the background until `token` is cancelled.
pub async fn spawn(
    endpoint: Endpoint,
    addr: SocketAddr,
    state: Arc<AgentState>,
    token: CancellationToken,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} ({endpoint:?}): {e}"),
        )
    })?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                () = token.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, ?endpoint, "admin accept failed");
                        continue;
                    }
                },
            };
            let state = state.clone();
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(endpoint, &req, &state)) }
            });
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "admin connection ended");
                }
            });
        }
    });
    Ok(())
}

fn route(endpoint: Endpoint, req: &Request<Incoming>, state: &AgentState) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served here\n".into(),
        );
    }
    match (endpoint, req.uri().path()) {
        (Endpoint::Admin, "/") => text(
            StatusCode::OK,
            "nodemesh agent admin: /healthz /readyz /config_dump /workloads /connections /stats\n"
                .into(),
        ),
        (Endpoint::Admin, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (Endpoint::Admin, "/readyz") | (Endpoint::Readiness, "/healthz/ready") => {
            match state.readiness() {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
            }
        }
        (Endpoint::Admin, "/config_dump") => json(&state.config_dump()),
        (Endpoint::Admin, "/workloads") => json(&state.workloads()),
        (Endpoint::Admin, "/connections") => json(&state.connections.recent()),
        (Endpoint::Admin, "/stats") => {
            let stats: serde_json::Map<String, serde_json::Value> = state
                .datapath
                .stats
                .read()
                .into_iter()
                .map(|(stat, value)| (stat.name().to_owned(), value.into()))
                .collect();
            json(&serde_json::json!({ "ebpf": stats }))
        }
        (Endpoint::Metrics, "/metrics" | "/stats/prometheus") => Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(
                state.metrics.render(&state.datapath.stats),
            )))
            .unwrap_or_default(),
        (_, path) => text(StatusCode::NOT_FOUND, format!("no endpoint {path}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}
