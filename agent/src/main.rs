//! nodemesh-agent: one per node. Loads the eBPF capture programs, enrolls the node's
//! workloads and runs the shared node proxy.
//!
//! Exit status: 0 after a clean stop (SIGTERM or SIGINT), 1 with a one-line reason when the
//! agent cannot start (not root, no cgroup2, kernel feature missing, eBPF object not built).

mod admin;
mod cni;
mod config;
mod config_source;
mod controller_client;
mod datapath;
mod discovery;
mod identity;
mod inpod;
mod mesh;
mod metrics;
mod netns;
mod proxy;
mod state;
mod telemetry;
mod workers;
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
    config::{Command, Config, LogFormat},
    config_source::{SnapshotSource, SourceEvent},
    controller_client::ControllerClient,
    datapath::Datapath,
    identity::IdentityManager,
    mesh::SharedMesh,
    proxy::{
        HbonePool, ProxyShared, Spread,
        http::{Sinks, outbound::HttpStacks, state::TrafficState, upstream::MeshConnector},
    },
    state::{AgentState, DatapathView},
    workers::Workers,
    workloads::WorkloadRegistry,
};

/// jemalloc: it gives memory back after a load, where glibc's per-thread arenas keep it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How often workloads that failed to enroll are tried again, and enrolled workloads' network
/// namespaces checked for replacement.
const RECHECK_INTERVAL: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let config = match Config::from_args() {
        Ok(Command::Run(config)) => Arc::new(*config),
        Ok(Command::Uninstall { pin_dir }) => return uninstall(&pin_dir),
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

/// `--uninstall`: the node's workloads talk directly again once the pins are gone.
fn uninstall(pin_dir: &std::path::Path) -> ExitCode {
    match datapath::uninstall(pin_dir) {
        Ok(true) => {
            eprintln!(
                "nodemesh-agent: removed the pinned datapath in {}; capture is off on this node",
                pin_dir.display()
            );
            ExitCode::SUCCESS
        }
        Ok(false) => {
            eprintln!(
                "nodemesh-agent: nothing pinned in {}; capture was already off",
                pin_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nodemesh-agent: cannot remove {}: {e}", pin_dir.display());
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
    let workers =
        Workers::start(config.worker_threads).context("cannot start the proxy workers")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(run(config, workers.handles().to_vec()));
    // The workers stop after the agent's own tasks: draining happens before.
    drop(workers);
    result
}

async fn run(config: Arc<Config>, workers: Vec<tokio::runtime::Handle>) -> anyhow::Result<()> {
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
        pins = %datapath.pin_dir().display(),
        "eBPF capture attached and pinned"
    );
    if datapath.adopted() > 0 {
        tracing::info!(
            pods = datapath.adopted(),
            "capture pinned by the previous agent is in force; those pods' connections are \
             refused until each is enrolled again"
        );
    }
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
        tcp_idle_timeout: config.tcp_idle_timeout,
        state: state.clone(),
        identities,
        mesh: mesh.clone(),
        pool: HbonePool::default(),
        spread: Spread::new(workers.len()),
        workers,
        admission: proxy::admission::Admission::new(
            config.max_connections,
            config.max_connections_per_source,
        ),
        http: HttpStacks::new(
            mesh,
            traffic,
            Arc::new(MeshConnector::new(shared.clone())),
            sinks,
        ),
        local: Default::default(),
    });
    let mut registry = WorkloadRegistry::new(config.clone(), datapath, shared);
    let (cni_tx, mut cni_requests) = mpsc::channel(64);
    let cni_stop = CancellationToken::new();
    if let Some(path) = &config.cni_socket {
        let socket = cni::CniSocket::bind(path)?;
        tracing::info!(socket = %socket.path().display(), "the CNI plugin hands new pods over here");
        tokio::spawn(socket.serve(cni_tx, cni_stop.clone()));
    }
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
    let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
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
            Some(request) = cni_requests.recv() => registry.handle_cni(request).await,
            _ = recheck.tick() => {
                registry.recheck().await;
                keep_cni_entry(&config).await;
            }
        }
        state.set_workloads(registry.status());
    }
    follower.abort();
    // New pods wait for the next agent (or start without the mesh, if so configured).
    cni_stop.cancel();
    drain(
        &registry,
        &state,
        config.drain,
        &mut terminate,
        &mut interrupt,
    )
    .await;
    stop.cancel();
    drop(registry);
    Ok(())
}

/// Puts nodemesh-cni back into the node's CNI configuration if the network plugin rewrote it
/// without it: until then new pods would start outside the mesh.
async fn keep_cni_entry(config: &Config) {
    let (Some(conf), Some(socket)) = (&config.cni_conf, &config.cni_socket) else {
        return;
    };
    let settings = nodemesh_cni::conflist::PluginSettings {
        agent_socket: socket.clone(),
        exclude_namespaces: conf.exclude_namespaces.clone(),
        fail_open: conf.fail_open,
        timeout_seconds: 15,
    };
    let dir = conf.dir.clone();
    let result =
        tokio::task::spawn_blocking(move || nodemesh_cni::conflist::install(&dir, &settings)).await;
    match result {
        Ok(Ok(nodemesh_cni::conflist::Installed::Written(file))) => tracing::warn!(
            file = %file.display(),
            "nodemesh-cni was missing from the node's CNI configuration; put it back"
        ),
        Ok(Ok(nodemesh_cni::conflist::Installed::Unchanged(_))) | Err(_) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot keep nodemesh-cni in the node's CNI configuration")
        }
    }
}

/// Stops taking connections and lets the open ones finish for up to `grace` (a second signal
/// cuts it short), then closes what is left. Capture stays pinned: until the next agent
/// takes over, the node's workloads are refused connections, never let around the mesh.
async fn drain(
    registry: &WorkloadRegistry,
    state: &AgentState,
    grace: Duration,
    terminate: &mut tokio::signal::unix::Signal,
    interrupt: &mut tokio::signal::unix::Signal,
) {
    registry.stop_accepting();
    let open = || state.metrics.open_connections();
    tracing::info!(
        open = open(),
        grace_seconds = grace.as_secs(),
        "stopping: no new connections; open ones may finish; capture stays in place"
    );
    let deadline = tokio::time::Instant::now() + grace;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while open() > 0 {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(deadline) => break,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    let left = open();
    if left > 0 {
        tracing::info!(open = left, "closing the connections still open");
    }
    registry.close_all();
    // Let the closed connections' tasks send their FINs and log their ends.
    tokio::time::sleep(Duration::from_millis(100)).await;
}
