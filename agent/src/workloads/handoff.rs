//! Namespaces the registry holds without a path: handed over by the CNI plugin at the pod's
//! creation (answered once the pod is enrolled, released when its sandbox goes), or found
//! under /proc for a pod that was running before the agent.

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use nodemesh_cni::{Command, Outcome};

use super::{
    WorkloadRegistry,
    plan::{Admission, HandoffView},
};
use crate::{
    cni::CniRequest,
    netns::{NetnsOrigin, PodNetns},
};

/// How often /proc is searched, at most, for the namespaces of pods still awaited.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(10);

/// A namespace held for a workload without a path: handed over by the CNI plugin, or found
/// under /proc.
#[derive(Debug)]
pub(super) struct Handoff {
    pub(super) netns: PodNetns,
    pub(super) uid: Option<String>,
    pub(super) ips: Vec<Ipv4Addr>,
}

impl Handoff {
    pub(super) fn view(&self) -> HandoffView<'_> {
        HandoffView {
            origin: self.netns.origin(),
            uid: self.uid.as_deref(),
            ips: &self.ips,
        }
    }
}

/// How long an ADD may wait for the configuration to know its pod (the controller sees the
/// pod when the scheduler binds it, before the runtime creates its sandbox).
const PENDING_TIMEOUT: Duration = Duration::from_secs(10);

/// A CNI ADD waiting for a configuration that knows its pod.
#[derive(Debug)]
pub struct PendingAdd {
    request: CniRequest,
    deadline: Instant,
}

impl WorkloadRegistry {
    /// Looks under /proc for the namespaces of awaited pods that have a uid and an address:
    /// pods that ran before this agent (or before they joined the mesh).
    pub(super) async fn discover(&mut self) {
        if !self.config.discover_pods
            || self
                .last_discovery
                .is_some_and(|t| t.elapsed() < DISCOVERY_INTERVAL)
        {
            return;
        }
        let wanted: BTreeMap<String, String> = self
            .awaiting
            .iter()
            .filter(|(key, a)| a.workload.ip().is_some() && !self.handoffs.contains_key(*key))
            .filter_map(|(key, a)| Some((a.workload.metadata.uid.clone()?, key.clone())))
            .collect();
        if wanted.is_empty() {
            return;
        }
        self.last_discovery = Some(Instant::now());
        let uids: HashSet<String> = wanted.keys().cloned().collect();
        let proc_root = self.config.proc_root.clone();
        let found =
            tokio::task::spawn_blocking(move || crate::discovery::find_pods(&proc_root, &uids))
                .await
                .unwrap_or_default();
        for (uid, found) in found {
            let Some(key) = wanted.get(&uid).cloned() else {
                continue;
            };
            let origin = NetnsOrigin::Proc { pid: found.pid };
            match PodNetns::from_file(found.netns, origin) {
                Ok(netns) => {
                    tracing::info!(workload = %key, netns = %netns, "found the namespace of a running pod");
                    self.handoffs.insert(
                        key.clone(),
                        Handoff {
                            netns,
                            uid: Some(uid),
                            ips: Vec::new(),
                        },
                    );
                    if let Some(awaiting) = self.awaiting.remove(&key) {
                        self.converge(key, awaiting.workload).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(workload = %key, error = %e, "a process of the pod is in no usable namespace");
                }
            }
        }
    }

    /// Answers a request of the CNI plugin: ADD enrolls the pod (or says it stays out),
    /// DEL releases it, CHECK says whether it is enrolled as it should be.
    pub async fn handle_cni(&mut self, request: CniRequest) {
        match request.pod.command {
            Command::Add => self.cni_add(request).await,
            Command::Del => self.cni_del(request).await,
            Command::Check => self.cni_check(request),
        }
    }

    async fn cni_add(&mut self, request: CniRequest) {
        let Some(mesh) = &self.mesh else {
            // Nothing to decide by: the plugin goes by the namespaces last published (a pod of
            // a namespace outside the mesh starts; one of the mesh waits for the agent).
            return request.answer(
                Outcome::Unknown,
                "this agent has no configuration from the controller yet",
            );
        };
        let admission = super::plan::admit(mesh, &self.config.node, &request.pod);
        self.admit(request, admission).await;
    }

    async fn admit(&mut self, mut request: CniRequest, admission: Admission) {
        let key = request.key();
        match admission {
            Admission::NotInMesh => request.answer(Outcome::NotInMesh, ""),
            Admission::Refuse(why) => request.answer(Outcome::Refused, why),
            Admission::Wait => {
                tracing::info!(pod = %key, "CNI ADD waits for the configuration to know the pod");
                self.pending.push(PendingAdd {
                    request,
                    deadline: Instant::now() + PENDING_TIMEOUT,
                });
            }
            Admission::Enroll => {
                let Some(netns) = request.netns.take() else {
                    request.answer(Outcome::Refused, "ADD came without the pod's namespace");
                    return;
                };
                self.handoffs.insert(
                    key.clone(),
                    Handoff {
                        netns,
                        uid: request.pod.uid.clone(),
                        ips: request.pod.ips.clone(),
                    },
                );
                let workload = self
                    .mesh
                    .as_ref()
                    .and_then(|mesh| mesh.workloads.get(&key).cloned());
                if let Some(workload) = workload {
                    self.release(&key).await;
                    self.converge(key.clone(), workload).await;
                }
                let origin = NetnsOrigin::Cni {
                    container_id: request.pod.container_id.clone(),
                };
                match (self.enrolled.get(&key), self.failed.get(&key)) {
                    (Some(enrolled), _) if enrolled.origin == origin => {
                        request.answer(Outcome::Enrolled, "")
                    }
                    (_, Some(failed)) => request.answer(Outcome::Refused, failed.error.clone()),
                    _ => request.answer(
                        Outcome::Refused,
                        self.awaiting
                            .get(&key)
                            .map_or_else(|| "not enrolled".to_owned(), |a| a.reason.clone()),
                    ),
                }
            }
        }
    }

    /// Decides again the ADDs that waited for a configuration that knows their pod.
    pub(super) async fn retry_pending(&mut self) {
        let Some(mesh) = self.mesh.clone() else {
            return;
        };
        for pending in std::mem::take(&mut self.pending) {
            let admission = super::plan::admit(&mesh, &self.config.node, &pending.request.pod);
            if admission == Admission::Wait {
                self.pending.push(pending);
            } else {
                self.admit(pending.request, admission).await;
            }
        }
    }

    /// Refuses the ADDs that waited too long; the runtime tries again.
    pub(super) fn expire_pending(&mut self) {
        let now = Instant::now();
        let (expired, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.deadline <= now);
        self.pending = waiting;
        for pending in expired {
            let key = pending.request.key();
            let why = if self.mesh.is_none() {
                "this agent has no configuration from the controller yet".to_owned()
            } else {
                format!(
                    "the configuration from the controller does not know pod {key} (or its \
                     namespace) yet"
                )
            };
            tracing::warn!(pod = %key, "CNI ADD refused: {why}");
            pending.request.answer(Outcome::Refused, why);
        }
    }

    async fn cni_del(&mut self, request: CniRequest) {
        let key = request.key();
        let origin = NetnsOrigin::Cni {
            container_id: request.pod.container_id.clone(),
        };
        self.pending.retain(|p| {
            !(p.request.key() == key && p.request.pod.container_id == request.pod.container_id)
        });
        let held = self
            .handoffs
            .get(&key)
            .is_some_and(|h| *h.netns.origin() == origin);
        if held {
            self.handoffs.remove(&key);
            let workload = self.enrolled.get(&key).map(|e| e.workload.clone());
            self.release(&key).await;
            self.lift_refusal(&key);
            if let Some(workload) = workload {
                // Still assigned here: it waits for its next sandbox.
                self.converge(key.clone(), workload).await;
            }
            tracing::info!(pod = %key, container = %request.pod.container_id, "released at the CNI plugin's request");
        }
        request.answer(Outcome::Released, "");
    }

    fn cni_check(&self, request: CniRequest) {
        let key = request.key();
        let origin = NetnsOrigin::Cni {
            container_id: request.pod.container_id.clone(),
        };
        if self.enrolled.get(&key).is_some_and(|e| e.origin == origin) {
            return request.answer(Outcome::Enrolled, "");
        }
        let admission = self
            .mesh
            .as_ref()
            .map(|mesh| super::plan::admit(mesh, &self.config.node, &request.pod));
        match admission {
            Some(Admission::NotInMesh) => request.answer(Outcome::NotInMesh, ""),
            _ => {
                let why = self
                    .failed
                    .get(&key)
                    .map(|f| f.error.clone())
                    .or_else(|| self.awaiting.get(&key).map(|a| a.reason.clone()))
                    .unwrap_or_else(|| "the pod is not enrolled".to_owned());
                request.answer(Outcome::Refused, why);
            }
        }
    }
}
