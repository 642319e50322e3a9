//! Pods made as a container runtime makes them, through the node's CNI chain (the reference
//! plugins `bridge`, `host-local` and `loopback`, then `nodemesh-cni`): the plugin hands the
//! pod's namespace to the agent and returns once the pod is enrolled, so its very first
//! connection is the mesh's; with the agent away, a pod of the mesh waits rather than starts
//! outside it. A pod that was running before its agent is found under /proc by its uid.

use std::{net::SocketAddr, time::Duration};

use nodemesh_sandbox::{
    Sandbox,
    cni::{CniFailure, CniPod},
    poll_until,
};
use nodemesh_tests::{bin_dir, connections, echo_from, sandbox, write_config};

const SOON: Duration = Duration::from_secs(15);

fn pod(sb: &Sandbox, name: &str, namespace: &str, uid: &str) -> CniPod {
    CniPod {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: uid.to_owned(),
        container_id: format!("sandbox-{name}"),
        netns: format!("{}-{name}", sb.status().name),
    }
}

/// A Workload as the controller makes one from a pod: no namespace path; an address once the
/// pod has one.
fn workload_yaml(pod: &CniPod, ip: Option<std::net::Ipv4Addr>) -> String {
    let ip = ip.map(|ip| format!("  ip: {ip}\n")).unwrap_or_default();
    format!(
        "apiVersion: nodemesh.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\n  \
         namespace: {ns}\n  uid: {uid}\n  labels:\n    app: {name}\nspec:\n  node: n1\n{ip}  \
         serviceAccount: {name}\n",
        name = pod.name,
        ns = pod.namespace,
        uid = pod.uid,
    )
}

fn state_of(sb: &Sandbox, node: &str, name: &str) -> anyhow::Result<serde_json::Value> {
    let workloads = sb.agent_admin(node, "/workloads")?;
    workloads
        .as_array()
        .and_then(|all| all.iter().find(|w| w["name"] == name))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("agent {node} does not list {name}: {workloads}"))
}

fn wait_state(sb: &Sandbox, name: &str, state: &str) -> serde_json::Value {
    poll_until(SOON, || {
        let workload = state_of(sb, "n1", name)?;
        anyhow::ensure!(workload["state"] == state, "{workload}");
        Ok(workload)
    })
    .unwrap_or_else(|e| panic!("{name} is not {state}: {e:#}"))
}

#[test]
fn a_pod_made_through_the_cni_chain_is_captured_from_its_first_connection() {
    let Some(mut sb) = sandbox("tcni") else {
        return;
    };
    let web = pod(
        &sb,
        "n1-c1",
        "default",
        "5f0c2a9e-7b41-4c2d-9a8e-0d6b3f1e2c41",
    );
    write_config(&sb, "workload-n1-c1.yaml", &workload_yaml(&web, None));
    let awaiting = wait_state(&sb, "n1-c1", "awaiting");
    assert!(
        awaiting["error"]
            .as_str()
            .is_some_and(|e| e.contains("CNI")),
        "it says what it waits for: {awaiting}"
    );

    let (result, ip) = sb.cni_add("n1", &web, true).expect("the chain's ADD");
    // The runtime starts the pod's containers now: the first connection they make.
    let far = sb.pod("n2-p1").server.echo;
    let echo = echo_from(&web.netns, far, b"first").expect("the first connection");
    assert_eq!(
        echo.peer,
        SocketAddr::from((ip, 15001)),
        "the pod's first connection went to its proxy"
    );
    assert_eq!(echo.reply, b"first");
    let enrolled = state_of(&sb, "n1", "n1-c1").expect("listed");
    assert_eq!(enrolled["state"], "enrolled");
    assert_eq!(enrolled["netns"], "cni:sandbox-n1-c1");
    assert_eq!(enrolled["ip"], ip.to_string());
    poll_until(SOON, || {
        let carried = connections(&sb, "n2").into_iter().any(|c| {
            c["direction"] == "inbound"
                && c["source_identity"] == "spiffe://cluster.local/ns/default/sa/n1-c1"
                && c["original_dst"] == far.to_string()
        });
        anyhow::ensure!(carried, "no mTLS connection from n1-c1 recorded on n2");
        Ok(())
    })
    .expect("it crossed to n2 in an HBONE tunnel with the pod's own identity");

    sb.cni_del("n1", &web, true, Some(&result))
        .expect("the chain's DEL");
    wait_state(&sb, "n1-c1", "awaiting");

    // With the agent gone, a pod of a namespace in the mesh waits; one outside it starts.
    sb.kill_agent("n1").expect("kill agent n1");
    let later = pod(
        &sb,
        "n1-c2",
        "default",
        "0b7d3c11-2f6e-4a59-8c1d-6e2f9a4b7d20",
    );
    let error = sb
        .cni_add("n1", &later, true)
        .expect_err("no agent to enroll it");
    let failure = error
        .downcast_ref::<CniFailure>()
        .expect("a plugin's error");
    assert_eq!(failure.plugin, "nodemesh-cni");
    assert_eq!(
        failure.error["code"], 11,
        "try again later: {}",
        failure.error
    );
    assert!(
        failure.error["details"]
            .as_str()
            .is_some_and(|d| d.contains("failOpen")),
        "it says how to choose otherwise: {}",
        failure.error
    );
    let outside = pod(
        &sb,
        "n1-c3",
        "legacy",
        "6a1e9d44-0c3b-4f7a-b2d5-93c8e1f0a6b7",
    );
    let (_, outside_ip) = sb
        .cni_add("n1", &outside, true)
        .expect("a pod of a namespace outside the mesh starts without the agent");
    let direct = echo_from(&outside.netns, far, b"direct").expect("direct");
    assert_ne!(direct.peer, SocketAddr::from((outside_ip, 15001)));
    assert_eq!(direct.reply, b"direct");
    sb.start_agent("n1").expect("agent n1 back");
}

#[test]
fn a_pod_running_before_its_agent_is_found_under_proc_and_enrolled() {
    let Some(mut sb) = sandbox("tproc") else {
        return;
    };
    // Made before the node had the mesh: the chain without nodemesh-cni, a process of the
    // pod in the cgroup kubelet would give it.
    let old = pod(
        &sb,
        "n1-old",
        "default",
        "9c3e7a10-5d2b-4e8f-a1c6-2b7d0e4f8a93",
    );
    let (_, ip) = sb.cni_add("n1", &old, false).expect("the chain's ADD");
    let _process = sb
        .start_pod_process(
            &old,
            &bin_dir().join("nodemesh-testserver"),
            &["--pod".to_owned(), old.name.clone()],
        )
        .expect("a process of the pod");
    let far = sb.pod("n2-p1").server.echo;
    let before = echo_from(&old.netns, far, b"before").expect("direct");
    assert_ne!(
        before.peer,
        SocketAddr::from((ip, 15001)),
        "not captured yet"
    );

    sb.stop_agent("n1").expect("stop agent n1");
    write_config(&sb, "workload-n1-old.yaml", &workload_yaml(&old, Some(ip)));
    sb.start_agent("n1").expect("agent n1 starts");

    let enrolled = wait_state(&sb, "n1-old", "enrolled");
    assert!(
        enrolled["netns"]
            .as_str()
            .is_some_and(|n| n.starts_with("/proc/") && n.ends_with("/ns/net")),
        "found under /proc: {enrolled}"
    );
    let after = echo_from(&old.netns, far, b"after").expect("through the mesh");
    assert_eq!(after.peer, SocketAddr::from((ip, 15001)));
    assert_eq!(after.reply, b"after");
    let server = SocketAddr::from((ip, 9000));
    let inbound = echo_from(&sb.pod("n2-p1").netns, server, b"in").expect("to the pod");
    assert_eq!(inbound.reply, b"in");
    poll_until(SOON, || {
        let carried = connections(&sb, "n1")
            .into_iter()
            .any(|c| c["direction"] == "inbound" && c["original_dst"] == server.to_string());
        anyhow::ensure!(carried, "n1 carried no connection to the pod");
        Ok(())
    })
    .expect("its inbound traffic goes through its proxy too");
}
