//! What the controller watches in the cluster, and its copy of it: one watcher per kind
//! (kube's, so restarts, relists after 410 Gone and bookmarks are kube's business), each
//! feeding a map of the kind's objects as the API server sent them.
//!
//! A kind counts as known once its first list is in: nothing is built before every kind is
//! known, so a first snapshot never lacks, say, the DENY policies. A kind whose CRD the
//! cluster does not have (404) is known to be empty; one that cannot be listed for another
//! reason (forbidden, unreachable) is not known, and holds the first snapshot back.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use futures_util::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use serde_json::Value;
use tokio::sync::watch;

/// The kinds the controller reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    Node,
    AuthorizationPolicy,
    PeerAuthentication,
    MeshSettings,
    BackendTrafficPolicy,
    HttpRoute,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::MeshSettings,
        Kind::BackendTrafficPolicy,
        Kind::HttpRoute,
    ];

    pub fn api_resource(self) -> ApiResource {
        use k8s_openapi::api::{core::v1, discovery::v1::EndpointSlice};
        use nodemesh_config::{
            AuthorizationPolicyResource, BackendTrafficPolicyResource, MeshSettingsResource,
            PeerAuthenticationResource,
        };
        match self {
            Kind::Namespace => ApiResource::erase::<v1::Namespace>(&()),
            Kind::Pod => ApiResource::erase::<v1::Pod>(&()),
            Kind::Service => ApiResource::erase::<v1::Service>(&()),
            Kind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
            Kind::Node => ApiResource::erase::<v1::Node>(&()),
            Kind::AuthorizationPolicy => ApiResource::erase::<AuthorizationPolicyResource>(&()),
            Kind::PeerAuthentication => ApiResource::erase::<PeerAuthenticationResource>(&()),
            Kind::MeshSettings => ApiResource::erase::<MeshSettingsResource>(&()),
            Kind::BackendTrafficPolicy => ApiResource::erase::<BackendTrafficPolicyResource>(&()),
            Kind::HttpRoute => ApiResource {
                group: "gateway.networking.k8s.io".into(),
                version: "v1".into(),
                api_version: nodemesh_config::GATEWAY_API_VERSION.into(),
                kind: "HTTPRoute".into(),
                plural: "httproutes".into(),
            },
        }
    }

    /// The kind's name as the configuration's errors write it (`Workload` for a Pod, which
    /// becomes one).
    pub fn model_name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Workload",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::MeshSettings => "MeshSettings",
            Kind::BackendTrafficPolicy => "BackendTrafficPolicy",
            Kind::HttpRoute => "HTTPRoute",
        }
    }

    /// A kind defined by a CRD the cluster may not have: nodemesh's own, and Gateway API's
    /// HTTPRoute (installed from Gateway API's release, not by nodemesh).
    pub fn defined_by_crd(self) -> bool {
        matches!(
            self,
            Kind::AuthorizationPolicy
                | Kind::PeerAuthentication
                | Kind::MeshSettings
                | Kind::BackendTrafficPolicy
                | Kind::HttpRoute
        )
    }
}

/// `namespace/name`, or `name` for a cluster-scoped object.
pub type ObjectKey = String;

/// The objects of every kind, as the API server sent them (less their managed fields).
pub type Objects = BTreeMap<Kind, BTreeMap<ObjectKey, Arc<Value>>>;

/// Whether a kind's objects are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Pending,
    Listed,
    /// The cluster does not have the kind (its CRD is not installed): none of them.
    Absent,
}

#[derive(Debug, Default)]
struct Inner {
    objects: Objects,
    listing: BTreeMap<Kind, Listing>,
}

/// The controller's copy of the cluster, shared by the watchers and their readers.
#[derive(Debug)]
pub struct Cluster {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Cluster {
    pub fn new() -> Self {
        let inner = Inner {
            objects: BTreeMap::new(),
            listing: Kind::ALL.iter().map(|k| (*k, Listing::Pending)).collect(),
        };
        Self {
            inner: Mutex::new(inner),
            changed: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Every object, once every kind is known; `None` before.
    pub fn snapshot(&self) -> Option<Objects> {
        let inner = self.lock();
        if inner.listing.values().any(|l| *l == Listing::Pending) {
            return None;
        }
        Some(inner.objects.clone())
    }

    /// The kinds not known yet, for readiness.
    pub fn pending(&self) -> Vec<Kind> {
        self.lock()
            .listing
            .iter()
            .filter(|(_, l)| **l == Listing::Pending)
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn listing(&self, kind: Kind) -> Listing {
        self.lock()
            .listing
            .get(&kind)
            .copied()
            .unwrap_or(Listing::Pending)
    }

    /// One object, as last seen.
    pub fn get(&self, kind: Kind, key: &str) -> Option<Arc<Value>> {
        self.lock().objects.get(&kind)?.get(key).cloned()
    }

    /// A whole list: the kind's objects are exactly these now (after a relist too, so that
    /// what was deleted while the watch was down goes).
    pub fn replace(&self, kind: Kind, objects: BTreeMap<ObjectKey, Arc<Value>>) {
        let mut inner = self.lock();
        inner.objects.insert(kind, objects);
        inner.listing.insert(kind, Listing::Listed);
        drop(inner);
        self.bump();
    }

    pub fn apply(&self, kind: Kind, object: Value) {
        let key = key_of(&object);
        self.lock()
            .objects
            .entry(kind)
            .or_default()
            .insert(key, Arc::new(object));
        self.bump();
    }

    pub fn delete(&self, kind: Kind, object: &Value) {
        let key = key_of(object);
        if let Some(objects) = self.lock().objects.get_mut(&kind) {
            objects.remove(&key);
        }
        self.bump();
    }

    /// The cluster has no such kind: none of them, and the watcher keeps looking.
    pub fn absent(&self, kind: Kind) {
        let mut inner = self.lock();
        if inner.listing.get(&kind) == Some(&Listing::Absent) {
            return;
        }
        inner.listing.insert(kind, Listing::Absent);
        inner.objects.remove(&kind);
        drop(inner);
        self.bump();
    }
}

/// `namespace/name` of an object, or its name when it has no namespace.
pub fn key_of(object: &Value) -> ObjectKey {
    let meta = &object["metadata"];
    let name = meta["name"].as_str().unwrap_or_default();
    match meta["namespace"].as_str() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_owned(),
    }
}

/// The object as kept: its kind and apiVersion set (list items come without), and without
/// what only costs memory here (managed fields, kubectl's copy of the last applied object).
fn kept(kind: Kind, object: DynamicObject) -> Value {
    let mut value = serde_json::to_value(object).unwrap_or(Value::Null);
    let resource = kind.api_resource();
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), resource.api_version.into());
        map.insert("kind".into(), resource.kind.into());
    }
    if let Some(meta) = value["metadata"].as_object_mut() {
        meta.remove("managedFields");
        if let Some(annotations) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
    value
}

/// Watches one kind for as long as the controller runs.
pub async fn watch_kind(client: Client, kind: Kind, cluster: Arc<Cluster>) {
    let api: Api<DynamicObject> = Api::all_with(client, &kind.api_resource());
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut listing: Option<BTreeMap<ObjectKey, Arc<Value>>> = None;
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if failing {
                    tracing::info!(kind = kind.model_name(), "watching again");
                    failing = false;
                }
                match event {
                    Event::Init => listing = Some(BTreeMap::new()),
                    Event::InitApply(object) => {
                        let value = kept(kind, object);
                        listing
                            .get_or_insert_default()
                            .insert(key_of(&value), Arc::new(value));
                    }
                    Event::InitDone => cluster.replace(kind, listing.take().unwrap_or_default()),
                    Event::Apply(object) => cluster.apply(kind, kept(kind, object)),
                    Event::Delete(object) => cluster.delete(kind, &kept(kind, object)),
                }
            }
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.code == 404 && kind.defined_by_crd() =>
            {
                if cluster.listing(kind) != Listing::Absent {
                    let resource = kind.api_resource();
                    tracing::warn!(
                        kind = %resource.kind,
                        api_version = %resource.api_version,
                        "the cluster does not serve {} ({}): none are read until its CRD is \
                         installed{}",
                        resource.plural,
                        resource.api_version,
                        if kind == Kind::HttpRoute {
                            " (install Gateway API's standard CRDs)"
                        } else {
                            " (kubectl apply -k manifests/)"
                        }
                    );
                }
                cluster.absent(kind);
            }
            Err(e) => {
                if !failing {
                    let resource = kind.api_resource();
                    let forbidden = matches!(
                        &e,
                        watcher::Error::InitialListFailed(kube::Error::Api(s))
                            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                            if s.code == 403
                    );
                    if forbidden {
                        tracing::error!(
                            kind = %resource.kind,
                            error = %e,
                            "the controller may not list and watch {} ({}); apply manifests/ \
                             (its ClusterRole grants it) — until then no configuration is built",
                            resource.plural,
                            resource.api_version
                        );
                    } else {
                        tracing::warn!(kind = %resource.kind, error = %e, "watch failed; retrying");
                    }
                    failing = true;
                }
            }
        }
    }
}
