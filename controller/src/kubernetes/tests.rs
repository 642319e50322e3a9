//! The controller against a scripted API server (`fake_api`), in the JSON a real one sends:
//! the cluster of `cluster.json` gives the configuration its local directory
//! (`equivalent.yaml`) gives; refused objects get their status and an Event while the last
//! good version stays in force; a 410 relist loses nothing and resends nothing unchanged; an
//! agent's token proves its own node and no other.

mod fake_api;
mod identity;

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use http::Method;
use nodemesh_config::MeshConfig;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use self::fake_api::{FakeApi, Write};
use super::{
    ClusterIdentity,
    build::{self, LastGood},
    cluster::{Cluster, Objects},
};
use crate::{config::Config, state::ControllerState};

const DEADLINE: Duration = Duration::from_secs(10);

fn fixture() -> Value {
    serde_json::from_str(include_str!("tests/cluster.json")).expect("cluster.json")
}

/// A fake API server holding the cluster of `cluster.json`.
fn cluster_api() -> FakeApi {
    let api = FakeApi::default();
    for (path, list) in fixture().as_object().expect("collections") {
        api.serve(
            path,
            list["apiVersion"].as_str().expect("apiVersion"),
            list["kind"].as_str().expect("kind"),
            list["items"].as_array().cloned().unwrap_or_default(),
        );
    }
    api
}

fn local_equivalent() -> MeshConfig {
    nodemesh_config::load_str(
        Path::new("equivalent.yaml"),
        include_str!("tests/equivalent.yaml"),
    )
    .unwrap_or_else(|e| panic!("equivalent.yaml: {e}"))
}

/// Polls `check` until it gives something, or fails the test after the deadline.
async fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "still waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn watched(api: &FakeApi, cluster: &Arc<Cluster>, stop: &CancellationToken) -> Objects {
    super::watch(&api.client(), cluster, stop);
    until("every kind listed", || cluster.snapshot()).await
}

/// Pretty JSON of both sides, for a failure worth reading.
fn same_mesh(left: &MeshConfig, right: &MeshConfig, what: &str) {
    if left != right {
        let show = |m: &MeshConfig| serde_json::to_string_pretty(m).unwrap_or_default();
        panic!(
            "{what} differ:\n--- from the cluster\n{}\n--- from the directory\n{}",
            show(left),
            show(right)
        );
    }
}

#[tokio::test]
async fn the_cluster_gives_the_configuration_its_local_directory_gives() {
    let api = cluster_api();
    let cluster = Arc::new(Cluster::new());
    let stop = CancellationToken::new();
    let objects = watched(&api, &cluster, &stop).await;
    let built = build::build(&objects, &mut LastGood::default());
    let local = local_equivalent();
    same_mesh(&built.mesh, &local, "the configurations");
    for node in ["n1", "n2", "n3"] {
        same_mesh(
            &built.mesh.for_node(node),
            &local.for_node(node),
            &format!("the snapshots of node {node}"),
        );
    }
    assert!(
        built.verdicts.values().all(|v| v.accepted()),
        "{:?}",
        built.verdicts
    );
    assert!(
        !built.mesh.http_routes.contains_key("shop/ingress"),
        "a Gateway's route is not the mesh's"
    );
    for path in [
        "/api/v1/pods",
        "/apis/gateway.networking.k8s.io/v1/httproutes",
    ] {
        assert_eq!(api.lists(path), 1, "{path} listed once");
        until(&format!("a watch of {path}"), || {
            api.watched(path).then_some(())
        })
        .await;
    }
    assert!(api.unexpected().is_empty(), "{:?}", api.unexpected());
    assert!(
        api.writes().is_empty(),
        "reading writes nothing: {:?}",
        api.writes()
    );
    stop.cancel();
}

#[tokio::test]
async fn without_gateway_apis_crd_the_rest_of_the_mesh_is_configured() {
    let api = FakeApi::default();
    for (path, list) in fixture().as_object().expect("collections") {
        if path.contains("gateway.networking.k8s.io") {
            continue;
        }
        api.serve(
            path,
            list["apiVersion"].as_str().expect("apiVersion"),
            list["kind"].as_str().expect("kind"),
            list["items"].as_array().cloned().unwrap_or_default(),
        );
    }
    let cluster = Arc::new(Cluster::new());
    let stop = CancellationToken::new();
    let objects = watched(&api, &cluster, &stop).await;
    let built = build::build(&objects, &mut LastGood::default());
    assert!(built.mesh.http_routes.is_empty());
    assert_eq!(built.mesh.workloads, local_equivalent().workloads);
    stop.cancel();
}

fn patches(api: &FakeApi, uri_part: &str) -> Vec<Write> {
    api.writes()
        .into_iter()
        .filter(|w| w.method == Method::PATCH && w.uri.contains(uri_part))
        .collect()
}

fn accepted_condition(write: &Write) -> Value {
    write.body["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"))
        .cloned()
        .unwrap_or(Value::Null)
}

const AP_STATUS: &str =
    "/apis/security.nodemesh.dev/v1/namespaces/shop/authorizationpolicies/web-allow/status";
const ROUTE_STATUS: &str =
    "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web-canary/status";

/// Runs the controller's Kubernetes loop against `api` as replica `ctrl-0`.
fn run_controller(api: &FakeApi, stop: &CancellationToken) -> (Arc<ControllerState>, Arc<Cluster>) {
    let client = api.client();
    let cluster = Arc::new(Cluster::new());
    let state = Arc::new(ControllerState::new(Config::kubernetes_for_tests("ctrl-0")));
    super::watch(&client, &cluster, stop);
    tokio::spawn(super::run(
        client,
        cluster.clone(),
        state.clone(),
        ClusterIdentity {
            namespace: "nodemesh-system".into(),
            name: "ctrl-0".into(),
        },
        stop.clone(),
    ));
    (state, cluster)
}

#[tokio::test]
async fn refused_objects_get_status_and_an_event_while_their_last_good_version_stays() {
    let api = cluster_api();
    let stop = CancellationToken::new();
    let (state, _) = run_controller(&api, &stop);

    // Elected (no lease yet: it takes it), it writes every object's status once.
    let accepted = until("the policy's status", || patches(&api, AP_STATUS).pop()).await;
    let lease = api
        .writes()
        .into_iter()
        .find(|w| {
            w.uri
                .starts_with("/apis/coordination.k8s.io/v1/namespaces/nodemesh-system/leases")
        })
        .expect("the lease was taken");
    assert_eq!(lease.method, Method::POST);
    assert_eq!(lease.body["spec"]["holderIdentity"], "ctrl-0");
    let condition = accepted_condition(&accepted);
    assert_eq!(
        (
            &condition["status"],
            &condition["reason"],
            &condition["observedGeneration"]
        ),
        (&json!("True"), &json!("Accepted"), &json!(1))
    );
    let route = until("the route's status", || patches(&api, ROUTE_STATUS).pop()).await;
    let parents = route.body["status"]["parents"].as_array().expect("parents");
    assert_eq!(parents.len(), 1);
    assert_eq!(parents[0]["controllerName"], "nodemesh.dev/controller");
    assert_eq!(parents[0]["parentRef"]["name"], "web");
    let reasons: Vec<(&str, &str)> = parents[0]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap_or(""),
                c["reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [("Accepted", "Accepted"), ("ResolvedRefs", "ResolvedRefs")]
    );
    assert!(
        patches(&api, "/httproutes/ingress/").is_empty(),
        "another implementation's route is left alone"
    );

    // An edit that does not validate: refused, said so, and the ALLOW stays as it was.
    let mut broken =
        fixture()["/apis/security.nodemesh.dev/v1/authorizationpolicies"]["items"][0].clone();
    broken["metadata"]["generation"] = 2.into();
    broken["spec"]["action"] = "DENNY".into();
    api.event(
        "/apis/security.nodemesh.dev/v1/authorizationpolicies",
        "MODIFIED",
        broken,
    );
    let refused = until("the refusal in status", || {
        patches(&api, AP_STATUS)
            .into_iter()
            .find(|w| accepted_condition(w)["status"] == "False")
    })
    .await;
    let condition = accepted_condition(&refused);
    assert_eq!(condition["reason"], "Invalid");
    assert_eq!(condition["observedGeneration"], 2);
    let message = condition["message"].as_str().expect("message");
    assert!(
        message.contains("spec.action") && message.contains("DENNY"),
        "{message}"
    );
    assert!(
        message.ends_with("the previous version stays in force"),
        "{message}"
    );
    let event = until("an Event", || {
        api.writes().into_iter().find(|w| {
            w.method == Method::POST
                && w.uri
                    .starts_with("/apis/events.k8s.io/v1/namespaces/shop/events")
        })
    })
    .await;
    assert_eq!(event.body["type"], "Warning");
    assert_eq!(event.body["reason"], "Refused");
    assert_eq!(event.body["reportingController"], "nodemesh.dev/controller");
    assert_eq!(event.body["reportingInstance"], "ctrl-0");
    assert_eq!(
        event.body["regarding"],
        json!({"apiVersion": "security.nodemesh.dev/v1", "kind": "AuthorizationPolicy",
               "name": "web-allow", "namespace": "shop", "uid": "3f4e5d6c-0000-4000-8000-000000000001"})
    );
    let in_force = state.config_dump();
    assert_eq!(
        in_force["config"]["authorization_policies"]["shop/web-allow"]["spec"]["action"], "ALLOW",
        "the last good version stays in force"
    );

    // A route sent to a Service that does not exist: in force, and its status says why.
    let mut missing =
        fixture()["/apis/gateway.networking.k8s.io/v1/httproutes"]["items"][0].clone();
    missing["metadata"]["generation"] = 4.into();
    missing["spec"]["rules"][0]["backendRefs"][0]["name"] = "gone".into();
    api.event(
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        "MODIFIED",
        missing,
    );
    let unresolved = until("BackendNotFound", || {
        patches(&api, ROUTE_STATUS)
            .into_iter()
            .find(|w| w.body.to_string().contains("BackendNotFound"))
    })
    .await;
    assert!(
        unresolved
            .body
            .to_string()
            .contains("backend Service shop/gone not found"),
        "{}",
        unresolved.body
    );
    // Said once: no second Event for the same refusal, no status written twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = api
        .writes()
        .iter()
        .filter(|w| w.uri.starts_with("/apis/events.k8s.io/"))
        .count();
    assert_eq!(events, 1);
    assert_eq!(
        patches(&api, AP_STATUS).len(),
        2,
        "{:?}",
        patches(&api, AP_STATUS)
    );
    assert!(api.unexpected().is_empty(), "{:?}", api.unexpected());
    stop.cancel();
}

#[tokio::test]
async fn a_410_relist_loses_nothing_and_an_unchanged_cluster_sends_no_new_snapshot() {
    let api = cluster_api();
    let stop = CancellationToken::new();
    let (state, _) = run_controller(&api, &stop);
    let mut snapshots = state.subscribe();
    let first = until("a configuration in force", || {
        snapshots.borrow_and_update().clone()
    })
    .await;
    assert!(first.mesh.workloads.contains_key("shop/web-2"));
    let pods = "/api/v1/pods";
    until("a watch of the pods", || api.watched(pods).then_some(())).await;

    // A BOOKMARK moves the watch on and changes nothing.
    api.bookmark(pods, "Pod", "v1");
    // While no watch looks, web-2 goes; then the API server has compacted past the watch.
    api.quietly(pods, |pods| {
        pods.remove("shop/web-2");
    });
    api.expire(pods);
    let second = until("the relisted configuration", || {
        snapshots
            .has_changed()
            .unwrap_or(false)
            .then(|| snapshots.borrow_and_update().clone())
            .flatten()
    })
    .await;
    assert_eq!(api.lists(pods), 2, "relisted after 410 Gone");
    assert!(
        !second.mesh.workloads.contains_key("shop/web-2"),
        "a deletion missed by the watch is seen"
    );
    assert!(
        second.mesh.workloads.contains_key("shop/web-1"),
        "nothing else is lost"
    );
    assert!(second.version > first.version);

    // Expired again with nothing changed: relisted, and no new snapshot goes out.
    until("a new watch of the pods", || {
        api.watched(pods).then_some(())
    })
    .await;
    api.expire(pods);
    until("a third list", || (api.lists(pods) == 3).then_some(())).await;
    until("a new watch after it", || api.watched(pods).then_some(())).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !snapshots.has_changed().unwrap_or(true),
        "an unchanged cluster sends no new snapshot"
    );
    stop.cancel();
}
