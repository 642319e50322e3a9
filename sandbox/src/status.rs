//! The sandbox's state file, which is also what `sandbox status --json` prints.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{
    STATE_ROOT, Spec,
    layout::{self, Layout, netns_path},
    process::is_alive,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    /// The arguments every agent gets beyond the sandbox's own.
    #[serde(default)]
    pub agent_args: Vec<String>,
    /// A command the agents run under (`setpriv ...`), its arguments first.
    #[serde(default)]
    pub agent_wrapper: Vec<String>,
    /// The mesh configuration the agents watch; edit it to change the mesh live.
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub fabric: FabricStatus,
    pub controller: ControllerStatus,
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<PodStatus>,
    /// The Prometheus server scraping the mesh, with `sandbox up --prometheus`.
    pub prometheus: Option<PrometheusStatus>,
    /// How long `up` took.
    pub up_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FabricStatus {
    pub netns: String,
    pub bridge: String,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrometheusStatus {
    pub pid: i32,
    /// The namespace the URL is reachable from.
    pub netns: Option<String>,
    /// Prometheus's HTTP API and UI, such as `http://10.88.0.254:9090`.
    pub url: String,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerStatus {
    pub pid: i32,
    /// The controller runs in the fabric namespace, reachable from every node.
    pub netns: String,
    /// /healthz, /readyz, /config_dump, /metrics; reachable from inside `netns`.
    pub monitoring: SocketAddr,
    /// The certificate API (HTTPS), reachable from every node.
    pub ca_api: SocketAddr,
    /// The mesh's root certificate.
    pub ca_cert: PathBuf,
    pub ca_dir: PathBuf,
    pub workload_cert_ttl_seconds: u64,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The node-namespace interface that carries traffic to other nodes.
    pub uplink: String,
    pub pod_cidr: String,
    pub agent: AgentStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    pub pid: i32,
    /// Reachable from inside the node's namespace.
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
    pub log: PathBuf,
    /// JSON lines, one per proxied connection and HTTP request.
    pub access_log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodStatus {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub enrolled: bool,
    /// The SPIFFE identity of an enrolled pod; null for pods outside the mesh.
    pub identity: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub server: ServerStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerStatus {
    pub pid: i32,
    pub http: SocketAddr,
    pub echo: SocketAddr,
    pub log: PathBuf,
}

impl Status {
    /// The status of a sandbox about to be started: everything but process ids.
    pub(crate) fn planned(layout: &Layout) -> Self {
        let nodes = layout
            .all_nodes()
            .into_iter()
            .map(|node| NodeStatus {
                agent: AgentStatus {
                    pid: 0,
                    admin: layout.admin_addr(&node),
                    metrics: layout.metrics_addr(&node),
                    readiness: layout.readiness_addr(&node),
                    log: layout.logs_dir().join(format!("agent-{}.log", node.name)),
                    access_log: layout.access_log(&node),
                },
                pod_cidr: format!("10.88.{}.0/24", node.index + 1),
                uplink: "eth0".to_owned(),
                ip: node.ip,
                netns: node.netns,
                name: node.name,
            })
            .collect();
        let pods = layout
            .all_pods()
            .into_iter()
            .map(|pod| PodStatus {
                identity: pod.enrolled.then(|| {
                    format!(
                        "spiffe://cluster.local/ns/{}/sa/{}",
                        pod.namespace, pod.service_account
                    )
                }),
                labels: pod.labels.clone(),
                server: ServerStatus {
                    pid: 0,
                    http: SocketAddr::from((pod.ip, layout::HTTP_PORT)),
                    echo: SocketAddr::from((pod.ip, layout::ECHO_PORT)),
                    log: layout.logs_dir().join(format!("server-{}.log", pod.name)),
                },
                name: pod.name,
                namespace: pod.namespace.to_owned(),
                service_account: pod.service_account,
                node: pod.node,
                netns: pod.netns,
                ip: pod.ip,
                enrolled: pod.enrolled,
            })
            .collect();
        Self {
            name: layout.name.clone(),
            agent_args: layout.agent_args.clone(),
            agent_wrapper: layout.agent_wrapper.clone(),
            config_dir: layout.config_dir(),
            state_dir: layout.state_dir(),
            bin_dir: layout.bin_dir.clone(),
            fabric: FabricStatus {
                netns: layout.fabric_netns(),
                bridge: "br0".to_owned(),
                ip: layout.fabric_ip(),
            },
            controller: ControllerStatus {
                pid: 0,
                netns: layout.fabric_netns(),
                monitoring: layout.controller_addr(),
                ca_api: layout.ca_api_addr(),
                ca_cert: layout.ca_dir().join("ca-cert.pem"),
                ca_dir: layout.ca_dir(),
                workload_cert_ttl_seconds: layout.workload_cert_ttl.as_secs(),
                log: layout.logs_dir().join("controller.log"),
            },
            nodes,
            pods,
            prometheus: None,
            up_seconds: 0.0,
        }
    }

    fn file(name: &str) -> PathBuf {
        Path::new(STATE_ROOT).join(name).join("state.json")
    }

    /// The saved status of sandbox `name`, if there is one.
    pub fn load(name: &str) -> anyhow::Result<Option<Self>> {
        let file = Self::file(name);
        match fs::read(&file) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not a sandbox state file", file.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", file.display())),
        }
    }

    pub(crate) fn save(&self) -> anyhow::Result<()> {
        let file = Self::file(&self.name);
        let tmp = file.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, &file).with_context(|| format!("cannot write {}", file.display()))?;
        Ok(())
    }

    pub(crate) fn is_shape(&self, spec: &Spec) -> bool {
        let layout = Layout::from_status(self);
        layout.nodes == spec.nodes
            && layout.pods == spec.pods
            && self.bin_dir == spec.bin_dir
            && layout.workload_cert_ttl == spec.workload_cert_ttl
            && layout.prometheus == spec.prometheus
            && layout.legacy_pods == spec.legacy_pods
            && {
                let mut mine = layout.labels.clone();
                let mut wanted = spec.labels.clone();
                mine.sort();
                wanted.sort();
                mine == wanted
            }
    }

    /// Every process alive and every namespace present.
    pub fn is_running(&self) -> bool {
        self.pids().iter().all(|&pid| pid > 0 && is_alive(pid))
            && self
                .nodes
                .iter()
                .map(|n| &n.netns)
                .chain(self.pods.iter().map(|p| &p.netns))
                .all(|ns| netns_path(ns).exists())
    }

    pub fn pids(&self) -> Vec<i32> {
        std::iter::once(self.controller.pid)
            .chain(self.prometheus.as_ref().map(|p| p.pid))
            .chain(self.nodes.iter().map(|n| n.agent.pid))
            .chain(self.pods.iter().map(|p| p.server.pid))
            .filter(|&pid| pid > 0)
            .collect()
    }
}
