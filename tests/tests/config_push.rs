//! The controller pushes per-node snapshots; agents acknowledge them, keep the last good one
//! when the controller is gone (across a restart too), and resynchronise when it returns,
//! whole snapshots only, even when the controller dies as it pushes one.

use std::{fs, time::Duration};

use nodemesh_sandbox::{Sandbox, poll_until};
use nodemesh_tests::{echo_from, sandbox};

const SOON: Duration = Duration::from_secs(10);
/// Agents reconnect with a backoff of up to 30 s.
const RECONNECT: Duration = Duration::from_secs(45);

fn deny_from(name: &str, app: &str, source: &str) -> String {
    format!(
        "apiVersion: security.nodemesh.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: {app}\n  action: DENY\n  rules:\n  - from:\n    - source:\n        {source}\n"
    )
}

fn agent_version(sb: &Sandbox, node: &str) -> anyhow::Result<u64> {
    let dump = sb.agent_admin(node, "/config_dump")?;
    dump["mesh"]["version"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no version in {dump}"))
}

/// Waits until every agent acknowledged, applied, the snapshot the controller last sent it
/// (a change that touches nothing of a node's view is not sent to it); returns the
/// controller's version.
fn all_acked(sb: &Sandbox) -> anyhow::Result<u64> {
    poll_until(SOON, || {
        let dump = sb.controller_dump()?;
        let version = dump["version"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no version"))?;
        for node in ["n1", "n2"] {
            let agent = &dump["agents"][node];
            let sent = agent["sent_version"].clone();
            anyhow::ensure!(
                sent.as_u64().is_some()
                    && agent["acked_version"] == sent
                    && agent["applied"] == true,
                "{node} has not acknowledged what it was sent: {agent}"
            );
            anyhow::ensure!(
                Some(agent_version(sb, node)?) == sent.as_u64(),
                "{node} reports another version"
            );
        }
        Ok(version)
    })
}

/// The version of the snapshot the controller last sent `node`'s agent.
fn sent_to(sb: &Sandbox, node: &str) -> u64 {
    sb.controller_dump().expect("controller dump")["agents"][node]["sent_version"]
        .as_u64()
        .expect("a version sent")
}

fn allowed(sb: &Sandbox, from: &str, to: &str) -> bool {
    echo_from(&sb.pod(from).netns, sb.pod(to).server.echo, b"?").is_ok_and(|e| e.reply == b"?")
}

#[test]
fn snapshots_reach_every_agent_acknowledged_and_filtered_per_node() {
    let Some(sb) = sandbox("tpush") else { return };
    let first = all_acked(&sb).expect("both agents acknowledge the first snapshot");

    fs::write(
        sb.config_dir().join("deny.yaml"),
        deny_from("deny-legacy", "n2-p1", "namespaces: [\"nobody\"]"),
    )
    .expect("write a policy");
    let second = poll_until(SOON, || {
        let version = all_acked(&sb)?;
        anyhow::ensure!(version > first, "still version {version}");
        Ok(version)
    })
    .expect("a change reaches every agent it concerns and is acknowledged");
    assert!(second > first);
    assert_eq!(sent_to(&sb, "n2"), second, "n2 runs the selected workload");
    assert_eq!(
        sent_to(&sb, "n1"),
        first,
        "n1's view did not change: it was not sent the snapshot again"
    );

    let policies = |node: &str| {
        sb.agent_admin(node, "/config_dump").expect("dump")["mesh"]["config"]["authorization_policies"]
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(
        policies("n2"),
        ["default/deny-legacy"],
        "n2 runs the selected workload"
    );
    assert!(
        policies("n1").is_empty(),
        "n1 gets only the policies of its own workloads"
    );

    let metrics = sb.controller_metrics().expect("controller metrics");
    assert!(
        metrics.contains("nodemesh_controller_agents_connected 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nodemesh_controller_snapshot_push_seconds_count"),
        "{metrics}"
    );
}

#[test]
fn after_a_controller_restart_agents_resynchronise() {
    let Some(mut sb) = sandbox("tctlrst") else {
        return;
    };
    all_acked(&sb).expect("in sync");
    sb.stop_controller().expect("stop the controller");
    poll_until(SOON, || {
        let dump = sb.agent_admin("n2", "/config_dump")?;
        anyhow::ensure!(
            dump["mesh"]["controller_connected"] == false,
            "still connected"
        );
        Ok(())
    })
    .expect("the agent notices the controller is gone");

    fs::write(
        sb.config_dir().join("deny.yaml"),
        deny_from(
            "deny-p1",
            "n2-p1",
            "principals: [\"cluster.local/ns/default/sa/n1-p1\"]",
        ),
    )
    .expect("write a policy while the controller is down");
    assert!(
        allowed(&sb, "n1-p1", "n2-p1"),
        "the last good snapshot stays in force"
    );

    sb.start_controller().expect("controller back");
    poll_until(RECONNECT, || {
        anyhow::ensure!(!allowed(&sb, "n1-p1", "n2-p1"), "not resynchronised yet");
        Ok(())
    })
    .expect("the agents pick up what changed while the controller was away");
    all_acked(&sb).expect("and acknowledge it");
}

#[test]
fn an_agent_restarted_while_the_controller_is_down_keeps_the_last_good_snapshot() {
    let Some(mut sb) = sandbox("tagtrst") else {
        return;
    };
    fs::write(
        sb.config_dir().join("deny.yaml"),
        deny_from("deny-legacy", "n2-p1", "ipBlocks: [\"10.88.1.250/32\"]"),
    )
    .expect("write a policy");
    poll_until(SOON, || {
        anyhow::ensure!(!allowed(&sb, "n1-legacy", "n2-p1"), "not enforced yet");
        Ok(())
    })
    .expect("the policy is enforced");

    sb.stop_controller().expect("stop the controller");
    sb.stop_agent("n2").expect("stop agent n2");
    sb.start_agent("n2")
        .expect("agent n2 starts without the controller");

    let dump = sb.agent_admin("n2", "/config_dump").expect("dump");
    assert_eq!(dump["mesh"]["origin"], "saved", "{}", dump["mesh"]);
    assert!(
        !allowed(&sb, "n1-legacy", "n2-p1"),
        "the saved policy is in force"
    );
    assert!(
        allowed(&sb, "n1-p1", "n2-p1"),
        "mTLS works with the certificates it kept"
    );
    assert!(allowed(&sb, "n2-p1", "n1-p2"), "and outbound too");

    sb.start_controller().expect("controller back");
    poll_until(RECONNECT, || {
        let dump = sb.agent_admin("n2", "/config_dump")?;
        anyhow::ensure!(
            dump["mesh"]["origin"] == "controller",
            "still on the saved snapshot"
        );
        Ok(())
    })
    .expect("the agent resynchronises when the controller returns");
}

#[test]
fn a_controller_killed_during_a_push_leaves_no_agent_half_applied() {
    let Some(mut sb) = sandbox("tctlkill") else {
        return;
    };
    let first = all_acked(&sb).expect("in sync");
    // A change that touches both nodes, and the controller killed as it pushes it.
    fs::write(
        sb.config_dir().join("deny.yaml"),
        format!(
            "{}---\n{}",
            deny_from(
                "deny-n1",
                "n1-p2",
                "principals: [\"cluster.local/ns/default/sa/n2-p1\"]"
            ),
            deny_from(
                "deny-n2",
                "n2-p2",
                "principals: [\"cluster.local/ns/default/sa/n1-p1\"]"
            ),
        ),
    )
    .expect("write the policies");
    std::thread::sleep(Duration::from_millis(150));
    sb.kill_controller().expect("SIGKILL the controller");
    for node in ["n1", "n2"] {
        let dump = sb.agent_admin(node, "/config_dump").expect("dump");
        let version = dump["mesh"]["version"].as_u64().expect("a version");
        let policies = dump["mesh"]["config"]["authorization_policies"]
            .as_object()
            .map(serde_json::Map::len)
            .unwrap_or_default();
        // Either the snapshot before the change, or the one after, never part of one.
        assert!(
            (version == first && policies == 0) || (version > first && policies == 1),
            "{node} is at version {version} with {policies} policies"
        );
    }

    sb.start_controller().expect("controller back");
    let version = poll_until(RECONNECT, || {
        let version = all_acked(&sb)?;
        anyhow::ensure!(version > first, "still version {version}");
        Ok(version)
    })
    .expect("every agent ends at the new version");
    assert!(version > first);
    assert!(!allowed(&sb, "n2-p1", "n1-p2"), "n1 enforces its part");
    assert!(!allowed(&sb, "n1-p1", "n2-p2"), "n2 enforces its part");
    assert!(allowed(&sb, "n1-p1", "n2-p1"), "and nothing more");
}
