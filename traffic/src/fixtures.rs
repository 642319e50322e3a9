//! Configurations for the unit tests: a namespace `shop` with two versions of `web`.

use std::path::Path;

use nodemesh_config::MeshConfig;

/// Namespaces `shop` (enrolled), `frontend` and `other`; workloads `web-1` (version v1) and
/// `web-2` (version v2); Services `web` (both, ports 80 and 81), `web-v1` and `web-v2`.
pub const BASE: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodemesh.dev/enabled: \"true\"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: frontend, labels: {nodemesh.dev/enabled: \"true\"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: nodemesh.dev/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web, version: v1}}
spec: {node: n1, netns: /run/netns/web-1, ip: 10.0.1.2, serviceAccount: web}
---
apiVersion: nodemesh.dev/v1alpha1
kind: Workload
metadata: {name: web-2, namespace: shop, labels: {app: web, version: v2}}
spec: {node: n2, netns: /run/netns/web-2, ip: 10.0.2.2, serviceAccount: web}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}, {port: 81, targetPort: 8081}]
---
apiVersion: v1
kind: Service
metadata: {name: web-v1, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  selector: {version: v1}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: shop}
spec:
  clusterIP: 10.96.0.12
  selector: {version: v2}
  ports: [{port: 80, targetPort: 8080}]
";

/// An HTTPRoute in `shop`; `rest` starts with the name and may add metadata lines.
pub fn route_yaml(rest: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  namespace: shop\n  {rest}"
    )
}

/// A BackendTrafficPolicy in `shop`; `rest` starts with the name.
pub fn policy_yaml(rest: &str) -> String {
    format!(
        "apiVersion: policy.nodemesh.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata:\n  namespace: shop\n  {rest}"
    )
}

/// [`BASE`] and more documents.
pub fn with(documents: &[&str]) -> MeshConfig {
    let mut text = BASE.to_owned();
    for document in documents {
        text.push_str("---\n");
        text.push_str(document);
    }
    nodemesh_config::load_str(Path::new("test.yaml"), &text)
        .unwrap_or_else(|e| panic!("test configuration refused:\n{e}"))
}

pub fn mesh(documents: &[&str]) -> MeshConfig {
    with(documents)
}

/// [`BASE`] and HTTPRoutes in `shop`.
pub fn with_routes(routes: &[&str]) -> MeshConfig {
    let routes: Vec<String> = routes.iter().map(|r| route_yaml(r)).collect();
    let refs: Vec<&str> = routes.iter().map(String::as_str).collect();
    with(&refs)
}
