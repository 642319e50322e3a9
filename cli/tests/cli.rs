//! `nodemesh check` and `nodemesh explain` as a user runs them: exit codes and messages.

use std::{fs, path::Path, process::Command};

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    nodemesh.dev/enabled: "true"
---
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: nodemesh.dev/v1alpha1
kind: Workload
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {node: n1, netns: /run/netns/web, ip: 10.0.0.2, serviceAccount: web}
---
apiVersion: nodemesh.dev/v1alpha1
kind: Workload
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {node: n2, netns: /run/netns/api, ip: 10.0.0.3, serviceAccount: api}
---
apiVersion: nodemesh.dev/v1alpha1
kind: Workload
metadata: {name: old, namespace: legacy}
spec: {node: n1, netns: /run/netns/old, ip: 10.0.0.4}
---
apiVersion: security.nodemesh.dev/v1
kind: AuthorizationPolicy
metadata: {name: web-public, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/api"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/public/*"]}}]
"#;

fn nodemesh(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nodemesh"))
        .args(args)
        .output()
        .expect("run nodemesh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config(dir: &Path, extra: &str) -> String {
    fs::write(dir.join("mesh.yaml"), MESH).expect("write");
    if !extra.is_empty() {
        fs::write(dir.join("extra.yaml"), extra).expect("write");
    }
    dir.display().to_string()
}

#[test]
fn check_passes_a_valid_directory_and_names_every_mistake() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = config(dir.path(), "");
    let (code, out, _) = nodemesh(&["check", &path]);
    assert_eq!(code, 0);
    assert!(
        out.contains("valid: 2 namespaces, 3 workloads (2 in the mesh)"),
        "{out}"
    );

    let typo = MESH.replace("methods:", "method:");
    fs::write(dir.path().join("mesh.yaml"), typo).expect("write");
    let (code, _, err) = nodemesh(&["check", &path]);
    assert_eq!(code, 1);
    assert!(err.contains("mesh.yaml: AuthorizationPolicy shop/web-public: field `spec.rules[0].to[0].operation.method`"), "{err}");
    assert!(err.contains("expected one of"), "{err}");
}

#[test]
fn explain_gives_the_verdict_and_the_deciding_rule() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = config(dir.path(), "");
    let explain = |extra: &[&str]| {
        let mut args = vec![
            "explain", "--config", &path, "--from", "api", "--to", "web:8080",
        ];
        args.extend_from_slice(extra);
        nodemesh(&args)
    };

    let (code, out, _) = explain(&["--method", "GET", "--path", "/public/x?y=1"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ALLOWED: AuthorizationPolicy shop/web-public rule 0 allows it"),
        "{out}"
    );

    let (code, out, _) = explain(&["--method", "POST", "--path", "/public/x"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("to[0].operation.methods: POST is not in [GET]"),
        "{out}"
    );

    let (code, out, _) = nodemesh(&[
        "explain",
        "--config",
        &path,
        "--from",
        "old",
        "--to",
        "shop/web:8080",
        "--path",
        "/public/a",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "principals: no principal (plaintext) is not in [cluster.local/ns/shop/sa/api]"
        ),
        "{out}"
    );

    let (code, _, err) = nodemesh(&[
        "explain", "--config", &path, "--from", "nobody", "--to", "web:8080",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("no workload named \"nobody\""), "{err}");
}

#[test]
fn explain_reports_strict_and_egress_before_authorization() {
    let dir = tempfile::tempdir().expect("temp dir");
    let extra = "apiVersion: security.nodemesh.dev/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: nodemesh.dev/v1alpha1\nkind: MeshSettings\nmetadata: {name: default, namespace: nodemesh-system}\nspec: {egress: {policy: Deny}}\n";
    let path = config(dir.path(), extra);
    let (code, out, _) = nodemesh(&[
        "explain", "--config", &path, "--from", "old", "--to", "web:8080",
    ]);
    assert_eq!(code, 1);
    assert!(
        out.contains("plaintext refused, the destination is STRICT (shop/strict)"),
        "{out}"
    );
    let (code, out, _) = nodemesh(&[
        "explain", "--config", &path, "--from", "web", "--to", "old:8080",
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("MeshSettings denies egress"), "{out}");
    let (code, out, _) = nodemesh(&[
        "explain", "--config", &path, "--from", "api", "--to", "web:9000", "--json",
    ]);
    assert_eq!(code, 1);
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(json["allowed"], false);
    assert_eq!(json["security"], "mtls");
}

#[test]
fn the_shipped_examples_are_valid() {
    for examples in [
        concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/policies"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/traffic"),
    ] {
        let (code, out, err) = nodemesh(&["check", examples]);
        assert_eq!(code, 0, "{examples}: {out}{err}");
    }
}

const ROUTED: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: front, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: front, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: front, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /public}}]
    backendRefs: [{name: front, port: 80}]
    timeouts: {request: 2s}
"#;

#[test]
fn check_refuses_a_route_to_a_service_that_does_not_exist() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = config(
        dir.path(),
        &ROUTED.replace("backendRefs: [{name: front", "backendRefs: [{name: nowhere"),
    );
    let (code, _, err) = nodemesh(&["check", &path]);
    assert_eq!(code, 1);
    assert!(
        err.contains("extra.yaml: HTTPRoute shop/front: field `spec.rules[0].backendRefs[0].name`: no Service shop/nowhere exists"),
        "{err}"
    );
}

#[test]
fn explain_follows_a_request_to_a_service_through_its_route() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = config(dir.path(), ROUTED);
    let explain = |extra: &[&str]| {
        let mut args = vec![
            "explain", "--config", &path, "--from", "api", "--to", "front:80",
        ];
        args.extend_from_slice(extra);
        nodemesh(&args)
    };
    let (code, out, _) = explain(&["--method", "GET", "--path", "/public/x"]);
    assert_eq!(code, 0, "{out}");
    for says in [
        "to Service shop/front port 80",
        "the client's proxy reads HTTP: yes (an HTTPRoute attaches to the port)",
        "HTTPRoute shop/front rule 0 match 0 (path /public): matches",
        "decision: rule 0 of HTTPRoute shop/front",
        "backend Service shop/front port 80 -> 8080, weight 1 (100.0 %)",
        "request timeout 2s",
        "endpoint shop/web 10.0.0.2:8080: health unknown",
        "its proxy: allowed",
        "verdict: SERVED",
    ] {
        assert!(out.contains(says), "{says:?} in:\n{out}");
    }
    let (code, out, _) = explain(&["--method", "GET", "--path", "/private"]);
    assert_eq!(code, 1);
    assert!(out.contains("decision: 404 (NR)"), "{out}");
    let (code, out, _) = explain(&["--method", "POST", "--path", "/public/x", "--json"]);
    assert_eq!(code, 1, "routed, but the policy allows only GET: {out}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(json["route"]["decision"]["kind"], "rule");
    assert_eq!(json["endpoints"][0]["authorization"]["allowed"], false);
}
