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
    /// Local mode: a YAML file or directory of mesh objects, watched for changes.
    #[arg(long, env = "NODEMESH_CONFIG")]
    config: PathBuf,
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
    /// YAML map of node name to bootstrap token; an agent presents its node's token to get
    /// certificates for that node's workloads.
    #[arg(long)]
    node_tokens: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

/// Where the CA comes from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaSource {
    /// Created by the controller in this directory on first start.
    Directory(PathBuf),
    /// Supplied by the operator.
    Files {
        cert: PathBuf,
        key: PathBuf,
        bundle: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub config_source: PathBuf,
    pub monitoring_addr: SocketAddr,
    pub config_poll_ms: u64,
    pub trust_domain: String,
    pub ca: CaSource,
    pub ca_addr: SocketAddr,
    pub ca_server_names: Vec<String>,
    #[serde(serialize_with = "seconds")]
    pub workload_cert_ttl: Duration,
    pub node_tokens: Option<PathBuf>,
    pub log_json: bool,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
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
        let ca = match (args.ca_cert, args.ca_key) {
            (Some(cert), Some(key)) => CaSource::Files {
                cert,
                key,
                bundle: args.ca_bundle,
            },
            _ => CaSource::Directory(args.ca_dir),
        };
        Ok(Self {
            config_source: args.config,
            monitoring_addr: args.monitoring_addr,
            config_poll_ms: args.config_poll_ms.max(10),
            trust_domain: args.trust_domain,
            ca,
            ca_addr: args.ca_addr,
            ca_server_names: args.ca_server_names,
            workload_cert_ttl: args.workload_cert_ttl,
            node_tokens: args.node_tokens,
            log_json: args.log_json,
        })
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
}
