use std::{
    convert::Infallible,
    sync::atomic::{AtomicUsize, Ordering},
};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::server::conn::auto;

use super::*;
use crate::proxy::{
    ProxyError,
    http::{
        ResponseFlags,
        balance::ChosenEndpoint,
        flags_of, full_body,
        testing::{self},
        upstream::connect::{ConnectFuture, UpstreamIo},
    },
};

/// Connects to an in-memory HTTP server that answers after `delay`, counting connections; or
/// refuses every connection.
#[derive(Debug, Default)]
struct Memory {
    connections: AtomicUsize,
    delay: Duration,
    refuse: bool,
}

impl Connector for Memory {
    fn connect(&self, target: ConnectTarget) -> ConnectFuture {
        if self.refuse {
            return Box::pin(async move {
                Err(ProxyError::Connect {
                    dst: std::net::SocketAddr::V4(target.endpoint.addr),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                })
            });
        }
        let id = self.connections.fetch_add(1, Ordering::SeqCst);
        let delay = self.delay;
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| async move {
                tokio::time::sleep(delay).await;
                let _ = req.into_body().collect().await;
                Ok::<_, Infallible>(Response::new(full_body(format!("connection {id}"))))
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        Box::pin(async move { Ok(Box::new(client) as UpstreamIo) })
    }
}

fn target() -> ConnectTarget {
    ConnectTarget {
        endpoint: ChosenEndpoint {
            addr: "10.0.0.1:8080".parse().expect("addr"),
            destination: None,
        },
        pod: None,
        connect_timeout: Duration::from_secs(1),
        service: None,
    }
}

fn request() -> HttpRequest {
    Request::builder()
        .uri("/")
        .header("host", "web")
        .body(full_body(""))
        .expect("request")
}

fn request_h2() -> HttpRequest {
    Request::builder()
        .uri("http://web/")
        .version(http::Version::HTTP_2)
        .body(full_body(""))
        .expect("request")
}

async fn send(
    pools: &UpstreamPools,
    backend: &BackendTarget,
    protocol: UpstreamProtocol,
    client: &Arc<ClientState>,
) -> (StatusCode, String, ResponseFlags) {
    let req = if protocol == UpstreamProtocol::Http2 {
        request_h2()
    } else {
        request()
    };
    let response = pools
        .send(
            &Arc::from("shop/client"),
            backend,
            target(),
            protocol,
            Some(client.clone()),
            req,
        )
        .await;
    let status = response.status();
    let flags = flags_of(&response);
    (status, testing::body_text(response).await, flags)
}

fn client_state() -> Arc<ClientState> {
    Arc::new(ClientState::new(BudgetSettings::default()))
}

#[tokio::test]
async fn http1_connections_are_kept_alive_and_reused() {
    let memory = Arc::new(Memory::default());
    let pools = UpstreamPools::new(memory.clone());
    let backend = testing::target();
    let client = client_state();
    for _ in 0..5 {
        let (status, body, _) = send(&pools, &backend, UpstreamProtocol::Http1, &client).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "connection 0", "the same connection every time");
    }
    assert_eq!(memory.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_http1_request_uses_a_connection_its_own_worker_drives() {
    let memory = Arc::new(Memory {
        delay: Duration::from_millis(100),
        ..Memory::default()
    });
    let pools = Arc::new(UpstreamPools::new(memory.clone()));
    let backend = testing::target();
    let mut limited = backend.clone();
    Arc::make_mut(&mut limited.settings).limits.max_connections = 2;
    let client = client_state();
    let workers = crate::workers::Workers::start(2).expect("workers");
    let on = |worker: usize, backend: &BackendTarget| {
        let (pools, backend, client) = (pools.clone(), backend.clone(), client.clone());
        workers.handles()[worker].spawn(async move {
            let (status, body, _) = send(&pools, &backend, UpstreamProtocol::Http1, &client).await;
            assert_eq!(status, StatusCode::OK);
            body
        })
    };
    // One after the other: worker 1 opens a connection of its own rather than take the one
    // worker 0 left idle.
    let opened = [
        on(0, &backend).await.expect("worker 0"),
        on(1, &backend).await.expect("worker 1"),
    ];
    assert_ne!(opened[0], opened[1]);
    for _ in 0..3 {
        for worker in [1, 0] {
            assert_eq!(
                on(worker, &backend).await.expect("request"),
                opened[worker],
                "worker {worker} reuses its own idle connection"
            );
        }
    }
    assert_eq!(memory.connections.load(Ordering::SeqCst), 2);
    // At maxConnections, with only the other worker's connection idle, that one is used.
    let busy = on(0, &limited);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(on(0, &limited).await.expect("request"), opened[1]);
    busy.await.expect("request");
    assert_eq!(memory.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn concurrent_http1_requests_open_more_connections_up_to_the_limit_then_wait() {
    let memory = Arc::new(Memory {
        delay: Duration::from_millis(50),
        ..Memory::default()
    });
    let pools = Arc::new(UpstreamPools::new(memory.clone()));
    let mut backend = testing::target();
    Arc::make_mut(&mut backend.settings).limits.max_connections = 2;
    let client = client_state();
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (pools, backend, client) = (pools.clone(), backend.clone(), client.clone());
            tokio::spawn(
                async move { send(&pools, &backend, UpstreamProtocol::Http1, &client).await },
            )
        })
        .collect();
    for task in tasks {
        let (status, _, _) = task.await.expect("task");
        assert_eq!(
            status,
            StatusCode::OK,
            "the others waited for a free connection"
        );
    }
    assert_eq!(memory.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn past_max_pending_requests_the_answer_is_503_uo() {
    let memory = Arc::new(Memory {
        delay: Duration::from_millis(200),
        ..Memory::default()
    });
    let pools = Arc::new(UpstreamPools::new(memory.clone()));
    let mut backend = testing::target();
    let limits = &mut Arc::make_mut(&mut backend.settings).limits;
    limits.max_connections = 1;
    limits.max_pending_requests = 1;
    let client = client_state();
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let (pools, backend, client) = (pools.clone(), backend.clone(), client.clone());
            tokio::spawn(
                async move { send(&pools, &backend, UpstreamProtocol::Http1, &client).await },
            )
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        let (status, _, flags) = task.await.expect("task");
        statuses.push((status, flags));
    }
    let overflowed = statuses
        .iter()
        .filter(|(s, f)| {
            *s == StatusCode::SERVICE_UNAVAILABLE && *f == ResponseFlags::UPSTREAM_OVERFLOW
        })
        .count();
    assert_eq!(
        overflowed, 1,
        "{statuses:?}: one in flight, one waiting, one refused"
    );
}

#[tokio::test]
async fn http2_multiplexes_concurrent_requests_on_one_connection() {
    let memory = Arc::new(Memory {
        delay: Duration::from_millis(20),
        ..Memory::default()
    });
    let pools = Arc::new(UpstreamPools::new(memory.clone()));
    let backend = testing::target();
    let client = client_state();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (pools, backend, client) = (pools.clone(), backend.clone(), client.clone());
            tokio::spawn(
                async move { send(&pools, &backend, UpstreamProtocol::Http2, &client).await },
            )
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("task").0, StatusCode::OK);
    }
    assert_eq!(memory.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn max_requests_per_connection_replaces_the_connection() {
    let memory = Arc::new(Memory::default());
    let pools = UpstreamPools::new(memory.clone());
    let mut backend = testing::target();
    Arc::make_mut(&mut backend.settings)
        .limits
        .max_requests_per_connection = Some(2);
    let client = client_state();
    let mut bodies = Vec::new();
    for _ in 0..4 {
        bodies.push(
            send(&pools, &backend, UpstreamProtocol::Http1, &client)
                .await
                .1,
        );
    }
    assert_eq!(
        bodies,
        [
            "connection 0",
            "connection 0",
            "connection 1",
            "connection 1"
        ]
    );
}

#[tokio::test]
async fn a_refused_connection_is_503_uf_with_its_attempt() {
    let pools = UpstreamPools::new(Arc::new(Memory {
        refuse: true,
        ..Memory::default()
    }));
    let response = pools
        .send(
            &Arc::from("shop/client"),
            &testing::target(),
            target(),
            UpstreamProtocol::Http1,
            None,
            request(),
        )
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(flags_of(&response), ResponseFlags::UPSTREAM_CONNECT_FAILURE);
    assert_eq!(
        response
            .extensions()
            .get::<nodemesh_traffic::retry::Attempt>(),
        Some(&nodemesh_traffic::retry::Attempt::ConnectFailure)
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_closes_after_the_idle_timeout() {
    let memory = Arc::new(Memory::default());
    let pools = UpstreamPools::new(memory.clone());
    let mut backend = testing::target();
    Arc::make_mut(&mut backend.settings).idle_timeout = Duration::from_secs(5);
    let client = client_state();
    send(&pools, &backend, UpstreamProtocol::Http1, &client).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (_, body, _) = send(&pools, &backend, UpstreamProtocol::Http1, &client).await;
    assert_eq!(body, "connection 1", "the idle one was closed");
}

/// Which connection answers each of `backends`' requests, in turn.
async fn served(
    pools: &UpstreamPools,
    client: &Arc<ClientState>,
    backends: &[&BackendTarget],
) -> Vec<String> {
    let mut connections = Vec::new();
    for backend in backends {
        connections.push(
            send(pools, backend, UpstreamProtocol::Http1, client)
                .await
                .1,
        );
    }
    connections
}

#[tokio::test]
async fn each_backend_has_its_own_connections_and_retain_forgets_the_ones_configuration_dropped() {
    let memory = Arc::new(Memory::default());
    let pools = UpstreamPools::new(memory.clone());
    let web = testing::target();
    let mut canary = web.clone();
    canary.state_key = format!("policy|{}", web.state_key);
    let client = client_state();
    // Two backends to the same endpoint (the same Service under two policies): a connection
    // each, each reused.
    assert_eq!(
        served(&pools, &client, &[&web, &canary, &web, &canary]).await,
        [
            "connection 0",
            "connection 1",
            "connection 0",
            "connection 1"
        ]
    );
    let keys = |keys: &[&str]| keys.iter().map(|k| (*k).to_owned()).collect();
    pools.retain(&keys(&[&web.state_key]), &keys(&["shop/client"]));
    assert_eq!(
        served(&pools, &client, &[&web, &canary]).await,
        ["connection 0", "connection 2"],
        "the dropped backend's pool is gone"
    );
    // A client that left takes its pools with it.
    pools.retain(&keys(&[&web.state_key, &canary.state_key]), &keys(&[]));
    assert_eq!(served(&pools, &client, &[&web]).await, ["connection 3"]);
    assert_eq!(memory.connections.load(Ordering::SeqCst), 4);
}
