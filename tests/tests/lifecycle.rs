//! The agent's start-up errors, the README's acceptance story (curl and ss), capture outliving
//! the agent (stopped, restarted, upgraded, uninstalled), and a clean `down`.

use std::{process::Command, time::Duration};

use nodemesh_sandbox::{Sandbox, poll_until, run_in_netns};
use nodemesh_tests::{bin_dir, curl, echo_from, preflight, proxy_of, refused, sandbox};

/// Where the agents this file starts pin their datapath, apart from any real node's.
const ERRORS_PIN_DIR: &str = "/sys/fs/bpf/nodemesh/test-agent-errors";

const SOON: Duration = Duration::from_secs(10);

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

#[test]
fn a_stopped_agent_leaves_capture_refusing_until_its_successor_takes_over() {
    let Some(mut sb) = sandbox("trestart") else {
        return;
    };
    let client = sb.pod("n1-p1").netns.clone();
    let dst = sb.pod("n2-p1").server.echo;
    let inbound = sb.pod("n1-p1").server.echo;
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
    let dst = sb.pod("n2-p1").server.echo;
    sb.stop_agent("n1").expect("SIGTERM agent n1");
    assert!(refused(&client, dst), "capture outlives the agent");

    let pins = nodemesh_sandbox::pins_of("tuninst").join("n1");
    let out = nodemesh_tests::uninstall("n1", &pins);
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

#[test]
fn an_agent_refuses_pinned_maps_of_another_shape() {
    let Some(mut sb) = sandbox("tshape") else {
        return;
    };
    sb.stop_agent("n1").expect("SIGTERM agent n1");
    let pins = nodemesh_sandbox::pins_of("tshape").join("n1");
    // What an older version with another layout would have left: a map with 4-byte keys
    // where this one keeps 8-byte ones.
    pin_in_place_of(&pins, "ENROLLED", "PODS");

    let error = sb
        .start_agent("n1")
        .expect_err("the agent must not reuse it");
    let text = format!("{error:#}");
    assert!(
        text.contains("ENROLLED") && text.contains("incompatible version"),
        "{text}"
    );
    assert!(text.contains("--uninstall"), "says what to do: {text}");

    nodemesh_tests::uninstall("n1", &pins);
    sb.start_agent("n1")
        .expect("a clean start after --uninstall");
    let dst = sb.pod("n2-p1").server.echo;
    assert_eq!(
        echo_from(&sb.pod("n1-p1").netns, dst, b"s")
            .expect("captured again")
            .peer,
        proxy_of(&sb, "n1-p1")
    );
}

#[test]
fn an_upgraded_agent_replaces_a_map_of_connections_in_flight_and_the_proxy_takes_each_entry() {
    let Some(mut sb) = sandbox("tflight") else {
        return;
    };
    sb.stop_agent("n1").expect("SIGTERM agent n1");
    let pins = nodemesh_sandbox::pins_of("tflight").join("n1");
    // An earlier version's TUPLE_DST, of another shape (here COOKIE_DST's 8-byte keys).
    pin_in_place_of(&pins, "TUPLE_DST", "COOKIE_DST");

    sb.start_agent("n1")
        .expect("a map of connections in flight is replaced, not refused");
    let replaced = aya::maps::MapInfo::from_pin(pins.join("TUPLE_DST")).expect("TUPLE_DST");
    assert_eq!(replaced.key_size(), 12, "a new map of this version's shape");

    // While a captured connection is open, the proxy has already taken its entry.
    let dst = sb.pod("n2-p1").server.echo;
    let left = nodemesh_sandbox::in_netns(&sb.pod("n1-p1").netns, move || {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect_timeout(&dst, SOON)?;
        stream.set_read_timeout(Some(SOON))?;
        stream.write_all(b"held")?;
        let mut echoed = [0; 4];
        stream.read_exact(&mut echoed)?;
        anyhow::ensure!(&echoed == b"held", "echoed {echoed:?}");
        let map = aya::maps::MapData::from_pin(pins.join("TUPLE_DST"))?;
        let tuples: aya::maps::HashMap<_, [u8; 12], [u8; 8]> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(map))?;
        Ok(tuples.keys().count())
    })
    .expect("a connection through the proxy, held open");
    assert_eq!(
        left, 0,
        "TUPLE_DST keeps no entry of an accepted connection"
    );
}

/// Pins the map pinned as `other` under the name `map` too, in place of the one there: what a
/// version with another layout of `map` would have left.
fn pin_in_place_of(pins: &std::path::Path, map: &str, other: &str) {
    let data = aya::maps::MapData::from_pin(pins.join(other))
        .unwrap_or_else(|e| panic!("{other} is not pinned: {e}"));
    std::fs::remove_file(pins.join(map)).unwrap_or_else(|e| panic!("unpin {map}: {e}"));
    data.pin(pins.join(map))
        .unwrap_or_else(|e| panic!("pin another map as {map}: {e}"));
}
