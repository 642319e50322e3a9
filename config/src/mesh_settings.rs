use serde::{Deserialize, Serialize};

use crate::{ObjectMeta, ROOT_NAMESPACE};

/// Mesh-wide settings (`apiVersion: nodemesh.dev/v1alpha1`, `kind: MeshSettings`): at most one,
/// named `default`, in the mesh's own namespace `nodemesh-system`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSettings {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: MeshSettingsSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema, kube::CustomResource))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "nodemesh.dev",
        version = "v1alpha1",
        kind = "MeshSettings",
        doc = "The mesh's settings: one, named default, in the root namespace.",
        root = "MeshSettingsResource",
        plural = "meshsettings",
        namespaced,
        status = "crate::ObjectStatus",
        category = "nodemesh",
        printcolumn(
            name = "Accepted",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
        )
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSettingsSpec {
    #[serde(default)]
    pub egress: Egress,
    #[serde(default)]
    pub telemetry: Telemetry,
    /// How request paths are normalised before authorization and routing judge them (Istio's
    /// `meshConfig.pathNormalization.normalization`).
    #[serde(default)]
    pub path_normalization: PathNormalization,
    /// The namespace whose AuthorizationPolicies and PeerAuthentications apply to the whole
    /// mesh (Istio's `rootNamespace`); `nodemesh-system` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_namespace: Option<String>,
    /// Other trust domains whose identities count as the mesh's own in AuthorizationPolicy
    /// principals (Istio's `trustDomainAliases`), for a mesh moving from one to another.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domain_aliases: Vec<String>,
}

impl MeshSettingsSpec {
    /// The namespace of mesh-wide policies.
    pub fn root_namespace(&self) -> &str {
        self.root_namespace.as_deref().unwrap_or(ROOT_NAMESPACE)
    }
}

/// Istio's path normalisation options, applied to every request the proxies read as HTTP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// The path as the client sent it.
    None,
    /// RFC 3986: dot segments removed, escaped unreserved characters decoded, `\` as `/`.
    #[default]
    Base,
    /// `BASE`, and runs of `/` merged.
    MergeSlashes,
    /// `%2F` and `%5C` decoded too, then `MERGE_SLASHES`.
    DecodeAndMergeSlashes,
}

/// What the proxies observe beyond connections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Telemetry {
    /// Read HTTP on every inbound connection, for request metrics, per-request access log
    /// lines and traces. Off by default: plain TCP is then a byte copy, and HTTP is read only
    /// for workloads whose AuthorizationPolicies need it. Tracing turns it on.
    #[serde(default)]
    pub http_processing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
}

/// W3C trace context propagation and span export over OTLP/HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    /// The collector's OTLP/HTTP base address, `http://host:port` (spans go to `/v1/traces`).
    pub otlp_endpoint: String,
    /// Percentage (0 to 100) of requests without a trace context for which the proxy starts
    /// one. A request that arrives with a sampled `traceparent` is always traced.
    #[serde(default = "full_sampling")]
    pub random_sampling_percentage: f64,
}

fn full_sampling() -> f64 {
    100.0
}

impl Telemetry {
    /// Whether the proxies read HTTP on every inbound connection.
    pub fn reads_http(&self) -> bool {
        self.http_processing || self.tracing.is_some()
    }
}

impl Tracing {
    /// The `host:port` of the collector.
    pub fn collector(&self) -> Result<&str, String> {
        let authority = self
            .otlp_endpoint
            .strip_prefix("http://")
            .map(|a| a.trim_end_matches('/'))
            .ok_or_else(|| {
                format!(
                    "{:?} is not an http:// address; give the collector's OTLP/HTTP endpoint, \
                     such as http://otel-collector:4318",
                    self.otlp_endpoint
                )
            })?;
        match authority.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(authority),
            _ => Err(format!("{:?} needs a host and a port", self.otlp_endpoint)),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Egress {
    #[serde(default)]
    pub policy: EgressPolicy,
}

/// What happens to connections from enrolled workloads to destinations outside the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum EgressPolicy {
    /// Carried as plain TCP.
    #[default]
    Allow,
    /// Refused: enrolled workloads may only reach enrolled workloads.
    Deny,
}
