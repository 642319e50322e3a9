//! The checks on one BackendTrafficPolicy: Envoy Gateway's ranges, and refusals that name the
//! field nodemesh does not implement.

use super::{
    BackendTrafficPolicy, ConsistentHashType, HeaderMatchType, LoadBalancerType, RateLimitType,
    RetryTrigger, TargetKind,
};
use crate::GatewayDuration;

type Refusal = (String, String);

impl BackendTrafficPolicy {
    pub fn validate(&self) -> Result<(), Refusal> {
        let spec = &self.spec;
        let unsupported = [
            ("spec.faultInjection", spec.fault_injection.is_some()),
            ("spec.tcpKeepalive", spec.tcp_keepalive.is_some()),
            ("spec.proxyProtocol", spec.proxy_protocol.is_some()),
            ("spec.compression", spec.compression.is_some()),
            ("spec.connection", spec.connection.is_some()),
            ("spec.dns", spec.dns.is_some()),
            ("spec.http2", spec.http2.is_some()),
            ("spec.useClientProtocol", spec.use_client_protocol.is_some()),
            ("spec.responseOverride", spec.response_override.is_some()),
        ];
        if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err((
                (*field).to_owned(),
                "is an Envoy Gateway setting nodemesh does not implement; remove it".into(),
            ));
        }
        if spec.target_refs.is_empty() && spec.target_ref.is_none() {
            return Err((
                "spec.targetRefs".into(),
                "is empty; name the Service (group \"\", kind Service) or HTTPRoute (group \
                 gateway.networking.k8s.io, kind HTTPRoute) this policy is for"
                    .into(),
            ));
        }
        if !spec.target_refs.is_empty() && spec.target_ref.is_some() {
            return Err((
                "spec.targetRef".into(),
                "cannot be given with targetRefs; list every target in targetRefs".into(),
            ));
        }
        let mut route_target = false;
        for (i, target) in self.targets().enumerate() {
            let at = if spec.target_ref.is_some() {
                "spec.targetRef".to_owned()
            } else {
                format!("spec.targetRefs[{i}]")
            };
            match target.target_kind() {
                Some(TargetKind::HttpRoute) => route_target = true,
                Some(TargetKind::Service) => {}
                None => {
                    return Err((
                        at,
                        format!(
                            "refers to group {:?} kind {:?}; a BackendTrafficPolicy attaches to \
                             a Service (group \"\") or an HTTPRoute (group \
                             gateway.networking.k8s.io)",
                            target.group, target.kind
                        ),
                    ));
                }
            }
            crate::meta::check_dns_label(&target.name).map_err(|e| (format!("{at}.name"), e))?;
            if target.section_name.is_some() {
                return Err((
                    format!("{at}.sectionName"),
                    "is not supported; the policy applies to the whole Service or route".into(),
                ));
            }
        }
        self.check_timeouts()?;
        self.check_retry()?;
        self.check_circuit_breaker()?;
        self.check_health()?;
        self.check_load_balancer()?;
        self.check_rate_limit(route_target)
    }

    fn check_timeouts(&self) -> Result<(), Refusal> {
        let Some(timeout) = &self.spec.timeout else {
            return Ok(());
        };
        if let Some(connect) = timeout
            .tcp
            .as_ref()
            .and_then(|t| t.connect_timeout.as_ref())
        {
            positive("spec.timeout.tcp.connectTimeout", connect)?;
        }
        if let Some(http) = &timeout.http {
            if let Some(idle) = &http.connection_idle_timeout {
                positive("spec.timeout.http.connectionIdleTimeout", idle)?;
            }
            if let Some(max) = &http.max_connection_duration {
                positive("spec.timeout.http.maxConnectionDuration", max)?;
            }
        }
        Ok(())
    }

    fn check_retry(&self) -> Result<(), Refusal> {
        let Some(retry) = &self.spec.retry else {
            return Ok(());
        };
        if let Some(on) = &retry.retry_on {
            for (i, code) in on.http_status_codes.iter().enumerate() {
                if !(100..=599).contains(code) {
                    return Err((
                        format!("spec.retry.retryOn.httpStatusCodes[{i}]"),
                        format!("{code} is not an HTTP status code (100 to 599)"),
                    ));
                }
            }
            let listed = on.triggers.contains(&RetryTrigger::RetriableStatusCodes);
            if listed && on.http_status_codes.is_empty() {
                return Err((
                    "spec.retry.retryOn.httpStatusCodes".into(),
                    "is empty, but the trigger retriable-status-codes needs the codes to retry"
                        .into(),
                ));
            }
        }
        if let Some(per) = &retry.per_retry {
            if let Some(timeout) = &per.timeout {
                positive("spec.retry.perRetry.timeout", timeout)?;
            }
            if let Some(back_off) = &per.back_off {
                if let Some(base) = &back_off.base_interval {
                    positive("spec.retry.perRetry.backOff.baseInterval", base)?;
                }
                if let (Some(base), Some(max)) = (&back_off.base_interval, &back_off.max_interval)
                    && max.get() < base.get()
                {
                    return Err((
                        "spec.retry.perRetry.backOff.maxInterval".into(),
                        format!("{max} is shorter than baseInterval ({base})"),
                    ));
                }
            }
        }
        if let Some(budget) = &retry.budget {
            if budget.percent > 100 {
                return Err((
                    "spec.retry.budget.percent".into(),
                    format!("{} is not a percentage from 0 to 100", budget.percent),
                ));
            }
            let ttl = budget.ttl.get();
            if ttl < std::time::Duration::from_secs(1) || ttl > std::time::Duration::from_secs(60) {
                return Err((
                    "spec.retry.budget.ttl".into(),
                    format!("{} is outside 1s to 60s", budget.ttl),
                ));
            }
        }
        Ok(())
    }

    fn check_circuit_breaker(&self) -> Result<(), Refusal> {
        let Some(breaker) = &self.spec.circuit_breaker else {
            return Ok(());
        };
        if breaker.max_requests_per_connection == Some(0) {
            return Err((
                "spec.circuitBreaker.maxRequestsPerConnection".into(),
                "0 would let no request through; leave it out for no limit".into(),
            ));
        }
        Ok(())
    }

    fn check_health(&self) -> Result<(), Refusal> {
        let Some(health) = &self.spec.health_check else {
            return Ok(());
        };
        if health.active.is_some() {
            return Err((
                "spec.healthCheck.active".into(),
                "active health checks are not supported by nodemesh; use healthCheck.passive"
                    .into(),
            ));
        }
        let Some(passive) = &health.passive else {
            return Ok(());
        };
        for (field, duration) in [
            ("spec.healthCheck.passive.interval", &passive.interval),
            (
                "spec.healthCheck.passive.baseEjectionTime",
                &passive.base_ejection_time,
            ),
        ] {
            if duration.as_ref().is_some_and(|d| d.get().is_zero()) {
                return Err((field.to_owned(), "must be longer than 0s".into()));
            }
        }
        if let Some(percent) = passive.max_ejection_percent
            && !(0..=100).contains(&percent)
        {
            return Err((
                "spec.healthCheck.passive.maxEjectionPercent".into(),
                format!("{percent} is not a percentage from 0 to 100"),
            ));
        }
        Ok(())
    }

    fn check_load_balancer(&self) -> Result<(), Refusal> {
        let Some(lb) = &self.spec.load_balancer else {
            return Ok(());
        };
        if lb.slow_start.is_some() {
            return Err((
                "spec.loadBalancer.slowStart".into(),
                "is not supported by nodemesh; remove it".into(),
            ));
        }
        if lb.zone_aware.is_some() {
            return Err((
                "spec.loadBalancer.zoneAware".into(),
                "is not supported by nodemesh; remove it".into(),
            ));
        }
        match (lb.kind, &lb.consistent_hash) {
            (LoadBalancerType::ConsistentHash, None) => Err((
                "spec.loadBalancer.consistentHash".into(),
                "is missing; type ConsistentHash needs it (type SourceIP or Header)".into(),
            )),
            (LoadBalancerType::ConsistentHash, Some(hash)) => {
                let at = "spec.loadBalancer.consistentHash";
                match hash.kind {
                    ConsistentHashType::SourceIp => Ok(()),
                    ConsistentHashType::Header if hash.header.is_none() => Err((
                        format!("{at}.header"),
                        "is missing; type Header needs the header's name".into(),
                    )),
                    ConsistentHashType::Headers if hash.headers.is_empty() => Err((
                        format!("{at}.headers"),
                        "is empty; type Headers needs the headers' names".into(),
                    )),
                    ConsistentHashType::Header | ConsistentHashType::Headers => Ok(()),
                    ConsistentHashType::Cookie => Err((
                        format!("{at}.type"),
                        "Cookie hashing is not supported by nodemesh; use Header or SourceIP"
                            .into(),
                    )),
                }
            }
            (_, Some(_)) => Err((
                "spec.loadBalancer.consistentHash".into(),
                "only goes with type ConsistentHash".into(),
            )),
            (_, None) => Ok(()),
        }
    }

    fn check_rate_limit(&self, route_target: bool) -> Result<(), Refusal> {
        let Some(limit) = &self.spec.rate_limit else {
            return Ok(());
        };
        if limit.kind == RateLimitType::Global || limit.global.is_some() {
            return Err((
                "spec.rateLimit.type".into(),
                "Global rate limits need a rate limit service, which nodemesh does not have; \
                 use type Local (enforced in each destination pod's node proxy)"
                    .into(),
            ));
        }
        if route_target {
            return Err((
                "spec.rateLimit".into(),
                "is enforced where the destination pods are, which know Services, not the \
                 client's routes; attach the rate limit to the Service"
                    .into(),
            ));
        }
        let Some(local) = &limit.local else {
            return Err((
                "spec.rateLimit.local".into(),
                "is missing; type Local needs its rules".into(),
            ));
        };
        if local
            .rules
            .iter()
            .filter(|r| r.client_selectors.is_empty())
            .count()
            > 1
        {
            return Err((
                "spec.rateLimit.local.rules".into(),
                "has more than one rule without clientSelectors; the one such rule is the \
                 limit for all requests no other rule selects"
                    .into(),
            ));
        }
        if local.rules.is_empty() {
            return Err((
                "spec.rateLimit.local.rules".into(),
                "is empty; give at least one rule with a limit".into(),
            ));
        }
        for (i, rule) in local.rules.iter().enumerate() {
            let at = format!("spec.rateLimit.local.rules[{i}]");
            if rule.limit.requests == 0 {
                return Err((
                    format!("{at}.limit.requests"),
                    "0 would refuse everything; give at least 1".into(),
                ));
            }
            for (j, selector) in rule.client_selectors.iter().enumerate() {
                let at = format!("{at}.clientSelectors[{j}]");
                if selector.headers.is_empty()
                    && selector.source_cidr.is_none()
                    && selector.methods.is_empty()
                    && selector.path.is_none()
                {
                    return Err((
                        at,
                        "selects nothing; give headers, sourceCIDR, methods or path".into(),
                    ));
                }
                for (k, header) in selector.headers.iter().enumerate() {
                    let at = format!("{at}.headers[{k}]");
                    match (header.kind, &header.value) {
                        (HeaderMatchType::Distinct, Some(_)) => {
                            return Err((
                                format!("{at}.value"),
                                "does not go with type Distinct, which counts each value apart"
                                    .into(),
                            ));
                        }
                        (HeaderMatchType::Exact | HeaderMatchType::RegularExpression, None) => {
                            return Err((
                                format!("{at}.value"),
                                "is missing; give the value to match".into(),
                            ));
                        }
                        (HeaderMatchType::RegularExpression, Some(pattern)) => {
                            crate::meta::check_regex(&format!("{at}.value"), pattern)?;
                        }
                        _ => {}
                    }
                    if header.kind == HeaderMatchType::Distinct && header.invert == Some(true) {
                        return Err((
                            format!("{at}.invert"),
                            "cannot be used with type Distinct".into(),
                        ));
                    }
                }
                if let Some(source) = &selector.source_cidr {
                    crate::parse_ip_block(&source.value)
                        .map_err(|e| (format!("{at}.sourceCIDR.value"), e))?;
                }
                if let Some(path) = &selector.path
                    && path.kind == super::PathMatchKind::RegularExpression
                {
                    crate::meta::check_regex(&format!("{at}.path.value"), &path.value)?;
                }
                for (k, method) in selector.methods.iter().enumerate() {
                    if method.kind == super::StringMatchType::RegularExpression {
                        crate::meta::check_regex(
                            &format!("{at}.methods[{k}].value"),
                            &method.value,
                        )?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn positive(field: &str, duration: &GatewayDuration) -> Result<(), Refusal> {
    if duration.is_zero() {
        return Err((field.to_owned(), "must be longer than 0s".into()));
    }
    Ok(())
}
