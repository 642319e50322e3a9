//! Workload certificates: an agent obtains only its own node's identities, an operator's root
//! signs them, they rotate under load without breaking a connection, connections outlive the
//! controller while certificates are valid, and an expired one fails closed.

use std::{fs, time::Duration};

use nodemesh_identity::{CertificateRequest, SpiffeId};
use nodemesh_sandbox::{Sandbox, poll_until, run_in_netns};
use nodemesh_tests::{LongLived, connections, echo_from, identity, sandbox, sandbox_with};

const SOON: Duration = Duration::from_secs(10);

/// POSTs a certificate request to the controller with a node's token; returns (status, body).
fn request_certificate(sb: &Sandbox, token_node: &str, id: &SpiffeId) -> (u16, serde_json::Value) {
    let status = sb.status();
    let token = fs::read_to_string(status.state_dir.join(format!("tokens/{token_node}.token")))
        .expect("token");
    let request = CertificateRequest::new(id.clone()).expect("CSR");
    let body =
        serde_json::json!({ "identity": id.to_string(), "csr": request.csr_pem() }).to_string();
    let url = format!("https://{}/v1/certificates", status.controller.ca_api);
    let out = run_in_netns(
        &sb.node(token_node).netns,
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            status.controller.ca_cert.to_str().expect("utf-8"),
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
            "-w",
            "\n%{http_code}",
            &url,
        ],
    )
    .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (
        code.parse().expect("status"),
        serde_json::from_str(body).unwrap_or_default(),
    )
}

#[test]
fn an_agent_obtains_only_its_own_nodes_identities() {
    let Some(sb) = sandbox("tnodes") else {
        return;
    };
    let theirs = identity(&sb, "n2-p1");

    let (status, body) = request_certificate(&sb, "n1", &theirs);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["reason"], "not_on_node");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("node n2")),
        "{body}"
    );

    let (status, body) = request_certificate(&sb, "n2", &theirs);
    assert_eq!(status, 200, "the right node gets it: {body}");
    assert!(
        body["certificate_chain"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    );

    let unknown: SpiffeId = "spiffe://cluster.local/ns/default/sa/nobody"
        .parse()
        .expect("id");
    let (status, body) = request_certificate(&sb, "n1", &unknown);
    assert_eq!(
        (status, body["reason"].as_str()),
        (403, Some("unknown_identity"))
    );

    let metrics = sb.controller_metrics().expect("controller metrics");
    assert!(
        metrics
            .contains("nodemesh_controller_certificates_refused_total{reason=\"not_on_node\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_sandbox_given_an_operators_root_signs_under_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = nodemesh_identity::generate_root("cluster.local").expect("a root");
    fs::write(dir.path().join("root.pem"), &cert).expect("write");
    fs::write(dir.path().join("root-key.pem"), &key).expect("write");
    let Some(sb) = sandbox_with("troot", |spec| {
        spec.ca = Some((dir.path().join("root.pem"), dir.path().join("root-key.pem")));
    }) else {
        return;
    };
    let (status, body) = request_certificate(&sb, "n1", &identity(&sb, "n1-p1"));
    assert_eq!(status, 200, "{body}");
    let roots: Vec<String> = body["trust_bundle"]
        .as_array()
        .expect("a bundle")
        .iter()
        .map(|pem| pem.as_str().unwrap_or_default().replace('\r', ""))
        .collect();
    assert_eq!(
        roots,
        [cert.replace('\r', "")],
        "the operator's root is the mesh's"
    );
    assert_eq!(
        echo_from(&sb.pod("n1-p1").netns, sb.pod("n2-p1").server.echo, b"mtls")
            .expect("mTLS across nodes")
            .reply,
        b"mtls"
    );
}

fn serial_of(sb: &Sandbox, node: &str, id: &SpiffeId) -> Option<String> {
    sb.agent_admin(node, "/certs")
        .ok()?
        .as_array()?
        .iter()
        .find(|c| c["identity"] == id.to_string().as_str())?["serial"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn certificates_rotate_under_load_without_breaking_a_connection() {
    let Some(sb) = sandbox_with("trotate", |spec| {
        spec.workload_cert_ttl = Duration::from_secs(16)
    }) else {
        return;
    };
    let id = identity(&sb, "n1-p1");
    let first = serial_of(&sb, "n1", &id).expect("a certificate");
    let mut conn = LongLived::open(&sb.pod("n1-p1").netns, sb.pod("n2-p1").server.echo);
    assert_eq!(conn.round_trip(b"before"), b"before");
    // New connections all along, across the rotation: none may fail.
    let load = nodemesh_tests::Load::start(
        sb.pod("n1-p1").netns.clone(),
        sb.pod("n2-p2").server.echo,
        b"under load",
        2000,
    );
    load.wait_successes(5);

    let second = poll_until(Duration::from_secs(20), || {
        let serial = serial_of(&sb, "n1", &id).ok_or_else(|| anyhow::anyhow!("no certificate"))?;
        anyhow::ensure!(serial != first, "not renewed yet");
        Ok(serial)
    })
    .expect("the certificate is renewed at about half its 16 s life");

    assert_ne!(first, second);
    load.wait_successes(20);
    let (ok, failed) = load.stop();
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed across the rotation",
        ok + failed
    );
    assert_eq!(conn.round_trip(b"after rotation"), b"after rotation");
    let fresh = echo_from(&sb.pod("n1-p1").netns, sb.pod("n2-p2").server.echo, b"new")
        .expect("new connection");
    assert_eq!(fresh.reply, b"new");
}

#[test]
fn with_the_controller_stopped_connections_keep_working_while_certificates_are_valid() {
    let Some(mut sb) = sandbox("tnoctl") else {
        return;
    };
    let mut conn = LongLived::open(&sb.pod("n1-p1").netns, sb.pod("n2-p1").server.echo);
    assert_eq!(conn.round_trip(b"1"), b"1");

    sb.stop_controller().expect("stop the controller");

    assert_eq!(conn.round_trip(b"2"), b"2", "an existing connection");
    // A destination never contacted before needs a new HBONE connection and handshake.
    let fresh = echo_from(&sb.pod("n1-p1").netns, sb.pod("n2-p2").server.echo, b"3")
        .expect("new connection");
    assert_eq!(fresh.reply, b"3");
    let back = echo_from(&sb.pod("n2-p2").netns, sb.pod("n1-p2").server.echo, b"4")
        .expect("the other way");
    assert_eq!(back.reply, b"4");
}

#[test]
fn an_expired_certificate_fails_closed_until_the_controller_returns() {
    let Some(mut sb) = sandbox_with("texpire", |spec| {
        spec.workload_cert_ttl = Duration::from_secs(10)
    }) else {
        return;
    };
    let id = identity(&sb, "n1-p1");
    sb.stop_controller().expect("stop the controller");
    poll_until(Duration::from_secs(15), || {
        let certs = sb.agent_admin("n1", "/certs")?;
        let state = certs
            .as_array()
            .and_then(|a| a.iter().find(|c| c["identity"] == id.to_string().as_str()))
            .map(|c| c["state"].clone());
        anyhow::ensure!(state == Some("expired".into()), "still {state:?}");
        Ok(())
    })
    .expect("the certificate expires with the controller away");

    let refused = echo_from(&sb.pod("n1-p1").netns, sb.pod("n2-p2").server.echo, b"x");
    assert!(
        refused.is_err() || refused.is_ok_and(|e| e.reply.is_empty()),
        "fails closed"
    );
    let error = poll_until(SOON, || {
        connections(&sb, "n1")
            .into_iter()
            .rev()
            .find_map(|c| c["error"].as_str().map(str::to_owned))
            .ok_or_else(|| anyhow::anyhow!("no failure recorded"))
    })
    .expect("the refusal is recorded");
    assert!(error.contains("expired"), "{error}");

    sb.start_controller().expect("controller back");
    poll_until(Duration::from_secs(45), || {
        let echo = echo_from(&sb.pod("n1-p1").netns, sb.pod("n2-p2").server.echo, b"y")?;
        anyhow::ensure!(echo.reply == b"y", "not yet");
        Ok(())
    })
    .expect("a renewed certificate lets connections through again");
}
