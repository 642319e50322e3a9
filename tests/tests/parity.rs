//! The authorization parity suite (`policy/parity/authorization.yaml`) put to the proxy: each
//! group's configuration in force alone, each request sent from a real pod, byte for byte as
//! the case writes it, and `nodemesh explain` asked the same question. The proxy, explain and
//! Istio's documented verdict must all agree.

use std::{
    ffi::OsString,
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::ffi::OsStringExt as _,
    process::Command,
    time::Duration,
};

use nodemesh_policy::parity::{
    Case, DESTINATION, Expect, Group, client_hello, groups, header_bytes,
};
use nodemesh_sandbox::{Sandbox, in_netns, poll_until};
use nodemesh_tests::{bin_dir, echo_from, sandbox};

const SOON: Duration = Duration::from_secs(10);

/// Waits until n2's agent runs exactly this group's configuration.
fn in_force(sb: &Sandbox, group: &Group) {
    let want = group.mesh().for_node("n2");
    let keys = |map: &serde_json::Value| -> Vec<String> {
        map.as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    let want_settings = serde_json::to_value(&want.settings).expect("settings as JSON");
    let want_authz: Vec<String> = want.authorization_policies.keys().cloned().collect();
    let want_peer: Vec<String> = want.peer_authentications.keys().cloned().collect();
    poll_until(SOON, || {
        let dump = sb.agent_admin("n2", "/config_dump")?;
        let config = &dump["mesh"]["config"];
        let now = (
            keys(&config["authorization_policies"]),
            keys(&config["peer_authentications"]),
            &config["settings"],
        );
        anyhow::ensure!(
            now == (want_authz.clone(), want_peer.clone(), &want_settings),
            "group {}: n2 runs {now:?}",
            group.group
        );
        Ok(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "the configuration of group {} is not in force: {e:#}",
            group.group
        )
    });
}

/// Sends the case's HTTP/1.1 request exactly as written; the status code and the answer, or
/// `None` when the connection was refused or closed without an answer.
fn send_http(sb: &Sandbox, case: &Case) -> Option<(u16, String)> {
    let netns = sb.pod(case.client().0).netns.clone();
    let mut request = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\n",
        case.method.as_deref().unwrap_or("GET"),
        case.target(),
        case.authority()
    )
    .into_bytes();
    for (name, value) in &case.headers {
        request.extend_from_slice(name.as_bytes());
        request.extend_from_slice(b": ");
        request.extend_from_slice(&header_bytes(value));
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"Connection: close\r\n\r\n");
    let dst = SocketAddr::from((DESTINATION.1, case.port()));
    let answer = in_netns(&netns, move || {
        let mut stream = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(&request)?;
        let mut reply = Vec::new();
        // A reset after a partial answer still leaves the status line read.
        let _ = stream.read_to_end(&mut reply);
        Ok(reply)
    })
    .ok()?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((status, text))
}

/// The proxy's verdict on a case; an answer that is none of the three is an error.
fn proxy_verdict(sb: &Sandbox, case: &Case) -> Result<Expect, String> {
    if case.tcp {
        let message = match &case.sni {
            Some(name) => client_hello(name),
            None => b"parity".to_vec(),
        };
        let dst = SocketAddr::from((DESTINATION.1, case.port()));
        return Ok(
            match echo_from(&sb.pod(case.client().0).netns, dst, &message) {
                Ok(echo) if echo.reply == message => Expect::Allow,
                _ => Expect::Deny,
            },
        );
    }
    match send_http(sb, case) {
        // Refused as a connection: plaintext to STRICT, or a connection-level decision.
        None => Ok(Expect::Deny),
        Some((403, text)) if text.contains("RBAC: access denied") => Ok(Expect::Deny),
        Some((400, text)) if text.contains("invalid path") || text.contains("upper case") => {
            Ok(Expect::Bad)
        }
        Some((200..=299, _)) => Ok(Expect::Allow),
        Some((status, text)) => Err(format!("unexpected answer {status}: {text}")),
    }
}

/// `nodemesh explain`'s verdict on a case, from its exit code.
fn explain_verdict(sb: &Sandbox, case: &Case) -> (Expect, String) {
    let mut args: Vec<OsString> = vec![
        "explain".into(),
        "--config".into(),
        sb.config_dir().into(),
        "--from".into(),
        case.client().0.into(),
        "--to".into(),
        format!("{}:{}", DESTINATION.0, case.port()).into(),
    ];
    if !case.tcp {
        args.extend([
            "--method".into(),
            case.method.clone().unwrap_or_else(|| "GET".into()).into(),
            "--path".into(),
            case.target().into(),
            "--host".into(),
            case.authority().into(),
        ]);
        for (name, value) in &case.headers {
            let mut header = format!("{name}=").into_bytes();
            header.extend_from_slice(&header_bytes(value));
            args.extend(["--header".into(), OsString::from_vec(header)]);
        }
    }
    if let Some(sni) = &case.sni {
        args.extend(["--sni".into(), sni.into()]);
    }
    let out = Command::new(bin_dir().join("nodemesh"))
        .args(&args)
        .output()
        .expect("run nodemesh explain");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let verdict = match out.status.code() {
        Some(0) => Expect::Allow,
        Some(1) if text.contains("answers 400") => Expect::Bad,
        Some(1) => Expect::Deny,
        _ => panic!(
            "explain could not answer {}: {}",
            case.describe(),
            String::from_utf8_lossy(&out.stderr)
        ),
    };
    (verdict, text)
}

#[test]
fn the_proxy_and_explain_give_istios_verdict_on_every_case_of_the_parity_suite() {
    let Some(sb) = sandbox("tpar") else { return };
    let file = sb.config_dir().join("parity.yaml");
    let mut failures = Vec::new();
    let mut cases = 0;
    for group in groups() {
        fs::write(&file, &group.config).expect("write the group's configuration");
        in_force(&sb, &group);
        for case in &group.cases {
            cases += 1;
            let proxy = proxy_verdict(&sb, case);
            let (explained, text) = explain_verdict(&sb, case);
            if proxy.as_ref() != Ok(&case.expect) || explained != case.expect {
                failures.push(format!(
                    "{}: {}: Istio {:?}, proxy {proxy:?}, explain {explained:?}\n{text}",
                    group.group,
                    case.describe(),
                    case.expect
                ));
            }
        }
    }
    fs::remove_file(&file).expect("remove the parity configuration");
    assert!(cases > 100, "{cases} cases");
    assert!(
        failures.is_empty(),
        "{} of {cases} cases disagree:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
