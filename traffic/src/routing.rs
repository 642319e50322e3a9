//! Which route rule a request to a Service port gets, and which backend of the rule.

use std::sync::Arc;

use crate::{
    matching::RequestHead,
    table::{BackendTarget, CompiledRule, PortEntry, RuleMatch},
};

/// The outcome of routing one request.
#[derive(Debug)]
pub enum RouteDecision<'a> {
    /// No route attaches to the port: the Service's own endpoints.
    Service,
    /// A rule matched.
    Rule(&'a RuleMatch),
    /// Routes attach to the port but none matches: 404, flag `NR`.
    NoRoute,
}

/// The rules that apply to a client in `client_namespace`: its namespace's consumer routes if
/// it has any, else the producer routes. `None` when no route attaches to the port.
pub fn rules_for<'a>(port: &'a PortEntry, client_namespace: &str) -> Option<&'a [RuleMatch]> {
    let routes = port.routes.as_ref()?;
    Some(
        routes
            .consumers
            .get(client_namespace)
            .map_or(&routes.producer[..], |list| &list[..]),
    )
}

/// Routes one request: the first rule match, in precedence order, that the request meets.
pub fn route<'a>(
    port: &'a PortEntry,
    client_namespace: &str,
    request: &RequestHead<'_>,
) -> RouteDecision<'a> {
    let Some(rules) = rules_for(port, client_namespace) else {
        return RouteDecision::Service;
    };
    rules
        .iter()
        .find(|m| m.condition.matches(request))
        .map_or(RouteDecision::NoRoute, RouteDecision::Rule)
}

impl CompiledRule {
    /// The backend for a request, by weight: `draw` is a uniform random number. `None` when
    /// the rule has no backend with weight (a redirect, or every weight 0).
    pub fn pick_backend(&self, draw: u64) -> Option<&Arc<BackendTarget>> {
        if self.total_weight == 0 {
            return None;
        }
        let mut point = draw % self.total_weight;
        for backend in &self.backends {
            let weight = u64::from(backend.weight);
            if point < weight {
                return Some(backend);
            }
            point -= weight;
        }
        None
    }

    /// Each backend's share of the rule's requests, in percent.
    pub fn shares(&self) -> Vec<(&BackendTarget, f64)> {
        self.backends
            .iter()
            .map(|b| {
                let share = if self.total_weight == 0 {
                    0.0
                } else {
                    100.0 * f64::from(b.weight) / self.total_weight as f64
                };
                (&**b, share)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
