//! The local sandbox: network namespaces as nodes and pods on this one machine, one agent per
//! node, a test server in every pod. Users (`cargo xtask sandbox`), the namespaced tests and
//! the benchmark all use it.
//!
//! Only addresses inside namespaces the sandbox created are used; nothing reaches the host's
//! own network. Everything the sandbox makes is named after it, so [`down`] finds and removes
//! all of it even when the state file is gone.
#![forbid(unsafe_code)]

pub mod capture;
pub mod cni;
pub mod curl;
mod http;
mod layout;
mod mesh_config;
mod process;
mod prometheus;
mod status;
mod topology;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub use crate::{
    http::{HttpResponse, http_get},
    layout::{Layout, pins_of},
    process::{is_alive, run_in_netns},
    status::{AgentStatus, ControllerStatus, NodeStatus, PodStatus, ServerStatus, Status},
    topology::in_netns,
};

/// Where sandboxes keep their state, configuration and logs.
pub const STATE_ROOT: &str = "/run/nodemesh/sandbox";

/// What the sandbox runs, all from one directory.
pub const BINARIES: [&str; 5] = [
    "nodemesh-agent",
    "nodemesh-cni",
    "nodemesh-controller",
    "nodemesh-testserver",
    "nodemesh-ebpf.o",
];

/// The name `cargo xtask sandbox` uses when none is given.
pub const DEFAULT_NAME: &str = "nm";

/// What to bring up.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Short name; prefixes every namespace. 1 to 8 lower-case letters and digits.
    pub name: String,
    pub nodes: usize,
    /// Enrolled pods per node; each node also gets one pod in namespace `legacy`.
    pub pods: usize,
    /// Directory holding nodemesh-agent, nodemesh-testserver and nodemesh-ebpf.o.
    pub bin_dir: PathBuf,
    /// Lifetime of workload certificates; short values exercise rotation.
    pub workload_cert_ttl: Duration,
    /// Also run a Prometheus server (Debian's) scraping every agent and the controller.
    pub prometheus: bool,
    /// Pods per node outside the mesh (namespace `legacy`); the benchmark uses two.
    pub legacy_pods: usize,
    /// Labels beyond `app=<pod name>`, as (pod, key, value): so that Services can select
    /// several pods (`version=v1`, `tier=web`).
    pub labels: Vec<(String, String, String)>,
    /// More arguments for every agent (`--max-connections-per-source 4`, say).
    pub agent_args: Vec<String>,
    /// A command every agent runs under, such as `setpriv` with the capabilities a
    /// DaemonSet grants: its program and arguments, the agent's command line after them.
    pub agent_wrapper: Vec<String>,
    /// An operator's root CA (certificate, private key) for the controller to sign with,
    /// instead of one it creates: so that the sandbox shares a root with another mesh.
    pub ca: Option<(PathBuf, PathBuf)>,
}

/// Parses `POD=KEY=VALUE`, as `sandbox up --label` takes it.
pub fn parse_label(text: &str) -> Result<(String, String, String), String> {
    let mut parts = text.splitn(3, '=');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(pod), Some(key), Some(value)) if !pod.is_empty() && !key.is_empty() => {
            Ok((pod.to_owned(), key.to_owned(), value.to_owned()))
        }
        _ => Err(format!(
            "{text:?} is not POD=KEY=VALUE, such as n2-p1=version=v1"
        )),
    }
}

impl Spec {
    pub fn new(name: &str, bin_dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.to_owned(),
            nodes: 2,
            pods: 2,
            bin_dir: bin_dir.into(),
            workload_cert_ttl: Duration::from_secs(24 * 3600),
            prometheus: false,
            legacy_pods: 1,
            labels: Vec::new(),
            agent_args: Vec::new(),
            agent_wrapper: Vec::new(),
            ca: None,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 8
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !name_ok {
            bail!(
                "sandbox name {:?} is not valid: use 1 to 8 lower-case letters and digits",
                self.name
            );
        }
        if !(1..=200).contains(&self.nodes) {
            bail!("--nodes must be between 1 and 200, not {}", self.nodes);
        }
        if self.workload_cert_ttl < Duration::from_secs(10) {
            bail!("the workload certificate lifetime must be at least 10 s");
        }
        if !(1..=40).contains(&self.legacy_pods) {
            bail!(
                "legacy pods per node must be between 1 and 40, not {}",
                self.legacy_pods
            );
        }
        if !(1..=150).contains(&self.pods) {
            bail!("--pods must be between 1 and 150, not {}", self.pods);
        }
        let layout = Layout::new(self);
        let pods: Vec<String> = layout.all_pods().into_iter().map(|p| p.name).collect();
        for (pod, key, _) in &self.labels {
            if !pods.contains(pod) {
                bail!(
                    "--label names pod {pod:?}, which this sandbox does not have ({})",
                    pods.join(", ")
                );
            }
            if key == "app" || key == "nodemesh.dev/enabled" {
                bail!("--label cannot set {key:?} on {pod}: the sandbox sets it");
            }
        }
        for binary in BINARIES {
            let path = self.bin_dir.join(binary);
            if !path.is_file() {
                bail!(
                    "{} is missing; build it first with `cargo xtask build`",
                    path.display()
                );
            }
        }
        Ok(())
    }
}

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    status: Status,
}

impl Sandbox {
    /// Brings the sandbox up and returns when every agent is ready and every test server
    /// answers. If it is already up with the same shape, it is reused; a partial or different
    /// one is removed first. On failure everything made so far is removed again.
    pub fn up(spec: &Spec) -> anyhow::Result<Self> {
        spec.check()?;
        // A state file from another version reads as no state: down cleans up by name.
        // One with another CA than asked for is not reused.
        if let Ok(Some(status)) = Status::load(&spec.name)
            && spec.ca.is_none()
            && status.is_shape(spec)
            && status.is_running()
        {
            return Ok(Self { status });
        }
        // Leftovers of a partial or different sandbox, or of one whose state file is gone.
        down(&spec.name)?;
        let layout = Layout::new(spec);
        match bring_up(&layout) {
            Ok(status) => Ok(Self { status }),
            Err(e) => {
                let logs = layout.logs_dir();
                let _ = down(&spec.name);
                Err(e.context(format!(
                    "sandbox {} did not come up (logs were in {})",
                    spec.name,
                    logs.display()
                )))
            }
        }
    }

    /// The sandbox called `name`, if it is up.
    pub fn find(name: &str) -> anyhow::Result<Option<Self>> {
        Ok(Status::load(name)?.map(|status| Self { status }))
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    pub fn config_dir(&self) -> &Path {
        &self.status.config_dir
    }

    pub fn pod(&self, name: &str) -> &PodStatus {
        self.status
            .pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("sandbox {} has no pod {name}", self.status.name))
    }

    pub fn node(&self, name: &str) -> &NodeStatus {
        self.status
            .nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("sandbox {} has no node {name}", self.status.name))
    }

    /// GETs `path` from a node's agent admin endpoint, from inside the node's namespace.
    pub fn agent_admin(&self, node: &str, path: &str) -> anyhow::Result<serde_json::Value> {
        let node = self.node(node);
        let url = format!("http://{}{path}", node.agent.admin);
        let response = http_get(&node.netns, &url, Duration::from_secs(5))?;
        response.json()
    }

    /// A node's agent's Prometheus exposition (`/metrics`), from inside the node's namespace.
    pub fn agent_metrics(&self, node: &str) -> anyhow::Result<String> {
        let node = self.node(node);
        let url = format!("http://{}/metrics", node.agent.metrics);
        Ok(http_get(&node.netns, &url, Duration::from_secs(5))?.body)
    }

    /// The controller's Prometheus exposition (`/metrics`).
    pub fn controller_metrics(&self) -> anyhow::Result<String> {
        let controller = &self.status.controller;
        let url = format!("http://{}/metrics", controller.monitoring);
        Ok(http_get(&controller.netns, &url, Duration::from_secs(5))?.body)
    }

    /// The controller's `/config_dump`: its configuration in force, the last refusal and
    /// what each agent acknowledged.
    pub fn controller_dump(&self) -> anyhow::Result<serde_json::Value> {
        let controller = &self.status.controller;
        let url = format!("http://{}/config_dump", controller.monitoring);
        http_get(&controller.netns, &url, Duration::from_secs(5))?.json()
    }

    /// Stops a node's agent (SIGTERM) and waits for it to exit.
    pub fn stop_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let pid = self.node(node).agent.pid;
        process::terminate(&[pid], Duration::from_secs(10));
        Ok(())
    }

    /// Kills a node's agent (SIGKILL), as a crash would, and waits until it is gone. Its
    /// pinned capture stays in place.
    pub fn kill_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let pid = self.node(node).agent.pid;
        process::kill_now(pid, Duration::from_secs(10))
    }

    /// Starts a node's agent again and waits until it is ready.
    pub fn start_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let layout = Layout::from_status(&self.status);
        let index = self
            .status
            .nodes
            .iter()
            .position(|n| n.name == node)
            .with_context(|| format!("no node {node}"))?;
        let pid = process::start_agent(&layout, index)?;
        self.status.nodes[index].agent.pid = pid;
        process::wait_agent_ready(&self.status.nodes[index], Duration::from_secs(30))?;
        self.status.save()?;
        Ok(())
    }

    /// Stops the controller (SIGTERM); agents keep their certificates until they expire.
    pub fn stop_controller(&mut self) -> anyhow::Result<()> {
        process::terminate(&[self.status.controller.pid], Duration::from_secs(10));
        Ok(())
    }

    /// Kills the controller (SIGKILL), as a crash would, and waits until it is gone.
    pub fn kill_controller(&mut self) -> anyhow::Result<()> {
        process::kill_now(self.status.controller.pid, Duration::from_secs(10))
    }

    /// Starts the controller again with the same CA and waits until it is ready.
    pub fn start_controller(&mut self) -> anyhow::Result<()> {
        let layout = Layout::from_status(&self.status);
        self.status.controller.pid = process::start_controller(&layout)?;
        process::wait_controller_ready(&self.status.controller, Duration::from_secs(30))?;
        self.status.save()?;
        Ok(())
    }

    /// Removes everything; the same as [`down`].
    pub fn down(self) -> anyhow::Result<()> {
        down(&self.status.name)
    }
}

/// Puts the operator's root where the controller keeps its CA, so that it signs with it
/// rather than creating one (the key readable by root only).
fn install_ca(layout: &Layout, cert: &Path, key: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = layout.ca_dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key_to = dir.join("ca-key.pem");
    fs::copy(key, &key_to).with_context(|| format!("cannot read --ca-key {}", key.display()))?;
    fs::set_permissions(&key_to, fs::Permissions::from_mode(0o600))?;
    fs::copy(cert, dir.join("ca-cert.pem"))
        .with_context(|| format!("cannot read --ca-cert {}", cert.display()))?;
    Ok(())
}

fn bring_up(layout: &Layout) -> anyhow::Result<Status> {
    let started = Instant::now();
    fs::create_dir_all(layout.logs_dir())
        .with_context(|| format!("cannot create {}", layout.logs_dir().display()))?;
    topology::create(layout)?;
    mesh_config::write(layout)?;
    process::provision_tokens(layout)?;
    if let Some((cert, key)) = &layout.ca {
        install_ca(layout, cert, key)?;
    }
    let mut status = Status::planned(layout);
    status.save()?;
    for pod in &mut status.pods {
        pod.server.pid = process::start_test_server(layout, pod)?;
    }
    status.controller.pid = process::start_controller(layout)?;
    status.save()?;
    let deadline = Duration::from_secs(30);
    // Agents need the CA's root, which the controller writes on its first start.
    process::wait_controller_ready(&status.controller, deadline)?;
    for (index, node) in status.nodes.iter_mut().enumerate() {
        node.agent.pid = process::start_agent(layout, index)?;
    }
    status.save()?;
    for pod in &status.pods {
        process::wait_server_ready(pod, deadline)?;
    }
    for node in &status.nodes {
        process::wait_agent_ready(node, deadline)?;
    }
    if layout.prometheus {
        let prometheus = prometheus::start(layout, &status)?;
        status.prometheus = Some(prometheus.clone());
        status.save()?;
        prometheus::wait_ready(&prometheus, deadline)?;
    }
    status.up_seconds = started.elapsed().as_secs_f64();
    status.save()?;
    Ok(status)
}

/// Removes every namespace, link, process and file of the sandbox `name`. Safe to call when
/// nothing is there.
pub fn down(name: &str) -> anyhow::Result<()> {
    let namespaces = topology::sandbox_namespaces(name)?;
    let mut pids: Vec<i32> = Status::load(name)
        .ok()
        .flatten()
        .map(|s| s.pids())
        .unwrap_or_default();
    for ns in &namespaces {
        pids.extend(topology::netns_pids(ns));
    }
    pids.sort_unstable();
    pids.dedup();
    process::terminate(&pids, Duration::from_secs(10));
    // The agents' capture outlives them by design: removing the pins detaches it.
    let pins = layout::pins_of(name);
    if pins.exists() {
        fs::remove_dir_all(&pins).with_context(|| format!("cannot remove {}", pins.display()))?;
    }
    for ns in &namespaces {
        topology::delete_netns(ns)?;
    }
    cni::remove_cgroups(name)?;
    let dir = Path::new(STATE_ROOT).join(name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    let left = topology::sandbox_namespaces(name)?;
    if !left.is_empty() {
        bail!(
            "network namespaces still present after down: {}",
            left.join(", ")
        );
    }
    Ok(())
}

/// Opens `n` TCP connections from inside `netns` to `dst` and returns them open, raising this
/// process's open-file limit to its hard limit first.
pub fn hold_connections(
    netns: &str,
    dst: std::net::SocketAddr,
    n: usize,
) -> anyhow::Result<Vec<std::net::TcpStream>> {
    raise_open_files()?;
    in_netns(netns, move || {
        (0..n)
            .map(|i| {
                std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                    .with_context(|| format!("connection {i} of {n} to {dst}"))
            })
            .collect()
    })
}

/// Raises the soft limit on open files to the hard limit.
pub fn raise_open_files() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit")?;
    Ok(())
}

/// Polls `check` until it succeeds or `timeout` passes; the error is the last failure.
pub fn poll_until<T>(
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("still failing after {timeout:?}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_pod_key_value() {
        assert_eq!(
            parse_label("n2-p1=version=v1"),
            Ok(("n2-p1".into(), "version".into(), "v1".into()))
        );
        assert_eq!(
            parse_label("n2-p1=config=a=b"),
            Ok(("n2-p1".into(), "config".into(), "a=b".into())),
            "the value may hold '='"
        );
        for bad in ["n2-p1", "n2-p1=version", "=version=v1", "n2-p1==v1"] {
            assert!(parse_label(bad).is_err(), "{bad}");
        }
    }
}
