//! Kubernetes mode: the configuration is the cluster's. The controller watches Namespaces,
//! Pods, Services, EndpointSlices, Nodes, nodemesh's CRDs and Gateway API's HTTPRoutes
//! (`cluster`), turns them into the same model a local directory gives (`convert`, `build`),
//! keeps the configuration in force up to date within a moment of a change, and, while this
//! replica holds the lease (`lease`), writes each object's status and an Event for each
//! refusal (`status`). Agents prove their node with their ServiceAccount token
//! (`token_review`); the CA lives in a Secret (`ca_secret`).

mod build;
pub mod ca_secret;
mod cluster;
mod convert;
mod lease;
mod status;
#[cfg(test)]
mod tests;
pub mod token_review;

use std::{sync::Arc, time::Duration};

use kube::Client;
use nodemesh_config::MeshConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use self::cluster::{Cluster, Kind};
use self::{
    build::{Built, LastGood},
    status::StatusWriter,
};
use crate::state::{ControllerState, ObjectProblem};

/// How long after a change the configuration is built: changes arriving together (a
/// `kubectl apply` of many objects, a relist) are built once.
const SETTLE: Duration = Duration::from_millis(100);
/// How often everything is built and status written again without a change, so that a
/// status write that failed is retried.
const RESYNC: Duration = Duration::from_secs(30);

/// Where this replica lives and who it is.
#[derive(Debug, Clone)]
pub struct ClusterIdentity {
    /// The controller's namespace: its Lease, CA Secret and roots ConfigMap.
    pub namespace: String,
    /// This replica's name (its pod's): the lease holder, the Events' reporting instance.
    pub name: String,
}

/// Starts one watcher per kind, each ending with `stop`.
pub fn watch(client: &Client, cluster: &Arc<Cluster>, stop: &CancellationToken) {
    for kind in Kind::ALL {
        let watching = cluster::watch_kind(client.clone(), kind, cluster.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.run_until_cancelled(watching).await;
        });
    }
}

/// Keeps `state` at the configuration the cluster describes, and, while this replica leads,
/// the objects' status at what became of them. Runs until `stop`.
pub async fn run(
    client: Client,
    cluster: Arc<Cluster>,
    state: Arc<ControllerState>,
    me: ClusterIdentity,
    stop: CancellationToken,
) {
    let (leading_tx, mut leading) = watch::channel(false);
    tokio::spawn(lease::elect(
        client.clone(),
        me.namespace.clone(),
        me.name.clone(),
        leading_tx,
        stop.clone(),
    ));
    let mut writer = StatusWriter::new(client, me.name);
    let mut changes = cluster.subscribe();
    let mut last_good = LastGood::default();
    let mut in_force: Option<MeshConfig> = None;
    let mut resync = tokio::time::interval(RESYNC);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            changed = leading.changed() => if changed.is_err() { return },
            _ = resync.tick() => {}
        }
        if stop
            .run_until_cancelled(tokio::time::sleep(SETTLE))
            .await
            .is_none()
        {
            return;
        }
        changes.borrow_and_update();
        let Some(objects) = cluster.snapshot() else {
            let pending: Vec<&str> = cluster.pending().iter().map(|k| k.model_name()).collect();
            state.waiting(format!(
                "waiting for the first list of {} from the API server",
                pending.join(", ")
            ));
            continue;
        };
        let built = build::build(&objects, &mut last_good);
        state.object_problems(problems(&built));
        if in_force.as_ref() != Some(&built.mesh) {
            tracing::info!(
                workloads = built.mesh.workloads.len(),
                services = built.mesh.services.len(),
                "configuration from the cluster in force"
            );
            state.accepted(built.mesh.clone());
            in_force = Some(built.mesh.clone());
        }
        if *leading.borrow_and_update() {
            writer.write(&cluster, &built, &now()).await;
        }
    }
}

/// The objects with a problem, for `/config_dump` and the error gauge.
fn problems(built: &Built) -> Vec<ObjectProblem> {
    built
        .verdicts
        .iter()
        .filter(|(_, v)| !v.accepted())
        .map(|((kind, key), verdict)| ObjectProblem {
            object: format!("{} {key}", kind.api_resource().kind),
            refused: verdict.refused,
            message: verdict.message(),
        })
        .collect()
}

/// Now, as Kubernetes writes times in conditions (RFC 3339, seconds).
fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}
