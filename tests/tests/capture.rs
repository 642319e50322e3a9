//! eBPF capture in the sandbox: enrolled pods' connections go through the node proxy, others
//! are left alone, and nothing reaches an enrolled pod around the proxy. (Capture outliving
//! the agent: `lifecycle.rs`.)

use std::{net::SocketAddr, time::Duration};

use nodemesh_sandbox::poll_until;
use nodemesh_tests::{connections, curl, echo_from, proxy_of, recorded, refused, sandbox};

const SOON: Duration = Duration::from_secs(10);

fn echo_addr(sandbox: &nodemesh_sandbox::Sandbox, pod: &str) -> SocketAddr {
    sandbox.pod(pod).server.echo
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
    // Both ends are this agent's: handed over in-process, with the client's identity, and no
    // tunnel to itself.
    let records = connections(&sb, "n1");
    let inbound = records
        .iter()
        .find(|c| c["direction"] == "inbound" && c["original_dst"] == dst.to_string())
        .expect("inbound record");
    assert_eq!(
        inbound["source_identity"],
        "spiffe://cluster.local/ns/default/sa/n1-p1"
    );
    assert_eq!(inbound["security"], "mtls");
    assert_eq!(inbound["bytes_from_client"], 4, "{inbound}");
    assert!(
        records.iter().all(|c| c["hbone"].is_null()),
        "no HBONE connection between two pods of one node: {records:?}"
    );
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

    // A protocol whose server speaks first (SMTP, MySQL): the client's proxy has nothing to
    // send ahead of the tunnel's answer, and the greeting still comes through.
    let (dst, exchanged) = server_speaks_first(&sb, "n1-p1", "n2-p1").expect("server first");
    assert_eq!(exchanged, b"220 ready\r\nHELO\r\n");
    poll_until(SOON, || {
        anyhow::ensure!(recorded(&sb, "n1", "outbound", "default/n1-p1", dst));
        anyhow::ensure!(recorded(&sb, "n2", "inbound", "default/n2-p1", dst));
        Ok(())
    })
    .expect("both agents carried the server-first connection");
}

/// A server in `server`'s namespace greets its one connection before reading, then echoes
/// one line; from `client`, a connection that says nothing until greeted. Returns the
/// server's address and what the client read (greeting, then echo).
fn server_speaks_first(
    sb: &nodemesh_sandbox::Sandbox,
    client: &str,
    server: &str,
) -> anyhow::Result<(SocketAddr, Vec<u8>)> {
    use std::io::{Read as _, Write as _};

    use anyhow::Context as _;

    let dst = SocketAddr::from((sb.pod(server).ip, 9100));
    let listener = nodemesh_sandbox::in_netns(&sb.pod(server).netns, move || {
        let listener = std::net::TcpListener::bind(dst)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })?;
    let serving = std::thread::spawn(move || -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + SOON;
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    anyhow::ensure!(std::time::Instant::now() < deadline, "no connection came");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(SOON))?;
        stream.write_all(b"220 ready\r\n")?;
        let mut line = [0; 6];
        stream.read_exact(&mut line)?;
        stream.write_all(&line)?;
        Ok(())
    });
    let exchanged = nodemesh_sandbox::in_netns(&sb.pod(client).netns, move || {
        let mut stream = std::net::TcpStream::connect_timeout(&dst, SOON)?;
        stream.set_read_timeout(Some(SOON))?;
        let mut greeting = [0; 11];
        stream
            .read_exact(&mut greeting)
            .context("the greeting, before the client sent anything")?;
        stream.write_all(b"HELO\r\n")?;
        let mut echo = [0; 6];
        stream.read_exact(&mut echo).context("the echo")?;
        Ok([&greeting[..], &echo[..]].concat())
    });
    let served = serving
        .join()
        .map_err(|_| anyhow::anyhow!("the server thread panicked"))?;
    let exchanged = exchanged?;
    served?;
    Ok((dst, exchanged))
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

/// Serves at most `count` connections on `listener` for up to 20 s, answering each with
/// `ok` and closing it.
fn answer_ok(listener: std::net::TcpListener, count: usize) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        use std::io::Write as _;
        listener.set_nonblocking(true).expect("non-blocking");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut served = 0;
        while served < count && std::time::Instant::now() < deadline {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.write_all(b"ok");
                    served += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        served
    })
}

/// Sends one datagram from `netns` to `dst`.
fn send_udp(netns: &str, dst: SocketAddr, message: &'static [u8]) {
    nodemesh_sandbox::in_netns(netns, move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.send_to(message, dst)?;
        Ok(())
    })
    .expect("send a datagram");
}

#[test]
fn a_strict_pod_takes_no_udp_and_nothing_reaches_it_around_the_proxy() {
    let Some(sb) = sandbox("tbypass") else {
        return;
    };
    let pod = sb.pod("n2-p1").clone();
    let legacy = sb.pod("n1-legacy").netns.clone();
    let (udp_addr, app_addr) = (
        SocketAddr::from((pod.ip, 7000)),
        SocketAddr::from((pod.ip, 15053)),
    );
    // The application's own sockets: UDP, and TCP on a port the proxy uses elsewhere.
    let (udp, app) = nodemesh_sandbox::in_netns(&pod.netns, move || {
        let udp = std::net::UdpSocket::bind(udp_addr)?;
        udp.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok((udp, std::net::TcpListener::bind(app_addr)?))
    })
    .expect("application sockets in n2-p1");
    let server = answer_ok(app, 1);

    send_udp(&legacy, udp_addr, b"permissive");
    let mut buffer = [0u8; 64];
    let (n, _) = udp.recv_from(&mut buffer).expect("PERMISSIVE takes UDP");
    assert_eq!(&buffer[..n], b"permissive");
    let reply = echo_from(&legacy, app_addr, b"").expect("a plaintext client reaches 15053");
    assert_eq!(reply.reply, b"ok");
    assert_eq!(server.join().expect("server"), 1);
    poll_until(SOON, || {
        anyhow::ensure!(
            recorded(&sb, "n2", "inbound", "default/n2-p1", app_addr),
            "no inbound record for {app_addr}"
        );
        Ok(())
    })
    .expect("the application's 15053 is reached only through the proxy");

    nodemesh_tests::set_strict(&sb, "n2-p1");
    for _ in 0..3 {
        send_udp(&legacy, udp_addr, b"strict");
        send_udp(&sb.pod("n2-legacy").netns, udp_addr, b"strict");
    }
    let received = udp.recv_from(&mut buffer);
    assert!(
        received.is_err(),
        "a STRICT pod takes UDP, which the mesh cannot authenticate: {received:?}"
    );
    assert!(
        refused(&legacy, app_addr),
        "a plaintext client reaches a STRICT pod's 15053"
    );
    let metrics = sb.agent_metrics("n2").expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("inbound_udp_refused") && !l.ends_with(" 0")),
        "the refusals are counted"
    );
}

/// The link-local IPv6 address of a pod's `eth0`, once duplicate address detection is over,
/// and the index of the node's end of that link.
fn link_local(sb: &nodemesh_sandbox::Sandbox, pod: &str) -> std::net::SocketAddrV6 {
    let pod = sb.pod(pod);
    let node = &sb.node(&pod.node).netns;
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("run ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let links = ip(&["-n", node, "-o", "link"]);
    let line = links
        .lines()
        .find(|l| l.ends_with(&format!("link-netns {}", pod.netns)))
        .unwrap_or_else(|| panic!("no link to {} in {links}", pod.netns));
    let mut fields = line.split(':');
    let index: u32 = fields
        .next()
        .and_then(|i| i.trim().parse().ok())
        .unwrap_or_else(|| panic!("no index in {line}"));
    let node_side = fields
        .next()
        .and_then(|name| name.trim().split('@').next())
        .unwrap_or_else(|| panic!("no name in {line}"))
        .to_owned();
    // Both ends' link-local addresses, once duplicate address detection is over.
    let usable = |netns: &str, device: &str| {
        let out = ip(&["-n", netns, "-6", "-o", "addr", "show", "dev", device]);
        let line = out
            .lines()
            .find(|l| l.contains("scope link") && !l.contains("tentative"))
            .ok_or_else(|| anyhow::anyhow!("no usable link-local address yet: {out}"))?;
        let cidr = line
            .split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)
            .ok_or_else(|| anyhow::anyhow!("{line}"))?;
        Ok(cidr
            .split('/')
            .next()
            .unwrap_or_default()
            .parse::<std::net::Ipv6Addr>()?)
    };
    let address = poll_until(SOON, || {
        usable(node, &node_side)?;
        usable(&pod.netns, "eth0")
    })
    .expect("link-local addresses on both ends");
    std::net::SocketAddrV6::new(address, 7001, 0, index)
}

/// From the node's namespace, whether a TCP connect to `pod`'s link-local `:7001`, where the
/// pod listens, gets through.
fn ipv6_reaches(sb: &nodemesh_sandbox::Sandbox, pod: &str) -> anyhow::Result<()> {
    let target = link_local(sb, pod);
    let listener = nodemesh_sandbox::in_netns(&sb.pod(pod).netns, move || {
        Ok(std::net::TcpListener::bind(SocketAddr::from((
            std::net::Ipv6Addr::UNSPECIFIED,
            target.port(),
        )))?)
    })
    .expect("listen on [::]:7001 in the pod");
    let server = answer_ok(listener, 1);
    let node = sb.node(&sb.pod(pod).node).netns.clone();
    let result = nodemesh_sandbox::in_netns(&node, move || {
        use std::io::Read as _;
        let mut stream =
            std::net::TcpStream::connect_timeout(&target.into(), Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply)?;
        anyhow::ensure!(reply == b"ok", "answered {reply:?}");
        Ok(())
    });
    if result.is_err() {
        // Unblock the server thread: it serves one connection at most.
        let _ = nodemesh_sandbox::in_netns(&sb.pod(pod).netns, move || {
            Ok(std::net::TcpStream::connect_timeout(
                &SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, target.port())),
                Duration::from_secs(1),
            )?)
        });
    }
    server.join().expect("server thread");
    result
}

#[test]
fn native_ipv6_neither_leaves_nor_reaches_an_enrolled_pod() {
    let Some(sb) = sandbox("tipv6") else { return };
    ipv6_reaches(&sb, "n1-legacy").expect("IPv6 works in the sandbox, outside the mesh");
    let refused = ipv6_reaches(&sb, "n1-p1");
    assert!(
        refused.is_err(),
        "inbound native IPv6 reached an enrolled pod's application"
    );

    let elsewhere = SocketAddr::from((std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1), 80));
    let connect = |netns: &str| {
        nodemesh_sandbox::in_netns(netns, move || {
            Ok(
                std::net::TcpStream::connect_timeout(&elsewhere, Duration::from_secs(2))
                    .map(drop)
                    .map_err(|e| e.kind()),
            )
        })
        .expect("in the pod")
    };
    assert_eq!(
        connect(&sb.pod("n1-p1").netns),
        Err(std::io::ErrorKind::PermissionDenied),
        "an enrolled pod's native IPv6 connect is refused, not sent around the mesh"
    );
    assert_ne!(
        connect(&sb.pod("n1-legacy").netns),
        Err(std::io::ErrorKind::PermissionDenied),
        "outside the mesh, nothing refuses it"
    );
}
