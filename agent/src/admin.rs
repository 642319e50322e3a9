//! The agent's operator endpoints: admin (:15000), Prometheus metrics (:15020) and readiness
//! (:15021).

use std::sync::Arc;

use nodemesh_admin::{Body, Router, json, not_found, prometheus, readiness, text};

use crate::state::AgentState;

pub fn admin(state: Arc<AgentState>) -> Router {
    Arc::new(move |path| route_admin(path, &state))
}

pub fn metrics(state: Arc<AgentState>) -> Router {
    Arc::new(move |path| match path {
        "/metrics" | "/stats/prometheus" => prometheus(state.metrics.render(&state.datapath.stats)),
        other => not_found(other),
    })
}

pub fn ready(state: Arc<AgentState>) -> Router {
    Arc::new(move |path| match path {
        "/healthz/ready" => readiness(state.readiness()),
        other => not_found(other),
    })
}

fn route_admin(path: &str, state: &AgentState) -> http::Response<Body> {
    match path {
        "/" => text(
            http::StatusCode::OK,
            "nodemesh agent admin: /healthz /readyz /config_dump /workloads /connections /stats\n",
        ),
        "/healthz" => text(http::StatusCode::OK, "ok\n"),
        "/readyz" => readiness(state.readiness()),
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
