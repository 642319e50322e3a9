//! Bounded and drained rather than reset: a silent client is closed by the handshake deadline,
//! a Workload edit that changes nothing about its traffic keeps its connections, and a stopping
//! agent drains; one source cannot take every connection; a silent one is closed.

use std::{fs, net::SocketAddr, time::Duration};

use nodemesh_sandbox::poll_until;
use nodemesh_tests::{LongLived, connections, sandbox};

const SOON: Duration = Duration::from_secs(10);

/// From `netns`, opens TCP to `addr`, sends nothing, and says whether the server closed it
/// (rather than leaving it open past the read timeout).
fn closed_while_silent(netns: &str, addr: SocketAddr) -> bool {
    nodemesh_sandbox::in_netns(netns, move || {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        // Longer than the handshake timeout: a read that times out means nobody closed it.
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buffer = [0u8; 64];
        anyhow::Ok(match std::io::Read::read(&mut stream, &mut buffer) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        })
    })
    .unwrap_or_else(|e| panic!("connect to {addr}: {e:#}"))
}

#[test]
fn a_client_that_never_finishes_its_tls_handshake_is_closed() {
    let Some(sb) = sandbox("tsilent") else { return };
    let hbone = SocketAddr::from((sb.pod("n2-p1").ip, 15008));
    let controller = sb.status().controller.ca_api;
    let (pod, node) = (
        sb.pod("n1-legacy").netns.clone(),
        sb.node("n1").netns.clone(),
    );
    let (to_pod, to_controller) = std::thread::scope(|s| {
        let pod = s.spawn(|| closed_while_silent(&pod, hbone));
        let controller = s.spawn(|| closed_while_silent(&node, controller));
        (
            pod.join().expect("pod side"),
            controller.join().expect("controller side"),
        )
    });
    assert!(to_pod, "a pod's :15008 closes the silent connection");
    assert!(
        to_controller,
        "the controller's API closes the silent connection"
    );
    poll_until(SOON, || {
        connections(&sb, "n2")
            .into_iter()
            .filter_map(|c| c["error"].as_str().map(str::to_owned))
            .find(|e| e.contains("did not finish"))
            .ok_or_else(|| anyhow::anyhow!("no handshake timeout recorded"))
    })
    .expect("the agent records why");
}

#[test]
fn a_label_edit_keeps_the_workloads_connections() {
    let Some(sb) = sandbox("trelabel") else {
        return;
    };
    let mut mesh = LongLived::open(&sb.pod("n1-p1").netns, sb.pod("n2-p1").server.echo);
    let mut plain = LongLived::open(&sb.pod("n1-legacy").netns, sb.pod("n2-p1").server.echo);
    assert_eq!(mesh.round_trip(b"before"), b"before");
    assert_eq!(plain.round_trip(b"before"), b"before");
    let file = sb.config_dir().join("workload-n2-p1.yaml");
    let text = fs::read_to_string(&file).expect("the workload's file");
    let relabelled = text.replace("    app: n2-p1\n", "    app: n2-p1\n    tier: backend\n");
    assert_ne!(text, relabelled, "the label was added");
    fs::write(&file, relabelled).expect("relabel");
    poll_until(SOON, || {
        let dump = sb.agent_admin("n2", "/config_dump")?;
        let labels = &dump["mesh"]["config"]["workloads"]["default/n2-p1"]["metadata"]["labels"];
        anyhow::ensure!(labels["tier"] == "backend", "not applied yet: {labels}");
        Ok(())
    })
    .expect("the agent applies the new labels");
    assert_eq!(
        mesh.round_trip(b"after"),
        b"after",
        "the mTLS connection stays"
    );
    assert_eq!(
        plain.round_trip(b"after"),
        b"after",
        "the plaintext connection stays"
    );
}

#[test]
fn sigterm_lets_open_connections_finish_then_closes_them() {
    use std::io::Read as _;
    let Some(mut sb) = sandbox("tdrain") else {
        return;
    };
    let client = sb.pod("n1-p1").netns.clone();
    let dst = sb.pod("n2-p1").server.echo;
    let mut held: Vec<LongLived> = (0..3).map(|_| LongLived::open(&client, dst)).collect();
    for connection in &mut held {
        assert_eq!(connection.round_trip(b"before"), b"before");
    }
    let pid = sb.node("n1").agent.pid;
    let signal = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(signal.success());

    poll_until(SOON, || {
        anyhow::ensure!(nodemesh_tests::refused(&client, dst), "still accepting");
        Ok(())
    })
    .expect("a draining agent takes no new connection");
    for connection in &mut held {
        assert_eq!(
            connection.round_trip(b"draining"),
            b"draining",
            "an open connection goes on during the grace period"
        );
    }
    poll_until(SOON, || {
        anyhow::ensure!(
            !nodemesh_sandbox::is_alive(pid),
            "agent {pid} still running"
        );
        Ok(())
    })
    .expect("the agent exits after the grace period (2 s in the sandbox)");
    let closed = held
        .iter()
        .filter(|c| matches!((&c.0).read(&mut [0u8; 8]), Ok(0) | Err(_)))
        .count();
    eprintln!(
        "{closed} of {} held connections closed at the end of the grace period",
        held.len()
    );
    assert_eq!(
        closed,
        held.len(),
        "what is still open at the end is closed"
    );

    sb.start_agent("n1").expect("agent n1 back");
    assert_eq!(LongLived::open(&client, dst).round_trip(b"again"), b"again");
}

#[test]
fn one_source_is_capped_and_counted_while_others_get_in() {
    let Some(sb) = nodemesh_tests::sandbox_with("tcap", |spec| {
        spec.agent_args = vec!["--max-connections-per-source".into(), "4".into()];
    }) else {
        return;
    };
    let (flooder, other) = (
        sb.pod("n1-legacy").netns.clone(),
        sb.pod("n2-legacy").netns.clone(),
    );
    let dst = sb.pod("n2-p1").server.echo;
    let mut held: Vec<LongLived> = (0..4).map(|_| LongLived::open(&flooder, dst)).collect();
    for connection in &mut held {
        assert_eq!(connection.round_trip(b"in"), b"in");
    }
    assert!(
        nodemesh_tests::refused(&flooder, dst),
        "a fifth connection from one source is closed"
    );
    assert_eq!(
        nodemesh_tests::echo_from(&other, dst, b"other")
            .expect("another source gets in")
            .reply,
        b"other"
    );
    let metrics = sb.agent_metrics("n2").expect("metrics");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("nodemesh_proxy_connections_refused_total{reason=\"source_limit\"}")
            && !l.ends_with(" 0")),
        "the refusal is counted"
    );

    drop(held.pop());
    poll_until(SOON, || {
        let echo = nodemesh_tests::echo_from(&flooder, dst, b"again")?;
        anyhow::ensure!(echo.reply == b"again", "still over the cap");
        Ok(())
    })
    .expect("a closed connection frees its place");
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("process status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_thousand_silent_tls_clients_are_closed_with_memory_bounded() {
    const CLIENTS: usize = 1000;
    let Some(sb) = sandbox("tsilentk") else {
        return;
    };
    let hbone = SocketAddr::from((sb.pod("n2-p1").ip, 15008));
    let agent = sb.node("n2").agent.pid;
    let before = rss_kib(agent);
    let streams = nodemesh_sandbox::in_netns(&sb.pod("n1-legacy").netns, move || {
        use std::io::Write as _;
        let mut streams = Vec::with_capacity(CLIENTS);
        for i in 0..CLIENTS {
            let mut stream = std::net::TcpStream::connect_timeout(&hbone, Duration::from_secs(5))?;
            if i % 2 == 0 {
                // The start of a TLS record that never completes.
                stream.write_all(&[22, 3, 1, 0x02, 0x00, 1])?;
            }
            streams.push(stream);
        }
        Ok(streams)
    })
    .expect("a thousand connections");
    // Give the agent time to accept them all and start their handshakes.
    std::thread::sleep(Duration::from_secs(2));
    let held = rss_kib(agent);
    let grown_mib = held.saturating_sub(before) / 1024;
    eprintln!("agent n2: {before} KiB before, {held} KiB with {CLIENTS} silent TLS clients");
    assert!(
        grown_mib < 32,
        "{CLIENTS} silent clients grew the agent by {grown_mib} MiB"
    );

    // Past the 10 s handshake deadline each must be closed; 30 s at most.
    let mut open = streams;
    for stream in &open {
        stream.set_nonblocking(true).expect("non-blocking");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !open.is_empty() && std::time::Instant::now() < deadline {
        open.retain_mut(|stream| {
            use std::io::Read as _;
            match stream.read(&mut [0u8; 64]) {
                Ok(0) => false,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                Err(_) => false,
                // TLS alerts may come before the close.
                Ok(_) => true,
            }
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed = CLIENTS - open.len();
    assert_eq!(
        closed, CLIENTS,
        "every silent client is closed by the handshake deadline"
    );
}

#[test]
fn a_connection_silent_past_the_idle_timeout_is_closed_a_busy_one_is_not() {
    use std::io::Read as _;
    let Some(sb) = nodemesh_tests::sandbox_with("tidle", |spec| {
        spec.agent_args = vec!["--tcp-idle-timeout".into(), "1".into()];
    }) else {
        return;
    };
    let dst = sb.pod("n2-p1").server.echo;
    let mut silent_mesh = LongLived::open(&sb.pod("n1-p1").netns, dst);
    let mut silent_plain = LongLived::open(&sb.pod("n1-legacy").netns, dst);
    let mut busy = LongLived::open(&sb.pod("n1-p1").netns, dst);
    for connection in [&mut silent_mesh, &mut silent_plain, &mut busy] {
        assert_eq!(connection.round_trip(b"hello"), b"hello");
    }
    // Closed after one to two periods of silence: 4 s is past that.
    for _ in 0..20 {
        assert_eq!(busy.round_trip(b"still here"), b"still here");
        std::thread::sleep(Duration::from_millis(200));
    }
    for (what, connection) in [("mesh", &mut silent_mesh), ("plaintext", &mut silent_plain)] {
        connection
            .0
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let read = connection.0.read(&mut [0u8; 8]);
        assert!(
            matches!(read, Ok(0))
                || read
                    .as_ref()
                    .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
            "the silent {what} connection is still open: {read:?}"
        );
    }
    assert_eq!(busy.round_trip(b"after"), b"after", "the busy one stays");
    poll_until(SOON, || {
        connections(&sb, "n2")
            .into_iter()
            .find(|c| {
                c["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("tcp-idle-timeout"))
            })
            .ok_or_else(|| anyhow::anyhow!("no idle close recorded"))
    })
    .expect("the agent records why");
}

#[test]
fn hundreds_of_connections_between_two_pods_share_one_hbone_connection() {
    let Some(sb) = sandbox("tstreams") else {
        return;
    };
    let (client, dst) = (sb.pod("n1-p1").netns.clone(), sb.pod("n2-p1").server.echo);
    // Past HTTP/2's customary 100-200 concurrent streams: every one must be carried at once.
    let mut held: Vec<LongLived> = (0..300).map(|_| LongLived::open(&client, dst)).collect();
    for (i, connection) in held.iter_mut().enumerate() {
        // Other tests share the two cores: give each answer time.
        connection
            .0
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let message = format!("stream {i}");
        let echoed = {
            use std::io::{Read as _, Write as _};
            let mut reply = vec![0; message.len()];
            connection
                .0
                .write_all(message.as_bytes())
                .and_then(|()| connection.0.read_exact(&mut reply))
                .map(|()| reply)
        };
        if let Err(e) = &echoed {
            let errors: Vec<String> = ["n1", "n2"]
                .iter()
                .flat_map(|node| connections(&sb, node))
                .filter_map(|c| c["error"].as_str().map(str::to_owned))
                .collect();
            panic!("stream {i}: {e}; errors recorded: {errors:?}");
        }
        assert_eq!(echoed.expect("echo"), message.as_bytes());
    }
}
