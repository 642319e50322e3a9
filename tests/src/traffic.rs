//! Fixtures of the traffic tests: two versions of `web` on node n2, their Services and
//! policies, and `nodemesh explain` against the sandbox.

use nodemesh_sandbox::Sandbox;

use crate::{Answer, TestSandbox, sandbox_with};

/// Two versions of `web` on node n2: n2-p1 is v1, n2-p2 is v2; both are `tier=web`.
pub fn two_versions(name: &str) -> Option<TestSandbox> {
    sandbox_with(name, |spec| {
        for (pod, version) in [("n2-p1", "v1"), ("n2-p2", "v2")] {
            spec.labels
                .push((pod.into(), "version".into(), version.into()));
            spec.labels.push((pod.into(), "tier".into(), "web".into()));
        }
    })
}

/// Services `web` (both versions), `web-v1` and `web-v2`, port 80 to the test server.
pub const SERVICES: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {tier: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v1, namespace: default}
spec: {clusterIP: 10.96.0.11, selector: {version: v1}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: default}
spec: {clusterIP: 10.96.0.12, selector: {version: v2}, ports: [{port: 80, targetPort: 8080}]}
";

pub fn canary(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web-canary, namespace: default}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]
  rules:
  - matches: [{{headers: [{{name: x-canary, value: \"true\"}}]}}]
    backendRefs: [{{name: web-v2, port: 80}}]
  - backendRefs: [{{name: web-v1, port: 80, weight: {v1}}}, {{name: web-v2, port: 80, weight: {v2}}}]
"
    )
}

pub fn policy(name: &str, service: &str, spec: &str) -> String {
    format!(
        "apiVersion: policy.nodemesh.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  targetRefs: [{{group: \"\", kind: Service, name: {service}}}]\n{spec}"
    )
}

pub fn share(answers: &[Answer], pod: &str) -> f64 {
    answers.iter().filter(|a| a.pod == pod).count() as f64 / answers.len().max(1) as f64
}

/// `nodemesh explain --json` against the sandbox's configuration, with node n1's agent for
/// endpoint health.
pub fn explain(sb: &Sandbox, args: &[&str]) -> serde_json::Value {
    let config = sb.config_dir().display().to_string();
    let agent = format!("http://{}", sb.node("n1").agent.admin);
    let mut all = vec!["explain", "--config", &config, "--agent", &agent, "--json"];
    all.extend_from_slice(args);
    let binary = crate::bin_dir().join("nodemesh").display().to_string();
    let out = nodemesh_sandbox::run_in_netns(&sb.node("n1").netns, &binary, &all)
        .expect("run nodemesh explain");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "nodemesh explain gave no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

pub fn client(sb: &Sandbox) -> String {
    sb.pod("n1-p1").netns.clone()
}
