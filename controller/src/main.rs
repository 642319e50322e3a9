//! nodemesh-controller: one per cluster. In local mode it watches a directory of
//! Kubernetes-style YAML, validates every change and keeps the last good configuration in
//! force, serving it on its monitoring endpoint (:15014, Istio's control-plane monitoring
//! port). Certificate issuing and per-node snapshots build on this.
#![forbid(unsafe_code)]

mod state;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use nodemesh_admin::{json, not_found, prometheus, readiness, text};
use nodemesh_config::LocalSource;
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::state::ControllerState;

/// nodemesh controller: validates the mesh configuration and serves it.
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
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

/// The controller's configuration, dumped by `/config_dump`.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub config_source: PathBuf,
    pub monitoring_addr: SocketAddr,
    pub config_poll_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    let config = Config {
        config_source: args.config,
        monitoring_addr: args.monitoring_addr,
        config_poll_ms: args.config_poll_ms.max(10),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nodemesh-controller: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodemesh-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
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
            "/metrics" => prometheus(router_state.metrics()),
            other => not_found(other),
        }),
        stop.clone(),
    )
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
