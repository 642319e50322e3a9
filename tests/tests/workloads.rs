//! Enrollment follows the configuration directory: a workload removed from it is released,
//! one added back is captured again, and a broken file changes nothing.

use std::{fs, net::SocketAddr, time::Duration};

use nodemesh_sandbox::poll_until;
use nodemesh_tests::{echo_from, sandbox};

const SOON: Duration = Duration::from_secs(10);

fn enrolled_names(sb: &nodemesh_sandbox::Sandbox, node: &str) -> Vec<String> {
    sb.agent_admin(node, "/workloads")
        .expect("agent /workloads")
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["state"] == "enrolled")
        .filter_map(|w| w["name"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn removing_a_workload_releases_it_and_adding_it_back_captures_again() {
    let Some(sb) = sandbox("tremove") else { return };
    let pod = sb.pod("n1-p1").clone();
    let file = sb.config_dir().join("workload-n1-p1.yaml");
    let saved = fs::read_to_string(&file).expect("workload file");
    let dst = sb.pod("n2-p1").server.echo;
    let proxy = SocketAddr::from((pod.ip, 15001));
    assert_eq!(
        echo_from(&pod.netns, dst, b"1").expect("enrolled").peer,
        proxy
    );

    fs::remove_file(&file).expect("remove the workload from the mesh");
    poll_until(SOON, || {
        anyhow::ensure!(
            !enrolled_names(&sb, "n1").contains(&pod.name),
            "still enrolled"
        );
        Ok(())
    })
    .expect("agent n1 releases n1-p1");

    let direct = echo_from(&pod.netns, dst, b"2").expect("released pod still has its network");
    assert_eq!(direct.peer, dst, "outbound no longer captured");
    let listener_gone = echo_from(&pod.netns, proxy, b"3");
    assert!(
        listener_gone.is_err(),
        "the in-pod outbound listener is closed"
    );
    let inbound = nodemesh_tests::curl(
        &sb.pod("n2-p1").netns,
        &format!("http://{}/", pod.server.http),
        &[],
    )
    .expect("inbound to the released pod");
    let answer: serde_json::Value = serde_json::from_str(&inbound.1).expect("JSON");
    assert!(
        answer["client"]
            .as_str()
            .is_some_and(|c| !c.starts_with(&format!("{}:", pod.ip))),
        "inbound reaches the app directly, not through the proxy: {answer}"
    );

    fs::write(&file, saved).expect("put the workload back");
    poll_until(SOON, || {
        anyhow::ensure!(
            enrolled_names(&sb, "n1").contains(&pod.name),
            "not enrolled yet"
        );
        Ok(())
    })
    .expect("agent n1 enrolls n1-p1 again");
    assert_eq!(
        echo_from(&pod.netns, dst, b"4")
            .expect("captured again")
            .peer,
        proxy
    );
}

#[test]
fn a_broken_config_file_is_refused_and_changes_nothing() {
    let Some(sb) = sandbox("tbadcfg") else { return };
    let pod = sb.pod("n1-p1").clone();
    let dst = sb.pod("n2-p1").server.echo;
    let proxy = SocketAddr::from((pod.ip, 15001));
    let broken = sb.config_dir().join("zz-typo.yaml");
    fs::write(
        &broken,
        "apiVersion: nodemesh.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: typo\n  namespace: default\nspec:\n  node: n1\n  netns: /run/netns/none\n  ip: 10.88.1.77\n  serviceAcount: x\n",
    )
    .expect("write a broken file");

    let error = poll_until(SOON, || {
        let dump = sb.controller_dump()?;
        anyhow::ensure!(!dump["last_error"].is_null(), "not refused yet");
        let error = dump["last_error"].to_string();
        Ok(error)
    })
    .expect("agent n1 refuses the file");
    assert!(error.contains("zz-typo.yaml"), "{error}");
    assert!(error.contains("Workload default/typo"), "{error}");
    assert!(error.contains("serviceAcount"), "{error}");

    assert!(
        enrolled_names(&sb, "n1").contains(&pod.name),
        "the last good config stays"
    );
    assert_eq!(
        echo_from(&pod.netns, dst, b"ok")
            .expect("traffic unaffected")
            .peer,
        proxy
    );
}
