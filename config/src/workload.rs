use std::{net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::ObjectMeta;

/// A workload in local mode (`apiVersion: nodemesh.dev/v1alpha1`, `kind: Workload`): what a
/// Pod is in Kubernetes, described by the network namespace it lives in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: WorkloadSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Name of the node whose agent serves this workload.
    pub node: String,
    /// Path of the workload's network namespace, such as `/run/netns/web-1`. Absent for a pod
    /// whose namespace reaches the agent another way: handed over by the `nodemesh-cni` plugin
    /// when the pod is created, or found under /proc by its `metadata.uid` (Kubernetes mode
    /// never names one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The workload's IPv4 address inside its network namespace; absent until the pod has
    /// one (the CNI plugin tells the agent at the pod's creation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// The service account the workload runs as; its SPIFFE identity derives from it.
    #[serde(default = "default_service_account")]
    pub service_account: String,
}

fn default_service_account() -> String {
    "default".to_owned()
}

impl Workload {
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace()
    }

    /// The workload's address, once it has one.
    pub fn ip(&self) -> Option<Ipv4Addr> {
        self.spec.ip
    }

    /// `namespace/name`, the key users know a workload by.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace(), self.name())
    }

    /// The workload's SPIFFE identity in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace(),
            self.spec.service_account
        )
    }
}
