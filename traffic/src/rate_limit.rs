//! Local rate limits with Envoy Gateway's semantics: each rule is a token bucket holding
//! `requests` tokens, filled up again every `unit`. A request takes a token from every rule
//! whose client selectors it meets (all of a rule's selectors must hold); a request no such
//! rule selects takes one from the rule without selectors, if there is one. It is refused
//! when one of its buckets is empty. `Distinct` selectors give each distinct header value or
//! client address a bucket of its own.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use http::{HeaderMap, Method};
use nodemesh_config::{
    BackendTrafficPolicy, HeaderMatchType, IpBlock, MeshConfig, PathMatchKind,
    RateLimitSelectCondition, SourceMatchType, StringMatchType, TargetKind, Workload,
};
use regex::Regex;

/// A Service's local rate limit, as the pods it selects enforce it.
#[derive(Debug)]
pub struct RateLimitPolicy {
    /// `namespace/name` of the BackendTrafficPolicy.
    pub policy: String,
    pub rules: Vec<RateLimitRule>,
}

#[derive(Debug)]
pub struct RateLimitRule {
    selectors: Vec<Selector>,
    pub requests: u32,
    pub interval: Duration,
}

#[derive(Debug)]
struct Selector {
    headers: Vec<HeaderCondition>,
    source: Option<SourceCondition>,
    methods: Vec<(StringCondition, bool)>,
    path: Option<(PathCondition, bool)>,
}

#[derive(Debug)]
struct HeaderCondition {
    name: http::HeaderName,
    kind: HeaderKind,
    invert: bool,
}

#[derive(Debug)]
enum HeaderKind {
    Exact(String),
    Regex(Regex),
    Distinct,
}

#[derive(Debug)]
struct SourceCondition {
    block: IpBlock,
    distinct: bool,
}

#[derive(Debug)]
enum StringCondition {
    Exact(String),
    Regex(Regex),
}

#[derive(Debug)]
enum PathCondition {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

/// What a rate limit looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RateLimitRequest<'a> {
    pub source: IpAddr,
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

fn whole(pattern: &str) -> Option<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).ok()
}

impl RateLimitPolicy {
    /// The local rate limit of a policy, if it has one.
    pub fn new(policy: &BackendTrafficPolicy) -> Option<Self> {
        let local = policy.spec.rate_limit.as_ref()?.local.as_ref()?;
        Some(Self {
            policy: policy.key(),
            rules: local
                .rules
                .iter()
                .map(|rule| RateLimitRule {
                    selectors: rule.client_selectors.iter().map(Selector::new).collect(),
                    requests: rule.limit.requests,
                    interval: Duration::from_secs(rule.limit.unit.seconds()),
                })
                .collect(),
        })
    }
}

impl Selector {
    fn new(condition: &RateLimitSelectCondition) -> Self {
        let invert = |v: Option<bool>| v.unwrap_or(false);
        Self {
            headers: condition
                .headers
                .iter()
                .filter_map(|h| {
                    let name = http::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
                    let value = h.value.clone().unwrap_or_default();
                    let kind = match h.kind {
                        HeaderMatchType::Exact => HeaderKind::Exact(value),
                        HeaderMatchType::RegularExpression => HeaderKind::Regex(whole(&value)?),
                        HeaderMatchType::Distinct => HeaderKind::Distinct,
                    };
                    Some(HeaderCondition {
                        name,
                        kind,
                        invert: invert(h.invert),
                    })
                })
                .collect(),
            source: condition.source_cidr.as_ref().and_then(|s| {
                Some(SourceCondition {
                    block: IpBlock::new(&s.value)?,
                    distinct: s.kind == SourceMatchType::Distinct,
                })
            }),
            methods: condition
                .methods
                .iter()
                .filter_map(|m| {
                    let condition = match m.kind {
                        StringMatchType::Exact => StringCondition::Exact(m.value.clone()),
                        StringMatchType::RegularExpression => {
                            StringCondition::Regex(whole(&m.value)?)
                        }
                    };
                    Some((condition, invert(m.invert)))
                })
                .collect(),
            path: condition.path.as_ref().and_then(|p| {
                let condition = match p.kind {
                    PathMatchKind::Exact => PathCondition::Exact(p.value.clone()),
                    PathMatchKind::PathPrefix => PathCondition::Prefix(p.value.clone()),
                    PathMatchKind::RegularExpression => PathCondition::Regex(whole(&p.value)?),
                };
                Some((condition, invert(p.invert)))
            }),
        }
    }

    /// `None` when the request does not meet the selector; else the distinct values it adds
    /// to the bucket's key.
    fn key(&self, request: &RateLimitRequest<'_>, key: &mut String) -> Option<()> {
        for header in &self.headers {
            let value = request
                .headers
                .get(&header.name)
                .and_then(|v| v.to_str().ok());
            match &header.kind {
                HeaderKind::Distinct => {
                    key.push_str(value?);
                    key.push('\0');
                }
                HeaderKind::Exact(expected) => {
                    (value.is_some_and(|v| v == expected) != header.invert).then_some(())?;
                }
                HeaderKind::Regex(regex) => {
                    (value.is_some_and(|v| regex.is_match(v)) != header.invert).then_some(())?;
                }
            }
        }
        if let Some(source) = &self.source {
            source.block.contains(request.source).then_some(())?;
            if source.distinct {
                key.push_str(&request.source.to_string());
                key.push('\0');
            }
        }
        if !self.methods.is_empty() {
            let method = request.method.as_str();
            self.methods
                .iter()
                .any(|(condition, invert)| condition.matches(method) != *invert)
                .then_some(())?;
        }
        if let Some((path, invert)) = &self.path {
            let matched = match path {
                PathCondition::Exact(p) => request.path == p,
                PathCondition::Prefix(p) => request.path.starts_with(p.as_str()),
                PathCondition::Regex(r) => r.is_match(request.path),
            };
            (matched != *invert).then_some(())?;
        }
        Some(())
    }
}

impl StringCondition {
    fn matches(&self, value: &str) -> bool {
        match self {
            StringCondition::Exact(expected) => expected == value,
            StringCondition::Regex(regex) => regex.is_match(value),
        }
    }
}

impl RateLimitRule {
    /// Whether the rule selects clients; the one rule that does not is the limit of requests
    /// no other rule selects (Envoy Gateway's default bucket).
    pub fn selects(&self) -> bool {
        !self.selectors.is_empty()
    }

    /// The key of the bucket a request takes from; `None` when the rule does not apply to it.
    /// Rules without selectors apply to every request, with one shared bucket.
    pub fn bucket_key(&self, request: &RateLimitRequest<'_>) -> Option<String> {
        let mut key = String::new();
        for selector in &self.selectors {
            selector.key(request, &mut key)?;
        }
        Some(key)
    }
}

/// Envoy's token bucket: `max` tokens, all of them back at every `interval` boundary.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    max: u32,
    tokens: u32,
    interval: Duration,
    next_fill: Instant,
}

/// A refused request: when the bucket fills again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
}

/// An admitted request: the tokens left and the time to the next fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub remaining: u32,
    pub reset: Duration,
}

impl TokenBucket {
    pub fn new(max: u32, interval: Duration, now: Instant) -> Self {
        Self {
            max,
            tokens: max,
            interval,
            next_fill: now + interval,
        }
    }

    fn fill(&mut self, now: Instant) {
        if now >= self.next_fill {
            self.tokens = self.max;
            let late = now.saturating_duration_since(self.next_fill);
            let skipped = (late.as_nanos() / self.interval.as_nanos().max(1)) as u32;
            self.next_fill += self.interval * (skipped + 1);
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> Result<Admitted, Limited> {
        self.fill(now);
        let reset = self.next_fill.saturating_duration_since(now);
        if self.tokens == 0 {
            return Err(Limited { retry_after: reset });
        }
        self.tokens -= 1;
        Ok(Admitted {
            remaining: self.tokens,
            reset,
        })
    }

    /// Whether a token is there, without taking it.
    pub fn has_token(&mut self, now: Instant) -> bool {
        self.fill(now);
        self.tokens > 0
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// A Service's rate limit on one of the pods it selects: requests to `ports` (the Service's
/// target ports) count against it.
#[derive(Debug)]
pub struct PodRateLimit {
    /// `namespace/name` of the Service.
    pub service: String,
    pub ports: Vec<u16>,
    pub limit: RateLimitPolicy,
}

/// The rate limits a workload enforces: those of the Services that select it.
pub fn for_workload(mesh: &MeshConfig, workload: &Workload) -> Vec<PodRateLimit> {
    mesh.backend_traffic_policies
        .values()
        .flat_map(|policy| {
            policy
                .targets()
                .filter(|t| t.target_kind() == Some(TargetKind::Service))
                .filter_map(move |t| {
                    let key = format!("{}/{}", policy.metadata.namespace(), t.name);
                    Some((policy, mesh.services.get(&key)?))
                })
        })
        .filter(|(_, service)| mesh.serves(service, workload))
        .filter_map(|(policy, service)| {
            Some(PodRateLimit {
                service: service.key(),
                ports: service
                    .spec
                    .ports
                    .iter()
                    .filter_map(|p| service.target_port(p.port))
                    .collect(),
                limit: RateLimitPolicy::new(policy)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &str) -> RateLimitPolicy {
        let yaml = format!(
            "apiVersion: policy.nodemesh.dev/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {{name: rl, namespace: shop}}\nspec:\n  targetRefs: [{{group: \"\", kind: Service, name: web}}]\n  rateLimit:\n    type: Local\n    local:\n      rules:\n{rules}"
        );
        RateLimitPolicy::new(&serde_yaml::from_str(&yaml).expect("policy")).expect("a limit")
    }

    fn request<'a>(source: &str, headers: &'a HeaderMap) -> RateLimitRequest<'a> {
        RateLimitRequest {
            source: source.parse().expect("ip"),
            method: &Method::GET,
            path: "/api/items",
            headers,
        }
    }

    #[test]
    fn a_bucket_admits_its_limit_per_interval() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(50, Duration::from_secs(1), start);
        let admitted = (0..200).filter(|_| bucket.take(start).is_ok()).count();
        assert_eq!(admitted, 50);
        let refused = bucket
            .take(start + Duration::from_millis(400))
            .expect_err("empty");
        assert_eq!(refused.retry_after, Duration::from_millis(600));
        let next = start + Duration::from_millis(1000);
        assert_eq!(
            bucket.take(next).map(|a| a.remaining),
            Ok(49),
            "filled at the boundary"
        );
        // Offered 200/s for 5 s: 50 admitted per second, not a burst on top.
        let mut bucket = TokenBucket::new(50, Duration::from_secs(1), start);
        let admitted = (0..1000)
            .filter(|i| bucket.take(start + Duration::from_millis(i * 5)).is_ok())
            .count();
        assert_eq!(admitted, 250);
    }

    #[test]
    fn selectors_must_all_hold_and_distinct_values_get_their_own_bucket() {
        let p = policy(
            "      - clientSelectors:\n        - headers: [{name: x-user, type: Distinct}]\n          sourceCIDR: {value: 10.88.1.0/24}\n        limit: {requests: 5, unit: Second}\n      - limit: {requests: 100, unit: Minute}\n",
        );
        let mut alice = HeaderMap::new();
        alice.insert("x-user", "alice".parse().expect("value"));
        let per_user = &p.rules[0];
        assert_eq!(
            per_user
                .bucket_key(&request("10.88.1.2", &alice))
                .as_deref(),
            Some("alice\0")
        );
        assert_eq!(
            per_user.bucket_key(&request("10.88.2.2", &alice)),
            None,
            "outside the block"
        );
        assert_eq!(
            per_user.bucket_key(&request("10.88.1.2", &HeaderMap::new())),
            None,
            "no header"
        );
        let everyone = &p.rules[1];
        assert_eq!(
            everyone
                .bucket_key(&request("10.88.2.2", &HeaderMap::new()))
                .as_deref(),
            Some("")
        );
        assert_eq!(everyone.interval, Duration::from_secs(60));
    }

    #[test]
    fn a_distinct_source_gives_each_client_a_bucket_and_invert_negates() {
        let p = policy(
            "      - clientSelectors:\n        - sourceCIDR: {type: Distinct, value: 0.0.0.0/0}\n          headers: [{name: x-internal, value: \"yes\", invert: true}]\n        limit: {requests: 1, unit: Hour}\n",
        );
        let rule = &p.rules[0];
        let none = HeaderMap::new();
        assert_eq!(
            rule.bucket_key(&request("10.0.0.1", &none)).as_deref(),
            Some("10.0.0.1\0")
        );
        let mut internal = HeaderMap::new();
        internal.insert("x-internal", "yes".parse().expect("value"));
        assert_eq!(rule.bucket_key(&request("10.0.0.1", &internal)), None);
    }

    #[test]
    fn methods_and_paths_select() {
        let p = policy(
            "      - clientSelectors:\n        - methods: [{value: POST}, {type: RegularExpression, value: 'GET|HEAD'}]\n          path: {type: PathPrefix, value: /api}\n        limit: {requests: 1, unit: Second}\n",
        );
        let rule = &p.rules[0];
        let none = HeaderMap::new();
        assert!(rule.bucket_key(&request("10.0.0.1", &none)).is_some());
        let other = RateLimitRequest {
            path: "/health",
            ..request("10.0.0.1", &none)
        };
        assert!(rule.bucket_key(&other).is_none());
        let block = IpBlock::new("10.0.0.0/8").expect("block");
        assert!(block.contains("10.1.2.3".parse().expect("ip")));
        assert!(!block.contains("11.1.2.3".parse().expect("ip")));
    }
}
