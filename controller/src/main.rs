//! nodemesh-controller: one or more per cluster. It reads the mesh's configuration (in
//! Kubernetes, from the cluster's objects; in local mode, from a directory of the same
//! YAML), validates every change and keeps the last good configuration in force; it runs the
//! mesh CA and its certificate API (:15012), and serves its state on the monitoring endpoint
//! (:15014, Istio's control-plane monitoring port).
#![forbid(unsafe_code)]

mod agent_api;
mod config;
mod kubernetes;
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
    agent_api::{AgentApi, AgentAuth},
    config::{CaSource, Config, KubernetesSettings, Source},
    kubernetes::{Cluster, ClusterIdentity, token_review::TokenReviewer},
    node_tokens::NodeTokens,
    state::ControllerState,
};

fn main() -> ExitCode {
    // kube's client builds its TLS from the process's default provider: the mesh's own.
    let _ = rustls::crypto::CryptoProvider::install_default(
        (*nodemesh_identity::crypto_provider()).clone(),
    );
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

/// The CA from files or a directory (local mode, or operator files in Kubernetes).
fn load_ca(config: &Config) -> anyhow::Result<Option<CertificateAuthority>> {
    let (ca, key) = match &config.ca {
        CaSource::Directory(dir) => (
            CertificateAuthority::load_or_create(dir, &config.trust_domain)?,
            dir.join("ca-key.pem"),
        ),
        CaSource::Files { cert, key, bundle } => (
            CertificateAuthority::from_files(cert, key, bundle.as_deref())?,
            key.clone(),
        ),
        CaSource::Secret => return Ok(None),
    };
    if let Ok(meta) = std::fs::metadata(&key)
        && meta.permissions().mode() & 0o007 != 0
    {
        tracing::warn!(
            key = %key.display(),
            "the CA private key is readable by any user; chmod 600 (or 640 for a group) it"
        );
    }
    Ok(Some(ca))
}

/// A client of the API server: in-cluster, or from --kubeconfig.
async fn kube_client(settings: &KubernetesSettings) -> anyhow::Result<kube::Client> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {} is not usable", path.display()))?
        }
        None => kube::Config::incluster().context(
            "not running in a Kubernetes pod (no in-cluster service account); give \
             --kubeconfig, or use --source local",
        )?,
    };
    kube::Client::try_from(config).context("cannot make a Kubernetes client")
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
            "/metrics" => prometheus(router_state.render_metrics()),
            other => not_found(other),
        }),
        stop.clone(),
    )
    .await?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    match &config.source {
        Source::Local { path, node_tokens } => {
            let ca = Arc::new(load_ca(&config)?.context("local mode keeps its CA in files")?);
            let tokens = match node_tokens {
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
            serve_agents(&config, ca, AgentAuth::NodeTokens(tokens), &state, &stop).await?;
            let mut source =
                LocalSource::new(path.clone(), Duration::from_millis(config.config_poll_ms));
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
        }
        Source::Kubernetes(settings) => {
            let client = kube_client(settings).await?;
            let ca = match load_ca(&config)? {
                Some(ca) => ca,
                None => {
                    kubernetes::ca_secret::load_or_create(
                        client.clone(),
                        &settings.namespace,
                        &settings.ca_secret,
                        &config.trust_domain,
                    )
                    .await?
                }
            };
            let ca = Arc::new(ca);
            kubernetes::ca_secret::publish_roots(
                client.clone(),
                &settings.namespace,
                &settings.roots_configmap,
                ca.bundle(),
            )
            .await?;
            tracing::info!(
                trust_domain = %config.trust_domain,
                roots = ca.bundle().roots().len(),
                "mesh CA ready; agents prove their node with their ServiceAccount token"
            );
            let cluster = Arc::new(Cluster::new());
            kubernetes::watch(&client, &cluster, &stop);
            let reviewer = TokenReviewer::new(
                client.clone(),
                settings.token_audience.clone(),
                settings.agent_service_account.clone(),
                cluster.clone(),
            );
            serve_agents(
                &config,
                ca,
                AgentAuth::Kubernetes(Box::new(reviewer)),
                &state,
                &stop,
            )
            .await?;
            let me = ClusterIdentity {
                namespace: settings.namespace.clone(),
                name: settings.identity.clone(),
            };
            let following = tokio::spawn(kubernetes::run(
                client,
                cluster,
                state.clone(),
                me,
                stop.clone(),
            ));
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            stop.cancel();
            let _ = following.await;
        }
    }
    stop.cancel();
    Ok(())
}

/// Starts the agent API (certificates, snapshots).
async fn serve_agents(
    config: &Config,
    ca: Arc<CertificateAuthority>,
    auth: AgentAuth,
    state: &Arc<ControllerState>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    AgentApi {
        ca,
        auth,
        state: state.clone(),
        workload_ttl: config.workload_cert_ttl,
        server_names: config.ca_server_names.clone(),
        stop: stop.clone(),
    }
    .spawn(config.ca_addr)
    .await?;
    Ok(())
}
