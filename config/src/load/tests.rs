use std::fs;

use super::*;

const NAMESPACES: &str = r#"
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
"#;

fn workload(name: &str, namespace: &str, ip: &str, extra_labels: &str) -> String {
    format!(
        r#"
apiVersion: nodemesh.dev/v1alpha1
kind: Workload
metadata:
  name: {name}
  namespace: {namespace}
  labels:
    app: {name}
    {extra_labels}
spec:
  node: n1
  netns: /run/netns/{name}
  ip: {ip}
  serviceAccount: {name}-sa
"#
    )
}

struct ConfigDir(tempfile::TempDir);

impl ConfigDir {
    fn new() -> Self {
        let dir = Self(tempfile::tempdir().expect("temp dir"));
        dir.write("00-namespaces.yaml", NAMESPACES);
        dir
    }

    fn write(&self, name: &str, text: &str) -> &Self {
        fs::write(self.0.path().join(name), text).expect("write config file");
        self
    }

    fn load(&self) -> Result<MeshConfig, ConfigErrors> {
        load_dir(self.0.path())
    }

    fn errors(&self) -> Vec<ConfigError> {
        self.load().expect_err("configuration should be refused").0
    }
}

#[test]
fn enrollment_follows_namespace_and_workload_labels() {
    let dir = ConfigDir::new();
    dir.write("web.yaml", &workload("web", "shop", "10.0.0.2", ""))
        .write(
            "opted-out.yaml",
            &workload(
                "batch",
                "shop",
                "10.0.0.3",
                "nodemesh.dev/enabled: \"false\"",
            ),
        )
        .write("old.yml", &workload("old", "legacy", "10.0.0.4", ""))
        .write(".web.yaml.swp", "not yaml: [")
        .write("README.md", "ignored");
    let config = dir.load().expect("valid configuration");
    let enrolled: Vec<_> = config.enrolled_on("n1").map(Workload::key).collect();
    assert_eq!(enrolled, ["shop/web"]);
    assert_eq!(config.workloads.len(), 3);
    assert_eq!(
        config.workloads["shop/web"].identity("cluster.local"),
        "spiffe://cluster.local/ns/shop/sa/web-sa"
    );
    assert_eq!(config.enrolled_on("n2").count(), 0);
}

#[test]
fn several_objects_in_one_file() {
    let dir = ConfigDir::new();
    let both = format!(
        "{}---\n{}",
        workload("a", "shop", "10.0.0.2", ""),
        workload("b", "shop", "10.0.0.3", "")
    );
    dir.write("pods.yaml", &both);
    assert_eq!(dir.load().expect("valid").workloads.len(), 2);
}

#[test]
fn a_typo_names_file_object_and_field() {
    let dir = ConfigDir::new();
    let typo = workload("web", "shop", "10.0.0.2", "").replace("serviceAccount", "serviceAcount");
    dir.write("web.yaml", &typo);
    let errors = dir.errors();
    assert_eq!(errors.len(), 1);
    let message = errors[0].to_string();
    assert!(message.contains("web.yaml"), "{message}");
    assert!(message.contains("Workload shop/web"), "{message}");
    assert!(message.contains("spec"), "{message}");
    assert!(message.contains("serviceAcount"), "{message}");
    assert!(
        message.contains("serviceAccount"),
        "the allowed names are listed: {message}"
    );
}

#[test]
fn bad_values_are_refused_with_their_field() {
    let cases = [
        (workload("web", "shop", "10.0.0", ""), "spec.ip"),
        (workload("web", "shop", "127.0.0.1", ""), "spec.ip"),
        (workload("Web", "shop", "10.0.0.2", ""), "metadata.name"),
        (
            workload("web", "shop", "10.0.0.2", "").replace("/run/netns/web", "netns/web"),
            "spec.netns",
        ),
        (
            workload("web", "nowhere", "10.0.0.2", ""),
            "metadata.namespace",
        ),
        (
            workload("web", "shop", "10.0.0.2", "").replace("nodemesh.dev/v1alpha1", "v1"),
            "apiVersion",
        ),
        (
            workload("web", "shop", "10.0.0.2", "").replace("Workload", "Pod"),
            "kind",
        ),
    ];
    for (text, field) in cases {
        let dir = ConfigDir::new();
        dir.write("web.yaml", &text);
        let errors = dir.errors();
        assert_eq!(errors[0].field.as_deref(), Some(field), "{}", errors[0]);
    }
}

#[test]
fn duplicates_are_refused_naming_both_files() {
    let dir = ConfigDir::new();
    dir.write("a.yaml", &workload("web", "shop", "10.0.0.2", ""))
        .write("b.yaml", &workload("web", "shop", "10.0.0.3", ""))
        .write("c.yaml", &workload("api", "shop", "10.0.0.2", ""));
    let errors = dir.errors();
    assert_eq!(errors.len(), 2, "{errors:?}");
    let text = ConfigErrors(errors).to_string();
    assert!(
        text.contains("b.yaml") && text.contains("already defined in"),
        "{text}"
    );
    assert!(
        text.contains("c.yaml") && text.contains("10.0.0.2 is already"),
        "{text}"
    );
}

#[test]
fn broken_yaml_is_refused_and_every_file_reported() {
    let dir = ConfigDir::new();
    dir.write("a.yaml", "kind: [")
        .write("b.yaml", "- just\n- a list\n");
    let errors = dir.errors();
    assert_eq!(errors.len(), 2);
    assert!(
        errors[0].to_string().contains("not valid YAML"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].to_string().contains("Kubernetes-style object"),
        "{}",
        errors[1]
    );
}

#[test]
fn fingerprint_notices_edits_additions_and_removals() {
    let dir = ConfigDir::new();
    let before = SourceFingerprint::of(dir.0.path());
    assert_eq!(before, SourceFingerprint::of(dir.0.path()));
    dir.write("web.yaml", &workload("web", "shop", "10.0.0.2", ""));
    let added = SourceFingerprint::of(dir.0.path());
    assert_ne!(before, added);
    fs::remove_file(dir.0.path().join("web.yaml")).expect("remove");
    assert_eq!(before, SourceFingerprint::of(dir.0.path()));
}

fn peer_auth(name: &str, namespace: &str, selector_app: Option<&str>, mode: &str) -> String {
    let selector = selector_app
        .map(|app| format!("  selector:\n    matchLabels:\n      app: {app}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: security.nodemesh.dev/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{selector}  mtls:\n    mode: {mode}\n"
    )
}

#[test]
fn mtls_mode_is_decided_by_the_narrowest_peer_authentication() {
    let dir = ConfigDir::new();
    dir.write("web.yaml", &workload("web", "shop", "10.0.0.2", ""))
        .write("api.yaml", &workload("api", "shop", "10.0.0.3", ""))
        .write("old.yaml", &workload("old", "legacy", "10.0.0.4", ""));
    let mode = |config: &MeshConfig, key: &str| {
        let m = config.mtls_mode(&config.workloads[key]);
        (m.mode, m.policy)
    };
    let config = dir.load().expect("valid");
    assert_eq!(
        mode(&config, "shop/web"),
        (crate::MtlsMode::Permissive, None),
        "the default"
    );

    dir.write(
        "mesh.yaml",
        &peer_auth("default", "nodemesh-system", None, "STRICT"),
    );
    let config = dir.load().expect("valid");
    assert_eq!(
        mode(&config, "legacy/old"),
        (
            crate::MtlsMode::Strict,
            Some("nodemesh-system/default".into())
        )
    );

    dir.write(
        "shop.yaml",
        &peer_auth("shop-wide", "shop", None, "PERMISSIVE"),
    )
    .write(
        "web-pa.yaml",
        &peer_auth("web-only", "shop", Some("web"), "STRICT"),
    )
    .write(
        "unset.yaml",
        &peer_auth("inherit", "shop", Some("api"), "UNSET"),
    );
    let config = dir.load().expect("valid");
    assert_eq!(
        mode(&config, "shop/web"),
        (crate::MtlsMode::Strict, Some("shop/web-only".into()))
    );
    assert_eq!(
        mode(&config, "shop/api"),
        (crate::MtlsMode::Permissive, Some("shop/shop-wide".into())),
        "UNSET defers to the namespace"
    );
    assert_eq!(
        mode(&config, "legacy/old"),
        (
            crate::MtlsMode::Strict,
            Some("nodemesh-system/default".into())
        )
    );
}

#[test]
fn mtls_is_composed_as_istio_composes_it() {
    let dir = ConfigDir::new();
    dir.write("web.yaml", &workload("web", "shop", "10.0.0.2", ""))
        .write("mesh.yaml", &peer_auth("default", "nodemesh-system", None, "STRICT"))
        // A selector in the root namespace has no effect, as in Istio.
        .write(
            "root-web.yaml",
            &peer_auth("root-web", "nodemesh-system", Some("web"), "PERMISSIVE"),
        )
        // The oldest of two selecting policies wins; its UNSET mode inherits, its ports apply.
        .write(
            "old.yaml",
            &(peer_auth("zz-old", "shop", Some("web"), "UNSET").replace(
                "  name: zz-old\n",
                "  name: zz-old\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\n",
            ) + "  portLevelMtls:\n    8080:\n      mode: PERMISSIVE\n    9090:\n      mode: UNSET\n"),
        )
        .write(
            "new.yaml",
            &peer_auth("aa-new", "shop", Some("web"), "PERMISSIVE").replace(
                "  name: aa-new\n",
                "  name: aa-new\n  creationTimestamp: \"2025-01-01T00:00:00Z\"\n",
            ),
        );
    let config = dir.load().expect("valid");
    let mtls = config.mtls_mode(&config.workloads["shop/web"]);
    assert_eq!(
        mtls.for_port(80),
        (crate::MtlsMode::Strict, Some("nodemesh-system/default")),
        "the workload's policy sets no mode: the mesh's holds"
    );
    assert_eq!(
        mtls.for_port(8080),
        (crate::MtlsMode::Permissive, Some("shop/zz-old"))
    );
    assert_eq!(
        mtls.for_port(9090),
        (crate::MtlsMode::Strict, Some("nodemesh-system/default")),
        "an UNSET port takes the workload's mode"
    );
}

#[test]
fn a_root_namespace_set_in_mesh_settings_makes_its_policies_mesh_wide() {
    let dir = ConfigDir::new();
    dir.write("web.yaml", &workload("web", "shop", "10.0.0.2", ""))
        .write(
            "settings.yaml",
            "apiVersion: nodemesh.dev/v1alpha1\nkind: MeshSettings\nmetadata:\n  name: default\n  namespace: nodemesh-system\nspec:\n  rootNamespace: mesh-root\n",
        )
        .write("mesh.yaml", &peer_auth("default", "mesh-root", None, "STRICT"))
        .write("ignored.yaml", &peer_auth("default", "nodemesh-system", None, "DISABLE"));
    let config = dir.load().expect("valid");
    let mtls = config.mtls_mode(&config.workloads["shop/web"]);
    assert_eq!(
        mtls.for_port(80),
        (crate::MtlsMode::Strict, Some("mesh-root/default"))
    );
    assert!(
        config
            .for_node("n1")
            .peer_authentications
            .contains_key("mesh-root/default")
    );
}

#[test]
fn mesh_settings_and_peer_authentication_are_validated() {
    let dir = ConfigDir::new();
    dir.write(
        "settings.yaml",
        "apiVersion: nodemesh.dev/v1alpha1\nkind: MeshSettings\nmetadata:\n  name: default\n  namespace: nodemesh-system\nspec:\n  egress:\n    policy: Deny\n",
    );
    assert_eq!(
        dir.load().expect("valid").egress(),
        crate::EgressPolicy::Deny
    );

    let cases = [
        (peer_auth("x", "shop", None, "STRICTER"), "spec.mtls.mode"),
        (
            "apiVersion: nodemesh.dev/v1alpha1\nkind: MeshSettings\nmetadata:\n  name: mine\n  namespace: nodemesh-system\n".to_owned(),
            "metadata",
        ),
        (
            "apiVersion: nodemesh.dev/v1alpha1\nkind: MeshSettings\nmetadata:\n  name: default\n  namespace: nodemesh-system\nspec:\n  egress:\n    policy: deny\n".to_owned(),
            "spec.egress.policy",
        ),
        (peer_auth("x", "shop", None, "STRICT").replace("security.nodemesh.dev/v1", "security.istio.io/v1"), "apiVersion"),
    ];
    for (text, field) in cases {
        let dir = ConfigDir::new();
        dir.write("bad.yaml", &text);
        let errors = dir.errors();
        assert_eq!(errors[0].field.as_deref(), Some(field), "{}", errors[0]);
    }
}

const ALLOW_PUBLIC: &str = r#"
apiVersion: security.nodemesh.dev/v1
kind: AuthorizationPolicy
metadata:
  name: public-only
  namespace: shop
spec:
  selector:
    matchLabels:
      app: web
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/api"]
        namespaces: ["shop"]
        ipBlocks: ["10.0.0.0/8"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/public/*"]
        ports: ["8080"]
    when:
    - key: request.headers[x-tenant]
      values: ["blue"]
"#;

#[test]
fn an_istio_authorization_policy_loads_and_selects_its_workloads() {
    let dir = ConfigDir::new();
    dir.write("web.yaml", &workload("web", "shop", "10.0.0.2", ""))
        .write("api.yaml", &workload("api", "shop", "10.0.0.3", ""))
        .write("policy.yaml", ALLOW_PUBLIC)
        .write(
            "mesh-deny.yaml",
            "apiVersion: security.nodemesh.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-legacy\n  namespace: nodemesh-system\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"legacy\"]\n",
        );
    let config = dir.load().expect("valid");
    let names = |key: &str| -> Vec<String> {
        config
            .authorization_policies_for(&config.workloads[key])
            .map(crate::AuthorizationPolicy::key)
            .collect()
    };
    assert_eq!(
        names("shop/web"),
        ["nodemesh-system/deny-legacy", "shop/public-only"]
    );
    assert_eq!(names("shop/api"), ["nodemesh-system/deny-legacy"]);
}

#[test]
fn authorization_policy_mistakes_name_their_field() {
    let cases = [
        (ALLOW_PUBLIC.replace("ALLOW", "PERMIT"), "spec.action"),
        (
            ALLOW_PUBLIC.replace("\"GET\"", "\"\""),
            "spec.rules[0].to[0].operation.methods[0]",
        ),
        (
            ALLOW_PUBLIC.replace("\"/public/*\"", "\"/a/{x}\""),
            "spec.rules[0].to[0].operation.paths[0]",
        ),
        (
            ALLOW_PUBLIC.replace("\"8080\"", "\"http\""),
            "spec.rules[0].to[0].operation.ports[0]",
        ),
        (
            ALLOW_PUBLIC.replace("10.0.0.0/8", "10.0.0.0/33"),
            "spec.rules[0].from[0].source.ipBlocks[0]",
        ),
        (
            ALLOW_PUBLIC.replace("request.headers[x-tenant]", "request.auth.claims[iss]"),
            "spec.rules[0].when[0].key",
        ),
        (
            ALLOW_PUBLIC.replace("principals:", "requestPrincipals:"),
            "spec.rules[0].from[0].source.requestPrincipals",
        ),
        (
            ALLOW_PUBLIC.replace("methods:", "verbs:"),
            "spec.rules[0].to[0].operation.verbs",
        ),
    ];
    for (text, field) in cases {
        let dir = ConfigDir::new();
        dir.write("policy.yaml", &text);
        let errors = dir.errors();
        assert_eq!(errors[0].field.as_deref(), Some(field), "{}", errors[0]);
        assert!(
            errors[0]
                .to_string()
                .contains("AuthorizationPolicy shop/public-only"),
            "{}",
            errors[0]
        );
    }
}

mod cluster;
