//! The traffic view of a configuration, compiled once per change: Services with their ports,
//! endpoints and policies, and for each Service port the route rules attached to it, in
//! precedence order, as producer routes (the Service's namespace) and consumer routes (any
//! other namespace, for that namespace's clients only).

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use nodemesh_config::{
    AppProtocol, BackendTrafficPolicy, FilterType, HttpRoute, HttpRouteRule, MeshConfig,
    RequestRedirect, TargetKind, UrlRewrite,
};
use serde::Serialize;

use crate::{
    filters::HeaderEdit,
    matching::CompiledMatch,
    policy::{BackendSettings, RequestSettings},
};

/// Index of a Service in [`TrafficTable::services`].
pub type ServiceId = usize;

#[derive(Debug, Default)]
pub struct TrafficTable {
    pub services: Vec<ServiceEntry>,
    by_vip: HashMap<Ipv4Addr, ServiceId>,
    by_key: HashMap<String, ServiceId>,
}

#[derive(Debug)]
pub struct ServiceEntry {
    /// `namespace/name`.
    pub key: String,
    pub ports: Vec<PortEntry>,
    pub endpoints: Vec<Endpoint>,
    /// The endpoint settings of the Service's own policy (or the defaults).
    pub settings: Arc<BackendSettings>,
}

/// An endpoint of a Service: usually a workload, or an address an EndpointSlice lists
/// outside the mesh's pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    /// `namespace/name` of the workload holding the address, when the mesh knows one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

#[derive(Debug)]
pub struct PortEntry {
    pub port: u16,
    pub target_port: u16,
    pub protocol: AppProtocol,
    /// `None` when no route attaches to the port.
    pub routes: Option<PortRoutes>,
    /// The Service itself on this port, with its own policy: where requests go when no route
    /// attaches, and where plain TCP goes.
    pub service_target: Arc<BackendTarget>,
    /// The Service's BackendTrafficPolicy sets what only HTTP can do (retries, a request
    /// timeout): the port reads HTTP for it.
    pub http_policy: bool,
}

/// The rules attached to one Service port.
#[derive(Debug, Default)]
pub struct PortRoutes {
    /// Routes in the Service's namespace, for every client.
    pub producer: Vec<RuleMatch>,
    /// Routes in other namespaces, by namespace, for that namespace's clients only; they
    /// replace the producer routes for those clients.
    pub consumers: BTreeMap<String, Vec<RuleMatch>>,
}

/// One `matches` entry of a rule, in precedence order within its list.
#[derive(Debug, Clone)]
pub struct RuleMatch {
    pub rule: Arc<CompiledRule>,
    pub match_index: usize,
    pub condition: CompiledMatch,
}

/// A route rule ready to serve.
#[derive(Debug)]
pub struct CompiledRule {
    /// `namespace/name` of the HTTPRoute.
    pub route: Arc<str>,
    pub rule_index: usize,
    pub name: Option<String>,
    pub request_headers: Option<HeaderEdit>,
    pub response_headers: Option<HeaderEdit>,
    pub redirect: Option<RequestRedirect>,
    pub rewrite: Option<UrlRewrite>,
    pub backends: Vec<Arc<BackendTarget>>,
    pub total_weight: u64,
}

/// Where a rule (or a Service without routes) sends: a Service's endpoints on one port, with
/// the settings that apply.
#[derive(Debug, Clone, Serialize)]
pub struct BackendTarget {
    /// `namespace/name`; `None` when the backendRef names no Service (requests get 500).
    pub service: Option<ServiceId>,
    pub service_key: String,
    /// The Service port, and the endpoints' port behind it.
    pub port: u16,
    pub target_port: u16,
    pub weight: u32,
    pub settings: Arc<BackendSettings>,
    pub request: Arc<RequestSettings>,
    /// Whose limits, budget and health this target shares: the policies that set them and
    /// the Service.
    pub state_key: String,
}

impl TrafficTable {
    pub fn new(mesh: &MeshConfig) -> Self {
        let policies = PolicyIndex::new(mesh);
        let mut table = TrafficTable::default();
        for (id, service) in mesh.services.values().enumerate() {
            let key = service.key();
            if let Some(vip) = service.vip() {
                table.by_vip.insert(vip, id);
            }
            table.by_key.insert(key.clone(), id);
        }
        for (id, service) in mesh.services.values().enumerate() {
            let key = service.key();
            let (settings, request) = policies.for_service(&key);
            let http_policy = policies.service.get(&key).is_some_and(|p| {
                p.spec.retry.is_some()
                    || p.spec
                        .timeout
                        .as_ref()
                        .and_then(|t| t.http.as_ref())
                        .is_some_and(|h| h.request_timeout.is_some())
            });
            let endpoints = mesh
                .endpoints(service)
                .into_iter()
                .map(|e| Endpoint {
                    ip: e.ip,
                    workload: e.workload.map(nodemesh_config::Workload::key),
                })
                .collect();
            let ports = service
                .spec
                .ports
                .iter()
                .map(|p| {
                    let target_port = service.target_port(p.port).unwrap_or(p.port);
                    PortEntry {
                        port: p.port,
                        target_port,
                        protocol: p.app_protocol(),
                        routes: None,
                        http_policy,
                        service_target: Arc::new(BackendTarget {
                            service: Some(id),
                            service_key: key.clone(),
                            port: p.port,
                            target_port,
                            weight: 1,
                            state_key: key.clone(),
                            settings: settings.clone(),
                            request: request.clone(),
                        }),
                    }
                })
                .collect();
            table.services.push(ServiceEntry {
                key,
                ports,
                endpoints,
                settings,
            });
        }
        let mut routes: Vec<&HttpRoute> = mesh.http_routes.values().collect();
        // Ties in precedence go to the oldest route, then by namespace/name.
        routes.sort_by(|a, b| {
            let age = |r: &HttpRoute| r.metadata.creation_timestamp.clone();
            match (age(a), age(b)) {
                (Some(x), Some(y)) => x.cmp(&y),
                _ => std::cmp::Ordering::Equal,
            }
            .then_with(|| a.key().cmp(&b.key()))
        });
        for route in routes {
            table.attach(route, &policies);
        }
        for service in &mut table.services {
            for port in &mut service.ports {
                if let Some(routes) = &mut port.routes {
                    sort(&mut routes.producer);
                    for list in routes.consumers.values_mut() {
                        sort(list);
                    }
                }
            }
        }
        table
    }

    fn attach(&mut self, route: &HttpRoute, policies: &PolicyIndex) {
        let namespace = route.metadata.namespace();
        let default_rule = [HttpRouteRule::default()];
        let rules = if route.spec.rules.is_empty() {
            &default_rule[..]
        } else {
            &route.spec.rules
        };
        for parent in &route.spec.parent_refs {
            let parent_ns = parent.namespace(namespace);
            let Some(&parent_id) = self.by_key.get(&format!("{parent_ns}/{}", parent.name)) else {
                continue;
            };
            let ports: Vec<u16> = self.services[parent_id]
                .ports
                .iter()
                .map(|p| p.port)
                .filter(|p| parent.port.is_none_or(|wanted| wanted == *p))
                .collect();
            for port in ports {
                let compiled: Vec<Arc<CompiledRule>> = rules
                    .iter()
                    .enumerate()
                    .map(|(index, rule)| {
                        Arc::new(self.compile_rule(route, index, rule, parent_id, port, policies))
                    })
                    .collect();
                let producer = parent_ns == namespace;
                let Some(entry) = self.services[parent_id]
                    .ports
                    .iter_mut()
                    .find(|p| p.port == port)
                else {
                    continue;
                };
                let routes = entry.routes.get_or_insert_with(PortRoutes::default);
                let list = if producer {
                    &mut routes.producer
                } else {
                    routes.consumers.entry(namespace.to_owned()).or_default()
                };
                for (rule, source) in compiled.iter().zip(rules) {
                    for (match_index, m) in source.effective_matches().iter().enumerate() {
                        // Validation compiled every expression already.
                        if let Ok(condition) = CompiledMatch::new(m) {
                            list.push(RuleMatch {
                                rule: rule.clone(),
                                match_index,
                                condition,
                            });
                        }
                    }
                }
            }
        }
    }

    fn compile_rule(
        &self,
        route: &HttpRoute,
        rule_index: usize,
        rule: &HttpRouteRule,
        parent: ServiceId,
        parent_port: u16,
        policies: &PolicyIndex,
    ) -> CompiledRule {
        let namespace = route.metadata.namespace();
        let route_policy = policies.route.get(&route.key()).copied();
        let filter = |kind| rule.filters.iter().find(|f| f.kind == kind);
        let mut backends: Vec<Arc<BackendTarget>> = rule
            .backend_refs
            .iter()
            .map(|backend| {
                let key = format!("{}/{}", backend.namespace(namespace), backend.name);
                let port = backend.port.unwrap_or(parent_port);
                self.target(&key, port, backend.weight, route_policy, rule, policies)
            })
            .collect();
        let redirects = filter(FilterType::RequestRedirect).is_some();
        if backends.is_empty() && !redirects {
            // GAMMA: a rule without backendRefs sends to the parent Service.
            let key = self.services[parent].key.clone();
            backends.push(self.target(&key, parent_port, 1, route_policy, rule, policies));
        }
        CompiledRule {
            route: Arc::from(route.key()),
            rule_index,
            name: rule.name.clone(),
            request_headers: filter(FilterType::RequestHeaderModifier)
                .and_then(|f| f.request_header_modifier.as_ref())
                .map(HeaderEdit::new),
            response_headers: filter(FilterType::ResponseHeaderModifier)
                .and_then(|f| f.response_header_modifier.as_ref())
                .map(HeaderEdit::new),
            redirect: filter(FilterType::RequestRedirect).and_then(|f| f.request_redirect.clone()),
            rewrite: filter(FilterType::UrlRewrite).and_then(|f| f.url_rewrite.clone()),
            total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
            backends,
        }
    }

    /// A backend of a rule: the Service's settings, then the route's policy over them, then
    /// the rule's own timeouts and retry.
    fn target(
        &self,
        service_key: &str,
        port: u16,
        weight: u32,
        route_policy: Option<&BackendTrafficPolicy>,
        rule: &HttpRouteRule,
        policies: &PolicyIndex,
    ) -> Arc<BackendTarget> {
        let service = self.by_key.get(service_key).copied();
        let (mut settings, mut request) = policies.for_service(service_key);
        let mut state_key = service_key.to_owned();
        if let Some(policy) = route_policy {
            settings = Arc::new(BackendSettings::from_policy(policy, &settings));
            request = Arc::new(RequestSettings::from_policy(policy, &request));
            state_key = format!("{}|{service_key}", policy.key());
        }
        let request = Arc::new((*request).clone().with_rule(rule));
        let target_port = service
            .and_then(|id| self.services[id].ports.iter().find(|p| p.port == port))
            .map_or(port, |p| p.target_port);
        Arc::new(BackendTarget {
            service,
            service_key: service_key.to_owned(),
            port,
            target_port,
            weight,
            settings,
            request,
            state_key,
        })
    }

    /// The Service whose address this is.
    pub fn service_at(&self, vip: Ipv4Addr) -> Option<(ServiceId, &ServiceEntry)> {
        let id = *self.by_vip.get(&vip)?;
        Some((id, &self.services[id]))
    }

    pub fn service(&self, key: &str) -> Option<(ServiceId, &ServiceEntry)> {
        let id = *self.by_key.get(key)?;
        Some((id, &self.services[id]))
    }
}

impl ServiceEntry {
    pub fn port(&self, port: u16) -> Option<&PortEntry> {
        self.ports.iter().find(|p| p.port == port)
    }
}

impl PortEntry {
    /// Whether the client's proxy reads HTTP on this port: an HTTPRoute attaches, the
    /// appProtocol says HTTP, or the Service's policy retries or times out requests.
    pub fn reads_http(&self) -> bool {
        self.routes.is_some() || self.protocol != AppProtocol::Opaque || self.http_policy
    }
}

fn sort(list: &mut [RuleMatch]) {
    // Stable: equal precedence keeps route order (age, then name), rule and match order.
    list.sort_by(|a, b| a.condition.precedence(&b.condition));
}

/// BackendTrafficPolicies by what they target.
struct PolicyIndex<'a> {
    service: HashMap<String, &'a BackendTrafficPolicy>,
    route: HashMap<String, &'a BackendTrafficPolicy>,
}

impl<'a> PolicyIndex<'a> {
    fn new(mesh: &'a MeshConfig) -> Self {
        let mut index = Self {
            service: HashMap::new(),
            route: HashMap::new(),
        };
        for policy in mesh.backend_traffic_policies.values() {
            for target in policy.targets() {
                let key = format!("{}/{}", policy.metadata.namespace(), target.name);
                match target.target_kind() {
                    Some(TargetKind::Service) => index.service.insert(key, policy),
                    Some(TargetKind::HttpRoute) => index.route.insert(key, policy),
                    None => None,
                };
            }
        }
        index
    }

    fn for_service(&self, key: &str) -> (Arc<BackendSettings>, Arc<RequestSettings>) {
        match self.service.get(key) {
            Some(policy) => (
                Arc::new(BackendSettings::from_policy(
                    policy,
                    &BackendSettings::default(),
                )),
                Arc::new(RequestSettings::from_policy(
                    policy,
                    &RequestSettings::default(),
                )),
            ),
            None => Default::default(),
        }
    }
}
