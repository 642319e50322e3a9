//! nodemesh-agent: one per node. Loads the eBPF capture programs, enrolls the node's
//! workloads and runs the shared node proxy.
//!
//! Exit status: 0 after a clean stop (SIGTERM or SIGINT), 1 with a one-line reason when the
//! agent cannot start (not root, no cgroup2, kernel feature missing, eBPF object not built).

mod admin;
mod config;
mod config_source;
mod controller_client;
mod datapath;
mod identity;
mod inpod;
mod mesh;
mod metrics;
mod netns;
mod proxy;
mod state;
mod telemetry;
mod workloads;

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use nodemesh_config::snapshot::SnapshotAck;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, LogFormat},
    config_source::{SnapshotSource, SourceEvent},
    controller_client::ControllerClient,
    datapath::Datapath,
    identity::IdentityManager,
    mesh::SharedMesh,
    proxy::{
        HbonePool, ProxyShared,
        http::{Sinks, outbound::HttpStacks, state::TrafficState, upstream::MeshConnector},
    },
    state::{AgentState, DatapathView},
    workloads::WorkloadRegistry,
};

/// How often workloads that failed to enroll are tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let config = match Config::from_args() {
        Ok(config) => Arc::new(config),
        Err(reason) => {
            eprintln!("nodemesh-agent: {reason}");
            return ExitCode::FAILURE;
        }
    };
    init_tracing(config.log_format);
    match start(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("nodemesh-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn start(config: Arc<Config>) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "must run as root: loading eBPF programs and entering pods' network namespaces need \
             CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN"
        );
    }
    netns::init().context("cannot open this process's network namespace")?;
    // Every proxied connection holds a few sockets: take all the descriptors allowed.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .context("cannot read the open-file limit")?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
        .context("cannot raise the open-file limit")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: Arc<Config>) -> anyhow::Result<()> {
    let datapath = Datapath::load(&config)?;
    let controller = Arc::new(ControllerClient::new(
        &config.controller,
        &config.controller_ca,
        &config.token_file,
    )?);
    tracing::info!(
        controller = controller.authority(),
        "configuration and certificates come from the controller"
    );
    let identities = Arc::new(IdentityManager::new(controller.clone(), &config.state_dir));
    tracing::info!(
        node = %config.node,
        cgroup = %datapath.cgroup().display(),
        programs = ?datapath.program_ids(),
        "eBPF capture attached"
    );
    let state = Arc::new(AgentState::new(
        config.clone(),
        DatapathView {
            stats: datapath.stats(),
            program_ids: datapath.program_ids().to_vec(),
            cgroup: datapath.cgroup().display().to_string(),
        },
    )?);
    let traffic = Arc::new(TrafficState::new(state.metrics.registry()));
    let stop = CancellationToken::new();
    for (what, addr, router) in [
        (
            "admin",
            config.admin_addr,
            admin::admin(state.clone(), identities.clone(), traffic.clone()),
        ),
        (
            "metrics",
            config.metrics_addr,
            admin::metrics(state.clone(), identities.clone()),
        ),
        (
            "readiness",
            config.readiness_addr,
            admin::ready(state.clone(), identities.clone()),
        ),
    ] {
        nodemesh_admin::spawn(what, addr, router, stop.clone()).await?;
    }
    let mesh = Arc::new(SharedMesh::default());
    let sinks = Sinks {
        istio: state.istio.clone(),
        access_log: state.access_log.clone(),
        tracer: Some(state.tracer.clone()),
    };
    let shared = Arc::new_cyclic(|shared| ProxyShared {
        original_dst: datapath.original_dst_table(),
        transparent: datapath.transparent_connects(),
        mark: config.proxy_mark,
        transparent_mark: config.transparent_mark,
        hbone_port: config.ports.hbone,
        state: state.clone(),
        identities,
        mesh: mesh.clone(),
        pool: HbonePool::default(),
        http: HttpStacks::new(
            mesh,
            traffic,
            Arc::new(MeshConnector::new(shared.clone())),
            sinks,
        ),
    });
    let mut registry = WorkloadRegistry::new(config.clone(), datapath, shared);
    let source = Arc::new(SnapshotSource::new(controller, &config.state_dir));
    if let Some((version, mesh)) = source.load_saved() {
        tracing::info!(version, "starting from the snapshot saved by the last run");
        let mesh = Arc::new(mesh);
        registry.apply(mesh.clone()).await;
        state.config_applied(mesh, version, "saved", registry.status());
    }
    let (events_tx, mut events) = mpsc::channel(8);
    let follower = tokio::spawn(source.clone().follow(events_tx));
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            Some(event) = events.recv() => match event {
                SourceEvent::Snapshot { version, mesh } => {
                    let mesh = Arc::new(*mesh);
                    registry.apply(mesh.clone()).await;
                    state.config_applied(mesh.clone(), version, "controller", registry.status());
                    tracing::info!(version, workloads = registry.status().len(), "snapshot applied");
                    let saved = source.save(version, &mesh);
                    if let Err(e) = &saved {
                        tracing::warn!(error = %e, "cannot save the snapshot for the next start");
                    }
                    source.ack(SnapshotAck { version, applied: true, error: None });
                }
                SourceEvent::Connected => {
                    tracing::info!("following the controller's snapshots");
                    state.set_controller(None);
                }
                SourceEvent::Disconnected(reason) => {
                    tracing::warn!("controller unreachable, the snapshot in force stays: {reason}");
                    state.set_controller(Some(reason));
                }
            },
            _ = retry.tick(), if registry.has_failures() => registry.retry_failed().await,
        }
        state.set_workloads(registry.status());
    }
    tracing::info!("stopping: releasing workloads and detaching eBPF programs");
    follower.abort();
    registry.release_all().await;
    stop.cancel();
    drop(registry);
    Ok(())
}
