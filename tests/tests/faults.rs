//! Faults in the sandbox: an agent killed under load, a workload that cannot be enrolled, a
//! connection to a port nobody listens on. In each the mesh refuses rather than lets traffic
//! around itself, and nothing of an enrolled pod leaves a node outside a tunnel.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use nodemesh_sandbox::{capture::Capture, poll_until};
use nodemesh_tests::{
    Load, LongLived, connections, echo_from, refused, sandbox, set_strict, write_config,
};

const SOON: Duration = Duration::from_secs(10);
const CANARY: &[u8] = b"nodemesh-faults-canary-41c8e2";

/// TCP packets in `pcap` from one of `sources` to or from a port other than HBONE's and the
/// controller API's, resets aside: what an enrolled pod must never put on an uplink.
fn outside_the_tunnel(pcap: &Path, sources: &[std::net::Ipv4Addr]) -> Vec<String> {
    let hosts: Vec<String> = sources.iter().map(|ip| format!("src host {ip}")).collect();
    let filter = format!(
        "tcp and ({}) and not port 15008 and not port 15012 and tcp[tcpflags] & tcp-rst == 0",
        hosts.join(" or ")
    );
    Capture::read(pcap, &filter).expect("read the capture")
}

/// The uplink capture (`bytes`, saved at `pcap`) holds no canary byte and no TCP of the
/// enrolled `pods` outside HBONE.
fn assert_nothing_in_clear(bytes: &[u8], pcap: &Path, pods: &[std::net::Ipv4Addr]) {
    assert!(
        !bytes.windows(CANARY.len()).any(|w| w == CANARY),
        "an enrolled pod's bytes crossed the uplink in clear"
    );
    let leaked = outside_the_tunnel(pcap, pods);
    assert!(
        leaked.is_empty(),
        "enrolled pods' TCP outside HBONE on the uplink: {leaked:?}"
    );
}

#[test]
fn an_agent_killed_under_load_leaks_no_plaintext_and_admits_no_legacy_client() {
    let Some(mut sb) = sandbox("tkill") else {
        return;
    };
    set_strict(&sb, "n1-p1");
    let (p1, p2) = (sb.pod("n1-p1").clone(), sb.pod("n1-p2").clone());
    let dir = tempfile::tempdir().expect("temp dir");
    let pcap = dir.path().join("n1-uplink.pcap");
    let capture = Capture::start(&sb.node("n1").netns, "eth0", &pcap).expect("tcpdump");
    // Out of n1 and into n1, both across the uplink.
    let outgoing = Load::start(p1.netns.clone(), sb.pod("n2-p1").server.echo, CANARY, 3000);
    let incoming = Load::start(sb.pod("n2-p1").netns.clone(), p2.server.echo, CANARY, 3000);
    outgoing.wait_successes(5);
    incoming.wait_successes(5);

    sb.kill_agent("n1").expect("SIGKILL agent n1");
    let down = Instant::now();
    for legacy in ["n1-legacy", "n2-legacy"] {
        assert!(
            refused(&sb.pod(legacy).netns, p1.server.echo),
            "{legacy} reaches the STRICT pod while its agent is dead"
        );
    }
    // Let the load run against the dead agent for a while.
    let during = outgoing.counts();
    std::thread::sleep(Duration::from_secs(1).saturating_sub(down.elapsed()));
    let (ok_before, failed_before) = during;
    let (ok_down, failed_down) = outgoing.counts();
    assert_eq!(
        ok_down, ok_before,
        "no connection gets through with no proxy to carry it"
    );
    assert!(failed_down > failed_before, "the load kept trying");

    sb.start_agent("n1").expect("agent n1 back");
    outgoing.wait_successes(5);
    incoming.wait_successes(5);
    let (out_ok, out_failed) = outgoing.stop();
    let (in_ok, in_failed) = incoming.stop();
    let bytes = capture.stop().expect("capture file");

    eprintln!(
        "agent n1 killed under load: outgoing {out_ok} ok / {out_failed} refused, \
         incoming {in_ok} ok / {in_failed} refused"
    );
    assert_nothing_in_clear(&bytes, &pcap, &[p1.ip, p2.ip]);
    for legacy in ["n1-legacy", "n2-legacy"] {
        assert!(
            refused(&sb.pod(legacy).netns, p1.server.echo),
            "{legacy} reaches the STRICT pod after the restart"
        );
    }
}

/// Whether a held connection was cut: the next read ends or fails instead of timing out.
fn cut(connection: &LongLived) -> bool {
    use std::io::Read as _;
    let _ = connection
        .0
        .set_read_timeout(Some(Duration::from_millis(200)));
    match (&connection.0).read(&mut [0u8; 16]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn an_agent_restarted_under_load_cuts_only_what_it_carried_and_leaks_nothing() {
    let Some(mut sb) = sandbox("trestart") else {
        return;
    };
    set_strict(&sb, "n1-p1");
    let (p1, p2, far) = (
        sb.pod("n1-p1").clone(),
        sb.pod("n1-p2").clone(),
        sb.pod("n2-p1").clone(),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let pcap = dir.path().join("n1-uplink.pcap");
    let capture = Capture::start(&sb.node("n1").netns, "eth0", &pcap).expect("tcpdump");
    // Connections n1's agent carries (out of and into n1), and one it does not (n2 to n2).
    let mut carried: Vec<LongLived> = (0..4)
        .map(|_| LongLived::open(&p2.netns, far.server.echo))
        .chain((0..4).map(|_| LongLived::open(&far.netns, p2.server.echo)))
        .collect();
    let mut elsewhere = LongLived::open(&far.netns, sb.pod("n2-p2").server.echo);
    for connection in carried.iter_mut().chain(std::iter::once(&mut elsewhere)) {
        assert_eq!(connection.round_trip(b"before"), b"before");
    }
    let outgoing = Load::start(p1.netns.clone(), far.server.echo, CANARY, 3000);
    let incoming = Load::start(far.netns.clone(), p2.server.echo, CANARY, 3000);
    outgoing.wait_successes(5);
    incoming.wait_successes(5);

    // SIGTERM: the agent drains (2 s in the sandbox) and exits; its successor takes over.
    sb.stop_agent("n1").expect("stop agent n1");
    for legacy in ["n1-legacy", "n2-legacy"] {
        assert!(
            refused(&sb.pod(legacy).netns, p1.server.echo),
            "{legacy} reaches the STRICT pod while no agent runs"
        );
    }
    let (ok_down, _) = outgoing.counts();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        outgoing.counts().0,
        ok_down,
        "nothing gets through with no proxy to carry it"
    );
    sb.start_agent("n1").expect("agent n1 back");
    outgoing.wait_successes(5);
    incoming.wait_successes(5);
    let (out_ok, out_failed) = outgoing.stop();
    let (in_ok, in_failed) = incoming.stop();
    let bytes = capture.stop().expect("capture file");

    let cut_count = carried.iter().filter(|c| cut(c)).count();
    eprintln!(
        "agent n1 restarted under load: {cut_count} of {} carried connections cut at the end \
         of the drain; new connections outgoing {out_ok} ok / {out_failed} refused, incoming \
         {in_ok} ok / {in_failed} refused",
        carried.len()
    );
    assert_eq!(
        cut_count,
        carried.len(),
        "every connection the old agent carried ends (closed at the end of its drain), none \
         hangs half-open"
    );
    assert_eq!(
        elsewhere.round_trip(b"after"),
        b"after",
        "a connection another agent carries is untouched"
    );
    assert_nothing_in_clear(&bytes, &pcap, &[p1.ip, p2.ip]);
    assert_eq!(
        LongLived::open(&p2.netns, far.server.echo).round_trip(b"again"),
        b"again"
    );
}

#[test]
fn a_workload_that_cannot_be_enrolled_is_refused_traffic() {
    let Some(sb) = sandbox("tbroken") else {
        return;
    };
    // A Workload for n1-legacy's namespace with an address the namespace does not have: the
    // proxy cannot listen there, so enrollment fails.
    let legacy = sb.pod("n1-legacy").clone();
    let dst = sb.pod("n2-p1").server.echo;
    assert_eq!(
        echo_from(&legacy.netns, dst, b"a").expect("before").peer,
        dst
    );
    write_config(
        &sb,
        "workload-broken.yaml",
        &format!(
            "apiVersion: nodemesh.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: broken\n  \
             namespace: default\n  labels:\n    app: broken\nspec:\n  node: n1\n  \
             netns: /run/netns/{}\n  ip: 10.88.1.222\n  serviceAccount: default\n",
            legacy.netns
        ),
    );

    let status = poll_until(SOON, || {
        let workloads = sb.agent_admin("n1", "/workloads")?;
        workloads
            .as_array()
            .and_then(|a| a.iter().find(|w| w["name"] == "broken"))
            .filter(|w| w["state"] == "failed")
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("not failed yet: {workloads}"))
    })
    .expect("agent n1 reports the failure");
    assert!(
        status["error"]
            .as_str()
            .is_some_and(|e| e.contains("10.88.1.222")),
        "the error names what is wrong: {status}"
    );
    let error = echo_from(&legacy.netns, dst, b"b").expect_err("refused");
    let io = error
        .chain()
        .find_map(|e| e.downcast_ref::<std::io::Error>())
        .expect("an I/O error");
    assert_eq!(
        io.kind(),
        std::io::ErrorKind::PermissionDenied,
        "the connect is refused at once (EPERM): {error:#}"
    );
    let metrics = sb.agent_metrics("n1").expect("metrics");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("nodemesh_workload_enrollment_failures_total{reason=\"listen\"}")
            && !l.ends_with(" 0")),
        "the failure is counted"
    );

    std::fs::remove_file(sb.config_dir().join("workload-broken.yaml")).expect("remove it");
    poll_until(SOON, || {
        let echo = echo_from(&legacy.netns, dst, b"c")?;
        anyhow::ensure!(echo.peer == dst && echo.reply == b"c");
        Ok(())
    })
    .expect("no longer a workload of the mesh: it talks directly again");
}

#[test]
fn a_refused_port_fails_at_once_and_its_reset_stays_on_the_node() {
    let Some(sb) = sandbox("tnoport") else {
        return;
    };
    let server = sb.pod("n2-p1").clone();
    let closed = SocketAddr::from((server.ip, 7777));
    let dir = tempfile::tempdir().expect("temp dir");
    let pcap = dir.path().join("n2-uplink.pcap");
    let capture = Capture::start(&sb.node("n2").netns, "eth0", &pcap).expect("tcpdump");

    assert!(refused(&sb.pod("n1-p1").netns, closed));
    let inbound = poll_until(SOON, || {
        connections(&sb, "n2")
            .into_iter()
            .find(|c| c["original_dst"] == closed.to_string() && c["direction"] == "inbound")
            .ok_or_else(|| anyhow::anyhow!("no inbound record"))
    })
    .expect("agent n2 recorded it");
    let _ = capture.stop().expect("capture file");

    assert!(
        inbound["error"]
            .as_str()
            .is_some_and(|e| e.contains("refused")),
        "the application's kernel refused it, and the proxy heard so: {inbound}"
    );
    let leaked = outside_the_tunnel(&pcap, &[server.ip]);
    assert!(
        leaked.is_empty(),
        "the destination's answer left the node outside the tunnel: {leaked:?}"
    );
    let all = Capture::read(
        &pcap,
        &format!(
            "tcp and src host {} and not port 15008 and not port 15012",
            server.ip
        ),
    )
    .expect("read");
    assert!(all.is_empty(), "not even a reset leaves: {all:?}");
    poll_until(SOON, || {
        let metrics = sb.agent_metrics("n1")?;
        anyhow::ensure!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_tcp_connections_closed_total{")
                    && l.contains("response_flags=\"UF\"")),
            "no UF connection on n1"
        );
        Ok(())
    })
    .expect("the client's agent flags it UF");
}
