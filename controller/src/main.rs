//! nodemesh-controller: one per cluster. In local mode it watches a directory of
//! Kubernetes-style YAML, validates every change and keeps the last good configuration in
//! force; it runs the mesh CA and its certificate API (:15012), and serves its state on the
//! monitoring endpoint (:15014, Istio's control-plane monitoring port).
#![forbid(unsafe_code)]

mod agent_api;
mod config;
mod node_tokens;
mod state;

use std::{os::unix::fs::PermissionsExt as _, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use nodemesh_admin::{json, not_found, prometheus, readiness, text};
use nodemesh_config::LocalSource;
use nodemesh_identity::CertificateAuthority;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{
    agent_api::AgentApi,
    config::{CaSource, Config},
    node_tokens::NodeTokens,
    state::ControllerState,
};

fn main() -> ExitCode {
    let config = match Config::from_args() {
        Ok(config) => config,
        Err(reason) => {
            eprintln!("nodemesh-controller: {reason}");
            return ExitCode::FAILURE;
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(run(config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("nodemesh-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_ca(config: &Config) -> anyhow::Result<CertificateAuthority> {
    let (ca, key) = match &config.ca {
        CaSource::Directory(dir) => (
            CertificateAuthority::load_or_create(dir, &config.trust_domain)?,
            dir.join("ca-key.pem"),
        ),
        CaSource::Files { cert, key, bundle } => (
            CertificateAuthority::from_files(cert, key, bundle.as_deref())?,
            key.clone(),
        ),
    };
    if let Ok(meta) = std::fs::metadata(&key)
        && meta.permissions().mode() & 0o007 != 0
    {
        tracing::warn!(
            key = %key.display(),
            "the CA private key is readable by any user; chmod 600 (or 640 for a group) it"
        );
    }
    Ok(ca)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let ca = Arc::new(load_ca(&config)?);
    let tokens = match &config.node_tokens {
        Some(path) => NodeTokens::load(path).map_err(anyhow::Error::msg)?,
        None => {
            tracing::warn!("no --node-tokens: the certificate API will refuse every agent");
            NodeTokens::default()
        }
    };
    tracing::info!(
        trust_domain = %config.trust_domain,
        roots = ca.bundle().roots().len(),
        nodes = tokens.len(),
        "mesh CA ready"
    );
    let state = Arc::new(ControllerState::new(config.clone()));
    let stop = CancellationToken::new();
    let router_state = state.clone();
    nodemesh_admin::spawn(
        "monitoring",
        config.monitoring_addr,
        Arc::new(move |path| match path {
            "/healthz" => text(http::StatusCode::OK, "ok\n"),
            "/readyz" => readiness(router_state.readiness()),
            "/config_dump" => json(&router_state.config_dump()),
            "/metrics" => prometheus(router_state.render_metrics()),
            other => not_found(other),
        }),
        stop.clone(),
    )
    .await?;
    AgentApi {
        ca,
        tokens,
        state: state.clone(),
        workload_ttl: config.workload_cert_ttl,
        server_names: config.ca_server_names.clone(),
        stop: stop.clone(),
    }
    .spawn(config.ca_addr)
    .await?;
    let mut source = LocalSource::new(
        config.config_source.clone(),
        Duration::from_millis(config.config_poll_ms),
    );
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            loaded = source.changed() => match loaded {
                Ok(mesh) => {
                    tracing::info!(workloads = mesh.workloads.len(), "configuration accepted");
                    state.accepted(mesh);
                }
                Err(errors) => {
                    tracing::error!("configuration refused, the last good one stays in force: {errors}");
                    state.refused(&errors);
                }
            },
        }
    }
    stop.cancel();
    Ok(())
}
