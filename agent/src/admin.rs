//! The agent's operator endpoints: admin (:15000), Prometheus metrics (:15020) and readiness
//! (:15021).

use std::sync::Arc;

use nodemesh_admin::{Body, Router, json, not_found, prometheus, readiness, text};

use crate::{
    identity::IdentityManager, metrics::ScrapeInputs, proxy::http::state::TrafficState,
    state::AgentState,
};

pub fn admin(
    state: Arc<AgentState>,
    identities: Arc<IdentityManager>,
    traffic: Arc<TrafficState>,
) -> Router {
    Arc::new(move |path| match path {
        "/certs" => json(&identities.status()),
        "/endpoints" => json(&traffic.report()),
        "/readyz" => readiness(ready_state(&state, &identities)),
        other => route_admin(other, &state),
    })
}

/// Ready once a configuration is in force, every workload is enrolled and every identity
/// has a valid certificate.
fn ready_state(state: &AgentState, identities: &IdentityManager) -> Result<(), String> {
    state.readiness()?;
    let missing: Vec<String> = identities
        .status()
        .into_iter()
        .filter(|c| c.state != "valid")
        .map(|c| format!("{} ({})", c.identity, c.state))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("no valid certificate for {}", missing.join(", ")))
    }
}

pub fn metrics(state: Arc<AgentState>, identities: Arc<IdentityManager>) -> Router {
    Arc::new(move |path| match path {
        "/metrics" | "/stats/prometheus" => {
            let inputs = ScrapeInputs {
                datapath: &state.datapath.stats,
                certificates: identities
                    .status()
                    .into_iter()
                    .filter_map(|c| Some((c.identity, c.seconds_to_expiry?)))
                    .collect(),
                config_applied_unix_ms: state.applied_at(),
                enrolled: state
                    .workloads()
                    .iter()
                    .filter(|w| w.state == "enrolled")
                    .count(),
            };
            prometheus(state.metrics.render(&inputs))
        }
        other => not_found(other),
    })
}

pub fn ready(state: Arc<AgentState>, identities: Arc<IdentityManager>) -> Router {
    Arc::new(move |path| match path {
        "/healthz/ready" => readiness(ready_state(&state, &identities)),
        other => not_found(other),
    })
}

fn route_admin(path: &str, state: &AgentState) -> http::Response<Body> {
    match path {
        "/" => text(
            http::StatusCode::OK,
            "nodemesh agent admin: /healthz /readyz /config_dump /workloads /connections /certs \
             /endpoints /stats\n",
        ),
        "/healthz" => text(http::StatusCode::OK, "ok\n"),
        "/config_dump" => json(&state.config_dump()),
        "/workloads" => json(&state.workloads()),
        "/connections" => json(&state.connections.recent()),
        "/stats" => {
            let stats: serde_json::Map<String, serde_json::Value> = state
                .datapath
                .stats
                .read()
                .into_iter()
                .map(|(stat, value)| (stat.name().to_owned(), value.into()))
                .collect();
            json(&serde_json::json!({ "ebpf": stats }))
        }
        other => not_found(other),
    }
}
