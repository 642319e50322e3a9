//! mTLS between node proxies: what crosses the wire, who may connect to :15008, STRICT vs
//! PERMISSIVE, and egress outside the mesh. (Who obtains which certificate, and rotation:
//! `certificates.rs`.)

use std::{fs, net::SocketAddr, time::Duration};

use nodemesh_identity::{
    CertificateAuthority, CertificateRequest, SpiffeId, WorkloadCertificate, tls,
};
use nodemesh_sandbox::capture::Capture;
use nodemesh_sandbox::{Sandbox, poll_until};
use nodemesh_tests::{
    LongLived, connections, curl, echo_from, hbone::hbone_echo, identity, sandbox,
};

const SOON: Duration = Duration::from_secs(10);

fn sandbox_ca(sb: &Sandbox) -> CertificateAuthority {
    CertificateAuthority::load_or_create(&sb.status().controller.ca_dir, "cluster.local")
        .expect("the sandbox CA")
}

fn issue(ca: &CertificateAuthority, id: &SpiffeId, ttl: Duration) -> WorkloadCertificate {
    let request = CertificateRequest::new(id.clone()).expect("CSR");
    let issued = ca
        .sign_workload(request.csr_pem(), id, ttl)
        .expect("signed");
    request.complete(&issued.chain_pem).expect("certificate")
}

#[test]
fn between_nodes_the_uplink_carries_only_tls_to_port_15008() {
    let Some(sb) = sandbox("tuplink") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let pcap = dir.path().join("uplink.pcap");
    let capture = Capture::start(&sb.node("n1").netns, "eth0", &pcap).expect("tcpdump");
    let secret = b"nodemesh-cleartext-canary-7f3a9c".repeat(64);
    let server = sb.pod("n2-p1").clone();

    let echo = echo_from(&sb.pod("n1-p1").netns, server.server.echo, &secret).expect("echo");
    let (status, _) = curl(
        &sb.pod("n1-p1").netns,
        &format!("http://{}/headers", server.server.http),
        &["-H", "x-canary: nodemesh-cleartext-canary-7f3a9c"],
    )
    .expect("curl across nodes");
    let bytes = capture.stop().expect("capture file");

    assert_eq!(echo.reply, secret);
    assert_eq!(status, 200);
    let canary = b"nodemesh-cleartext-canary";
    assert!(
        !bytes.windows(canary.len()).any(|w| w == canary),
        "the application's bytes appear in clear on the uplink"
    );
    let to_hbone = Capture::read(&pcap, "tcp dst port 15008").expect("read");
    assert!(to_hbone.len() > 5, "the traffic was captured: {to_hbone:?}");
    // Besides HBONE, only the agent's own TLS stream to the controller (snapshots,
    // heartbeats, acknowledgements) may cross the uplink.
    let other = Capture::read(&pcap, "tcp and not port 15008 and not port 15012").expect("read");
    assert!(
        other.is_empty(),
        "TCP other than HBONE and the controller API on the uplink: {other:?}"
    );

    // Both ends know the other's identity.
    let client_id = identity(&sb, "n1-p1").to_string();
    let server_id = identity(&sb, "n2-p1").to_string();
    poll_until(SOON, || {
        let inbound = connections(&sb, "n2")
            .into_iter()
            .find(|c| c["original_dst"] == server.server.echo.to_string())
            .ok_or_else(|| anyhow::anyhow!("no inbound record"))?;
        anyhow::ensure!(
            inbound["security"] == "mtls" && inbound["source_identity"] == client_id.as_str(),
            "{inbound}"
        );
        let outbound = connections(&sb, "n1")
            .into_iter()
            .find(|c| c["original_dst"] == server.server.echo.to_string())
            .ok_or_else(|| anyhow::anyhow!("no outbound record"))?;
        anyhow::ensure!(
            outbound["destination_identity"] == server_id.as_str() && outbound["error"].is_null(),
            "{outbound}"
        );
        Ok(())
    })
    .expect("the server side knows the client's identity, the client verified the server's");
}

#[test]
fn port_15008_admits_only_valid_mesh_certificates() {
    let Some(sb) = sandbox("thbone") else { return };
    let ca = sandbox_ca(&sb);
    let target = identity(&sb, "n2-p1");
    let hbone = SocketAddr::from((sb.pod("n2-p1").ip, 15008));
    let authority = sb.pod("n2-p1").server.echo;
    let from = sb.pod("n1-legacy").netns.clone();
    let mesh_id = identity(&sb, "n1-p1");
    let try_with = |cert: &WorkloadCertificate| {
        let config = tls::client_config(cert, ca.bundle(), target.clone()).expect("client config");
        hbone_echo(&from, hbone, config, authority, b"hello")
    };

    let valid = issue(&ca, &mesh_id, Duration::from_secs(600));
    assert_eq!(
        try_with(&valid).expect("a valid mesh certificate gets through"),
        b"hello"
    );

    // TLS 1.3 judges the client's certificate after the handshake, so the client may only
    // see its connection closed; the server's agent records why.
    let refusal = |what: &str| {
        poll_until(SOON, || {
            connections(&sb, "n2")
                .into_iter()
                .filter_map(|c| c["error"].as_str().map(str::to_lowercase))
                .find(|e| e.contains(what))
                .ok_or_else(|| {
                    let errors: Vec<_> = connections(&sb, "n2")
                        .into_iter()
                        .filter_map(|c| c["error"].as_str().map(str::to_owned))
                        .collect();
                    anyhow::anyhow!("no refusal mentioning {what} among {errors:?}")
                })
        })
        .expect("the refusal is recorded")
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let stranger = CertificateAuthority::load_or_create(dir.path(), "cluster.local").expect("CA");
    let foreign = issue(&stranger, &mesh_id, Duration::from_secs(600));
    assert!(
        try_with(&foreign).is_err(),
        "a certificate of another CA is refused"
    );
    refusal("invalid peer certificate");

    // The mesh's own CA, another trust domain: not the mesh's identity.
    let outsider: SpiffeId = "spiffe://other.example/ns/default/sa/n1-p1"
        .parse()
        .expect("SPIFFE ID");
    let other_domain = issue(&ca, &outsider, Duration::from_secs(600));
    assert!(
        try_with(&other_domain).is_err(),
        "an identity of another trust domain is refused"
    );
    refusal("not of the mesh's trust domains");

    let expired = issue(&ca, &mesh_id, Duration::ZERO);
    std::thread::sleep(Duration::from_millis(1100));
    assert!(
        try_with(&expired).is_err(),
        "an expired certificate is refused"
    );
    refusal("expired");

    let anonymous =
        rustls::ClientConfig::builder_with_provider(nodemesh_identity::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(ca.bundle().root_store().expect("roots"))
            .with_no_client_auth();
    assert!(
        hbone_echo(&from, hbone, anonymous, authority, b"x").is_err(),
        "a TLS client without a certificate is refused"
    );
}

fn set_mode(sb: &Sandbox, file: &str, text: &str, pod: &str, mode: &str) {
    fs::write(sb.config_dir().join(file), text).expect("write the policy");
    let node = sb.pod(pod).node.clone();
    let name = pod.to_owned();
    poll_until(SOON, || {
        let workloads = sb.agent_admin(&node, "/workloads")?;
        let current = workloads
            .as_array()
            .and_then(|a| a.iter().find(|w| w["name"] == name.as_str()))
            .map(|w| w["mtls_mode"].clone());
        anyhow::ensure!(current == Some(mode.into()), "{name} is {current:?}");
        Ok(())
    })
    .expect("the agent applies the policy");
}

#[test]
fn strict_refuses_plaintext_and_permissive_admits_it() {
    let Some(sb) = sandbox("tstrict") else { return };
    let legacy = sb.pod("n1-legacy").netns.clone();
    let (p1, p2) = (sb.pod("n2-p1").server.echo, sb.pod("n2-p2").server.echo);
    assert_eq!(
        echo_from(&legacy, p1, b"a")
            .expect("PERMISSIVE by default")
            .reply,
        b"a"
    );

    let mut held = LongLived::open(&legacy, p1);
    assert_eq!(held.round_trip(b"held"), b"held");

    let workload_strict = "apiVersion: security.nodemesh.dev/v1\nkind: PeerAuthentication\nmetadata:\n  name: p1-strict\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: n2-p1\n  mtls:\n    mode: STRICT\n";
    set_mode(&sb, "pa-p1.yaml", workload_strict, "n2-p1", "STRICT");
    poll_until(SOON, || {
        use std::io::{Read as _, Write as _};
        let _ = held.0.write_all(b"x");
        let mut byte = [0u8; 1];
        match held.0.read(&mut byte) {
            Ok(0) | Err(_) => Ok(()),
            Ok(_) => anyhow::bail!("the plaintext connection is still open"),
        }
    })
    .expect("switching to STRICT closes the plaintext connection already open");
    let refused = echo_from(&legacy, p1, b"b");
    assert!(
        refused.is_err() || refused.is_ok_and(|e| e.reply.is_empty()),
        "STRICT refuses the legacy pod"
    );
    assert_eq!(
        echo_from(&sb.pod("n1-p1").netns, p1, b"c")
            .expect("mTLS still admitted")
            .reply,
        b"c"
    );
    assert_eq!(
        echo_from(&legacy, p2, b"d")
            .expect("other workloads unaffected")
            .reply,
        b"d"
    );

    let namespace_strict = "apiVersion: security.nodemesh.dev/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: default\nspec:\n  mtls:\n    mode: STRICT\n";
    set_mode(&sb, "pa-ns.yaml", namespace_strict, "n2-p2", "STRICT");
    let refused = echo_from(&legacy, p2, b"e");
    assert!(
        refused.is_err() || refused.is_ok_and(|e| e.reply.is_empty()),
        "namespace-wide STRICT"
    );
    let record = connections(&sb, "n2")
        .into_iter()
        .rev()
        .find(|c| c["original_dst"] == p2.to_string())
        .expect("a record");
    assert!(
        record["error"]
            .as_str()
            .is_some_and(|e| e.contains("STRICT (default/default)")),
        "{record}"
    );

    fs::remove_file(sb.config_dir().join("pa-ns.yaml")).expect("remove");
    fs::remove_file(sb.config_dir().join("pa-p1.yaml")).expect("remove");
    set_mode(&sb, "zz-empty.yaml", "", "n2-p1", "PERMISSIVE");
    assert_eq!(
        echo_from(&legacy, p1, b"f")
            .expect("PERMISSIVE again")
            .reply,
        b"f"
    );
}

#[test]
fn egress_deny_refuses_destinations_outside_the_mesh() {
    let Some(sb) = sandbox("tegress") else { return };
    let client = sb.pod("n1-p1").netns.clone();
    let outside = sb.pod("n2-legacy").server.echo;
    let inside = sb.pod("n2-p1").server.echo;
    assert_eq!(
        echo_from(&client, outside, b"a")
            .expect("Allow by default")
            .reply,
        b"a"
    );

    let settings = sb.config_dir().join("mesh-settings.yaml");
    fs::write(
        &settings,
        "apiVersion: nodemesh.dev/v1alpha1\nkind: MeshSettings\nmetadata:\n  name: default\n  namespace: nodemesh-system\nspec:\n  egress:\n    policy: Deny\n",
    )
    .expect("write MeshSettings");
    poll_until(SOON, || {
        let dump = sb.agent_admin("n1", "/config_dump")?;
        let policy = dump["mesh"]["config"]["settings"]["egress"]["policy"].clone();
        anyhow::ensure!(policy == "Deny", "egress is {policy}");
        Ok(())
    })
    .expect("agent n1 applies the egress policy");

    let refused = echo_from(&client, outside, b"b");
    assert!(
        refused.is_err() || refused.is_ok_and(|e| e.reply.is_empty()),
        "a pod outside the mesh is not reachable"
    );
    let record = connections(&sb, "n1")
        .into_iter()
        .rev()
        .find(|c| c["original_dst"] == outside.to_string())
        .expect("a record");
    assert!(
        record["error"]
            .as_str()
            .is_some_and(|e| e.contains("egress to") && e.contains("denied")),
        "{record}"
    );
    // The proxy's own port numbers are no way around it.
    for port in [15001, 15006, 15008, 15053] {
        let dst = SocketAddr::new(outside.ip(), port);
        let _ = echo_from(&client, dst, b"p");
        poll_until(SOON, || {
            let record = connections(&sb, "n1")
                .into_iter()
                .find(|c| c["original_dst"] == dst.to_string())
                .ok_or_else(|| anyhow::anyhow!("{dst} was not captured"))?;
            anyhow::ensure!(
                record["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("egress to") && e.contains("denied")),
                "{record}"
            );
            Ok(())
        })
        .expect("a connect to a proxy port elsewhere is captured and judged");
    }
    assert_eq!(
        echo_from(&client, inside, b"c")
            .expect("mesh traffic unaffected")
            .reply,
        b"c"
    );

    fs::remove_file(&settings).expect("remove MeshSettings");
    poll_until(SOON, || {
        let echo = echo_from(&client, outside, b"d")?;
        anyhow::ensure!(echo.reply == b"d", "still refused");
        Ok(())
    })
    .expect("Allow again");
}
