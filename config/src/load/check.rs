//! Checks of one object on its own, beyond what its types enforce.

use super::Object;
use crate::{
    ROOT_NAMESPACE,
    meta::{check_dns_label, check_dns_subdomain},
};

/// Checks one object on its own. Returns the field and what is wrong with it.
pub(super) fn check_object(object: &Object) -> Result<(), (String, String)> {
    match object {
        Object::Namespace(ns) => {
            check_dns_label(&ns.metadata.name).map_err(|e| ("metadata.name".to_owned(), e))?;
            if ns.metadata.namespace.is_some() {
                return Err((
                    "metadata.namespace".to_owned(),
                    "a Namespace is not itself namespaced; remove the field".into(),
                ));
            }
        }
        Object::Workload(w) => {
            check_names(&w.metadata.name, w.namespace())?;
            check_dns_label(&w.spec.service_account)
                .map_err(|e| ("spec.serviceAccount".to_owned(), e))?;
            if w.spec.node.is_empty() {
                return Err((
                    "spec.node".to_owned(),
                    "is empty; name the node that runs this workload".into(),
                ));
            }
            if let Some(netns) = &w.spec.netns {
                if !netns.is_absolute() {
                    return Err((
                        "spec.netns".to_owned(),
                        format!(
                            "{netns:?} is not an absolute path; give the network namespace's \
                             path, such as /run/netns/<name>"
                        ),
                    ));
                }
                if w.spec.ip.is_none() {
                    return Err((
                        "spec.ip".to_owned(),
                        "is missing; a workload with a network namespace needs its address \
                         there"
                            .into(),
                    ));
                }
            }
            if let Some(ip) = w.spec.ip
                && (ip.is_unspecified()
                    || ip.is_loopback()
                    || ip.is_multicast()
                    || ip.is_broadcast())
            {
                return Err((
                    "spec.ip".to_owned(),
                    format!("{ip} cannot be a workload address"),
                ));
            }
            if w.metadata.uid.as_deref().is_some_and(str::is_empty) {
                return Err((
                    "metadata.uid".to_owned(),
                    "is empty; give the pod's uid or leave the field out".into(),
                ));
            }
        }
        Object::PeerAuthentication(p) => {
            check_policy_names(&p.metadata.name, p.metadata.namespace())?;
            p.validate()?;
        }
        Object::AuthorizationPolicy(p) => {
            check_policy_names(&p.metadata.name, p.metadata.namespace())?;
            p.validate()?;
        }
        Object::Service(svc) => {
            check_names(&svc.metadata.name, svc.metadata.namespace())?;
            svc.validate()?;
        }
        Object::HttpRoute(route) => {
            check_names(&route.metadata.name, route.metadata.namespace())?;
            route.validate()?;
        }
        Object::BackendTrafficPolicy(policy) => {
            check_names(&policy.metadata.name, policy.metadata.namespace())?;
            policy.validate()?;
        }
        Object::EndpointSlice(slice) => {
            check_names(&slice.metadata.name, slice.metadata.namespace())?;
            slice.validate()?;
        }
        Object::MeshSettings(m) => {
            if let Some(tracing) = &m.spec.telemetry.tracing {
                tracing
                    .collector()
                    .map_err(|e| ("spec.telemetry.tracing.otlpEndpoint".to_owned(), e))?;
                if !(0.0..=100.0).contains(&tracing.random_sampling_percentage) {
                    return Err((
                        "spec.telemetry.tracing.randomSamplingPercentage".to_owned(),
                        format!(
                            "{} is not a percentage between 0 and 100",
                            tracing.random_sampling_percentage
                        ),
                    ));
                }
            }
            if let Some(root) = &m.spec.root_namespace {
                check_dns_label(root).map_err(|e| ("spec.rootNamespace".to_owned(), e))?;
            }
            for (i, alias) in m.spec.trust_domain_aliases.iter().enumerate() {
                if alias.is_empty() || alias.contains(['/', '*']) {
                    return Err((
                        format!("spec.trustDomainAliases[{i}]"),
                        format!("{alias:?} is not a trust domain, such as old.example.com"),
                    ));
                }
            }
            if m.metadata.name != "default" || m.metadata.namespace() != ROOT_NAMESPACE {
                return Err((
                    "metadata".to_owned(),
                    format!(
                        "MeshSettings must be named default in namespace {ROOT_NAMESPACE}, not \
                         {}/{}",
                        m.metadata.namespace(),
                        m.metadata.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The name and namespace of a namespaced object are DNS labels.
fn check_names(name: &str, namespace: &str) -> Result<(), (String, String)> {
    check_dns_label(name).map_err(|e| ("metadata.name".to_owned(), e))?;
    check_dns_label(namespace).map_err(|e| ("metadata.namespace".to_owned(), e))
}

/// Policies are named as most Kubernetes kinds are: a DNS subdomain (dots allowed).
fn check_policy_names(name: &str, namespace: &str) -> Result<(), (String, String)> {
    check_dns_subdomain(name).map_err(|e| ("metadata.name".to_owned(), e))?;
    check_dns_label(namespace).map_err(|e| ("metadata.namespace".to_owned(), e))
}
