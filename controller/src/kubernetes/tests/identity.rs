//! Who may do what: an agent's token proves its own node and obtains no other node's
//! identities; the first controller makes the CA Secret and the next takes it; one replica
//! leads and hands over when it stops.

use std::{sync::Arc, time::Duration};

use http::Method;
use nodemesh_identity::SpiffeId;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{FakeApi, cluster_api, until, watched};
use crate::{
    config::Config,
    kubernetes::{
        build::{self, LastGood},
        cluster::Cluster,
        token_review::{ReviewError, TokenReviewer},
    },
    state::ControllerState,
};

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
    let first = crate::kubernetes::ca_secret::load_or_create(
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
    let second = crate::kubernetes::ca_secret::load_or_create(
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

    crate::kubernetes::ca_secret::publish_roots(
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
    crate::kubernetes::ca_secret::publish_roots(
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
    let error = crate::kubernetes::ca_secret::load_or_create(
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
    tokio::spawn(crate::kubernetes::lease::elect(
        api.client(),
        "nodemesh-system".into(),
        "ctrl-0".into(),
        first_tx,
        first_stop.clone(),
    ));
    until("ctrl-0 leads", || (*first.borrow()).then_some(())).await;
    tokio::spawn(crate::kubernetes::lease::elect(
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
