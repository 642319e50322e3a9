//! Validation parity with Istio: the policies of Istio's documentation pass (after the
//! apiVersion change), what Istio's validation refuses is refused, naming the field.

use std::path::Path;

use crate::load_str;

/// Loads one document; the error as `nodemesh check` prints it.
fn check(document: &str) -> Result<(), String> {
    load_str(Path::new("policy.yaml"), document)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn policy(meta: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.nodemesh.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n{meta}\nspec:\n{spec}"
    )
}

const META: &str = "  name: httpbin\n  namespace: foo";

/// The AuthorizationPolicy examples of Istio's reference and task pages.
const ISTIO_DOC_POLICIES: [&str; 16] = [
    // Allow from a principal or a namespace to GET (the reference's first example, without
    // its JWT condition, which is tested below).
    "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/sleep\"]\n    - source:\n        namespaces: [\"dev\"]\n    to:\n    - operation:\n        methods: [\"GET\"]\n",
    "  action: DENY\n  rules:\n  - from:\n    - source:\n        notNamespaces: [\"foo\"]\n",
    "  {}\n",
    "  action: DENY\n  rules:\n  - {}\n",
    "  action: ALLOW\n  rules:\n  - {}\n",
    "  selector:\n    matchLabels:\n      app: httpbin\n      version: v1\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/sleep\"]\n    to:\n    - operation:\n        methods: [\"GET\"]\n    when:\n    - key: request.headers[version]\n      values: [\"v1\", \"v2\"]\n",
    "  action: AUDIT\n  rules:\n  - to:\n    - operation:\n        paths: [\"/user/profile/*\"]\n",
    "  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        paths: [\"/foo/{*}/bar\", \"/foo/{**}\"]\n",
    "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"default/sleep\", \"other-ns/client\"]\n",
    "  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"1.2.3.4\", \"5.6.7.0/24\"]\n        remoteIpBlocks: [\"10.0.0.0/8\"]\n",
    "  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        hosts: [\"httpbin.org\", \"httpbin.org:*\"]\n        ports: [\"8000\"]\n",
    "  action: DENY\n  rules:\n  - to:\n    - operation:\n        methods: [\"get\"]\n        notPaths: [\"/healthz\"]\n",
    "  action: ALLOW\n  rules:\n  - when:\n    - key: request.headers[:method]\n      values: [\"GET\"]\n    - key: request.headers[:authority]\n      values: [\"*.example.com\"]\n    - key: connection.sni\n      values: [\"www.example.com\"]\n    - key: destination.ip\n      values: [\"10.1.2.3/32\"]\n    - key: remote.ip\n      notValues: [\"10.0.0.1\"]\n",
    "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/*/sa/admin\", \"*\", \"a*b\"]\n    to:\n    - operation:\n        ports: [\"0\", \"65535\"]\n        paths: [\"healthz\", \"*\"]\n",
    "  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: productpage\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/curl\"]\n",
    "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        trustDomains: [\"cluster.local\"]\n        notIpBlocks: [\"::1\"]\n    when:\n    - key: source.serviceAccount\n      values: [\"sleep\"]\n    - key: destination.port\n      values: [\"8080\"]\n",
];

#[test]
fn the_policies_of_istios_documentation_pass() {
    for spec in ISTIO_DOC_POLICIES {
        check(&policy(META, spec)).unwrap_or_else(|e| panic!("refused:\n{spec}\n{e}"));
    }
}

/// Shapes of the documentation's examples beyond the spec: dotted names, suffix paths that
/// do not start with `/`, bare principals, gateway selectors, a namespace left out.
#[test]
fn the_documentations_other_shapes_pass() {
    let documents = [
        policy(
            "  name: service-httpbin.default.svc.cluster.local",
            "  rules:\n  - to:\n    - operation:\n        paths: [\"*/info\"]\n  selector:\n    matchLabels:\n      istio.io/gateway-name: httpbin-gateway\n",
        ),
        policy(
            "  name: frag",
            "  action: DENY\n  rules:\n  - to:\n    - operation:\n        notPaths: [\"/admin*\"]\n        hosts: [\"*.example.com\"]\n    from:\n    - source:\n        principals: [\"admin\", \"old-td/ns/foo/sa/bar\"]\n        notIpBlocks: [\"10.1.0.0/16\"]\n    when:\n    - key: request.headers[x-token]\n      notValues: [\"admin\"]\n",
        ),
        "apiVersion: security.nodemesh.dev/v1\nkind: PeerAuthentication\nmetadata:\n  name: finance\n  namespace: foo\nspec:\n  selector:\n    matchLabels:\n      app: finance\n  portLevelMtls:\n    \"8080\":\n      mode: DISABLE\n    80:\n      mode: UNSET\n---\n".to_owned(),
    ];
    for document in documents {
        check(&document).unwrap_or_else(|e| panic!("refused:\n{document}\n{e}"));
    }
}

#[test]
fn objects_exported_from_a_cluster_pass_with_their_status() {
    let exported = policy(
        "  name: httpbin\n  namespace: foo\n  uid: 1c2b\n  resourceVersion: \"42\"\n  generation: 3\n  annotations:\n    istio.io/dry-run: \"True\"",
        "  action: DENY\n  rules:\n  - {}\n",
    ) + "status:\n  validationMessages: []\n  conditions:\n  - type: Reconciled\n    status: \"True\"\n";
    check(&exported).expect("accepted");
}

/// What Istio refuses, the field each refusal names, and words of the message.
const REFUSED: [(&str, &str, &str, &str); 30] = [
    ("", "  action: DENY\n", "spec.rules", "never be triggered"),
    (
        "",
        "  action: DENY\n  rules: []\n",
        "spec.rules",
        "never be triggered",
    ),
    (
        "",
        "  rules:\n  - from: []\n",
        "spec.rules[0].from",
        "must not be empty",
    ),
    (
        "",
        "  rules:\n  - to: []\n",
        "spec.rules[0].to",
        "must not be empty",
    ),
    (
        "",
        "  rules:\n  - from:\n    - {}\n",
        "spec.rules[0].from[0].source",
        "must be set",
    ),
    (
        "",
        "  rules:\n  - from:\n    - source: {}\n",
        "spec.rules[0].from[0].source",
        "must not be empty",
    ),
    (
        "",
        "  rules:\n  - to:\n    - {}\n",
        "spec.rules[0].to[0].operation",
        "must be set",
    ),
    (
        "",
        "  rules:\n  - to:\n    - operation: {}\n",
        "spec.rules[0].to[0].operation",
        "must not be empty",
    ),
    (
        "",
        "  rules:\n  - from:\n    - source:\n        namespaces: [\"\"]\n",
        "spec.rules[0].from[0].source.namespaces[0]",
        "empty",
    ),
    (
        "",
        "  rules:\n  - to:\n    - operation:\n        methods: [\"GET\", \"\"]\n",
        "spec.rules[0].to[0].operation.methods[1]",
        "empty",
    ),
    (
        "",
        "  rules:\n  - to:\n    - operation:\n        ports: [\"http\"]\n",
        "spec.rules[0].to[0].operation.ports[0]",
        "not a port",
    ),
    (
        "",
        "  rules:\n  - to:\n    - operation:\n        ports: [\"70000\"]\n",
        "spec.rules[0].to[0].operation.ports[0]",
        "not a port",
    ),
    (
        "",
        "  rules:\n  - to:\n    - operation:\n        notPorts: [\"+80\"]\n",
        "spec.rules[0].to[0].operation.notPorts[0]",
        "not a port",
    ),
    (
        "",
        "  rules:\n  - to:\n    - operation:\n        paths: [\"/a/{**}/{*}\"]\n",
        "spec.rules[0].to[0].operation.paths[0]",
        "last operator",
    ),
    (
        "",
        "  rules:\n  - to:\n    - operation:\n        paths: [\"/a/{b}\"]\n",
        "spec.rules[0].to[0].operation.paths[0]",
        "whole segments",
    ),
    (
        "",
        "  rules:\n  - to:\n    - operation:\n        paths: [\"/a/*/{*}\"]\n",
        "spec.rules[0].to[0].operation.paths[0]",
        "may only hold",
    ),
    (
        "",
        "  selector:\n    matchLabels:\n      \"\": x\n",
        "spec.selector.matchLabels[]",
        "empty label key",
    ),
    (
        "",
        "  selector:\n    matchLabels:\n      app: \"*\"\n",
        "spec.selector.matchLabels[app]",
        "wildcards",
    ),
    (
        "  annotations:\n    istio.io/dry-run: \"yes\"",
        "  action: DENY\n  rules:\n  - {}\n",
        "metadata.annotations[istio.io/dry-run]",
        "not a boolean",
    ),
    (
        "  annotations:\n    istio.io/dry-run: \"false\"",
        "  action: AUDIT\n  rules:\n  - {}\n",
        "metadata.annotations[istio.io/dry-run]",
        "only to ALLOW and DENY",
    ),
    (
        "",
        "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/33\"]\n",
        "spec.rules[0].from[0].source.ipBlocks[0]",
        "prefix length",
    ),
    (
        "",
        "  rules:\n  - from:\n    - source:\n        principals: [\"a\"]\n        serviceAccounts: [\"b\"]\n",
        "spec.rules[0].from[0].source.serviceAccounts",
        "cannot be set together",
    ),
    (
        "",
        "  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"ns/*\"]\n",
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "wildcards",
    ),
    (
        "",
        "  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"a/b/c\"]\n",
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "namespace/serviceAccount",
    ),
    (
        "",
        "  rules:\n  - when:\n    - key: source.ip\n",
        "spec.rules[0].when[0].values",
        "at least one of",
    ),
    (
        "",
        "  rules:\n  - when:\n    - key: destination.port\n      values: [\"x\"]\n",
        "spec.rules[0].when[0].values[0]",
        "not a port",
    ),
    (
        "",
        "  rules:\n  - when:\n    - key: source.foo\n      values: [\"x\"]\n",
        "spec.rules[0].when[0].key",
        "unknown attribute",
    ),
    (
        "",
        "  rules:\n  - when:\n    - values: [\"x\"]\n",
        "spec.rules[0].when[0].key",
        "must not be empty",
    ),
    (
        "",
        "  selector:\n    matchLabels: {app: a}\n  targetRefs:\n  - {kind: Service, name: a}\n",
        "spec",
        "only one of",
    ),
    (
        "",
        "  targetRef:\n    kind: Service\n    name: a\n    namespace: other\n",
        "spec.targetRef.namespace",
        "cross-namespace",
    ),
];

#[test]
fn what_istio_refuses_is_refused_naming_the_field() {
    for (meta, spec, field, says) in REFUSED {
        let meta = if meta.is_empty() {
            META.to_owned()
        } else {
            format!("{META}\n{meta}")
        };
        let error = check(&policy(&meta, spec)).expect_err(spec);
        assert!(
            error.contains(&format!("field `{field}`")) && error.contains(says),
            "{spec}\nwanted field {field} saying {says:?}, got:\n{error}"
        );
        assert!(
            error.starts_with("policy.yaml: AuthorizationPolicy foo/httpbin"),
            "{error}"
        );
    }
}

/// Fields that need what nodemesh does not have are refused saying exactly that.
#[test]
fn jwt_and_custom_are_refused_saying_why() {
    let cases = [
        (
            "  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"*\"]\n",
            "JWT",
        ),
        (
            "  action: DENY\n  rules:\n  - from:\n    - source:\n        notRequestPrincipals: [\"*\"]\n",
            "JWT",
        ),
        (
            "  rules:\n  - when:\n    - key: request.auth.claims[iss]\n      values: [\"https://accounts.google.com\"]\n",
            "JWT",
        ),
        (
            "  action: CUSTOM\n  provider:\n    name: my-custom-authz\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin\"]\n",
            "external authorizer",
        ),
        (
            "  targetRefs:\n  - kind: Gateway\n    group: gateway.networking.k8s.io\n    name: waypoint\n",
            "no gateways",
        ),
        // The documentation's ingress JWT policy: refused for JWT, before its Gateway target.
        (
            "  targetRef:\n    kind: Gateway\n    group: gateway.networking.k8s.io\n    name: ingress\n  action: DENY\n  rules:\n  - from:\n    - source:\n        notRequestPrincipals: [\"*\"]\n",
            "JWT",
        ),
    ];
    for (spec, says) in cases {
        let error = check(&policy(META, spec)).expect_err(spec);
        assert!(error.contains(says), "{spec}\n{error}");
        assert!(!error.contains("unknown field"), "{error}");
    }
}

#[test]
fn peer_authentication_parity() {
    let pa = |meta: &str, spec: &str| {
        format!(
            "apiVersion: security.nodemesh.dev/v1\nkind: PeerAuthentication\nmetadata:\n{meta}\nspec:\n{spec}"
        )
    };
    let accepted = [
        (
            "  name: default\n  namespace: nodemesh-system",
            "  mtls:\n    mode: STRICT\n",
        ),
        (
            "  name: default\n  namespace: foo",
            "  mtls:\n    mode: PERMISSIVE\n",
        ),
        (
            "  name: finance\n  namespace: foo",
            "  selector:\n    matchLabels:\n      app: finance\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    8080:\n      mode: DISABLE\n",
        ),
        (
            "  name: finance\n  namespace: foo",
            "  selector:\n    matchLabels:\n      app: finance\n  portLevelMtls:\n    8080:\n      mode: DISABLE\n",
        ),
        (
            "  name: scoped\n  namespace: nodemesh-system",
            "  selector:\n    matchLabels:\n      app: a\n  mtls:\n    mode: STRICT\n",
        ),
    ];
    for (meta, spec) in accepted {
        check(&pa(meta, spec)).unwrap_or_else(|e| panic!("{spec}\n{e}"));
    }
    let refused = [
        (
            "  mtls:\n    mode: STRICT\n  portLevelMtls:\n    8080:\n      mode: DISABLE\n",
            "spec.portLevelMtls",
            "add a selector",
        ),
        (
            "  selector:\n    matchLabels: {app: a}\n  portLevelMtls: {}\n",
            "spec.portLevelMtls",
            "at least one",
        ),
        (
            "  selector:\n    matchLabels: {app: a}\n  portLevelMtls:\n    0:\n      mode: STRICT\n",
            "spec.portLevelMtls[0]",
            "1..65535",
        ),
        (
            "  selector:\n    matchLabels: {app: \"*\"}\n",
            "spec.selector.matchLabels[app]",
            "wildcards",
        ),
    ];
    for (spec, field, says) in refused {
        let error = check(&pa("  name: p\n  namespace: foo", spec)).expect_err(spec);
        assert!(
            error.contains(&format!("field `{field}`")) && error.contains(says),
            "{spec}\n{error}"
        );
    }
}
