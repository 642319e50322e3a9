//! nodemesh's configuration model.
//!
//! One model, two sources: in Kubernetes the controller watches the API server; in local mode
//! the same kinds of objects are read, as Kubernetes-style YAML, from a directory. This crate
//! parses and validates them into a [`MeshConfig`]. Every error names the file, the object and
//! the field, and says what is allowed instead.
#![forbid(unsafe_code)]

mod error;
mod load;
mod mesh;
mod meta;
mod namespace;
#[cfg(feature = "watch")]
mod watch;
mod workload;

pub use error::{ConfigError, ConfigErrors};
pub use load::{SourceFingerprint, load_dir, load_path};
pub use mesh::MeshConfig;
pub use meta::ObjectMeta;
pub use namespace::Namespace;
#[cfg(feature = "watch")]
pub use watch::LocalSource;
pub use workload::{Workload, WorkloadSpec};

/// Label on a Namespace that enrolls its workloads (`"true"`), and on a workload that opts it
/// out again (`"false"`).
pub const ENROLLED_LABEL: &str = "nodemesh.dev/enabled";

/// The API group and version of nodemesh's own kinds.
pub const API_VERSION: &str = "nodemesh.dev/v1alpha1";

/// The SPIFFE trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
