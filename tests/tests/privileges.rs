//! The agent with only the privileges the DaemonSet grants it: the capabilities
//! `manifests/agent.yaml` adds (read from that file, so the test follows it), and no others,
//! applied with setpriv as a container runtime applies them. Capture, mTLS across nodes, a pod
//! handed over by the CNI plugin and a pod found under /proc all work so.

use std::{net::SocketAddr, time::Duration};

use nodemesh_sandbox::{cni::CniPod, poll_until};
use nodemesh_tests::{bin_dir, echo_from, sandbox_with, write_config};

/// The capabilities the agent's container adds, as the manifest says.
fn daemonset_capabilities() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/agent.yaml");
    let text = std::fs::read_to_string(&path).expect("manifests/agent.yaml");
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(document).expect("yaml");
        if value["kind"] == "DaemonSet" {
            let context = &value["spec"]["template"]["spec"]["containers"][0]["securityContext"];
            assert_eq!(context["privileged"], false, "the agent is not privileged");
            assert_eq!(context["capabilities"]["drop"], serde_json::json!(["ALL"]));
            return context["capabilities"]["add"]
                .as_array()
                .expect("capabilities")
                .iter()
                .map(|c| c.as_str().expect("name").to_owned())
                .collect();
        }
    }
    panic!("no DaemonSet in {}", path.display());
}

/// The capability numbers of `linux/capability.h`.
fn number(capability: &str) -> u32 {
    match capability {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "BPF" => 39,
        other => panic!("capability {other} is not known to this test"),
    }
}

/// A process's effective capabilities (`CapEff` of /proc/<pid>/status).
fn effective(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff");
    u64::from_str_radix(line.trim(), 16).expect("hex")
}

#[test]
fn the_agent_works_with_only_the_capabilities_the_daemonset_grants() {
    let capabilities = daemonset_capabilities();
    let bounding = std::iter::once("-all".to_owned())
        .chain(
            capabilities
                .iter()
                .map(|c| format!("+{}", c.to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    let Some(mut sb) = sandbox_with("tcaps", |spec| {
        spec.agent_wrapper = vec![
            "setpriv".to_owned(),
            "--bounding-set".to_owned(),
            bounding.clone(),
            "--inh-caps".to_owned(),
            "-all".to_owned(),
        ];
    }) else {
        return;
    };
    let granted: u64 = capabilities.iter().map(|c| 1u64 << number(c)).sum();
    for node in ["n1", "n2"] {
        assert_eq!(
            effective(sb.node(node).agent.pid),
            granted,
            "agent {node} runs with exactly {capabilities:?}"
        );
    }

    // Capture and mTLS across nodes.
    let far = sb.pod("n2-p1").server.echo;
    let echo = echo_from(&sb.pod("n1-p1").netns, far, b"caps").expect("through the mesh");
    assert_eq!(echo.peer, SocketAddr::from((sb.pod("n1-p1").ip, 15001)));
    assert_eq!(echo.reply, b"caps");

    // A pod handed over by the CNI plugin, and, after a restart, found under /proc.
    let pod = CniPod {
        namespace: "default".into(),
        name: "n1-c1".into(),
        uid: "3e1d7c55-9a2b-4f60-8d14-7b5c2a9e0f31".into(),
        container_id: "sandbox-n1-c1".into(),
        netns: "tcaps-n1-c1".into(),
    };
    write_config(
        &sb,
        "workload-n1-c1.yaml",
        &format!(
            "apiVersion: nodemesh.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: n1-c1\n  \
             namespace: default\n  uid: {}\nspec:\n  node: n1\n  serviceAccount: n1-c1\n",
            pod.uid
        ),
    );
    poll_until(Duration::from_secs(15), || {
        let workloads = sb.agent_admin("n1", "/workloads")?;
        anyhow::ensure!(
            workloads.to_string().contains("\"awaiting\""),
            "n1-c1 not assigned yet"
        );
        Ok(())
    })
    .expect("the workload waits for its namespace");
    let (_, ip) = sb.cni_add("n1", &pod, true).expect("the chain's ADD");
    let first = echo_from(&pod.netns, far, b"first").expect("first connection");
    assert_eq!(first.peer, SocketAddr::from((ip, 15001)));
    // As an application runs: another user than the agent's (SYS_PTRACE opens its namespace).
    let _process = sb
        .start_pod_process(
            &pod,
            std::path::Path::new("setpriv"),
            &[
                "--reuid=65534".to_owned(),
                "--regid=65534".to_owned(),
                "--clear-groups".to_owned(),
                bin_dir().join("nodemesh-testserver").display().to_string(),
                "--pod".to_owned(),
                pod.name.clone(),
            ],
        )
        .expect("a process of the pod");
    write_config(
        &sb,
        "workload-n1-c1.yaml",
        &format!(
            "apiVersion: nodemesh.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: n1-c1\n  \
             namespace: default\n  uid: {}\nspec:\n  node: n1\n  ip: {ip}\n  serviceAccount: n1-c1\n",
            pod.uid
        ),
    );
    sb.stop_agent("n1").expect("stop agent n1");
    sb.start_agent("n1").expect("agent n1 again, as restricted");
    assert_eq!(effective(sb.node("n1").agent.pid), granted);
    poll_until(Duration::from_secs(20), || {
        let echo = echo_from(&pod.netns, far, b"again")?;
        anyhow::ensure!(
            echo.peer == SocketAddr::from((ip, 15001)),
            "not captured yet"
        );
        Ok(())
    })
    .expect("the pod is found under /proc and enrolled again");
}
