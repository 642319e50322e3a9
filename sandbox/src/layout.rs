//! Names and addresses of everything in a sandbox, derived from its name and shape alone.
//!
//! Addresses (each sandbox is its own set of namespaces, so they repeat between sandboxes):
//! - fabric bridge `br0` in namespace `<name>-fabric`, 10.88.0.254/24, where the controller
//!   runs;
//! - node `n<i>`: namespace `<name>-n<i>`, uplink `eth0` 10.88.0.<i>/24, pods in 10.88.<i>.0/24
//!   behind gateway 10.88.<i>.1;
//! - enrolled pod `n<i>-p<j>` (namespace `default`): 10.88.<i>.<1+j>, in `<name>-n<i>-p<j>`;
//! - legacy pods `n<i>-legacy`, `n<i>-legacy2`, ... (namespace `legacy`, not enrolled):
//!   10.88.<i>.250, .249, ...

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use crate::{STATE_ROOT, Spec, Status};

pub const ADMIN_PORT: u16 = 15000;
pub const CONTROLLER_MONITORING_PORT: u16 = 15014;
pub const CONTROLLER_CA_PORT: u16 = 15012;
pub const METRICS_PORT: u16 = 15020;
pub const READINESS_PORT: u16 = 15021;
pub const HTTP_PORT: u16 = 8080;
pub const ECHO_PORT: u16 = 9000;
/// The Kubernetes namespace of the enrolled pods, labelled for the mesh.
pub const MESH_NAMESPACE: &str = "default";
/// The Kubernetes namespace of the pods left out of the mesh.
pub const LEGACY_NAMESPACE: &str = "legacy";

#[derive(Debug, Clone)]
pub struct Layout {
    pub name: String,
    pub nodes: usize,
    pub pods: usize,
    pub bin_dir: PathBuf,
    pub workload_cert_ttl: std::time::Duration,
    pub prometheus: bool,
    pub legacy_pods: usize,
    /// Extra labels, as (pod, key, value).
    pub labels: Vec<(String, String, String)>,
    pub agent_args: Vec<String>,
    pub agent_wrapper: Vec<String>,
    /// The operator's root CA (certificate, key) to install, if one was given.
    pub ca: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct NodePlan {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub index: usize,
}

#[derive(Debug, Clone)]
pub struct PodPlan {
    pub name: String,
    pub namespace: &'static str,
    pub service_account: String,
    pub node: String,
    pub node_netns: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// The pod's veth as seen in the node's namespace.
    pub host_if: String,
    pub enrolled: bool,
    /// `app=<name>` and the extra labels given for it.
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Layout {
    pub fn new(spec: &Spec) -> Self {
        Self {
            name: spec.name.clone(),
            nodes: spec.nodes,
            pods: spec.pods,
            bin_dir: spec.bin_dir.clone(),
            workload_cert_ttl: spec.workload_cert_ttl,
            prometheus: spec.prometheus,
            legacy_pods: spec.legacy_pods,
            labels: spec.labels.clone(),
            agent_args: spec.agent_args.clone(),
            agent_wrapper: spec.agent_wrapper.clone(),
            ca: spec.ca.clone(),
        }
    }

    pub fn from_status(status: &Status) -> Self {
        Self {
            name: status.name.clone(),
            nodes: status.nodes.len(),
            pods: status.pods.iter().filter(|p| p.enrolled).count() / status.nodes.len().max(1),
            bin_dir: status.bin_dir.clone(),
            workload_cert_ttl: std::time::Duration::from_secs(
                status.controller.workload_cert_ttl_seconds,
            ),
            prometheus: status.prometheus.is_some(),
            legacy_pods: status.pods.iter().filter(|p| !p.enrolled).count()
                / status.nodes.len().max(1),
            labels: status
                .pods
                .iter()
                .flat_map(|p| {
                    p.labels
                        .iter()
                        .filter(|(k, _)| *k != "app")
                        .map(|(k, v)| (p.name.clone(), k.clone(), v.clone()))
                })
                .collect(),
            agent_args: status.agent_args.clone(),
            agent_wrapper: status.agent_wrapper.clone(),
            // Installed already: the controller keeps it in its CA directory.
            ca: None,
        }
    }

    /// `app=<name>` and the extra labels of pod `name`.
    fn labels_of(&self, name: &str) -> std::collections::BTreeMap<String, String> {
        let mut labels: std::collections::BTreeMap<String, String> =
            [("app".to_owned(), name.to_owned())].into();
        for (pod, key, value) in &self.labels {
            if pod == name {
                labels.insert(key.clone(), value.clone());
            }
        }
        labels
    }

    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from(STATE_ROOT).join(&self.name)
    }

    pub fn config_dir(&self) -> PathBuf {
        self.state_dir().join("config")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.state_dir().join("logs")
    }

    /// The controller's CA: `ca-cert.pem` is the root agents trust.
    pub fn ca_dir(&self) -> PathBuf {
        self.state_dir().join("controller/ca")
    }

    pub fn node_tokens_file(&self) -> PathBuf {
        self.state_dir().join("controller/node-tokens.yaml")
    }

    /// The agent's access log: one JSON line per connection and HTTP request.
    pub fn access_log(&self, node: &NodePlan) -> PathBuf {
        self.logs_dir().join(format!("access-{}.log", node.name))
    }

    /// Where the node's agent pins its datapath: apart from other sandboxes' nodes of the
    /// same name, and from a real node's `/sys/fs/bpf/nodemesh/<node>`.
    pub fn pin_dir(&self, node: &NodePlan) -> PathBuf {
        pins_of(&self.name).join(&node.name)
    }

    pub fn token_file(&self, node: &NodePlan) -> PathBuf {
        self.state_dir().join(format!("tokens/{}.token", node.name))
    }

    pub fn ca_api_addr(&self) -> SocketAddr {
        SocketAddr::from((self.fabric_ip(), CONTROLLER_CA_PORT))
    }

    pub fn fabric_netns(&self) -> String {
        format!("{}-fabric", self.name)
    }

    pub fn fabric_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 88, 0, 254)
    }

    pub fn controller_addr(&self) -> SocketAddr {
        SocketAddr::from((self.fabric_ip(), CONTROLLER_MONITORING_PORT))
    }

    pub fn node(&self, index: usize) -> NodePlan {
        let n = index + 1;
        NodePlan {
            name: format!("n{n}"),
            netns: format!("{}-n{n}", self.name),
            ip: Ipv4Addr::new(10, 88, 0, n as u8),
            gateway: Ipv4Addr::new(10, 88, n as u8, 1),
            index,
        }
    }

    pub fn all_nodes(&self) -> Vec<NodePlan> {
        (0..self.nodes).map(|i| self.node(i)).collect()
    }

    /// The pods of one node: the enrolled ones, then the legacy one.
    pub fn pods_of(&self, node: &NodePlan) -> Vec<PodPlan> {
        let n = node.index + 1;
        let enrolled = (1..=self.pods).map(|j| PodPlan {
            name: format!("n{n}-p{j}"),
            namespace: MESH_NAMESPACE,
            service_account: format!("n{n}-p{j}"),
            node: node.name.clone(),
            node_netns: node.netns.clone(),
            netns: format!("{}-n{n}-p{j}", self.name),
            ip: Ipv4Addr::new(10, 88, n as u8, (1 + j) as u8),
            gateway: node.gateway,
            host_if: format!("p{j}"),
            enrolled: true,
            labels: self.labels_of(&format!("n{n}-p{j}")),
        });
        let legacy = (1..=self.legacy_pods).map(|k| {
            let suffix = if k == 1 { String::new() } else { k.to_string() };
            PodPlan {
                name: format!("n{n}-legacy{suffix}"),
                namespace: LEGACY_NAMESPACE,
                service_account: "default".to_owned(),
                node: node.name.clone(),
                node_netns: node.netns.clone(),
                netns: format!("{}-n{n}-legacy{suffix}", self.name),
                ip: Ipv4Addr::new(10, 88, n as u8, (251 - k) as u8),
                gateway: node.gateway,
                host_if: format!("legacy{suffix}"),
                enrolled: false,
                labels: self.labels_of(&format!("n{n}-legacy{suffix}")),
            }
        });
        enrolled.chain(legacy).collect()
    }

    pub fn all_pods(&self) -> Vec<PodPlan> {
        self.all_nodes()
            .iter()
            .flat_map(|n| self.pods_of(n))
            .collect()
    }

    pub fn admin_addr(&self, node: &NodePlan) -> SocketAddr {
        SocketAddr::from((node.ip, ADMIN_PORT))
    }

    pub fn metrics_addr(&self, node: &NodePlan) -> SocketAddr {
        SocketAddr::from((node.ip, METRICS_PORT))
    }

    pub fn readiness_addr(&self, node: &NodePlan) -> SocketAddr {
        SocketAddr::from((node.ip, READINESS_PORT))
    }
}

/// The path of a named network namespace.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Every pin directory of the sandbox `name`.
pub fn pins_of(name: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/nodemesh").join(format!("sandbox-{name}"))
}
