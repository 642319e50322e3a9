//! `nodemesh status`: the mesh's state at a glance, from the controller's and the agents'
//! admin endpoints.

use std::{
    process::ExitCode,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::source::{get_json, http_get};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The controller's monitoring endpoint, http://host:15014.
    #[arg(long)]
    controller: String,
    /// An agent's admin endpoint, http://host:15000; repeat for each node to include.
    #[arg(long = "agent")]
    agents: Vec<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ago(ms: Option<u64>) -> String {
    match ms {
        Some(at) => {
            let seconds = now_ms().saturating_sub(at) / 1000;
            format!("{}s ago", seconds)
        }
        None => "never".to_owned(),
    }
}

fn duration(seconds: i64) -> String {
    if seconds < 0 {
        return format!("expired {}s ago", -seconds);
    }
    let (h, m) = (seconds / 3600, (seconds % 3600) / 60);
    format!("{h}h{m:02}m")
}

/// Exit 0 when the controller and every agent are ready and in sync, 1 otherwise.
pub fn run(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let mut healthy = true;
    let (ready, reason) = http_get(&args.controller, "/readyz")?;
    healthy &= ready == 200;
    let dump = get_json(&args.controller, "/config_dump")?;
    let version = dump["version"].as_u64();
    let config = &dump["config"];
    let count = |key: &str| config[key].as_object().map_or(0, serde_json::Map::len);
    println!(
        "controller {}: {}",
        args.controller,
        if ready == 200 {
            "ready".to_owned()
        } else {
            reason.trim().to_owned()
        }
    );
    println!(
        "  configuration: version {}, accepted {}; {} workloads, {} services, {} authorization policies, {} peer authentications, {} HTTP routes, {} traffic policies",
        version.map_or_else(|| "-".to_owned(), |v| v.to_string()),
        ago(dump["accepted_at_unix_ms"].as_u64()),
        count("workloads"),
        count("services"),
        count("authorization_policies"),
        count("peer_authentications"),
        count("http_routes"),
        count("backend_traffic_policies"),
    );
    if let Some(errors) = dump["last_error"].as_array() {
        healthy = false;
        println!("  the configuration on disk is refused; the last good one stays in force:");
        for error in errors {
            println!("    {}", error.as_str().unwrap_or_default());
        }
    }
    for (node, agent) in dump["agents"].as_object().into_iter().flatten() {
        let connected = agent["streams"].as_u64().unwrap_or(0) > 0;
        // An agent is sent a configuration only when its own view changes: in sync when it
        // applied the last one it was sent.
        let sent = agent["sent_version"].as_u64();
        let in_sync =
            sent.is_some() && agent["acked_version"].as_u64() == sent && agent["applied"] == true;
        healthy &= connected && in_sync;
        println!(
            "  agent {node}: {}, {}",
            if connected {
                "connected"
            } else {
                "not connected"
            },
            if in_sync {
                match (agent["acked_version"].as_u64(), version) {
                    (Some(acked), Some(current)) if acked != current => format!(
                        "applied the last snapshot it was sent ({acked}; later changes did \
                         not touch its node)"
                    ),
                    _ => "applied the current version".to_owned(),
                }
            } else {
                format!(
                    "acknowledged {} ({})",
                    agent["acked_version"],
                    agent["error"].as_str().unwrap_or("not yet")
                )
            }
        );
    }
    for url in &args.agents {
        healthy &= agent(url)?;
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints one agent's state; returns whether it is ready.
fn agent(url: &str) -> anyhow::Result<bool> {
    let (ready, reason) = http_get(url, "/readyz")?;
    let dump = get_json(url, "/config_dump")?;
    let workloads = get_json(url, "/workloads")?;
    let certs = get_json(url, "/certs")?;
    let stats = get_json(url, "/stats")?;
    let node = dump["agent"]["node"].as_str().unwrap_or("?");
    println!(
        "agent {url} (node {node}): {}",
        if ready == 200 {
            "ready".to_owned()
        } else {
            reason.trim().to_owned()
        }
    );
    let mesh = &dump["mesh"];
    println!(
        "  snapshot: version {} from {}, applied {}; controller {}",
        mesh["version"],
        mesh["origin"].as_str().unwrap_or("-"),
        ago(mesh["applied_at_unix_ms"].as_u64()),
        if mesh["controller_connected"] == true {
            "connected".to_owned()
        } else {
            format!(
                "unreachable ({})",
                mesh["controller_error"].as_str().unwrap_or("?")
            )
        }
    );
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let workloads = list(&workloads);
    let failed: Vec<String> = workloads
        .iter()
        .filter(|w| w["state"] != "enrolled")
        .map(|w| {
            format!(
                "{}/{}: {}",
                w["namespace"].as_str().unwrap_or(""),
                w["name"].as_str().unwrap_or(""),
                w["error"].as_str().unwrap_or("")
            )
        })
        .collect();
    println!(
        "  workloads: {} enrolled, {} failed",
        workloads.len() - failed.len(),
        failed.len()
    );
    for failure in &failed {
        println!("    {failure}");
    }
    let certs = list(&certs);
    let valid = certs.iter().filter(|c| c["state"] == "valid").count();
    let nearest = certs
        .iter()
        .filter_map(|c| c["seconds_to_expiry"].as_i64())
        .min();
    println!(
        "  certificates: {valid} of {} valid{}",
        certs.len(),
        nearest.map_or_else(String::new, |s| format!(", next expiry {}", duration(s)))
    );
    let ebpf = &stats["ebpf"];
    let errors: u64 = [
        "cookie_insert_failed",
        "tuple_insert_failed",
        "inbound_steer_failed",
    ]
    .iter()
    .filter_map(|k| ebpf[*k].as_u64())
    .sum();
    println!(
        "  eBPF: {} connects redirected, {} inbound steered, {errors} errors",
        ebpf["outbound_redirected"], ebpf["inbound_steered"]
    );
    Ok(ready == 200 && failed.is_empty() && valid == certs.len())
}
