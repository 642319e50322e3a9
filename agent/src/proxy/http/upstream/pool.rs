//! Connections to endpoints, kept for the next request. HTTP/1.1: a connection carries one
//! request at a time and goes back to the pool when its response body ends; when every
//! connection is busy and `maxConnections` are open, the request waits (at most
//! `maxPendingRequests` wait; more get 503 `UO`). HTTP/2: one connection per endpoint carries
//! every request at once. A connection is replaced after `maxRequestsPerConnection` requests
//! or `maxConnectionDuration`, and closed after `connectionIdleTimeout` unused.

mod pooled;

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodemesh_traffic::{BackendTarget, policy::BudgetSettings};
// Tokio's clock, which tests can pause and advance.
use tokio::{sync::Notify, time::Instant};

use self::pooled::{Pooled, Return};
use super::{ConnectTarget, Connector, UpstreamProtocol, connect_failed, reset};
use crate::{
    proxy::http::{
        Body, HttpRequest, HttpResponse, boxed,
        breaker::overflow,
        state::{ClientState, Held},
    },
    workers,
};

/// A client workload's connections to one endpoint, by protocol; under it, by backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    client: Arc<str>,
    endpoint: SocketAddrV4,
    protocol: UpstreamProtocol,
}

/// Every pooled connection of the node proxy.
#[derive(Debug)]
pub struct UpstreamPools {
    connector: Arc<dyn Connector>,
    /// By client, endpoint and protocol, then by backend (`state_key`, looked up by
    /// reference: a request builds no key string).
    pools: Mutex<HashMap<PoolKey, HashMap<String, Arc<EndpointPool>>>>,
}

/// The connections of one client workload to one endpoint of one backend.
#[derive(Debug, Default)]
struct EndpointPool {
    idle: Mutex<Vec<(http1::SendRequest<Body>, Arc<ConnInfo>)>>,
    /// Signalled when a connection goes back to the pool or closes.
    changed: Notify,
    h2: tokio::sync::Mutex<Option<(http2::SendRequest<Body>, Arc<ConnInfo>)>>,
}

/// What the pool knows of one connection.
#[derive(Debug)]
struct ConnInfo {
    born: Instant,
    /// The proxy worker that drives it: a request on that worker uses it without waking
    /// another thread.
    worker: usize,
    requests: AtomicU32,
    /// Requests in flight on it.
    busy: AtomicU32,
    /// When it last became unused.
    idle_since: Mutex<Instant>,
    closed: AtomicBool,
}

/// Limits that decide whether a connection is kept.
#[derive(Debug, Clone, Copy)]
struct Reuse {
    max_requests: Option<u32>,
    max_age: Option<Duration>,
    idle_timeout: Duration,
}

impl ConnInfo {
    fn new() -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            born: now,
            worker: workers::current(),
            requests: AtomicU32::new(0),
            busy: AtomicU32::new(0),
            idle_since: Mutex::new(now),
            closed: AtomicBool::new(false),
        })
    }

    /// Whether it may carry another request.
    fn reusable(&self, reuse: Reuse, now: Instant) -> bool {
        !self.closed.load(Ordering::Acquire)
            && reuse
                .max_requests
                .is_none_or(|max| self.requests.load(Ordering::Relaxed) < max)
            && reuse
                .max_age
                .is_none_or(|max| now.saturating_duration_since(self.born) < max)
    }

    fn start(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.busy.fetch_add(1, Ordering::AcqRel);
    }

    fn finish(&self) {
        if self.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }

    /// How long it has been unused, `None` while busy.
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        Some(now.saturating_duration_since(since))
    }
}

/// Ends when the connection has been unused for `idle_timeout` (or, past its maximum age,
/// as soon as it is unused).
async fn idle_close(info: Arc<ConnInfo>, reuse: Reuse) {
    loop {
        let now = Instant::now();
        let old = reuse
            .max_age
            .is_some_and(|max| now.saturating_duration_since(info.born) >= max);
        let wait = match info.idle_for(now) {
            Some(_) if old => return,
            Some(idle) if idle >= reuse.idle_timeout => return,
            Some(idle) => reuse.idle_timeout - idle,
            None if old => Duration::from_millis(100),
            None => reuse.idle_timeout,
        };
        tokio::time::sleep(wait).await;
    }
}

impl UpstreamPools {
    pub fn new(connector: Arc<dyn Connector>) -> Self {
        Self {
            connector,
            pools: Mutex::default(),
        }
    }

    fn pool(&self, key: PoolKey, state_key: &str) -> Arc<EndpointPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let backends = pools.entry(key).or_default();
        if let Some(pool) = backends.get(state_key) {
            return pool.clone();
        }
        let pool = Arc::new(EndpointPool::default());
        backends.insert(state_key.to_owned(), pool.clone());
        pool
    }

    /// Forgets the pools of clients and backends the configuration no longer has; their
    /// connections close once their requests are done.
    pub fn retain(
        &self,
        state_keys: &std::collections::HashSet<String>,
        clients: &std::collections::HashSet<String>,
    ) {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, backends| {
                backends.retain(|state_key, _| state_keys.contains(state_key));
                clients.contains(&*key.client) && !backends.is_empty()
            });
    }

    /// Sends `req` to `target`'s endpoint on a pooled connection.
    pub async fn send(
        &self,
        client: &Arc<str>,
        backend: &BackendTarget,
        target: ConnectTarget,
        protocol: UpstreamProtocol,
        client_state: Option<Arc<ClientState>>,
        req: HttpRequest,
    ) -> HttpResponse {
        let pool = self.pool(
            PoolKey {
                client: client.clone(),
                endpoint: target.endpoint.addr,
                protocol,
            },
            &backend.state_key,
        );
        let client_state =
            client_state.unwrap_or_else(|| Arc::new(ClientState::new(BudgetSettings::default())));
        let settings = &backend.settings;
        let reuse = Reuse {
            max_requests: settings.limits.max_requests_per_connection,
            max_age: settings.max_connection_duration,
            idle_timeout: settings.idle_timeout,
        };
        match protocol {
            UpstreamProtocol::Http1 => {
                self.send_http1(&pool, backend, target, &client_state, reuse, req)
                    .await
            }
            UpstreamProtocol::Http2 => {
                self.send_http2(&pool, backend, target, &client_state, reuse, req)
                    .await
            }
        }
    }

    async fn send_http1(
        &self,
        pool: &Arc<EndpointPool>,
        backend: &BackendTarget,
        target: ConnectTarget,
        client_state: &Arc<ClientState>,
        reuse: Reuse,
        req: HttpRequest,
    ) -> HttpResponse {
        let limits = backend.settings.limits;
        let mut pending: Option<Held> = None;
        let (mut sender, info) = loop {
            let changed = pool.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // This worker's idle connection; else a new one, which this worker drives; only at
            // `maxConnections` another worker's idle one (its every request then wakes that
            // worker's thread: 7 context switches per request instead of 2, measured).
            if let Some((mut sender, info)) = take_idle(pool, reuse, Some(workers::current())) {
                if sender.ready().await.is_ok() {
                    break (sender, info);
                }
                continue;
            }
            if let Some(held) = client_state.try_hold(|c| &c.connections, limits.max_connections) {
                match self
                    .open(pool, &target, held, reuse, http1::handshake)
                    .await
                {
                    Ok(opened) => break opened,
                    Err(refused) => return *refused,
                }
            }
            if let Some((mut sender, info)) = take_idle(pool, reuse, None) {
                if sender.ready().await.is_ok() {
                    break (sender, info);
                }
                continue;
            }
            if pending.is_none() {
                let Some(held) = client_state.try_hold(|c| &c.pending, limits.max_pending_requests)
                else {
                    return overflow(
                        &backend.service_key,
                        "maxPendingRequests",
                        limits.max_pending_requests,
                    );
                };
                pending = Some(held);
            }
            changed.await;
        };
        drop(pending);
        info.start();
        match sender.send_request(req).await {
            Ok(response) => response.map(|body| {
                boxed(Pooled::new(
                    body,
                    Some(Return {
                        pool: pool.clone(),
                        sender,
                        info,
                        reuse,
                    }),
                ))
            }),
            Err(e) => {
                info.finish();
                reset(&target.endpoint, &e)
            }
        }
    }

    async fn send_http2(
        &self,
        pool: &Arc<EndpointPool>,
        backend: &BackendTarget,
        target: ConnectTarget,
        client_state: &Arc<ClientState>,
        reuse: Reuse,
        req: HttpRequest,
    ) -> HttpResponse {
        let (mut sender, info) = {
            let mut slot = pool.h2.lock().await;
            let now = Instant::now();
            match slot.as_ref() {
                Some((sender, info)) if !sender.is_closed() && info.reusable(reuse, now) => {
                    (sender.clone(), info.clone())
                }
                _ => {
                    let limits = backend.settings.limits;
                    let Some(held) =
                        client_state.try_hold(|c| &c.connections, limits.max_connections)
                    else {
                        return overflow(
                            &backend.service_key,
                            "maxConnections",
                            limits.max_connections,
                        );
                    };
                    let handshake = |io| http2::Builder::new(TokioExecutor::new()).handshake(io);
                    let (sender, info) =
                        match self.open(pool, &target, held, reuse, handshake).await {
                            Ok(opened) => opened,
                            Err(refused) => return *refused,
                        };
                    *slot = Some((sender.clone(), info.clone()));
                    (sender, info)
                }
            }
        };
        if sender.ready().await.is_err() {
            return reset(&target.endpoint, &"the HTTP/2 connection closed");
        }
        info.start();
        match sender.send_request(req).await {
            Ok(response) => response.map(|body| boxed(Pooled::new(body, None).watching(info))),
            Err(e) => {
                info.finish();
                reset(&target.endpoint, &e)
            }
        }
    }
}

impl UpstreamPools {
    /// Connects to the endpoint and starts HTTP on the stream with `handshake`; the
    /// connection's driver holds its place in `maxConnections`. The error is the answer.
    async fn open<Sender, Conn, H, F>(
        &self,
        pool: &Arc<EndpointPool>,
        target: &ConnectTarget,
        held: Held,
        reuse: Reuse,
        handshake: H,
    ) -> Result<(Sender, Arc<ConnInfo>), Box<HttpResponse>>
    where
        H: FnOnce(TokioIo<super::UpstreamIo>) -> F,
        F: std::future::Future<Output = hyper::Result<(Sender, Conn)>>,
        Conn: std::future::Future + Send + 'static,
    {
        let io = self
            .connector
            .connect(target.clone())
            .await
            .map_err(|e| Box::new(connect_failed(&target.endpoint, &e)))?;
        let (sender, connection) = handshake(TokioIo::new(io))
            .await
            .map_err(|e| Box::new(connect_failed(&target.endpoint, &e)))?;
        let info = ConnInfo::new();
        spawn_driver(pool.clone(), info.clone(), held, reuse, connection);
        Ok((sender, info))
    }
}

/// The most recently used idle connection that `worker` drives (of any worker with `None`).
fn take_idle(
    pool: &EndpointPool,
    reuse: Reuse,
    worker: Option<usize>,
) -> Option<(http1::SendRequest<Body>, Arc<ConnInfo>)> {
    let now = Instant::now();
    let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
    idle.retain(|(sender, info)| !sender.is_closed() && info.reusable(reuse, now));
    let at = idle
        .iter()
        .rposition(|(_, info)| worker.is_none_or(|w| info.worker == w))?;
    Some(idle.remove(at))
}

/// Drives a connection until it ends or has been idle too long; gives back its place in
/// `maxConnections` and wakes waiting requests when it ends.
fn spawn_driver<F>(
    pool: Arc<EndpointPool>,
    info: Arc<ConnInfo>,
    held: Held,
    reuse: Reuse,
    connection: F,
) where
    F: std::future::Future + Send + 'static,
{
    tokio::spawn(async move {
        tokio::select! {
            _ = connection => {}
            () = idle_close(info.clone(), reuse) => {}
        }
        info.closed.store(true, Ordering::Release);
        drop(held);
        pool.changed.notify_waiters();
    });
}

#[cfg(test)]
mod tests;
