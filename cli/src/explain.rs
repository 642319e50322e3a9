//! `nodemesh explain`: what the mesh does with a connection or request, to a workload or to
//! a Service (then: the route rule, the backends and their weights, the settings, each
//! endpoint's verdict and health).

mod route;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
};

use std::os::unix::ffi::OsStrExt as _;

use anyhow::{Context as _, bail};
use nodemesh_config::MeshConfig;
use nodemesh_policy::{HttpAttributes, PathExplanation, Question, Reason, Step, explain_path};

use crate::source::{self, Loaded};

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The client: a workload (`name` or `namespace/name`) or an IPv4 address.
    #[arg(long)]
    from: String,
    /// The destination: `workload:port`, `namespace/workload:port`, a Service
    /// (`service:port`, `namespace/service:port`, `clusterIP:port`) or `ip:port`.
    #[arg(long)]
    to: String,
    /// Judge an HTTP request with this method (otherwise a TCP connection).
    #[arg(long)]
    method: Option<String>,
    /// The request's path as the client sends it (normalised as the proxies normalise it;
    /// the query string is kept for `request.headers[:path]`).
    #[arg(long)]
    path: Option<String>,
    /// The request's `:authority` (Host), port included; by default the destination as
    /// curl would send it (`name:port`, or `name` for port 80).
    #[arg(long)]
    host: Option<String>,
    /// The server name of the application's own TLS handshake (for `connection.sni`).
    #[arg(long)]
    sni: Option<String>,
    /// A request header, `name=value` (the value as bytes, UTF-8 or not); repeat for more,
    /// the same name too.
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<std::ffi::OsString>,
    /// Read the configuration from this directory.
    #[arg(
        long,
        conflicts_with = "controller",
        required_unless_present = "controller"
    )]
    config: Option<PathBuf>,
    /// Ask the running controller (its monitoring endpoint, http://host:15014).
    #[arg(long)]
    controller: Option<String>,
    #[arg(long)]
    trust_domain: Option<String>,
    /// The source node's agent admin endpoint (http://host:15000), for endpoint health.
    #[arg(long)]
    agent: Option<String>,
    /// Print the explanation as JSON.
    #[arg(long)]
    json: bool,
}

/// Exit 0 when allowed, 1 when denied, 2 when the question cannot be answered.
pub fn run(args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let Loaded { mesh, trust_domain } = match (&args.config, &args.controller) {
        (Some(dir), _) => source::from_dir(dir, args.trust_domain.as_deref())?,
        (None, Some(url)) => source::from_controller(url, args.trust_domain.as_deref())?,
        (None, None) => bail!("give --config DIR or --controller URL"),
    };
    let from = resolve_ip(&mesh, &args.from)?;
    let (to_host, to_port) = args
        .to
        .rsplit_once(':')
        .with_context(|| format!("--to {:?} needs a port: workload:port or ip:port", args.to))?;
    let port: u16 = to_port
        .parse()
        .with_context(|| format!("--to {:?}: {to_port:?} is not a port", args.to))?;
    let http = http_attributes(args, to_host, port)?;
    if let Some(service) = resolve_service(&mesh, to_host, &args.from)? {
        return explain_service(args, &mesh, &trust_domain, from, &service, port, http);
    }
    let to = resolve_ip(&mesh, to_host)?;
    let explanation = explain_path(
        &mesh,
        &trust_domain,
        Question {
            source: from,
            destination: to,
            port,
            http: http.as_ref(),
            sni: args.sni.as_deref(),
        },
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
    } else {
        print!("{}", render(&explanation, http.as_ref()));
    }
    Ok(if explanation.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The Service `name` names (`namespace/name`, a name in the client's namespace, or a cluster
/// IP), when it names one.
fn resolve_service(mesh: &MeshConfig, name: &str, from: &str) -> anyhow::Result<Option<String>> {
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        return Ok(mesh
            .services
            .values()
            .find(|s| s.vip() == Some(ip))
            .map(|s| s.key()));
    }
    if mesh.services.contains_key(name) {
        return Ok(Some(name.to_owned()));
    }
    let workload_named = mesh
        .workloads
        .values()
        .any(|w| w.key() == name || w.name() == name);
    let client_namespace = client_namespace(mesh, from);
    let in_namespace = format!("{client_namespace}/{name}");
    if mesh.services.contains_key(&in_namespace) && !workload_named {
        return Ok(Some(in_namespace));
    }
    let named: Vec<String> = mesh
        .services
        .values()
        .filter(|s| s.metadata.name == name)
        .map(|s| s.key())
        .collect();
    match named.as_slice() {
        [one] if !workload_named => Ok(Some(one.clone())),
        [] | [_] => Ok(None),
        several => bail!(
            "{name:?} names several Services ({}); give namespace/name",
            several.join(", ")
        ),
    }
}

/// The namespace of the client `from` (a workload, or `default` for an address).
fn client_namespace(mesh: &MeshConfig, from: &str) -> String {
    mesh.workloads
        .values()
        .find(|w| w.key() == from || w.name() == from)
        .or_else(|| {
            let ip = from.parse::<Ipv4Addr>().ok()?;
            mesh.workloads.values().find(|w| w.ip() == Some(ip))
        })
        .map_or_else(|| "default".to_owned(), |w| w.namespace().to_owned())
}

fn explain_service(
    args: &ExplainArgs,
    mesh: &MeshConfig,
    trust_domain: &str,
    from: Ipv4Addr,
    service: &str,
    port: u16,
    http: Option<HttpAttributes>,
) -> anyhow::Result<ExitCode> {
    let health = match &args.agent {
        Some(url) => Some(route::health_from(&source::get_json(url, "/endpoints")?)),
        None => None,
    };
    let namespace = client_namespace(mesh, &args.from);
    let explanation = route::explain(
        mesh,
        trust_domain,
        from,
        &namespace,
        service,
        port,
        http.as_ref(),
        args.sni.as_deref(),
        health.as_ref(),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
    } else {
        let what = match &http {
            Some(h) => format!("HTTP {} {}", h.method, h.path),
            None => "A connection".to_owned(),
        };
        print!("{}", route::render(&explanation, &what, &args.from));
    }
    Ok(if explanation.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn resolve_ip(mesh: &MeshConfig, name: &str) -> anyhow::Result<Ipv4Addr> {
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        return Ok(ip);
    }
    let matches: Vec<_> = mesh
        .workloads
        .values()
        .filter(|w| w.key() == name || w.name() == name)
        .collect();
    match matches.as_slice() {
        [one] => one.ip().ok_or_else(|| {
            anyhow::anyhow!(
                "workload {} has no address yet; give its IPv4 address",
                one.key()
            )
        }),
        [] => bail!("no workload named {name:?}; give namespace/name, a name, or an IPv4 address"),
        several => bail!(
            "{name:?} names several workloads ({}); give namespace/name",
            several
                .iter()
                .map(|w| w.key())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn http_attributes(
    args: &ExplainArgs,
    to_host: &str,
    port: u16,
) -> anyhow::Result<Option<HttpAttributes>> {
    if args.method.is_none()
        && args.path.is_none()
        && args.headers.is_empty()
        && args.host.is_none()
    {
        return Ok(None);
    }
    let headers = args
        .headers
        .iter()
        .map(|h| {
            let bytes = h.as_bytes();
            let at = bytes
                .iter()
                .position(|b| *b == b'=')
                .with_context(|| format!("--header {h:?} must be name=value"))?;
            let name = String::from_utf8_lossy(&bytes[..at])
                .trim()
                .to_ascii_lowercase();
            Ok((name, bytes[at + 1..].trim_ascii().to_vec()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let target = args.path.clone().unwrap_or_else(|| "/".to_owned());
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
        None => (target, None),
    };
    let authority = args.host.clone().unwrap_or_else(|| match port {
        80 => to_host.to_owned(),
        _ => format!("{to_host}:{port}"),
    });
    Ok(Some(HttpAttributes {
        method: args.method.clone().unwrap_or_else(|| "GET".to_owned()),
        path,
        query,
        authority: Some(authority),
        scheme: Some("http".to_owned()),
        headers,
    }))
}

fn name(endpoint: &nodemesh_policy::Endpoint) -> String {
    match (&endpoint.workload, &endpoint.identity) {
        (Some(w), Some(id)) => format!("{w} ({}, {id})", endpoint.ip),
        (Some(w), None) => format!("{w} ({}, not in the mesh)", endpoint.ip),
        _ => format!("{} (not a known workload)", endpoint.ip),
    }
}

fn render(e: &PathExplanation, http: Option<&HttpAttributes>) -> String {
    let mut out = String::new();
    let what = match http {
        Some(h) => format!("HTTP {} {}", h.method, h.path),
        None => "TCP connection".to_owned(),
    };
    out.push_str(&format!(
        "{what} from {} to {} port {}\n",
        name(&e.source),
        name(&e.destination),
        SocketAddrV4::new(e.destination.ip, e.port).port()
    ));
    if let (Some(judged), Some(h)) = (&e.judged_path, http)
        && *judged != h.path
    {
        out.push_str(&format!("  path judged as: {judged} (normalised)\n"));
    }
    let same_node = e.source.node.is_some() && e.source.node == e.destination.node;
    out.push_str(&format!(
        "  carried as: {}\n",
        match e.security {
            "mtls" if same_node => {
                "handed over inside the node's proxy (both pods on one node), the client's \
                 identity known to the destination"
            }
            "mtls" => "mTLS (HBONE), the client's identity proven to the destination",
            _ => "plain TCP",
        }
    ));
    if let Some((mode, policy)) = &e.destination_mtls {
        out.push_str(&format!(
            "  destination mTLS mode: {} ({})\n",
            format!("{mode:?}").to_uppercase(),
            policy
                .as_deref()
                .map_or("default".to_owned(), |p| format!("PeerAuthentication {p}"))
        ));
    }
    let verdict = if e.allowed { "ALLOWED" } else { "DENIED" };
    match &e.step {
        Step::SourceOutsideMesh => out.push_str(&format!(
            "  verdict: {verdict}: neither end is in the mesh, nodemesh does not touch it\n"
        )),
        Step::DestinationOutsideMesh => out.push_str(&format!(
            "  verdict: {verdict}: the destination is outside the mesh; the source's proxy sends plain TCP (egress Allow)\n"
        )),
        Step::EgressDenied => out.push_str(&format!(
            "  verdict: {verdict}: the destination is outside the mesh and MeshSettings denies egress\n"
        )),
        Step::InvalidRequest { reason } => out.push_str(&format!(
            "  verdict: {verdict}: the proxy answers 400, the request cannot be normalised: {reason}\n"
        )),
        Step::PlaintextRefused { policy } => out.push_str(&format!(
            "  verdict: {verdict}: plaintext refused, the destination is STRICT ({})\n",
            policy.as_deref().unwrap_or("mesh default")
        )),
        Step::Authorization { explanation } => {
            let decision = &explanation.decision;
            let why = match &decision.reason {
                Reason::NoPolicy => "no AuthorizationPolicy applies to the destination".to_owned(),
                Reason::NoDenyMatched => "no DENY rule matched and no ALLOW policy applies".to_owned(),
                Reason::Allowed(v) => format!("AuthorizationPolicy {} rule {} allows it", v.policy, v.rule),
                Reason::Denied(v) => format!("AuthorizationPolicy {} rule {} denies it", v.policy, v.rule),
                Reason::NoAllowMatched { policies } => format!(
                    "ALLOW policies apply ({}) and none of their rules matched",
                    policies.join(", ")
                ),
            };
            out.push_str(&format!("  verdict: {verdict}: {why}\n"));
            for audit in &decision.audited {
                out.push_str(&format!("  audited by: {} rule {}\n", audit.policy, audit.rule));
            }
            if let Some(shadow) = &decision.dry_run {
                out.push_str(&format!(
                    "  with dry-run policies enforced it would be {}\n",
                    if shadow.allowed { "ALLOWED" } else { "DENIED" }
                ));
            }
            if !explanation.policies.is_empty() {
                out.push_str("  policies:\n");
            }
            for policy in &explanation.policies {
                let dry = if policy.dry_run { ", dry-run" } else { "" };
                let action = format!("{:?}", policy.action).to_uppercase();
                out.push_str(&format!("    {} ({action}{dry})\n", policy.policy));
                if let Some(note) = &policy.note {
                    out.push_str(&format!("      {note}\n"));
                }
                for rule in &policy.rules {
                    if rule.matched {
                        out.push_str(&format!("      rule {}: matches\n", rule.rule));
                    } else {
                        out.push_str(&format!("      rule {}: no match\n", rule.rule));
                        for reason in &rule.reasons {
                            out.push_str(&format!("        {reason}\n"));
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use nodemesh_policy::{Endpoint, PathExplanation, Step};

    use super::render;

    fn on(node: &str, last: u8) -> Endpoint {
        Endpoint {
            workload: Some(format!("default/p{last}")),
            ip: Ipv4Addr::new(10, 88, 1, last),
            identity: Some(format!("spiffe://cluster.local/ns/default/sa/p{last}")),
            node: Some(node.to_owned()),
        }
    }

    fn carried(source: Endpoint, destination: Endpoint) -> String {
        let explanation = PathExplanation {
            source,
            destination,
            port: 80,
            security: "mtls",
            destination_mtls: None,
            judged_path: None,
            allowed: true,
            step: Step::DestinationOutsideMesh,
        };
        render(&explanation, None)
            .lines()
            .find(|l| l.contains("carried as"))
            .expect("a carried-as line")
            .to_owned()
    }

    #[test]
    fn between_nodes_a_connection_is_a_tunnel_and_within_one_it_is_handed_over() {
        assert!(carried(on("n1", 2), on("n2", 3)).contains("mTLS (HBONE)"));
        assert!(carried(on("n1", 2), on("n1", 3)).contains("inside the node's proxy"));
    }
}
