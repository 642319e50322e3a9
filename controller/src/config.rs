//! The controller's configuration: built once from the command line, dumped by
//! `/config_dump`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use serde::Serialize;

/// nodemesh controller: validates the mesh configuration, serves it, and issues workload
/// certificates.
#[derive(Debug, Parser)]
#[command(name = "nodemesh-controller", version)]
struct Args {
    /// Where the mesh's configuration comes from: `local` (a directory, --config) or
    /// `kubernetes` (the cluster the controller runs in, or --kubeconfig's).
    #[arg(long, value_enum, default_value_t = SourceKind::Local)]
    source: SourceKind,
    /// Local mode: a YAML file or directory of mesh objects, watched for changes.
    #[arg(long, env = "NODEMESH_CONFIG")]
    config: Option<PathBuf>,
    /// Kubernetes mode: a kubeconfig file to reach the API server with (instead of the
    /// in-cluster ServiceAccount).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: the controller's namespace (its Lease, CA Secret and roots ConfigMap).
    #[arg(long, env = "POD_NAMESPACE", default_value = "nodemesh-system")]
    namespace: String,
    /// Kubernetes mode: this replica's name (the Lease holder), normally its pod's.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Kubernetes mode: the Secret holding the CA (created with a new root if absent).
    /// Ignored with --ca-cert.
    #[arg(long, default_value = "nodemesh-ca")]
    ca_secret: String,
    /// Kubernetes mode: the ConfigMap the roots are published in, for agents to trust the
    /// controller by.
    #[arg(long, default_value = "nodemesh-root-ca")]
    roots_configmap: String,
    /// Kubernetes mode: the agents' ServiceAccount, as namespace/name; only its tokens are
    /// taken.
    #[arg(long, default_value = "nodemesh-system/nodemesh-agent")]
    agent_service_account: String,
    /// Kubernetes mode: the audience agents' projected tokens are for.
    #[arg(long, default_value = "nodemesh")]
    token_audience: String,
    /// Monitoring endpoint: /healthz, /readyz, /config_dump, /metrics.
    #[arg(long, default_value = "0.0.0.0:15014")]
    monitoring_addr: SocketAddr,
    /// How often to look for configuration changes, in milliseconds.
    #[arg(long, default_value_t = 250)]
    config_poll_ms: u64,
    /// The SPIFFE trust domain of the mesh.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Directory of the CA the controller creates on first start (ca-cert.pem, ca-key.pem,
    /// optional trust-bundle.pem with more roots). Ignored with --ca-cert.
    #[arg(long, default_value = "/var/lib/nodemesh/ca")]
    ca_dir: PathBuf,
    /// An operator-supplied CA certificate (root or intermediate, optionally followed by the
    /// intermediates above it), to chain nodemesh into an existing PKI.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The private key of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The roots to trust (PEM, several allowed). Required when --ca-cert is an intermediate.
    #[arg(long, requires = "ca_cert")]
    ca_bundle: Option<PathBuf>,
    /// The certificate API (HTTPS).
    #[arg(long, default_value = "0.0.0.0:15012")]
    ca_addr: SocketAddr,
    /// Names (DNS or IP) agents use to reach the certificate API; its serving certificate
    /// carries them. Comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "nodemesh-controller,nodemesh-controller.nodemesh-system.svc"
    )]
    ca_server_names: Vec<String>,
    /// Lifetime of workload certificates, such as 24h, 30m or 90s.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    workload_cert_ttl: Duration,
    /// Local mode: YAML map of node name to bootstrap token; an agent presents its node's
    /// token to get certificates for that node's workloads.
    #[arg(long)]
    node_tokens: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SourceKind {
    Local,
    Kubernetes,
}

/// Where the configuration comes from, and what that mode needs.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Local {
        path: PathBuf,
        node_tokens: Option<PathBuf>,
    },
    Kubernetes(KubernetesSettings),
}

#[derive(Debug, Clone, Serialize)]
pub struct KubernetesSettings {
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    pub identity: String,
    pub ca_secret: String,
    pub roots_configmap: String,
    /// (namespace, name).
    pub agent_service_account: (String, String),
    pub token_audience: String,
}

/// Where the CA comes from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaSource {
    /// Created by the controller in this directory on first start.
    Directory(PathBuf),
    /// Kubernetes mode: the Secret named in the settings, created on first start.
    Secret,
    /// Supplied by the operator.
    Files {
        cert: PathBuf,
        key: PathBuf,
        bundle: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub source: Source,
    pub monitoring_addr: SocketAddr,
    pub config_poll_ms: u64,
    pub trust_domain: String,
    pub ca: CaSource,
    pub ca_addr: SocketAddr,
    pub ca_server_names: Vec<String>,
    #[serde(serialize_with = "seconds")]
    pub workload_cert_ttl: Duration,
    pub log_json: bool,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// This machine's name: the lease holder when no --identity is given.
fn hostname() -> Result<String, String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .ok_or_else(|| "cannot read this host's name; give --identity".to_owned())
}

/// Parses `90s`, `30m`, `24h` or `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; use a number and s, m, h or d (24h)"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => {
            return Err(format!(
                "{text:?} has no unit; use s, m, h or d, such as 24h"
            ));
        }
    };
    Ok(Duration::from_secs(seconds))
}

impl Config {
    pub fn from_args() -> Result<Self, String> {
        Self::from_parsed(Args::parse())
    }

    fn from_parsed(args: Args) -> Result<Self, String> {
        if args.workload_cert_ttl < Duration::from_secs(10) {
            return Err("--workload-cert-ttl must be at least 10s".to_owned());
        }
        if args.ca_server_names.iter().all(String::is_empty) {
            return Err("--ca-server-names needs at least one name".to_owned());
        }
        let source = match args.source {
            SourceKind::Local => Source::Local {
                path: args
                    .config
                    .ok_or("--config is required in local mode (or use --source kubernetes)")?,
                node_tokens: args.node_tokens,
            },
            SourceKind::Kubernetes => {
                if args.node_tokens.is_some() {
                    return Err(
                        "--node-tokens is for local mode; in Kubernetes agents prove \
                                their node with their ServiceAccount token"
                            .to_owned(),
                    );
                }
                let agent_service_account = args
                    .agent_service_account
                    .split_once('/')
                    .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
                    .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
                    .ok_or_else(|| {
                        format!(
                            "--agent-service-account {:?} is not namespace/name",
                            args.agent_service_account
                        )
                    })?;
                let identity = match args.identity.filter(|i| !i.is_empty()) {
                    Some(identity) => identity,
                    None => hostname()?,
                };
                Source::Kubernetes(KubernetesSettings {
                    kubeconfig: args.kubeconfig,
                    namespace: args.namespace,
                    identity,
                    ca_secret: args.ca_secret,
                    roots_configmap: args.roots_configmap,
                    agent_service_account,
                    token_audience: args.token_audience,
                })
            }
        };
        let ca = match (args.ca_cert, args.ca_key, &source) {
            (Some(cert), Some(key), _) => CaSource::Files {
                cert,
                key,
                bundle: args.ca_bundle,
            },
            (_, _, Source::Kubernetes(_)) => CaSource::Secret,
            _ => CaSource::Directory(args.ca_dir),
        };
        Ok(Self {
            source,
            monitoring_addr: args.monitoring_addr,
            config_poll_ms: args.config_poll_ms.max(10),
            trust_domain: args.trust_domain,
            ca,
            ca_addr: args.ca_addr,
            ca_server_names: args.ca_server_names,
            workload_cert_ttl: args.workload_cert_ttl,
            log_json: args.log_json,
        })
    }
}

#[cfg(test)]
impl Config {
    /// A Kubernetes-mode configuration, as `--source kubernetes --identity <name>` gives it.
    pub fn kubernetes_for_tests(identity: &str) -> Self {
        let args = Args::try_parse_from([
            "nodemesh-controller",
            "--source",
            "kubernetes",
            "--identity",
            identity,
        ])
        .expect("arguments");
        Self::from_parsed(args).expect("valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("24").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5w").is_err());
    }

    #[test]
    fn operator_ca_files_replace_the_directory() {
        let args = Args::try_parse_from([
            "nodemesh-controller",
            "--config",
            "/c",
            "--ca-cert",
            "/pki/int.pem",
            "--ca-key",
            "/pki/int-key.pem",
            "--ca-bundle",
            "/pki/roots.pem",
        ])
        .expect("valid");
        let config = Config::from_parsed(args).expect("valid");
        assert!(matches!(
            config.ca,
            CaSource::Files {
                bundle: Some(_),
                ..
            }
        ));
        let only_key =
            Args::try_parse_from(["nodemesh-controller", "--config", "/c", "--ca-key", "/k"]);
        assert!(
            only_key.is_err(),
            "a key without its certificate is refused"
        );
    }

    #[test]
    fn kubernetes_mode_needs_no_directory_and_takes_no_node_tokens() {
        let parse = |args: &[&str]| {
            Args::try_parse_from(["nodemesh-controller"].iter().chain(args))
                .map_err(|e| e.to_string())
                .and_then(Config::from_parsed)
        };
        let config = parse(&["--source", "kubernetes", "--identity", "ctrl-0"]).expect("valid");
        let Source::Kubernetes(settings) = &config.source else {
            panic!("kubernetes source");
        };
        assert_eq!(
            settings.agent_service_account,
            ("nodemesh-system".to_owned(), "nodemesh-agent".to_owned())
        );
        assert!(matches!(config.ca, CaSource::Secret));
        assert!(parse(&["--source", "kubernetes", "--node-tokens", "/t"]).is_err());
        assert!(parse(&["--source", "kubernetes", "--agent-service-account", "agent"]).is_err());
        assert!(parse(&[]).is_err(), "local mode needs --config");
    }
}
