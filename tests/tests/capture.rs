//! eBPF capture in the sandbox: enrolled pods' connections go through the node proxy, others
//! are left alone, and capture outlives the agent, refusing what no proxy is there to carry.

use std::{net::SocketAddr, time::Duration};

use nodemesh_sandbox::poll_until;
use nodemesh_tests::{curl, echo_from, recorded, sandbox};

const SOON: Duration = Duration::from_secs(10);

fn echo_addr(sandbox: &nodemesh_sandbox::Sandbox, pod: &str) -> SocketAddr {
    sandbox.pod(pod).server.echo
}

fn proxy_of(sandbox: &nodemesh_sandbox::Sandbox, pod: &str) -> SocketAddr {
    SocketAddr::from((sandbox.pod(pod).ip, 15001))
}

#[test]
fn same_node_connection_goes_through_the_proxy() {
    let Some(sb) = sandbox("tsame") else { return };
    let dst = echo_addr(&sb, "n1-p2");

    let echo = echo_from(&sb.pod("n1-p1").netns, dst, b"ping").expect("echo through the mesh");

    assert_eq!(
        echo.peer,
        proxy_of(&sb, "n1-p1"),
        "the client is connected to the proxy"
    );
    assert_eq!(
        echo.reply, b"ping",
        "bytes and the half-close crossed both proxies"
    );
    poll_until(SOON, || {
        anyhow::ensure!(
            recorded(&sb, "n1", "outbound", "default/n1-p1", dst),
            "no outbound record"
        );
        anyhow::ensure!(
            recorded(&sb, "n1", "inbound", "default/n1-p2", dst),
            "no inbound record"
        );
        Ok(())
    })
    .expect("agent n1 carried both ends");
}

#[test]
fn cross_node_http_goes_through_both_agents() {
    let Some(sb) = sandbox("tcross") else { return };
    let server = sb.pod("n2-p1");
    let url = format!("http://{}/", server.server.http);

    let (status, body) = curl(&sb.pod("n1-p1").netns, &url, &[]).expect("curl across nodes");

    assert_eq!(status, 200);
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
    assert_eq!(answer["pod"], "n2-p1");
    let h2 = curl(&sb.pod("n1-p1").netns, &url, &["--http2-prior-knowledge"]).expect("h2c");
    assert!(
        h2.1.contains("HTTP/2"),
        "h2c passes the L4 proxy untouched: {}",
        h2.1
    );
    poll_until(SOON, || {
        anyhow::ensure!(recorded(
            &sb,
            "n1",
            "outbound",
            "default/n1-p1",
            server.server.http
        ));
        anyhow::ensure!(recorded(
            &sb,
            "n2",
            "inbound",
            "default/n2-p1",
            server.server.http
        ));
        Ok(())
    })
    .expect("the client's agent and the server's agent both carried it");

    let echo = echo_from(
        &sb.pod("n1-p1").netns,
        server.server.echo,
        b"x".repeat(1 << 20).as_slice(),
    )
    .expect("a megabyte echoed across nodes");
    assert_eq!(echo.reply.len(), 1 << 20);
}

#[test]
fn ipv4_mapped_ipv6_connects_are_captured() {
    let Some(sb) = sandbox("tmapped") else { return };
    let ip = sb.pod("n2-p1").ip.to_ipv6_mapped();
    let dst = SocketAddr::from((ip, 9000));

    let echo = echo_from(&sb.pod("n1-p1").netns, dst, b"v6").expect("echo over a v6 socket");

    let proxy = SocketAddr::from((sb.pod("n1-p1").ip.to_ipv6_mapped(), 15001));
    assert_eq!(echo.peer, proxy);
    assert_eq!(echo.reply, b"v6");
}

#[test]
fn pods_outside_the_mesh_are_not_captured() {
    let Some(sb) = sandbox("tlegacy") else { return };
    let legacy = sb.pod("n1-legacy");
    let dst = echo_addr(&sb, "n2-p1");

    let echo = echo_from(&legacy.netns, dst, b"plain").expect("legacy client reaches a mesh pod");

    assert_eq!(
        echo.peer, dst,
        "the legacy pod's socket is connected to the server itself"
    );
    assert_eq!(echo.reply, b"plain");
    poll_until(SOON, || {
        anyhow::ensure!(recorded(&sb, "n2", "inbound", "default/n2-p1", dst));
        Ok(())
    })
    .expect("the destination's agent still carries the inbound side");
    let outbound_from_legacy = nodemesh_tests::connections(&sb, "n1").iter().any(|c| {
        c["client"]
            .as_str()
            .is_some_and(|a| a.starts_with(&legacy.ip.to_string()))
    });
    assert!(
        !outbound_from_legacy,
        "agent n1 never touched the legacy pod's connection"
    );

    // A mesh pod talking to the legacy pod: captured on the way out only.
    let legacy_server = echo_addr(&sb, "n2-legacy");
    let echo = echo_from(&sb.pod("n1-p1").netns, legacy_server, b"out").expect("to legacy");
    assert_eq!(echo.peer, proxy_of(&sb, "n1-p1"));
    assert_eq!(echo.reply, b"out");
}

/// Whether a connection from `netns` to `dst` fails (refused, reset, or closed unanswered).
fn refused(netns: &str, dst: SocketAddr) -> bool {
    match echo_from(netns, dst, b"x") {
        Ok(echo) => echo.reply.is_empty(),
        Err(_) => true,
    }
}

#[test]
fn a_stopped_agent_leaves_capture_refusing_until_its_successor_takes_over() {
    let Some(mut sb) = sandbox("trestart") else {
        return;
    };
    let client = sb.pod("n1-p1").netns.clone();
    let dst = echo_addr(&sb, "n2-p1");
    let inbound = echo_addr(&sb, "n1-p1");
    let legacy = sb.pod("n1-legacy").netns.clone();
    assert_eq!(
        echo_from(&client, dst, b"a").expect("before").peer,
        proxy_of(&sb, "n1-p1")
    );

    sb.stop_agent("n1").expect("SIGTERM agent n1");
    let pins = nodemesh_sandbox::pins_of("trestart").join("n1");
    for pin in [
        "connect4", "connect6", "sock_ops", "ENROLLED", "PODS", "INBOUND",
    ] {
        assert!(
            pins.join(pin).exists(),
            "{pin} is pinned after the agent stopped"
        );
    }
    assert!(
        refused(&client, dst),
        "with no proxy, an enrolled pod's connect is refused, not sent around the mesh"
    );
    assert!(
        refused(&legacy, inbound),
        "with no proxy, nothing reaches an enrolled pod's application directly"
    );
    assert!(
        refused(&sb.pod("n2-p1").netns, inbound),
        "mesh clients are refused too"
    );

    sb.start_agent("n1").expect("agent n1 back");
    let again = echo_from(&client, dst, b"c").expect("after restart");
    assert_eq!(
        again.peer,
        proxy_of(&sb, "n1-p1"),
        "captured again by the new agent, with no manual cleanup"
    );
    assert_eq!(again.reply, b"c");
    assert_eq!(
        echo_from(&legacy, inbound, b"d")
            .expect("inbound again")
            .reply,
        b"d"
    );
}

#[test]
fn uninstall_removes_the_capture_a_stopped_agent_left() {
    let Some(mut sb) = sandbox("tuninst") else {
        return;
    };
    let client = sb.pod("n1-p1").netns.clone();
    let dst = echo_addr(&sb, "n2-p1");
    sb.stop_agent("n1").expect("SIGTERM agent n1");
    assert!(refused(&client, dst), "capture outlives the agent");

    let pins = nodemesh_sandbox::pins_of("tuninst").join("n1");
    let out = std::process::Command::new(nodemesh_tests::bin_dir().join("nodemesh-agent"))
        .args(["--node", "n1", "--uninstall", "--bpf-pin-dir"])
        .arg(&pins)
        .output()
        .expect("run nodemesh-agent --uninstall");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("capture is off"),
        "{out:?}"
    );
    assert!(!pins.exists(), "{} removed", pins.display());
    let direct = echo_from(&client, dst, b"u").expect("the mesh is gone from n1");
    assert_eq!(direct.peer, dst, "the pod talks directly again");

    sb.start_agent("n1").expect("agent n1 back");
    assert_eq!(
        echo_from(&client, dst, b"v").expect("recaptured").peer,
        proxy_of(&sb, "n1-p1")
    );
}
