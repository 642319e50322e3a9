//! The agent's configuration: built once from the command line (and the matching environment
//! variables a DaemonSet sets), then shared read-only and dumped by the admin endpoint.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::Parser;

use crate::telemetry::AccessLogTarget;
use serde::Serialize;

/// nodemesh node agent: loads the eBPF capture programs and runs the node proxy.
#[derive(Debug, Parser)]
#[command(name = "nodemesh-agent", version)]
struct Args {
    /// Name of this node; the agent serves the workloads assigned to it.
    #[arg(long, env = "NODE_NAME")]
    node: String,

    /// Where the agent keeps what must survive a restart (the last good snapshot).
    #[arg(
        long,
        env = "NODEMESH_STATE_DIR",
        default_value = "/var/lib/nodemesh/agent"
    )]
    state_dir: PathBuf,

    /// The compiled eBPF object. Defaults to `nodemesh-ebpf.o` next to this binary.
    #[arg(long, env = "NODEMESH_EBPF_OBJECT")]
    ebpf_object: Option<PathBuf>,

    /// The cgroup2 directory to attach the connect hooks to. Defaults to the cgroup2 root:
    /// /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,

    /// SO_MARK set on every proxy socket, so that the capture hooks leave them alone.
    #[arg(long, default_value_t = DEFAULT_PROXY_MARK, value_parser = parse_u32)]
    proxy_mark: u32,

    /// SO_MARK of the proxy's connections to applications that carry the client's address;
    /// a routing rule in each pod sends the replies back to the proxy by this mark.
    #[arg(long, default_value_t = DEFAULT_TRANSPARENT_MARK, value_parser = parse_u32)]
    transparent_mark: u32,

    /// Where the capture programs, links and maps are pinned, so that capture outlives the
    /// agent. Must be on bpffs. Defaults to /sys/fs/bpf/nodemesh/<node>.
    #[arg(long, env = "NODEMESH_BPF_PIN_DIR")]
    bpf_pin_dir: Option<PathBuf>,

    /// Remove the mesh from this node on purpose: detach every capture program this node's
    /// agent pinned and free its maps, then exit. Stop the agent first.
    #[arg(long)]
    uninstall: bool,

    /// On SIGTERM, how long open connections may go on before they are closed (seconds).
    #[arg(long, default_value_t = 30)]
    drain_seconds: u64,

    /// Connections the proxy keeps open at most, every pod together; more are closed at once.
    #[arg(long, default_value_t = 131_072)]
    max_connections: usize,

    /// Connections the proxy keeps open at most from one source address.
    #[arg(long, default_value_t = 16_384)]
    max_connections_per_source: usize,

    /// Seconds a byte-stream connection may carry nothing either way before it is closed
    /// (one to two times this); 0 keeps them open for ever. Envoy's TCP proxy default.
    #[arg(long, default_value_t = 3600)]
    tcp_idle_timeout: u64,

    /// Listen at this unix socket for the `nodemesh-cni` plugin, which hands over each new
    /// pod's network namespace and waits until the pod is enrolled.
    #[arg(long, env = "NODEMESH_CNI_SOCKET")]
    cni_socket: Option<PathBuf>,

    /// Keep nodemesh-cni in the node's CNI configuration (this directory, such as
    /// /etc/cni/net.d): put it back whenever the network plugin rewrites its file. Needs
    /// --cni-socket.
    #[arg(long, requires = "cni_socket")]
    cni_conf_dir: Option<PathBuf>,

    /// Namespaces whose pods the CNI plugin never hands over (with --cni-conf-dir).
    #[arg(long, value_delimiter = ',', default_value = "kube-system")]
    cni_exclude_namespaces: Vec<String>,

    /// With the agent unreachable, let pods that may belong in the mesh start without it
    /// (with --cni-conf-dir). Off: their creation fails until the agent is back.
    #[arg(long)]
    cni_fail_open: bool,

    /// Open network namespaces at the paths the configuration names (local mode). Kubernetes
    /// mode sets it false: namespaces come only from the CNI plugin and from /proc.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    netns_from_config: bool,

    /// Look under /proc for the namespaces of pods that were running before the agent.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    discover_pods: bool,

    /// Where the host's /proc is (the DaemonSet mounts it elsewhere when not hostPID).
    #[arg(long, default_value = "/proc")]
    proc_root: PathBuf,

    /// The controller's certificate API, https://host:port.
    #[arg(
        long,
        env = "NODEMESH_CONTROLLER",
        required_unless_present = "uninstall"
    )]
    controller: Option<String>,

    /// The roots (PEM) the controller's serving certificate chains to.
    #[arg(
        long,
        env = "NODEMESH_CONTROLLER_CA",
        required_unless_present = "uninstall"
    )]
    controller_ca: Option<PathBuf>,

    /// File holding this node's bootstrap token for the certificate API.
    #[arg(
        long,
        env = "NODEMESH_TOKEN_FILE",
        required_unless_present = "uninstall"
    )]
    token_file: Option<PathBuf>,

    /// The SPIFFE trust domain of the mesh.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,

    /// Admin endpoint (config dump, workloads, connections). Keep it on the node.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,

    /// Prometheus metrics endpoint.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,

    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,

    /// Proxy workers: threads with a runtime and a set of listeners in every pod each (the
    /// kernel spreads connections among them). Defaults to the number of CPUs.
    #[arg(long, env = "NODEMESH_WORKER_THREADS")]
    worker_threads: Option<usize>,

    /// Access log: off, stdout, or a file to append JSON lines to.
    #[arg(long, default_value = "off")]
    access_log: String,

    /// Share of connections and requests written to the access log (0.0 to 1.0).
    #[arg(long, default_value_t = 1.0)]
    access_log_sample: f64,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// The mark nodemesh puts on its proxy sockets by default ("NM").
pub const DEFAULT_PROXY_MARK: u32 = 0x4e4d;
/// The mark of the proxy's transparent connections to applications by default.
pub const DEFAULT_TRANSPARENT_MARK: u32 = 0x4e4e;

fn parse_u32(value: &str) -> Result<u32, String> {
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|e| format!("{value:?} is not a 32-bit number (decimal or 0x hex): {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Ports of the proxy inside every enrolled pod's network namespace (Istio's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InPodPorts {
    pub outbound: u16,
    pub inbound: u16,
    pub hbone: u16,
    pub dns: u16,
}

impl Default for InPodPorts {
    fn default() -> Self {
        Self {
            outbound: 15001,
            inbound: 15006,
            hbone: 15008,
            dns: 15053,
        }
    }
}

/// The node's CNI configuration, kept chaining nodemesh-cni.
#[derive(Debug, Clone, Serialize)]
pub struct CniConf {
    pub dir: PathBuf,
    pub exclude_namespaces: Vec<String>,
    pub fail_open: bool,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Config>),
    /// `--uninstall`: remove what the agent pinned in this directory.
    Uninstall {
        pin_dir: PathBuf,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub node: String,
    pub state_dir: PathBuf,
    pub ebpf_object: PathBuf,
    pub cgroup_root: Option<PathBuf>,
    pub bpf_pin_dir: PathBuf,
    /// How long open connections may go on after SIGTERM.
    pub drain: std::time::Duration,
    /// Caps on open connections: the node's, and one source address's.
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    /// `None` when off.
    pub tcp_idle_timeout: Option<std::time::Duration>,
    pub proxy_mark: u32,
    pub transparent_mark: u32,
    /// Where the CNI plugin reaches the agent; `None` when off.
    pub cni_socket: Option<PathBuf>,
    /// The CNI configuration directory the agent keeps nodemesh-cni in, and how.
    pub cni_conf: Option<CniConf>,
    pub netns_from_config: bool,
    pub discover_pods: bool,
    pub proc_root: PathBuf,
    pub controller: String,
    pub controller_ca: PathBuf,
    pub token_file: PathBuf,
    pub trust_domain: String,
    pub ports: InPodPorts,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub worker_threads: usize,
    pub log_format: LogFormat,
    /// `None` when off.
    pub access_log: Option<AccessLogTarget>,
    pub access_log_sample: f64,
}

impl Config {
    /// Parses the command line; exits with clap's message on bad input.
    pub fn from_args() -> Result<Command, String> {
        let args = Args::parse();
        let pin_dir = pin_dir(&args)?;
        if args.uninstall {
            return Ok(Command::Uninstall { pin_dir });
        }
        Self::from_parsed(args).map(|config| Command::Run(Box::new(config)))
    }

    fn from_parsed(args: Args) -> Result<Self, String> {
        let bpf_pin_dir = pin_dir(&args)?;
        let (Some(controller), Some(controller_ca), Some(token_file)) =
            (args.controller, args.controller_ca, args.token_file)
        else {
            return Err("--controller, --controller-ca and --token-file are required".to_owned());
        };
        if args.proxy_mark == 0 || args.transparent_mark == 0 {
            return Err(
                "--proxy-mark and --transparent-mark must not be 0: unmarked sockets would \
                 count as the proxy's"
                    .into(),
            );
        }
        if args.max_connections == 0 || args.max_connections_per_source == 0 {
            return Err(
                "--max-connections and --max-connections-per-source must be at least 1".into(),
            );
        }
        if args.proxy_mark == args.transparent_mark {
            return Err("--proxy-mark and --transparent-mark must differ".into());
        }

        let ebpf_object = match args.ebpf_object {
            Some(path) => path,
            None => default_ebpf_object()?,
        };
        let worker_threads = args
            .worker_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
        Ok(Self {
            node: args.node,
            state_dir: args.state_dir,
            ebpf_object,
            cgroup_root: args.cgroup_root,
            bpf_pin_dir,
            drain: std::time::Duration::from_secs(args.drain_seconds),
            max_connections: args.max_connections,
            max_connections_per_source: args.max_connections_per_source,
            tcp_idle_timeout: (args.tcp_idle_timeout > 0)
                .then(|| std::time::Duration::from_secs(args.tcp_idle_timeout)),
            proxy_mark: args.proxy_mark,
            transparent_mark: args.transparent_mark,
            cni_conf: args.cni_conf_dir.map(|dir| CniConf {
                dir,
                exclude_namespaces: args.cni_exclude_namespaces,
                fail_open: args.cni_fail_open,
            }),
            cni_socket: args.cni_socket,
            netns_from_config: args.netns_from_config,
            discover_pods: args.discover_pods,
            proc_root: args.proc_root,
            controller,
            controller_ca,
            token_file,
            trust_domain: args.trust_domain,
            ports: InPodPorts::default(),
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            readiness_addr: args.readiness_addr,
            worker_threads: worker_threads.max(1),
            access_log: match args.access_log.as_str() {
                "off" => None,
                other => Some(other.parse()?),
            },
            access_log_sample: if (0.0..=1.0).contains(&args.access_log_sample) {
                args.access_log_sample
            } else {
                return Err(format!(
                    "--access-log-sample {} is not between 0.0 and 1.0",
                    args.access_log_sample
                ));
            },
            log_format: args.log_format,
        })
    }
}

/// The pin directory: the one given, or one per node under /sys/fs/bpf/nodemesh, so agents of
/// several nodes on one kernel (the sandbox) keep apart.
fn pin_dir(args: &Args) -> Result<PathBuf, String> {
    if args.node.is_empty() {
        return Err("--node is empty; give this node's name".to_owned());
    }
    if args.node.contains('/') || args.node.starts_with('.') {
        return Err(format!(
            "--node {:?} cannot name a pin directory; use a Kubernetes node name",
            args.node
        ));
    }
    Ok(args
        .bpf_pin_dir
        .clone()
        .unwrap_or_else(|| Path::new("/sys/fs/bpf/nodemesh").join(&args.node)))
}

fn default_ebpf_object() -> Result<PathBuf, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this binary's path to locate the eBPF object: {e}"))?;
    Ok(exe
        .parent()
        .unwrap_or(Path::new("/"))
        .join("nodemesh-ebpf.o"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let args = Args::try_parse_from(
            [
                "nodemesh-agent",
                "--node",
                "n1",
                "--controller",
                "https://10.0.0.1:15012",
                "--controller-ca",
                "/etc/nodemesh/ca.pem",
                "--token-file",
                "/etc/nodemesh/token",
            ]
            .iter()
            .chain(args),
        )
        .map_err(|e| e.to_string())?;
        Config::from_parsed(args)
    }

    #[test]
    fn defaults_follow_istio_port_numbers() {
        let config = parse(&["--ebpf-object", "/x.o"]).expect("valid");
        assert_eq!(config.ports.outbound, 15001);
        assert_eq!(config.ports.inbound, 15006);
        assert_eq!(config.ports.hbone, 15008);
        assert_eq!(config.admin_addr.port(), 15000);
        assert_eq!(config.metrics_addr.port(), 15020);
        assert_eq!(config.readiness_addr.port(), 15021);
        assert_eq!(config.proxy_mark, DEFAULT_PROXY_MARK);
        assert_eq!(config.bpf_pin_dir, Path::new("/sys/fs/bpf/nodemesh/n1"));
        assert_eq!(config.drain, std::time::Duration::from_secs(30));
    }

    #[test]
    fn uninstall_needs_only_the_node() {
        let args = Args::try_parse_from(["nodemesh-agent", "--node", "n1", "--uninstall"])
            .expect("no controller needed");
        assert_eq!(
            pin_dir(&args).expect("valid"),
            Path::new("/sys/fs/bpf/nodemesh/n1")
        );
        let args = Args::try_parse_from(["nodemesh-agent", "--node", "n1"]);
        assert!(args.is_err(), "running needs the controller");
        let args = Args::try_parse_from(["nodemesh-agent", "--node", "../x", "--uninstall"])
            .expect("parses");
        assert!(pin_dir(&args).is_err(), "a node name is not a path");
    }

    #[test]
    fn kubernetes_mode_takes_namespaces_only_from_the_cni_plugin_and_proc() {
        let local = parse(&["--ebpf-object", "/x.o"]).expect("valid");
        assert!(local.netns_from_config && local.cni_socket.is_none());
        let kubernetes = parse(&[
            "--ebpf-object",
            "/x.o",
            "--netns-from-config",
            "false",
            "--cni-socket",
            "/var/run/nodemesh/cni.sock",
            "--cni-conf-dir",
            "/etc/cni/net.d",
            "--proc-root",
            "/host/proc",
        ])
        .expect("valid");
        assert!(!kubernetes.netns_from_config);
        assert_eq!(
            kubernetes.cni_conf.expect("kept").exclude_namespaces,
            ["kube-system"]
        );
        assert!(
            parse(&["--ebpf-object", "/x.o", "--cni-conf-dir", "/etc/cni/net.d"]).is_err(),
            "the plugin needs a socket to reach"
        );
    }

    #[test]
    fn mark_accepts_hex_and_refuses_zero() {
        assert_eq!(
            parse(&["--proxy-mark", "0x539"]).expect("hex").proxy_mark,
            0x539
        );
        assert!(parse(&["--proxy-mark", "0"]).is_err());
        assert!(
            parse(&["--proxy-mark", "0x4e4e"]).is_err(),
            "must differ from the transparent mark"
        );
        assert!(parse(&["--proxy-mark", "zz"]).is_err());
    }
}
