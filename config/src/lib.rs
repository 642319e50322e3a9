//! nodemesh's configuration model.
//!
//! One model, two sources: in Kubernetes the controller watches the API server; in local mode
//! the same kinds of objects are read, as Kubernetes-style YAML, from a directory. This crate
//! parses and validates them into a [`MeshConfig`]. Every error names the file, the object and
//! the field, and says what is allowed instead.
#![forbid(unsafe_code)]

mod authorization_policy;
mod backend_traffic_policy;
mod duration;
mod endpoint_slice;
mod error;
#[cfg(test)]
mod fuzz;
mod http_route;
mod ip_block;
mod load;
mod mesh;
mod mesh_settings;
mod meta;
mod namespace;
mod peer_authentication;
#[cfg(feature = "kube")]
mod schema;
mod service;
pub mod snapshot;
mod status;
#[cfg(feature = "watch")]
mod watch;
mod workload;

#[cfg(feature = "kube")]
pub use authorization_policy::AuthorizationPolicyResource;
pub use authorization_policy::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, Condition, ConditionKey,
    DRY_RUN_ANNOTATION, From, ISTIO_DRY_RUN_ANNOTATION, Operation, PolicyTargetRef, Rule, Source,
    To, parse_go_bool, parse_ip_block, parse_port,
};
#[cfg(feature = "kube")]
pub use backend_traffic_policy::BackendTrafficPolicyResource;
pub use backend_traffic_policy::{
    BackOffPolicy, BackendTrafficPolicy, BackendTrafficPolicySpec, CircuitBreaker, ConsistentHash,
    ConsistentHashType, HashHeader, HeaderMatch, HeaderMatchType, HealthCheck, HttpTimeout,
    LoadBalancer, LoadBalancerType, LocalRateLimit, MethodMatch, POLICY_API_VERSION,
    PassiveHealthCheck, PathMatch, PathMatchKind, PerRetryPolicy, PolicyTargetReference, RateLimit,
    RateLimitRule, RateLimitSelectCondition, RateLimitType, RateLimitUnit, RateLimitValue, Retry,
    RetryBudget, RetryOn, RetryTrigger, SourceMatch, SourceMatchType, StringMatchType, TargetKind,
    TcpTimeout, Timeout,
};
pub use duration::{GatewayDuration, GoDuration};
pub use endpoint_slice::{
    EndpointConditions, EndpointSlice, SERVICE_NAME_LABEL, SliceEndpoint, SlicePort,
};
pub use error::{ConfigError, ConfigErrors};
pub use http_route::{
    FilterType, GATEWAY_API_VERSION, HeaderModifier, HttpBackendRef, HttpHeader, HttpHeaderMatch,
    HttpPathMatch, HttpQueryParamMatch, HttpRoute, HttpRouteFilter, HttpRouteMatch, HttpRouteRetry,
    HttpRouteRule, HttpRouteSpec, HttpRouteTimeouts, ParentReference, PathMatchType, PathModifier,
    PathModifierType, RequestRedirect, UrlRewrite, ValueMatchType,
};
pub use ip_block::IpBlock;
pub use load::{
    ParsedObject, SourceFingerprint, assemble, load_dir, load_path, load_str, parse_object,
};
pub use mesh::{EffectiveMtls, MeshConfig, PortMtls, ServiceEndpoint};
#[cfg(feature = "kube")]
pub use mesh_settings::MeshSettingsResource;
pub use mesh_settings::{
    Egress, EgressPolicy, MeshSettings, MeshSettingsSpec, PathNormalization, Telemetry, Tracing,
};
pub use meta::ObjectMeta;
pub use namespace::Namespace;
#[cfg(feature = "kube")]
pub use peer_authentication::PeerAuthenticationResource;
pub use peer_authentication::{
    Mtls, MtlsMode, PeerAuthentication, PeerAuthenticationSpec, PortKey, WorkloadSelector,
    selects_all,
};
pub use service::{AppProtocol, ClusterIp, Service, ServicePort, ServiceSpec};
pub use status::{ObjectStatus, StatusCondition};
#[cfg(feature = "watch")]
pub use watch::LocalSource;
pub use workload::{Workload, WorkloadSpec};

/// Label on a Namespace that enrolls its workloads (`"true"`), and on a workload that opts it
/// out again (`"false"`).
pub const ENROLLED_LABEL: &str = "nodemesh.dev/enabled";

/// The API group and version of nodemesh's own kinds.
pub const API_VERSION: &str = "nodemesh.dev/v1alpha1";

/// Kubernetes' EndpointSlice.
pub const ENDPOINT_SLICE_API_VERSION: &str = "discovery.k8s.io/v1";

/// The API group and version of the security kinds, named as Istio's.
pub const SECURITY_API_VERSION: &str = "security.nodemesh.dev/v1";

/// The mesh's own namespace (MeshSettings live there), and the root namespace whose policies
/// apply to the whole mesh unless MeshSettings names another.
pub const ROOT_NAMESPACE: &str = "nodemesh-system";

/// The SPIFFE trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
