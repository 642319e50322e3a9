//! Kubernetes' EndpointSlice (`apiVersion: discovery.k8s.io/v1`): the endpoints of a Service as
//! the cluster sees them, readiness included. Where a Service has slices, its endpoints are
//! theirs; without any (local mode, usually), its selector picks the workloads.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::ObjectMeta;

/// Label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Fields nodemesh does not use are accepted and ignored, so that slices exported from a
/// cluster load unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`; only IPv4 slices give endpoints (the mesh carries IPv4).
    pub address_type: String,
    #[serde(default)]
    pub endpoints: Vec<SliceEndpoint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<SlicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointConditions {
    /// Absent means ready, as Kubernetes defines it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl EndpointSlice {
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }

    /// `namespace/name` of the Service the slice belongs to.
    pub fn service_key(&self) -> Option<String> {
        self.metadata
            .label(SERVICE_NAME_LABEL)
            .map(|name| format!("{}/{name}", self.metadata.namespace()))
    }

    /// The IPv4 addresses of the slice's ready endpoints.
    pub fn ready_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.endpoints
            .iter()
            .filter(|e| self.address_type == "IPv4" && e.conditions.ready != Some(false))
            .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()))
    }

    /// The IPv4 addresses of all the slice's endpoints, ready or not.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.endpoints
            .iter()
            .filter(|_| self.address_type == "IPv4")
            .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()))
    }

    /// The port number the slice gives for the Service port called `name` (`None` for the
    /// Service's only, unnamed port).
    pub fn port_named(&self, name: Option<&str>) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name.as_deref().unwrap_or("") == name.unwrap_or(""))
            .and_then(|p| p.port)
    }

    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.service_key().is_none() {
            return Err((
                format!("metadata.labels.{SERVICE_NAME_LABEL}"),
                "is missing; say which Service the slice belongs to".to_owned(),
            ));
        }
        if !matches!(self.address_type.as_str(), "IPv4" | "IPv6" | "FQDN") {
            return Err((
                "addressType".to_owned(),
                format!(
                    "{:?} is not an address type; use IPv4, IPv6 or FQDN",
                    self.address_type
                ),
            ));
        }
        if self.address_type == "IPv4" {
            for (i, endpoint) in self.endpoints.iter().enumerate() {
                for (j, address) in endpoint.addresses.iter().enumerate() {
                    if address.parse::<Ipv4Addr>().is_err() {
                        return Err((
                            format!("endpoints[{i}].addresses[{j}]"),
                            format!("{address:?} is not an IPv4 address"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
