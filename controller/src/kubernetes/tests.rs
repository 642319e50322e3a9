//! The controller against a scripted API server (`fake_api`), in the JSON a real one sends:
//! the cluster of `cluster.json` gives the configuration its local directory
//! (`equivalent.yaml`) gives; refused objects get their status and an Event while the last
//! good version stays in force; a 410 relist loses nothing and resends nothing unchanged; an
//! agent's token proves its own node and no other.

mod fake_api;

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use http::Method;
use nodemesh_config::MeshConfig;
use nodemesh_identity::SpiffeId;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use self::fake_api::{FakeApi, Write};
use super::{
    ClusterIdentity,
    build::{self, LastGood},
    cluster::{Cluster, Objects},
    token_review::{ReviewError, TokenReviewer},
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

fn agent_review(pod: &str, uid: &str, node: Option<&str>) -> Value {
    let mut extra = json!({
        "authentication.kubernetes.io/credential-id": ["JTI=8f4c1a7e-5b6d-4e3f-9a2b-1c0d9e8f7a6b"],
        "authentication.kubernetes.io/pod-name": [pod],
        "authentication.kubernetes.io/pod-uid": [uid],
    });
    if let Some(node) = node {
        extra["authentication.kubernetes.io/node-name"] = json!([node]);
        extra["authentication.kubernetes.io/node-uid"] =
            json!(["1e2d3c4b-0000-4000-8000-000000000002"]);
    }
    json!({
        "authenticated": true,
        "user": {
            "username": "system:serviceaccount:nodemesh-system:nodemesh-agent",
            "uid": "6e5d4c3b-0000-4000-8000-00000000aaaa",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:nodemesh-system", "system:authenticated"],
            "extra": extra,
        },
        "audiences": ["nodemesh"],
    })
}

#[tokio::test]
async fn an_agents_token_proves_its_own_node_and_obtains_no_other_nodes_identities() {
    let api = cluster_api();
    const N2_AGENT: &str = "0b6f2d1e-5a44-4c83-9d2e-8c1f00000009";
    api.review(
        "agent-n2",
        agent_review("nodemesh-agent-q9v4d", N2_AGENT, Some("n2")),
    );
    api.review(
        "agent-n2-old-apiserver",
        agent_review("nodemesh-agent-q9v4d", N2_AGENT, None),
    );
    api.review(
        "claims-n1",
        agent_review("nodemesh-agent-q9v4d", N2_AGENT, Some("n1")),
    );
    api.review(
        "stale-pod",
        agent_review("nodemesh-agent-q9v4d", "0ld-uid", Some("n2")),
    );
    let mut workload = agent_review("web-1", "0b6f2d1e-5a44-4c83-9d2e-8c1f00000001", Some("n1"));
    workload["user"]["username"] = "system:serviceaccount:shop:web".into();
    api.review("a-workloads-token", workload);
    let mut unbound = agent_review("x", "y", None);
    unbound["user"]["extra"] = json!({});
    api.review("secret-token", unbound);
    let mut audience = agent_review("nodemesh-agent-q9v4d", N2_AGENT, Some("n2"));
    audience["audiences"] = json!(["https://kubernetes.default.svc"]);
    api.review("apiserver-token", audience);

    let cluster = Arc::new(Cluster::new());
    let stop = CancellationToken::new();
    let objects = watched(&api, &cluster, &stop).await;
    let state = ControllerState::new(Config::kubernetes_for_tests("ctrl-0"));
    state.accepted(build::build(&objects, &mut LastGood::default()).mesh);
    let reviewer = TokenReviewer::new(
        api.client(),
        "nodemesh".into(),
        ("nodemesh-system".into(), "nodemesh-agent".into()),
        cluster.clone(),
    );

    assert_eq!(reviewer.node_of("agent-n2").await, Ok("n2".to_owned()));
    assert_eq!(
        reviewer.node_of("agent-n2-old-apiserver").await,
        Ok("n2".to_owned()),
        "without the node claim, the pod's node"
    );
    let review = api
        .writes()
        .into_iter()
        .find(|w| {
            w.uri
                .starts_with("/apis/authentication.k8s.io/v1/tokenreviews")
        })
        .expect("a TokenReview was made");
    assert_eq!(
        review.body["spec"],
        json!({"token": "agent-n2", "audiences": ["nodemesh"]})
    );

    let cart = SpiffeId::new("cluster.local", "shop", "cart").expect("id");
    let web = SpiffeId::new("cluster.local", "shop", "web").expect("id");
    assert!(state.authorize("n1", &cart).is_ok(), "cart runs on n1");
    let refused = state
        .authorize("n2", &cart)
        .expect_err("n2's agent may not have it");
    assert_eq!(refused.0, "not_on_node");
    assert!(state.authorize("n2", &web).is_ok(), "web-2 runs on n2");

    for (token, wanted) in [
        ("claims-n1", "the token says node n1, the pod runs on n2"),
        ("stale-pod", "another pod of that name runs now"),
        ("a-workloads-token", "not to the agent's ServiceAccount"),
        ("secret-token", "not bound to a pod"),
        ("apiserver-token", "not for audience \"nodemesh\""),
        ("forged", "does not accept the token"),
    ] {
        let error = reviewer.node_of(token).await.expect_err(token);
        assert!(error.to_string().contains(wanted), "{token}: {error}");
        if token == "forged" {
            assert!(matches!(error, ReviewError::NotAuthenticated(_)));
        }
    }
    assert!(api.unexpected().is_empty(), "{:?}", api.unexpected());
    stop.cancel();
}

#[tokio::test]
async fn the_first_controller_makes_the_ca_secret_and_the_next_takes_it() {
    let api = FakeApi::default();
    let secrets = "/api/v1/namespaces/nodemesh-system/secrets/nodemesh-ca";
    let roots = "/api/v1/namespaces/nodemesh-system/configmaps/nodemesh-root-ca";
    let first = super::ca_secret::load_or_create(
        api.client(),
        "nodemesh-system",
        "nodemesh-ca",
        "cluster.local",
    )
    .await
    .expect("a new root");
    let secret = api.object(secrets).expect("the Secret was created");
    assert!(
        secret["data"]["ca-key.pem"].is_string() && secret["data"]["ca-cert.pem"].is_string(),
        "{secret}"
    );
    let second = super::ca_secret::load_or_create(
        api.client(),
        "nodemesh-system",
        "nodemesh-ca",
        "cluster.local",
    )
    .await
    .expect("the same root");
    assert_eq!(first.bundle().to_pem(), second.bundle().to_pem());
    let creations = api
        .writes()
        .iter()
        .filter(|w| w.method == Method::POST)
        .count();
    assert_eq!(creations, 1, "the second replica made nothing");

    super::ca_secret::publish_roots(
        api.client(),
        "nodemesh-system",
        "nodemesh-root-ca",
        first.bundle(),
    )
    .await
    .expect("published");
    let published = api.object(roots).expect("the ConfigMap");
    assert_eq!(
        published["data"]["ca-cert.pem"],
        first.bundle().to_pem().concat()
    );
    assert!(
        published["data"].get("ca-key.pem").is_none(),
        "never the key"
    );
    let writes = api.writes().len();
    super::ca_secret::publish_roots(
        api.client(),
        "nodemesh-system",
        "nodemesh-root-ca",
        first.bundle(),
    )
    .await
    .expect("unchanged");
    assert_eq!(
        api.writes().len(),
        writes,
        "an unchanged bundle is not written again"
    );

    // An operator's Secret without its key is refused, saying what to do.
    api.put_object(secrets, json!({"metadata": {"name": "nodemesh-ca"}, "data": {"ca-cert.pem": secret["data"]["ca-cert.pem"]}}));
    let error = super::ca_secret::load_or_create(
        api.client(),
        "nodemesh-system",
        "nodemesh-ca",
        "cluster.local",
    )
    .await
    .expect_err("no key");
    assert!(
        error
            .to_string()
            .contains("lacks ca-cert.pem or ca-key.pem"),
        "{error:#}"
    );
}

#[tokio::test]
async fn one_replica_leads_and_hands_over_when_it_stops() {
    let api = FakeApi::default();
    let (first_tx, first) = tokio::sync::watch::channel(false);
    let (second_tx, second) = tokio::sync::watch::channel(false);
    let first_stop = CancellationToken::new();
    let second_stop = CancellationToken::new();
    tokio::spawn(super::lease::elect(
        api.client(),
        "nodemesh-system".into(),
        "ctrl-0".into(),
        first_tx,
        first_stop.clone(),
    ));
    until("ctrl-0 leads", || (*first.borrow()).then_some(())).await;
    tokio::spawn(super::lease::elect(
        api.client(),
        "nodemesh-system".into(),
        "ctrl-1".into(),
        second_tx,
        second_stop.clone(),
    ));
    // ctrl-0 renews every 2 s: ctrl-1 sees the record change and never takes it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(*first.borrow() && !*second.borrow(), "one leader at a time");

    first_stop.cancel();
    until("ctrl-1 takes over", || (*second.borrow()).then_some(())).await;
    let lease = api
        .object(
            "/apis/coordination.k8s.io/v1/namespaces/nodemesh-system/leases/nodemesh-controller",
        )
        .expect("the lease");
    assert_eq!(lease["spec"]["holderIdentity"], "ctrl-1");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    second_stop.cancel();
}
