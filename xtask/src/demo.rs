//! `cargo xtask demo`: builds everything, brings up a two-node sandbox, sends traffic the ways
//! that matter, shows what each agent captured, and tears the sandbox down.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use nodemesh_sandbox::{PodStatus, Sandbox, Spec, capture::Capture, run_in_netns};
use serde_json::Value;

use crate::{Profile, build, require_root, setup};

mod traffic;

const NAME: &str = "demo";

pub fn run() -> anyhow::Result<()> {
    require_root("the demo")?;
    setup::run()?;
    let bin_dir = build::run(Profile::Dev)?;
    println!("\n== bringing up sandbox {NAME:?}: 2 nodes, 2 enrolled pods and 1 legacy pod each");
    let mut spec = Spec::new(NAME, bin_dir);
    spec.labels = traffic::LABELS
        .iter()
        .map(|(pod, key, value)| ((*pod).to_owned(), (*key).to_owned(), (*value).to_owned()))
        .collect();
    let sandbox = Sandbox::up(&spec)?;
    let result = show(&sandbox);
    let down = sandbox.down();
    result?;
    down?;
    println!(
        "\n== sandbox {NAME:?} removed: namespaces, agents, test servers and eBPF programs are gone"
    );
    Ok(())
}

fn show(sandbox: &Sandbox) -> anyhow::Result<()> {
    let status = sandbox.status();
    println!(
        "   up in {:.1}s; mesh configuration in {}",
        status.up_seconds,
        status.config_dir.display()
    );
    for pod in &status.pods {
        let identity = pod
            .identity
            .as_deref()
            .unwrap_or("not enrolled (namespace legacy)");
        println!(
            "   {:<10} {:<11} on {}  {identity}",
            pod.name, pod.ip, pod.node
        );
    }
    let scenarios = [
        ("same node", "n1-p1", "n1-p2"),
        ("across nodes", "n1-p1", "n2-p1"),
        ("from a pod outside the mesh", "n1-legacy", "n2-p1"),
        ("to a pod outside the mesh", "n1-p1", "n2-legacy"),
    ];
    for (i, (title, from, to)) in scenarios.into_iter().enumerate() {
        let (client, server) = (sandbox.pod(from), sandbox.pod(to));
        println!(
            "\n== {}. {title}: curl in {from} -> http://{}:8080/",
            i + 1,
            server.ip
        );
        let before = connection_ids(sandbox)?;
        let uplink =
            (client.node != server.node).then(|| UplinkWatch::start(sandbox, &client.node));
        let answer = curl(client, &format!("http://{}:8080/", server.ip))?;
        println!(
            "   answer: pod {} (it saw the connection come from {})",
            answer["pod"].as_str().unwrap_or("?"),
            answer["client"].as_str().unwrap_or("?")
        );
        print_captures(sandbox, &before)?;
        if let Some(watch) = uplink {
            watch?.report()?;
        }
    }
    show_socket(sandbox)?;
    show_policy(sandbox)?;
    println!("\n== 7. what the eBPF programs did");
    for node in &status.nodes {
        let stats = sandbox.agent_admin(&node.name, "/stats")?;
        println!(
            "   agent {}: {}",
            node.name,
            stats["ebpf"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(_, v)| v.as_u64() != Some(0))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        );
    }
    show_telemetry(sandbox)?;
    traffic::show_canary(sandbox)?;
    traffic::show_failure(sandbox, &status.bin_dir.join("nodemesh"))
}

/// Istio's connection metric as each agent reports it, and an access log line.
fn show_telemetry(sandbox: &Sandbox) -> anyhow::Result<()> {
    println!(
        "
== 8. what the agents report: istio_tcp_connections_opened_total on :15020/metrics"
    );
    for node in &sandbox.status().nodes {
        let metrics = sandbox.agent_metrics(&node.name)?;
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        {
            let label = |name: &str| {
                line.split(&format!("{name}=\"")[..])
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .unwrap_or("?")
                    .to_owned()
            };
            println!(
                "   agent {} ({}): {} -> {}, {}: {}",
                node.name,
                label("reporter"),
                label("source_workload"),
                label("destination_workload"),
                label("connection_security_policy"),
                line.rsplit(' ').next().unwrap_or("?")
            );
        }
    }
    let log = &sandbox.node("n2").agent.access_log;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if let Some(line) = text.lines().find(|l| l.contains("\"security\":\"mtls\"")) {
        println!(
            "   access log of agent n2 ({}), one line:\n   {line}",
            log.display()
        );
    }
    Ok(())
}

fn curl(client: &PodStatus, url: &str) -> anyhow::Result<Value> {
    let out = run_in_netns(&client.netns, "curl", &["-sS", "--max-time", "10", url])?;
    if !out.status.success() {
        bail!(
            "curl {url} from {} failed: {}",
            client.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("the test server's answer is not JSON")
}

/// Ids of the connections each agent has recorded so far.
fn connection_ids(sandbox: &Sandbox) -> anyhow::Result<Vec<(String, u64)>> {
    let mut seen = Vec::new();
    for node in &sandbox.status().nodes {
        let last = sandbox
            .agent_admin(&node.name, "/connections")?
            .as_array()
            .and_then(|a| a.iter().filter_map(|c| c["id"].as_u64()).max())
            .unwrap_or(0);
        seen.push((node.name.clone(), last));
    }
    Ok(seen)
}

fn print_captures(sandbox: &Sandbox, before: &[(String, u64)]) -> anyhow::Result<()> {
    // An agent records a connection when it ends; the proxy may close its side a moment after
    // curl returns.
    std::thread::sleep(Duration::from_millis(100));
    let mut any = false;
    for (node, last) in before {
        let connections = sandbox.agent_admin(node, "/connections")?;
        for c in connections.as_array().into_iter().flatten() {
            if c["id"].as_u64().unwrap_or(0) <= *last {
                continue;
            }
            any = true;
            let text = |key: &str| c[key].as_str().unwrap_or("-").to_owned();
            println!(
                "   agent {node}: {:<8} for {:<14} {} -> {}",
                text("direction"),
                text("workload"),
                text("client"),
                text("original_dst"),
            );
            let how = match (text("direction").as_str(), text("security").as_str()) {
                ("outbound", "mtls") => format!(
                    "mTLS tunnel to {} as {}, server verified as {}",
                    text("hbone"),
                    text("source_identity"),
                    text("destination_identity")
                ),
                ("inbound", "mtls") => format!(
                    "mTLS from {} into {}, handed to the app from {}",
                    text("source_identity"),
                    text("destination_identity"),
                    text("upstream_local")
                ),
                ("inbound", _) => format!(
                    "plaintext from outside the mesh (PERMISSIVE), handed to the app from {}",
                    text("upstream_local")
                ),
                _ => format!(
                    "plain TCP to a destination outside the mesh, from {}",
                    text("upstream_local")
                ),
            };
            println!("          {how}");
            if let Some(error) = c["error"].as_str() {
                println!("          error: {error}");
            }
        }
    }
    if !any {
        println!("   no agent captured this connection");
    }
    Ok(())
}

/// Shows, with `ss`, that an enrolled client's socket is connected to the proxy.
fn show_socket(sandbox: &Sandbox) -> anyhow::Result<()> {
    let client = sandbox.pod("n1-p1");
    let server = sandbox.pod("n2-p1");
    println!(
        "\n== 5. where the client's socket points: a slow request from n1-p1 to {}:8080, then ss in n1-p1",
        server.ip
    );
    let mut curl = InFlight::start(client, &format!("http://{}:8080/delay/1500", server.ip))?;
    std::thread::sleep(Duration::from_millis(500));
    let out = run_in_netns(&client.netns, "ss", &["-Htnp", "state", "established"])?;
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("curl"))
    {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [_, _, local, peer, ..] = fields.as_slice() {
            println!("   curl's socket: {local} -> {peer}");
            if peer.ends_with(":15001") {
                println!(
                    "   it is connected to the node proxy's in-pod listener (:15001), not to {}:8080",
                    server.ip
                );
            }
        }
    }
    curl.wait()?;
    Ok(())
}

/// Drops the example policy into the configuration, shows its effect and `nodemesh explain`.
fn show_policy(sandbox: &Sandbox) -> anyhow::Result<()> {
    let example = crate::root().join("examples/policies/public-get.yaml");
    let installed = sandbox.config_dir().join("public-get.yaml");
    println!(
        "\n== 6. authorization: copy examples/policies/public-get.yaml (n2-p1 answers only GET /public/*)"
    );
    std::fs::copy(&example, &installed)
        .with_context(|| format!("cannot copy {}", example.display()))?;
    let client = sandbox.pod("n1-p1");
    let server = sandbox.pod("n2-p1");
    let code = |path: &str, method: &str| -> anyhow::Result<String> {
        let url = format!("http://{}:8080{path}", server.ip);
        let out = run_in_netns(
            &client.netns,
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                method,
                &url,
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    nodemesh_sandbox::poll_until(Duration::from_secs(10), || {
        anyhow::ensure!(code("/private", "GET")? == "403", "not in force yet");
        Ok(())
    })?;
    for (method, path) in [
        ("GET", "/public/x"),
        ("GET", "/private"),
        ("POST", "/public/x"),
    ] {
        println!(
            "   {method} {path} from n1-p1: HTTP {}",
            code(path, method)?
        );
    }
    let out = Command::new(sandbox.status().bin_dir.join("nodemesh"))
        .args(["explain", "--config"])
        .arg(sandbox.config_dir())
        .args([
            "--from",
            "n1-p1",
            "--to",
            "n2-p1:8080",
            "--method",
            "POST",
            "--path",
            "/public/x",
        ])
        .output()
        .context("cannot run nodemesh explain")?;
    println!("   nodemesh explain --from n1-p1 --to n2-p1:8080 --method POST --path /public/x:");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("     {line}");
    }
    std::fs::remove_file(&installed)?;
    Ok(())
}

/// tcpdump on a node's uplink for one scenario.
struct UplinkWatch {
    node: String,
    capture: Capture,
    dir: std::path::PathBuf,
}

impl UplinkWatch {
    fn start(sandbox: &Sandbox, node: &str) -> anyhow::Result<Self> {
        let dir = sandbox.status().state_dir.join("demo-capture");
        std::fs::create_dir_all(&dir)?;
        let capture = Capture::start(&sandbox.node(node).netns, "eth0", &dir.join("uplink.pcap"))?;
        Ok(Self {
            node: node.to_owned(),
            capture,
            dir,
        })
    }

    fn report(self) -> anyhow::Result<()> {
        let file = self.dir.join("uplink.pcap");
        self.capture.stop()?;
        let all = Capture::read(&file, "tcp")?.len();
        let hbone = Capture::read(&file, "tcp port 15008")?.len();
        println!(
            "   uplink eth0 of node {}: {all} TCP packets, {hbone} of them TLS to or from port 15008",
            self.node
        );
        Ok(())
    }
}

/// A curl running in a pod's namespace in the background.
struct InFlight(Child);

impl InFlight {
    fn start(client: &PodStatus, url: &str) -> anyhow::Result<Self> {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", client.netns))
            .args([
                "--",
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "--max-time",
                "10",
                url,
            ])
            .stdout(Stdio::null())
            .spawn()
            .map(Self)
            .context("cannot start curl")
    }

    fn wait(&mut self) -> anyhow::Result<()> {
        let status = self.0.wait()?;
        if !status.success() {
            bail!("the slow request failed ({status})");
        }
        Ok(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
