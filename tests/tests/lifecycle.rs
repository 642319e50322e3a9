//! The agent's start-up errors, the README's acceptance story (curl and ss), and a clean
//! `down`.

use std::{process::Command, time::Duration};

use nodemesh_sandbox::{Sandbox, poll_until, run_in_netns};
use nodemesh_tests::{bin_dir, curl, preflight, sandbox};

/// Where the agents this file starts pin their datapath, apart from any real node's.
const ERRORS_PIN_DIR: &str = "/sys/fs/bpf/nodemesh/test-agent-errors";

fn agent_error(args: &[&str], wrapper: &[&str]) -> String {
    let agent = bin_dir().join("nodemesh-agent");
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(&agent);
            c
        }
        None => Command::new(&agent),
    };
    let out = command
        .args([
            "--node",
            "n1",
            "--state-dir",
            "/nonexistent",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--readiness-addr",
            "127.0.0.1:0",
        ])
        .args(["--controller", "https://127.0.0.1:1"])
        .args(["--bpf-pin-dir", ERRORS_PIN_DIR])
        .args([
            "--controller-ca",
            "/nonexistent",
            "--token-file",
            "/nonexistent",
        ])
        .args(args)
        .output()
        .expect("run the agent");
    // An agent that got as far as pinning its datapath leaves it, as a crashed one would.
    let _ = std::fs::remove_dir_all(ERRORS_PIN_DIR);
    assert!(!out.status.success(), "the agent must exit non-zero");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    stderr
        .lines()
        .rfind(|l| l.starts_with("nodemesh-agent: "))
        .unwrap_or_else(|| panic!("no one-line reason in: {stderr}"))
        .to_owned()
}

#[test]
fn the_agent_says_why_it_cannot_start() {
    if preflight("agent_errors").is_none() {
        return;
    }
    let object = bin_dir().join("nodemesh-ebpf.o");
    let missing = agent_error(&["--ebpf-object", "/nonexistent/nodemesh-ebpf.o"], &[]);
    assert!(
        missing.contains("eBPF object /nonexistent/nodemesh-ebpf.o not found"),
        "{missing}"
    );
    assert!(missing.contains("cargo xtask build"), "{missing}");

    let not_cgroup2 = agent_error(
        &[
            "--ebpf-object",
            object.to_str().expect("utf-8"),
            "--cgroup-root",
            "/tmp",
        ],
        &[],
    );
    assert!(
        not_cgroup2.contains("/tmp is not a cgroup2 directory"),
        "{not_cgroup2}"
    );

    let not_root = agent_error(
        &["--ebpf-object", object.to_str().expect("utf-8")],
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
    );
    assert!(not_root.contains("must run as root"), "{not_root}");

    let no_trust = agent_error(&["--ebpf-object", object.to_str().expect("utf-8")], &[]);
    assert!(
        no_trust.contains("cannot read --controller-ca /nonexistent"),
        "{no_trust}"
    );
}

#[test]
fn curl_gets_the_answer_while_ss_shows_the_proxy() {
    let Some(sb) = sandbox("tstory") else { return };
    let client = sb.pod("n1-p1").clone();
    let server = sb.pod("n2-p2").clone();
    let url = format!("http://{}/delay/1500", server.server.http);
    let slow = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", client.netns))
        .args(["--", "curl", "-sS", "--max-time", "10", &url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start curl");

    let peer = poll_until(Duration::from_secs(5), || {
        let out = run_in_netns(&client.netns, "ss", &["-Htnp", "state", "established"])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.contains("\"curl\""))
            .ok_or_else(|| anyhow::anyhow!("curl's socket not established yet: {text}"))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        Ok(fields.get(3).map(|s| (*s).to_owned()).unwrap_or_default())
    })
    .expect("ss shows curl's socket");
    assert_eq!(
        peer,
        format!("{}:15001", client.ip),
        "curl is connected to the proxy"
    );

    let out = slow.wait_with_output().expect("curl finishes");
    assert!(out.status.success());
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON answer");
    assert_eq!(answer["pod"], "n2-p2");

    // The legacy pod's socket points at the server itself.
    let (status, _) = curl(
        &sb.pod("n1-legacy").netns,
        &format!("http://{}/", server.server.http),
        &[],
    )
    .expect("legacy curl");
    assert_eq!(status, 200);
}

#[test]
fn down_leaves_no_namespace_process_or_program() {
    let Some(sb) = sandbox("tdown") else { return };
    let status = sb.status().clone();
    let mut programs: Vec<u64> = Vec::new();
    for node in &status.nodes {
        let dump = sb
            .agent_admin(&node.name, "/config_dump")
            .expect("config dump");
        programs.extend(
            dump["datapath"]["program_ids"]
                .as_array()
                .expect("program ids")
                .iter()
                .filter_map(serde_json::Value::as_u64),
        );
    }
    assert_eq!(
        programs.len(),
        4 * status.nodes.len(),
        "4 programs per agent"
    );

    Sandbox::down(Sandbox::find("tdown").expect("state").expect("up")).expect("down");
    nodemesh_sandbox::down("tdown").expect("down twice is fine");

    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !left.iter().any(|n| n.starts_with("tdown-")),
        "namespaces left: {left:?}"
    );
    for pid in status.pids() {
        assert!(
            !nodemesh_sandbox::is_alive(pid),
            "process {pid} still alive"
        );
    }
    let loaded: Vec<u64> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| u64::from(p.id()))
        .collect();
    for id in programs {
        assert!(!loaded.contains(&id), "eBPF program {id} still loaded");
    }
    assert!(!status.state_dir.exists(), "state directory removed");
    let pins = nodemesh_sandbox::pins_of("tdown");
    assert!(!pins.exists(), "pinned datapath left in {}", pins.display());
    drop(sb);
}
