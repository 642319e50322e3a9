//! Enrollment follows the configuration directory: a workload removed from it is released,
//! one added back is captured again, a broken file changes nothing, and a network namespace
//! replaced at the same path is enrolled again.

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

/// Runs `ip` with `args`, failing the test if it fails.
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// A network namespace the test makes, with an interface holding `address`/24; deleted
/// when dropped.
struct ExtraNetns(String);

impl ExtraNetns {
    fn create(name: &str, address: std::net::Ipv4Addr) -> Self {
        ip(&["netns", "add", name]);
        let netns = Self(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"]);
        // A veth pair with both ends inside: an interface for the address, nothing beyond.
        let link = ["link", "add", "e0", "type", "veth", "peer", "name", "e1"];
        ip(&[&["-n", name][..], &link[..]].concat());
        let address = format!("{address}/24");
        ip(&["-n", name, "addr", "add", &address, "dev", "e0"]);
        ip(&["-n", name, "link", "set", "e0", "up"]);
        netns
    }

    /// Deletes the namespace and makes a new one at the same path, as a recreated pod
    /// sandbox would.
    fn replace(&self, address: std::net::Ipv4Addr) {
        ip(&["netns", "delete", &self.0]);
        let _ = Self::create(&self.0, address).into_name();
    }

    fn into_name(self) -> String {
        let name = self.0.clone();
        std::mem::forget(self);
        name
    }
}

impl Drop for ExtraNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.0])
            .output();
    }
}

fn cookie_of(sb: &nodemesh_sandbox::Sandbox, name: &str) -> anyhow::Result<(String, u64)> {
    let workloads = sb.agent_admin("n1", "/workloads")?;
    let workload = workloads
        .as_array()
        .and_then(|a| a.iter().find(|w| w["name"] == name))
        .ok_or_else(|| anyhow::anyhow!("no workload {name}: {workloads}"))?;
    Ok((
        workload["state"].as_str().unwrap_or_default().to_owned(),
        workload["netns_cookie"].as_u64().unwrap_or_default(),
    ))
}

#[test]
fn a_network_namespace_replaced_at_the_same_path_is_enrolled_again() {
    let Some(sb) = sandbox("treplace") else {
        return;
    };
    let address = std::net::Ipv4Addr::new(10, 99, 0, 1);
    let netns = ExtraNetns::create("treplace-extra", address);
    fs::write(
        sb.config_dir().join("workload-extra.yaml"),
        format!(
            "apiVersion: nodemesh.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: extra\n  \
             namespace: default\n  labels:\n    app: extra\nspec:\n  node: n1\n  \
             netns: /run/netns/{}\n  ip: {address}\n  serviceAccount: default\n",
            netns.0
        ),
    )
    .expect("write the workload");
    let (_, first) = poll_until(SOON, || {
        let (state, cookie) = cookie_of(&sb, "extra")?;
        anyhow::ensure!(state == "enrolled", "extra is {state}");
        Ok((state, cookie))
    })
    .expect("agent n1 enrolls the extra workload");
    // Anything the workload connects to goes to the proxy in its namespace.
    let elsewhere = SocketAddr::from(([10, 99, 0, 2], 9000));
    let proxy = SocketAddr::from((address, 15001));
    let captured = |name: &str| {
        nodemesh_sandbox::in_netns(name, move || {
            let stream = std::net::TcpStream::connect_timeout(&elsewhere, Duration::from_secs(1))?;
            Ok(stream.peer_addr()?)
        })
    };
    assert_eq!(captured(&netns.0).expect("captured"), proxy);

    netns.replace(address);
    let (_, second) = poll_until(SOON, || {
        let (state, cookie) = cookie_of(&sb, "extra")?;
        anyhow::ensure!(
            state == "enrolled" && cookie != first,
            "extra is {state} in namespace {cookie}"
        );
        Ok((state, cookie))
    })
    .expect("agent n1 notices the new namespace and enrolls the workload in it");
    assert_ne!(second, 0);
    assert_eq!(
        captured(&netns.0).expect("captured in the new namespace"),
        proxy,
        "the new namespace is captured, by listeners that live in it"
    );
}
