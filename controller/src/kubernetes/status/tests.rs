use std::path::Path;

use nodemesh_config::{ConfigError, MeshConfig};
use serde_json::{Value, json};

use super::*;

const NOW: &str = "2026-12-03T20:00:00Z";
const EARLIER: &str = "2026-12-01T08:00:00Z";

fn mesh() -> MeshConfig {
    nodemesh_config::load_str(
        Path::new("t.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
         spec: {clusterIP: None, ports: [{port: 5432}]}\n",
    )
    .expect("mesh")
}

fn route(parents: Value, backends: Value, status: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "shop", "generation": 4},
        "spec": {"parentRefs": parents, "rules": [{"backendRefs": backends}]},
        "status": status,
    })
}

fn ours(parents: &Value) -> Vec<&Value> {
    parents
        .as_array()
        .expect("list")
        .iter()
        .filter(|p| p["controllerName"] == CONTROLLER_NAME)
        .collect()
}

fn reasons(parent: &Value) -> (String, String) {
    let of = |kind: &str| {
        let c = find_condition(&parent["conditions"], kind).expect("condition");
        format!(
            "{}/{}",
            c["status"].as_str().unwrap_or(""),
            c["reason"].as_str().unwrap_or("")
        )
    };
    (of("Accepted"), of("ResolvedRefs"))
}

#[test]
fn an_accepted_route_says_so_for_each_service_parent_and_keeps_others_entries() {
    let other = json!({"parentRef": {"name": "gw", "kind": "Gateway", "group": "gateway.networking.k8s.io"},
                       "controllerName": "example.com/gateway", "conditions": []});
    let r = route(
        json!([{"group": "", "kind": "Service", "name": "web", "port": 80},
               {"name": "gw", "kind": "Gateway", "group": "gateway.networking.k8s.io"}]),
        json!([{"name": "web", "port": 80}]),
        json!({"parents": [other.clone()]}),
    );
    let parents = route_parents(&r, Some(&Verdict::default()), &mesh(), NOW);
    assert_eq!(
        parents[0], other,
        "another controller's entry stays as it was"
    );
    let ours = ours(&parents);
    assert_eq!(ours.len(), 1);
    assert_eq!(ours[0]["parentRef"]["name"], "web");
    assert_eq!(
        reasons(ours[0]),
        ("True/Accepted".to_owned(), "True/ResolvedRefs".to_owned())
    );
    let accepted = find_condition(&ours[0]["conditions"], "Accepted").expect("Accepted");
    assert_eq!(accepted["observedGeneration"], 4);
    assert_eq!(accepted["lastTransitionTime"], NOW);
}

#[test]
fn gateway_apis_reasons_say_what_does_not_resolve() {
    let cases = [
        (
            json!([{"group": "", "kind": "Service", "name": "gone"}]),
            json!([{"name": "web", "port": 80}]),
            "False/NoMatchingParent",
            "True/ResolvedRefs",
            "parent Service shop/gone not found",
        ),
        (
            json!([{"group": "", "kind": "Service", "name": "db"}]),
            json!([{"name": "web", "port": 80}]),
            "False/NoMatchingParent",
            "True/ResolvedRefs",
            "headless",
        ),
        (
            json!([{"group": "", "kind": "Service", "name": "web", "port": 81}]),
            json!([{"name": "web", "port": 80}]),
            "False/NoMatchingParent",
            "True/ResolvedRefs",
            "no port 81",
        ),
        (
            json!([{"group": "", "kind": "Service", "name": "web"}]),
            json!([{"name": "missing", "port": 80}]),
            "True/Accepted",
            "False/BackendNotFound",
            "backend Service shop/missing not found",
        ),
        (
            json!([{"group": "", "kind": "Service", "name": "web"}]),
            json!([{"name": "b", "kind": "Bucket", "group": "s3.example.com"}]),
            "True/Accepted",
            "False/InvalidKind",
            "Bucket",
        ),
    ];
    for (parents, backends, accepted, resolved, said) in cases {
        let r = route(parents, backends, Value::Null);
        let status = route_parents(&r, None, &mesh(), NOW);
        let ours = ours(&status);
        assert_eq!(
            reasons(ours[0]),
            (accepted.to_owned(), resolved.to_owned()),
            "{r}"
        );
        assert!(status.to_string().contains(said), "{said}: {status}");
    }
}

#[test]
fn a_refused_route_is_not_accepted_and_says_why() {
    let r = route(
        json!([{"group": "", "kind": "Service", "name": "web"}]),
        json!([{"name": "web", "port": 80}]),
        Value::Null,
    );
    let verdict = Verdict {
        problems: vec![ConfigError {
            file: "".into(),
            object: Some("HTTPRoute shop/r".into()),
            field: Some("spec.rules[0].matches[0].path.value".into()),
            message: "\"[\" is not a valid regular expression".into(),
        }],
        refused: true,
        kept_previous: true,
        stand_in: None,
    };
    let status = route_parents(&r, Some(&verdict), &mesh(), NOW);
    let ours = ours(&status);
    assert_eq!(reasons(ours[0]).0, "False/UnsupportedValue");
    let message = find_condition(&ours[0]["conditions"], "Accepted").expect("c")["message"]
        .as_str()
        .expect("text")
        .to_owned();
    assert!(
        message.contains("spec.rules[0].matches[0].path.value"),
        "{message}"
    );
    assert!(
        message.ends_with("the previous version stays in force"),
        "{message}"
    );
}

#[test]
fn a_condition_keeps_its_transition_time_while_its_status_holds() {
    let policy = json!({
        "metadata": {"name": "p", "namespace": "shop", "generation": 2},
        "status": {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                   "message": "", "observedGeneration": 1, "lastTransitionTime": EARLIER}]}
    });
    let status = object_status(&policy, &Verdict::default(), NOW);
    assert_eq!(status["conditions"][0]["lastTransitionTime"], EARLIER);
    assert_eq!(status["conditions"][0]["observedGeneration"], 2);
    assert!(
        !same_status(&policy["status"], &status),
        "a new generation is news"
    );
    let refused = Verdict {
        problems: vec![ConfigError {
            file: "".into(),
            object: None,
            field: Some("spec.action".into()),
            message: "unknown variant `DENNY`".into(),
        }],
        refused: true,
        kept_previous: false,
        stand_in: None,
    };
    let status = object_status(&policy, &refused, NOW);
    assert_eq!(status["conditions"][0]["status"], "False");
    assert_eq!(status["conditions"][0]["reason"], "Invalid");
    assert_eq!(status["conditions"][0]["lastTransitionTime"], NOW);
    assert_eq!(
        status["conditions"][0]["message"],
        "field `spec.action`: unknown variant `DENNY`"
    );
    let mut same = status.clone();
    same["conditions"][0]["lastTransitionTime"] = "2030-01-01T00:00:00Z".into();
    assert!(same_status(&status, &same));
}
