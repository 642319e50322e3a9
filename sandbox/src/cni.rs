//! Pods made the way a container runtime makes them: a network namespace, the node's CNI
//! chain run into it (the reference plugins `bridge`, `host-local` and `loopback`, then
//! `nodemesh-cni`), and the pod's processes in a cgroup named after its uid, as kubelet
//! names them. Each plugin gets its entry of the list with `name`, `cniVersion` and the
//! previous plugin's result (`prevResult`) added, on stdin, as libcni gives it; DEL runs the
//! list backwards.
//!
//! Each node's chain puts its pods on a bridge `cni0` in 10.88.<node>.128/25 (addresses from
//! .200), which the other nodes already route to that node.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{
    Sandbox,
    layout::{Layout, netns_path},
};

/// Where Debian installs the CNI reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The CNI version the chain speaks: the reference plugins here know up to 1.0.0.
const CNI_VERSION: &str = "1.0.0";

/// A pod as the runtime describes it to the chain.
#[derive(Debug, Clone)]
pub struct CniPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The sandbox id (`CNI_CONTAINERID`).
    pub container_id: String,
    /// The network namespace's name under /run/netns.
    pub netns: String,
}

impl CniPod {
    fn env(&self, command: &str, layout: &Layout) -> Vec<(String, String)> {
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), self.container_id.clone()),
            (
                "CNI_NETNS".into(),
                netns_path(&self.netns).display().to_string(),
            ),
            ("CNI_IFNAME".into(), "eth0".into()),
            (
                "CNI_ARGS".into(),
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};\
                     K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                    self.namespace, self.name, self.container_id, self.uid
                ),
            ),
            (
                "CNI_PATH".into(),
                format!("{}:{REFERENCE_PLUGINS}", layout.bin_dir.display()),
            ),
        ]
    }
}

/// What a failed plugin said: its CNI error object.
#[derive(Debug, Clone)]
pub struct CniFailure {
    pub plugin: String,
    pub error: Value,
}

impl std::fmt::Display for CniFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.plugin, self.error)
    }
}

impl std::error::Error for CniFailure {}

impl Layout {
    /// The node's CNI network configuration: the reference plugins, then nodemesh-cni when
    /// `with_nodemesh`.
    pub fn cni_conflist(&self, node: &str, with_nodemesh: bool) -> anyhow::Result<Value> {
        let index: usize = node
            .strip_prefix('n')
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=self.nodes).contains(n))
            .with_context(|| format!("no node {node} in sandbox {}", self.name))?;
        let mut plugins = vec![
            json!({
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": self.state_dir().join("cni/ipam").join(node),
                    "ranges": [[{
                        "subnet": format!("10.88.{index}.128/25"),
                        "rangeStart": format!("10.88.{index}.200"),
                        "rangeEnd": format!("10.88.{index}.239"),
                    }]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }),
            json!({"type": "loopback"}),
        ];
        if with_nodemesh {
            plugins.push(json!({
                "type": "nodemesh-cni",
                "agentSocket": self.cni_socket(node),
                "excludeNamespaces": ["kube-system"],
                "timeoutSeconds": 15,
            }));
        }
        Ok(json!({"cniVersion": CNI_VERSION, "name": "sandbox", "plugins": plugins}))
    }

    /// The node's agent's CNI socket.
    pub fn cni_socket(&self, node: &str) -> PathBuf {
        self.state_dir().join("cni").join(node).join("cni.sock")
    }
}

/// Runs one plugin as the runtime would, in the node's namespace; its stdout on success.
fn run_plugin(
    layout: &Layout,
    node_netns: &str,
    pod: &CniPod,
    command: &str,
    plugin: &Value,
    prev_result: Option<&Value>,
) -> anyhow::Result<Value> {
    let kind = plugin["type"]
        .as_str()
        .context("a plugin entry without type")?
        .to_owned();
    let binary = [layout.bin_dir.as_path(), Path::new(REFERENCE_PLUGINS)]
        .iter()
        .map(|dir| dir.join(&kind))
        .find(|path| path.is_file())
        .with_context(|| format!("no CNI plugin {kind} (install containernetworking-plugins)"))?;
    let mut config = plugin.clone();
    config["name"] = json!("sandbox");
    config["cniVersion"] = json!(CNI_VERSION);
    if let Some(prev) = prev_result {
        config["prevResult"] = prev.clone();
    }
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns_path(node_netns).display()))
        .arg("--")
        .arg(&binary)
        .envs(pod.env(command, layout))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(config.to_string().as_bytes())?;
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let error = serde_json::from_str(&stdout).unwrap_or_else(
            |_| json!({"msg": stdout, "stderr": String::from_utf8_lossy(&output.stderr)}),
        );
        return Err(CniFailure {
            plugin: kind,
            error,
        }
        .into());
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout).with_context(|| format!("{kind} printed no JSON: {stdout}"))
}

impl Sandbox {
    fn layout(&self) -> Layout {
        Layout::from_status(self.status())
    }

    /// Creates the pod's network namespace (named `<sandbox>-<suffix>`, so that `down`
    /// removes it) and runs `node`'s CNI chain ADD into it; returns the chain's result and the
    /// pod's address. On a plugin's failure the chain is undone (DEL), as a runtime does.
    pub fn cni_add(
        &self,
        node: &str,
        pod: &CniPod,
        with_nodemesh: bool,
    ) -> anyhow::Result<(Value, Ipv4Addr)> {
        let layout = self.layout();
        let conflist = layout.cni_conflist(node, with_nodemesh)?;
        let node_netns = &self.node(node).netns;
        if !netns_path(&pod.netns).exists() {
            let out = Command::new("ip")
                .args(["netns", "add", &pod.netns])
                .output()?;
            if !out.status.success() {
                bail!(
                    "ip netns add {}: {}",
                    pod.netns,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let mut result: Option<Value> = None;
        for plugin in conflist["plugins"].as_array().into_iter().flatten() {
            match run_plugin(&layout, node_netns, pod, "ADD", plugin, result.as_ref()) {
                Ok(out) => result = Some(out),
                Err(e) => {
                    let _ = self.cni_del_with(&layout, node, pod, &conflist, result.as_ref());
                    return Err(e);
                }
            }
        }
        let result = result.context("an empty chain")?;
        let ip = nodemesh_cni::pod_ipv4s(&result)
            .first()
            .copied()
            .context("the chain gave the pod no IPv4 address")?;
        Ok((result, ip))
    }

    /// Runs `node`'s CNI chain DEL for the pod, backwards, every plugin whatever the others
    /// said; the first failure is returned.
    pub fn cni_del(
        &self,
        node: &str,
        pod: &CniPod,
        with_nodemesh: bool,
        result: Option<&Value>,
    ) -> anyhow::Result<()> {
        let layout = self.layout();
        let conflist = layout.cni_conflist(node, with_nodemesh)?;
        self.cni_del_with(&layout, node, pod, &conflist, result)
    }

    fn cni_del_with(
        &self,
        layout: &Layout,
        node: &str,
        pod: &CniPod,
        conflist: &Value,
        result: Option<&Value>,
    ) -> anyhow::Result<()> {
        let node_netns = &self.node(node).netns;
        let mut first_error = None;
        for plugin in conflist["plugins"].as_array().into_iter().flatten().rev() {
            if let Err(e) = run_plugin(layout, node_netns, pod, "DEL", plugin, result) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A process of a pod, in a cgroup named as kubelet names them
/// (`<cgroup2>/nodemesh-sandbox-<name>/kubepods/besteffort/pod<uid>/<container>`), living in
/// the pod's network namespace: what the agent looks for under /proc. Killed, and its
/// cgroups removed, when dropped (and by `down`).
#[derive(Debug)]
pub struct PodProcess {
    pub pid: i32,
    cgroups: Vec<PathBuf>,
}

impl Sandbox {
    /// Starts `program` in the pod's namespace and moves it into the pod's cgroup.
    pub fn start_pod_process(
        &self,
        pod: &CniPod,
        program: &Path,
        args: &[String],
    ) -> anyhow::Result<PodProcess> {
        let top = sandbox_cgroup(&self.status().name)?;
        let levels = [
            top.clone(),
            top.join("kubepods"),
            top.join("kubepods/besteffort"),
            top.join(format!("kubepods/besteffort/pod{}", pod.uid)),
            top.join(format!(
                "kubepods/besteffort/pod{}/{}",
                pod.uid, pod.container_id
            )),
        ];
        for level in &levels {
            match std::fs::create_dir(level) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", level.display()));
                }
            }
        }
        let leaf = &levels[levels.len() - 1];
        let log = self
            .layout()
            .logs_dir()
            .join(format!("pod-{}.log", pod.name));
        let pid = crate::process::spawn_in_netns(&pod.netns, program, args, &log)?;
        let process = PodProcess {
            pid,
            cgroups: levels[3..].iter().rev().cloned().collect(),
        };
        std::fs::write(leaf.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("cannot move {pid} into {}", leaf.display()))?;
        Ok(process)
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        crate::process::terminate(&[self.pid], std::time::Duration::from_secs(5));
        for cgroup in &self.cgroups {
            let _ = std::fs::remove_dir(cgroup);
        }
    }
}

/// The cgroup2 hierarchy's mount point, from this process's mount table.
fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("/proc/self/mountinfo")?;
    mounts
        .lines()
        .find_map(|line| {
            let (fields, fs) = line.split_once(" - ")?;
            let mount_point = fields.split_whitespace().nth(4)?;
            (fs.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup2 hierarchy is mounted")
}

/// The sandbox's own cgroups, under which its pods' processes sit.
fn sandbox_cgroup(name: &str) -> anyhow::Result<PathBuf> {
    Ok(cgroup2_root()?.join(format!("nodemesh-sandbox-{name}")))
}

/// Removes the sandbox's cgroups, deepest first; their processes must be gone.
pub(crate) fn remove_cgroups(name: &str) -> anyhow::Result<()> {
    let Ok(top) = sandbox_cgroup(name) else {
        return Ok(());
    };
    if !top.exists() {
        return Ok(());
    }
    fn remove(dir: &Path) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                remove(&entry.path())?;
            }
        }
        std::fs::remove_dir(dir)
    }
    remove(&top).with_context(|| format!("cannot remove the cgroups under {}", top.display()))
}
