//! Kubernetes' Service (`apiVersion: v1`): a virtual IP and ports in front of the workloads
//! its selector picks.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::ObjectMeta;

/// Fields nodemesh does not use are accepted and ignored, so that Services exported from a
/// cluster load unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// The virtual IP clients connect to, or `None` (as Kubernetes writes it) for a headless
    /// Service, whose clients connect to its pods' addresses.
    #[serde(rename = "clusterIP")]
    pub cluster_ip: ClusterIp,
    /// Labels of the workloads behind the Service, in its namespace.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// The workloads' port; the same as `port` when unset. Only numbers: local workloads
    /// declare no named ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<serde_yaml::Value>,
    #[serde(default = "tcp")]
    pub protocol: String,
    /// The application protocol: `http`, `h2c` or `grpc` (or Kubernetes' `kubernetes.io/h2c`)
    /// make the client's node proxy read HTTP on this port, for per-request balancing,
    /// retries and the other HTTP settings of a BackendTrafficPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// What the client's node proxy reads on a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AppProtocol {
    /// Bytes, unless an HTTPRoute attaches to the port (then HTTP, detected).
    Opaque,
    /// HTTP/1.1 or HTTP/2, detected from the first bytes.
    Http,
    /// HTTP/2 without TLS (h2c), gRPC included.
    Http2,
}

impl ServicePort {
    pub fn app_protocol(&self) -> AppProtocol {
        match self.app_protocol.as_deref() {
            Some("http") => AppProtocol::Http,
            Some("h2c" | "grpc" | "kubernetes.io/h2c") => AppProtocol::Http2,
            _ => AppProtocol::Opaque,
        }
    }
}

/// A Service's `clusterIP`: an IPv4 address, or `None` for a headless Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterIp {
    Address(Ipv4Addr),
    Headless,
}

impl ClusterIp {
    pub fn address(self) -> Option<Ipv4Addr> {
        match self {
            Self::Address(ip) => Some(ip),
            Self::Headless => None,
        }
    }
}

impl Serialize for ClusterIp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Address(ip) => s.collect_str(ip),
            Self::Headless => s.serialize_str("None"),
        }
    }
}

impl<'de> Deserialize<'de> for ClusterIp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "None" {
            return Ok(Self::Headless);
        }
        text.parse().map(Self::Address).map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is not an IPv4 address; write None for a headless Service"
            ))
        })
    }
}

fn tcp() -> String {
    "TCP".to_owned()
}

impl Service {
    /// The Service's virtual IP; `None` when headless.
    pub fn vip(&self) -> Option<Ipv4Addr> {
        self.spec.cluster_ip.address()
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }

    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.spec.ports.iter().find(|p| p.port == port)
    }

    /// The workloads' port behind `port`.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.spec.ports.iter().find(|p| p.port == port).map(|p| {
            p.target_port
                .as_ref()
                .and_then(serde_yaml::Value::as_u64)
                .map_or(p.port, |t| t as u16)
        })
    }

    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.spec.ports.is_empty() {
            return Err((
                "spec.ports".to_owned(),
                "a Service needs at least one port".to_owned(),
            ));
        }
        if let ClusterIp::Address(ip) = self.spec.cluster_ip
            && (ip.is_unspecified() || ip.is_loopback() || ip.is_multicast())
        {
            return Err((
                "spec.clusterIP".to_owned(),
                format!("{ip} cannot be a Service address"),
            ));
        }
        for (i, port) in self.spec.ports.iter().enumerate() {
            let at = |field: &str| format!("spec.ports[{i}].{field}");
            if port.port == 0 {
                return Err((at("port"), "0 is not a port".to_owned()));
            }
            if port.protocol != "TCP" {
                return Err((
                    at("protocol"),
                    format!("{:?} is not supported; nodemesh carries TCP", port.protocol),
                ));
            }
            match &port.target_port {
                None => {}
                Some(v) if v.as_u64().is_some_and(|p| (1..=65535).contains(&p)) => {}
                Some(v) => {
                    return Err((
                        at("targetPort"),
                        format!(
                            "{v:?} is not a port number; named ports are not supported in local mode"
                        ),
                    ));
                }
            }
            if self.spec.ports[..i].iter().any(|p| p.port == port.port) {
                return Err((at("port"), format!("port {} is listed twice", port.port)));
            }
        }
        Ok(())
    }
}
