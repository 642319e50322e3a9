//! Workload identities on this node: a certificate per identity of an enrolled workload,
//! obtained from the controller's certificate API and renewed before it expires.

mod manager;

pub use self::manager::{Identity, IdentityError, IdentityManager};
