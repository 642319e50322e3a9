//! Fixtures for the layers' unit tests: in-memory services, requests carrying what the layers
//! above would have set, and a small mesh.

use std::{
    convert::Infallible,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use nodemesh_traffic::{BackendTarget, policy::RequestSettings};
use tower::{ServiceExt as _, service_fn, util::BoxCloneSyncService};

use super::{Body, HttpRequest, HttpResponse, filter::Inner, full_body, route::Routed};
use crate::mesh::MeshView;

pub type TestService = BoxCloneSyncService<HttpRequest, HttpResponse, Infallible>;

/// Namespace `shop`, workloads `web-1` .. `web-<n>` at 10.0.0.1.. behind Service `web`
/// (10.96.0.10, port 80 to 8080), and `extra` documents.
pub fn mesh(endpoints: usize, extra: &str) -> Arc<MeshView> {
    Arc::new(MeshView::new(
        &mesh_config(endpoints, extra),
        "cluster.local",
    ))
}

/// The configuration behind [`mesh`].
pub fn mesh_config(endpoints: usize, extra: &str) -> nodemesh_config::MeshConfig {
    let mut text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {nodemesh.dev/enabled: \"true\"}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n".to_owned();
    for i in 1..=endpoints {
        text.push_str(&format!(
            "---\napiVersion: nodemesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: web-{i}, namespace: shop, labels: {{app: web}}}}\nspec: {{node: n1, netns: /run/netns/web-{i}, ip: 10.0.0.{i}, serviceAccount: web}}\n"
        ));
    }
    if !extra.is_empty() {
        text.push_str("---\n");
        text.push_str(extra);
    }
    nodemesh_config::load_str(Path::new("test.yaml"), &text)
        .unwrap_or_else(|e| panic!("test configuration refused:\n{e}"))
}

/// The `web` Service on port 80, with its policy.
pub fn web_target(mesh: &MeshView) -> BackendTarget {
    let (_, web) = mesh.traffic.service("shop/web").expect("Service web");
    (*web.port(80).expect("port 80").service_target).clone()
}

/// `web`'s target in a mesh without endpoints.
pub fn target() -> BackendTarget {
    web_target(&mesh(0, ""))
}

pub fn with_request_timeout(timeout: Option<Duration>) -> BackendTarget {
    let mut target = target();
    target.request = Arc::new(RequestSettings {
        request_timeout: timeout,
        ..RequestSettings::default()
    });
    target
}

pub fn request(path: &str) -> HttpRequest {
    Request::builder()
        .uri(path)
        .header(http::header::HOST, "web")
        .body(full_body(""))
        .expect("request")
}

/// A request as routing hands it down, in a mesh without endpoints.
pub fn routed_request(target: BackendTarget) -> HttpRequest {
    routed_request_in(Arc::new(MeshView::default()), target)
}

pub fn routed_request_in(mesh: Arc<MeshView>, target: BackendTarget) -> HttpRequest {
    let mut req = request("/");
    req.extensions_mut().insert(Routed {
        mesh,
        target: Arc::new(target),
        rule: None,
    });
    req
}

pub fn response(status: u16) -> HttpResponse {
    let mut response = Response::new(full_body(format!("status {status}")));
    *response.status_mut() = StatusCode::from_u16(status).expect("status");
    response
}

/// Answers with `status`.
pub fn status_service(status: u16) -> TestService {
    BoxCloneSyncService::new(service_fn(move |_req: HttpRequest| async move {
        Ok::<_, Infallible>(response(status))
    }))
}

/// Answers 200 with the request's URI as the layers above left it.
pub fn uri_echo_service() -> TestService {
    BoxCloneSyncService::new(tower::service_fn(|req: HttpRequest| async move {
        Ok::<_, Infallible>(Response::new(full_body(req.uri().to_string())))
    }))
}

/// Answers 200 with the request's Host header and URI, as `host uri`.
pub fn host_echo_service() -> TestService {
    BoxCloneSyncService::new(tower::service_fn(|req: HttpRequest| async move {
        let host = req
            .headers()
            .get(http::header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .unwrap_or_default();
        Ok::<_, Infallible>(Response::new(full_body(format!("{host} {}", req.uri()))))
    }))
}

/// Answers 200 after `delay`.
pub fn slow_service(delay: Duration) -> TestService {
    BoxCloneSyncService::new(service_fn(move |_req: HttpRequest| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, Infallible>(response(200))
    }))
}

/// A service that answers from a script (the last entry repeats) and remembers each request.
#[derive(Debug, Clone)]
pub struct Scripted {
    answers: Arc<Vec<HttpResponseMaker>>,
    pub calls: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<http::request::Parts>>>,
    pub bodies: Arc<Mutex<Vec<bytes::Bytes>>>,
}

/// How a scripted answer is made.
#[derive(Debug, Clone, Copy)]
pub enum HttpResponseMaker {
    Status(u16),
    /// A local failure, as the upstream layer reports one.
    Failure(nodemesh_traffic::retry::Attempt),
}

impl Scripted {
    pub fn new(answers: &[HttpResponseMaker]) -> Self {
        Self {
            answers: Arc::new(answers.to_vec()),
            calls: Arc::default(),
            seen: Arc::default(),
            bodies: Arc::default(),
        }
    }

    pub fn statuses(statuses: &[u16]) -> Self {
        let answers: Vec<_> = statuses
            .iter()
            .map(|s| HttpResponseMaker::Status(*s))
            .collect();
        Self::new(&answers)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Inner for TestService {
    async fn handle(&self, req: HttpRequest) -> HttpResponse {
        let Ok(response) = self.clone().oneshot(req).await;
        response
    }
}

impl Inner for Scripted {
    async fn handle(&self, req: HttpRequest) -> HttpResponse {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let (parts, body) = req.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        self.seen.lock().expect("lock").push(parts);
        self.bodies.lock().expect("lock").push(bytes);
        let answer = self.answers[n.min(self.answers.len() - 1)];
        match answer {
            HttpResponseMaker::Status(status) => response(status),
            HttpResponseMaker::Failure(attempt) => {
                let mut response = response(503);
                response.extensions_mut().insert(attempt);
                response
            }
        }
    }
}

pub async fn body_text(response: HttpResponse) -> String {
    let body: Body = response.into_body();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}
