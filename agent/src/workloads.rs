//! The workloads this agent serves: enrolling them (listeners in their namespace, capture
//! switched on) and releasing them when the configuration no longer assigns them here.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use nodemesh_config::{DEFAULT_TRUST_DOMAIN, MeshConfig, Workload};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    datapath::{CaptureHandle, Datapath, DatapathError},
    inpod,
    netns::{NetnsError, PodNetns},
    proxy::{PodContext, ProxyShared, serve_inbound, serve_outbound},
    state::WorkloadStatus,
};

#[derive(Debug, thiserror::Error)]
enum EnrollError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(
        "cannot listen on {addr} in {netns}: {source}; check that {ip} is configured in that \
         namespace and that nothing else uses the port"
    )]
    Listen {
        addr: SocketAddr,
        ip: Ipv4Addr,
        netns: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// A workload whose traffic is being captured.
#[derive(Debug)]
struct Enrolled {
    workload: Workload,
    pod: Arc<PodContext>,
    capture: CaptureHandle,
    /// Ends the listeners and every connection of this workload.
    token: CancellationToken,
}

#[derive(Debug)]
pub struct WorkloadRegistry {
    config: Arc<Config>,
    datapath: Datapath,
    shared: Arc<ProxyShared>,
    enrolled: BTreeMap<String, Enrolled>,
    failed: BTreeMap<String, (Workload, String)>,
}

impl WorkloadRegistry {
    pub fn new(config: Arc<Config>, datapath: Datapath, shared: Arc<ProxyShared>) -> Self {
        Self {
            config,
            datapath,
            shared,
            enrolled: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Makes the enrolled set match what `mesh` assigns to this node: releases workloads that
    /// left or changed, enrolls new ones. A workload that cannot be enrolled is reported and
    /// retried by [`retry_failed`](Self::retry_failed); the others are unaffected.
    pub fn apply(&mut self, mesh: &MeshConfig) {
        let config = self.config.clone();
        let desired: BTreeMap<String, &Workload> = mesh
            .enrolled_on(&config.node)
            .map(|w| (w.key(), w))
            .collect();
        let stale: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(key, e)| desired.get(*key).is_none_or(|w| **w != e.workload))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.release(&key);
        }
        self.failed.clear();
        for (key, workload) in desired {
            if !self.enrolled.contains_key(&key) {
                self.enroll(key, workload.clone());
            }
        }
    }

    /// Tries again to enroll the workloads that failed (their namespace may exist now).
    pub fn retry_failed(&mut self) {
        for (key, (workload, _)) in std::mem::take(&mut self.failed) {
            self.enroll(key, workload);
        }
    }

    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Releases every workload; the agent is stopping.
    pub fn release_all(&mut self) {
        let keys: Vec<String> = self.enrolled.keys().cloned().collect();
        for key in keys {
            self.release(&key);
        }
    }

    fn enroll(&mut self, key: String, workload: Workload) {
        match self.try_enroll(&workload) {
            Ok(enrolled) => {
                tracing::info!(
                    workload = %key,
                    ip = %workload.spec.ip,
                    netns = %workload.spec.netns.display(),
                    cookie = enrolled.pod.netns.cookie(),
                    "workload enrolled"
                );
                self.enrolled.insert(key, enrolled);
            }
            Err(e) => {
                tracing::warn!(workload = %key, error = %e, "cannot enroll workload");
                self.failed.insert(key, (workload, e.to_string()));
            }
        }
    }

    fn try_enroll(&mut self, workload: &Workload) -> Result<Enrolled, EnrollError> {
        let netns = PodNetns::open(&workload.spec.netns)?;
        let ip = workload.spec.ip;
        let ports = self.config.ports;
        let mark = self.config.proxy_mark;
        let listen = |port: u16| {
            let addr = SocketAddr::from((ip, port));
            inpod::listen(&netns, addr, mark).map_err(|source| EnrollError::Listen {
                addr,
                ip,
                netns: workload.spec.netns.display().to_string(),
                source,
            })
        };
        let outbound = listen(ports.outbound)?;
        let inbound = listen(ports.inbound)?;
        // Listeners first, capture last: no connection is redirected before the proxy is there.
        let capture = self.datapath.enroll(&netns, ip, &inbound)?;
        let pod = Arc::new(PodContext {
            key: workload.key(),

            netns,
            counters: Default::default(),
        });
        let token = CancellationToken::new();
        tokio::spawn(serve_outbound(
            outbound,
            pod.clone(),
            self.shared.clone(),
            token.clone(),
        ));
        tokio::spawn(serve_inbound(
            inbound,
            pod.clone(),
            self.shared.clone(),
            token.clone(),
        ));
        Ok(Enrolled {
            workload: workload.clone(),
            pod,
            capture,
            token,
        })
    }

    fn release(&mut self, key: &str) {
        let Some(mut enrolled) = self.enrolled.remove(key) else {
            return;
        };
        // Capture off first, so no new connection reaches listeners about to close.
        self.datapath.release(&mut enrolled.capture);
        enrolled.token.cancel();
        tracing::info!(workload = %key, "workload released");
    }

    /// Every workload assigned to this node, enrolled or failed, for `/workloads`.
    pub fn status(&self) -> Vec<WorkloadStatus> {
        let enrolled = self.enrolled.values().map(|e| {
            let mut status = describe(&e.workload, "enrolled", None);
            status.netns_cookie = Some(e.pod.netns.cookie());
            status.counters = Some(e.pod.counters.clone());
            status
        });
        let failed = self
            .failed
            .values()
            .map(|(w, error)| describe(w, "failed", Some(error.clone())));
        let mut all: Vec<WorkloadStatus> = enrolled.chain(failed).collect();
        all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        all
    }
}

fn describe(w: &Workload, state: &'static str, error: Option<String>) -> WorkloadStatus {
    WorkloadStatus {
        name: w.name().to_owned(),
        namespace: w.namespace().to_owned(),
        ip: w.spec.ip,
        netns: w.spec.netns.display().to_string(),
        service_account: w.spec.service_account.clone(),
        identity: w.identity(DEFAULT_TRUST_DOMAIN),
        state,
        error,
        netns_cookie: None,
        outbound_connections: 0,
        inbound_connections: 0,
        counters: None,
    }
}
