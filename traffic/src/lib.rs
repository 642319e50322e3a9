//! nodemesh's traffic decisions, as pure functions of the mesh view: which HTTPRoute rule a
//! request gets (Gateway API precedence, GAMMA producer and consumer routes), which backend
//! by weight, which settings apply (BackendTrafficPolicy over the Service and the route), which
//! endpoint (power of two choices over peak EWMA, round robin, random, consistent hash),
//! whether an attempt is retried and after how long, when an endpoint is ejected, and whether a
//! request is within a rate limit. The node proxy keeps the live state (counters, estimates,
//! buckets) and asks these functions; `nodemesh explain` asks the same ones.
#![forbid(unsafe_code)]

pub mod balance;
pub mod budget;
pub mod explain;
pub mod filters;
pub mod matching;
pub mod outlier;
pub mod policy;
pub mod rate_limit;
pub mod retry;
pub mod routing;
pub mod table;

#[cfg(test)]
mod fixtures;

pub use self::{
    matching::RequestHead,
    routing::{RouteDecision, route, rules_for},
    table::{
        BackendTarget, CompiledRule, Endpoint, PortEntry, ServiceEntry, ServiceId, TrafficTable,
    },
};
