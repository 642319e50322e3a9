//! A scripted Kubernetes API server behind kube's client (`tower_test::mock`): collections
//! answer lists and watches in the JSON a real API server sends (lists with a
//! resourceVersion, one watch event per line, BOOKMARKs, ERROR 410 when a watch's version
//! has expired); leases, secrets and configmaps are kept as objects; TokenReviews are
//! answered from a script; every write is recorded for the test to assert. A request it does
//! not know is recorded as unexpected, and answered 404.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Either, Full};
use kube::Client;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::agent_api::snapshots::ChannelBody;

type Body = Either<Full<Bytes>, ChannelBody>;

/// One request that wrote something.
#[derive(Debug, Clone)]
pub struct Write {
    pub method: Method,
    /// Path and query, as the client sent it.
    pub uri: String,
    pub body: Value,
}

#[derive(Debug, Default)]
struct Collection {
    list_kind: String,
    api_version: String,
    items: BTreeMap<String, Value>,
    watchers: Vec<mpsc::Sender<Bytes>>,
    lists: usize,
}

#[derive(Debug, Default)]
struct State {
    resource_version: u64,
    /// By collection path (`/api/v1/pods`).
    collections: BTreeMap<String, Collection>,
    /// Single objects by their path, for GET/POST/PUT.
    objects: BTreeMap<String, Value>,
    /// TokenReview answers by token.
    reviews: BTreeMap<String, Value>,
    writes: Vec<Write>,
    unexpected: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct FakeApi(Arc<Mutex<State>>);

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Either::Left(Full::new(Bytes::from(body.to_string()))))
        .expect("response")
}

fn status_error(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).expect("code"),
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

fn line(value: &Value) -> Bytes {
    Bytes::from(format!("{value}\n"))
}

impl FakeApi {
    /// A kube client talking to this fake, and the task serving it.
    pub fn client(&self) -> Client {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<Body>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let response = api.answer(request).await;
                respond.send_response(response);
            }
        });
        Client::new(service, "default")
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves the collection at `path` (such as `/api/v1/pods`) with `items`.
    pub fn serve(&self, path: &str, api_version: &str, list_kind: &str, items: Vec<Value>) {
        let mut state = self.state();
        let mut collection = Collection {
            list_kind: list_kind.to_owned(),
            api_version: api_version.to_owned(),
            ..Collection::default()
        };
        for mut item in items {
            state.resource_version += 1;
            item["metadata"]["resourceVersion"] = state.resource_version.to_string().into();
            collection.items.insert(key(&item), item);
        }
        state.collections.insert(path.to_owned(), collection);
    }

    /// A watch event on a collection: ADDED, MODIFIED or DELETED.
    pub fn event(&self, path: &str, kind: &str, mut object: Value) {
        let mut state = self.state();
        state.resource_version += 1;
        object["metadata"]["resourceVersion"] = state.resource_version.to_string().into();
        let collection = state
            .collections
            .get_mut(path)
            .expect("a served collection");
        if kind == "DELETED" {
            collection.items.remove(&key(&object));
        } else {
            collection.items.insert(key(&object), object.clone());
        }
        let event = line(&json!({"type": kind, "object": object}));
        collection
            .watchers
            .retain(|w| w.try_send(event.clone()).is_ok());
    }

    /// Changes a collection while no watch sees it (as if it happened while disconnected).
    pub fn quietly(&self, path: &str, change: impl FnOnce(&mut BTreeMap<String, Value>)) {
        let mut state = self.state();
        state.resource_version += 1;
        let rv = state.resource_version;
        let collection = state
            .collections
            .get_mut(path)
            .expect("a served collection");
        change(&mut collection.items);
        for item in collection.items.values_mut() {
            if item["metadata"]["resourceVersion"].is_null() {
                item["metadata"]["resourceVersion"] = rv.to_string().into();
            }
        }
    }

    /// A BOOKMARK: the watch's version moves on, nothing changes.
    pub fn bookmark(&self, path: &str, kind: &str, api_version: &str) {
        let mut state = self.state();
        state.resource_version += 1;
        let rv = state.resource_version.to_string();
        let collection = state
            .collections
            .get_mut(path)
            .expect("a served collection");
        let event = line(&json!({"type": "BOOKMARK",
            "object": {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv}}}));
        collection
            .watchers
            .retain(|w| w.try_send(event.clone()).is_ok());
    }

    /// The API server has compacted past the watches' versions: ERROR 410, and the watches
    /// end.
    pub fn expire(&self, path: &str) {
        let mut state = self.state();
        let rv = state.resource_version;
        let collection = state
            .collections
            .get_mut(path)
            .expect("a served collection");
        let event = line(
            &json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
            "message": format!("too old resource version: 1 ({rv})")}}),
        );
        for watcher in collection.watchers.drain(..) {
            let _ = watcher.try_send(event.clone());
        }
    }

    /// How many times the collection was listed.
    pub fn lists(&self, path: &str) -> usize {
        self.state().collections.get(path).map_or(0, |c| c.lists)
    }

    /// Whether someone watches the collection now.
    pub fn watched(&self, path: &str) -> bool {
        self.state()
            .collections
            .get(path)
            .is_some_and(|c| c.watchers.iter().any(|w| !w.is_closed()))
    }

    /// Keeps a single object (a Secret, a Lease) at `path`.
    pub fn put_object(&self, path: &str, object: Value) {
        self.state().objects.insert(path.to_owned(), object);
    }

    pub fn object(&self, path: &str) -> Option<Value> {
        self.state().objects.get(path).cloned()
    }

    /// What a TokenReview of `token` answers (its `status`).
    pub fn review(&self, token: &str, status: Value) {
        self.state().reviews.insert(token.to_owned(), status);
    }

    pub fn writes(&self) -> Vec<Write> {
        self.state().writes.clone()
    }

    pub fn unexpected(&self) -> Vec<String> {
        self.state().unexpected.clone()
    }

    async fn answer(&self, request: Request<kube::client::Body>) -> Response<Body> {
        let method = request.method().clone();
        let uri = request.uri().to_string();
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or("").to_owned();
        let bytes = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if method != Method::GET {
            self.state().writes.push(Write {
                method: method.clone(),
                uri: uri.clone(),
                body: body.clone(),
            });
        }
        let mut state = self.state();
        if method == Method::GET && state.collections.contains_key(&path) {
            let rv = state.resource_version.to_string();
            let collection = state.collections.get_mut(&path).expect("collection");
            if query.contains("watch=true") {
                let (tx, rx) = mpsc::channel(64);
                collection.watchers.push(tx);
                return Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(Either::Right(ChannelBody(rx)))
                    .expect("response");
            }
            collection.lists += 1;
            let items: Vec<Value> = collection
                .items
                .values()
                .map(|item| {
                    // List items carry no kind or apiVersion.
                    let mut item = item.clone();
                    if let Some(map) = item.as_object_mut() {
                        map.remove("kind");
                        map.remove("apiVersion");
                    }
                    item
                })
                .collect();
            return json_response(
                StatusCode::OK,
                &json!({"kind": collection.list_kind, "apiVersion": collection.api_version,
                        "metadata": {"resourceVersion": rv}, "items": items}),
            );
        }
        if path == "/apis/authentication.k8s.io/v1/tokenreviews" && method == Method::POST {
            let token = body["spec"]["token"].as_str().unwrap_or_default();
            let status = state.reviews.get(token).cloned().unwrap_or_else(
                || json!({"user": {}, "error": "[invalid bearer token, token lookup failed]"}),
            );
            let mut review = body.clone();
            review["status"] = status;
            return json_response(StatusCode::CREATED, &review);
        }
        if let Some(status_of) = path.strip_suffix("/status")
            && method == Method::PATCH
        {
            let collection = status_of.rsplit_once('/').map(|(c, _)| c).unwrap_or("");
            let cluster_wide = cluster_wide(collection);
            let name = status_of.rsplit('/').next().unwrap_or("");
            let namespace = namespace_in(collection);
            let found = state
                .collections
                .get_mut(&cluster_wide)
                .and_then(|c| c.items.get_mut(&format!("{namespace}/{name}")));
            return match found {
                Some(object) => {
                    object["status"] = body["status"].clone();
                    let object = object.clone();
                    json_response(StatusCode::OK, &object)
                }
                None => status_error(404, "NotFound", &format!("{name} not found")),
            };
        }
        if path.starts_with("/apis/events.k8s.io/v1/namespaces/") && method == Method::POST {
            return json_response(StatusCode::CREATED, &body);
        }
        // Single objects: leases, secrets, configmaps.
        let kept = ["/leases", "/secrets", "/configmaps"];
        let single = kept.iter().any(|k| path.contains(&format!("{k}/")));
        let collection = kept.iter().any(|k| path.ends_with(k));
        match method {
            Method::GET if single => match state.objects.get(&path) {
                Some(object) => json_response(StatusCode::OK, object),
                None => status_error(404, "NotFound", "not found"),
            },
            Method::POST if collection => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default();
                let at = format!("{path}/{name}");
                if state.objects.contains_key(&at) {
                    return status_error(409, "AlreadyExists", &format!("{name} already exists"));
                }
                state.resource_version += 1;
                let mut object = body.clone();
                object["metadata"]["resourceVersion"] = state.resource_version.to_string().into();
                state.objects.insert(at, object.clone());
                json_response(StatusCode::CREATED, &object)
            }
            Method::PUT if single => {
                let current_rv = state
                    .objects
                    .get(&path)
                    .map(|o| o["metadata"]["resourceVersion"].clone());
                if current_rv != Some(body["metadata"]["resourceVersion"].clone()) {
                    return status_error(409, "Conflict", "the object has been modified");
                }
                state.resource_version += 1;
                let mut object = body.clone();
                object["metadata"]["resourceVersion"] = state.resource_version.to_string().into();
                state.objects.insert(path.clone(), object.clone());
                json_response(StatusCode::OK, &object)
            }
            _ => {
                state.unexpected.push(format!("{method} {uri}"));
                Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .header("content-type", "text/plain")
                    .body(Either::Left(Full::new(Bytes::from("404 page not found"))))
                    .expect("response")
            }
        }
    }
}

/// `namespace/name` (or `name`) of an object.
fn key(object: &Value) -> String {
    super::super::cluster::key_of(object)
}

/// `/apis/g/v/namespaces/ns/plural` to `/apis/g/v/plural`.
fn cluster_wide(collection: &str) -> String {
    let parts: Vec<&str> = collection.split('/').collect();
    match parts.iter().position(|p| *p == "namespaces") {
        Some(i) if parts.len() > i + 2 => {
            let mut kept: Vec<&str> = parts[..i].to_vec();
            kept.extend(&parts[i + 2..]);
            kept.join("/")
        }
        _ => collection.to_owned(),
    }
}

fn namespace_in(collection: &str) -> String {
    let parts: Vec<&str> = collection.split('/').collect();
    parts
        .iter()
        .position(|p| *p == "namespaces")
        .and_then(|i| parts.get(i + 1))
        .map(|s| (*s).to_owned())
        .unwrap_or_default()
}
