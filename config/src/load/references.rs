//! Checks of objects that name other objects: an HTTPRoute's parent and backend Services, a
//! BackendTrafficPolicy's targets. What they name must exist, with the port they name.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::{ConfigError, MeshConfig, Service, TargetKind};

pub(super) fn check(config: &MeshConfig, origin: &BTreeMap<String, PathBuf>) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let file_of = |key: &str| origin.get(key).cloned().unwrap_or_default();
    for route in config.http_routes.values() {
        let object = format!("HTTPRoute {}", route.key());
        let file = file_of(&object);
        let at = |field: String, message: String| error(&file, &object, field, message);
        let namespace = route.metadata.namespace();
        for (i, parent) in route.spec.parent_refs.iter().enumerate() {
            let ns = parent.namespace(namespace);
            match service(config, ns, &parent.name) {
                None => errors.push(at(
                    format!("spec.parentRefs[{i}].name"),
                    format!(
                        "no Service {ns}/{} exists; a route attaches to an existing Service",
                        parent.name
                    ),
                )),
                Some(svc) => {
                    if let Some(port) = parent.port
                        && svc.port(port).is_none()
                    {
                        errors.push(at(
                            format!("spec.parentRefs[{i}].port"),
                            format!("Service {} has no port {port}", svc.key()),
                        ));
                    }
                }
            }
        }
        for (i, rule) in route.spec.rules.iter().enumerate() {
            for (j, backend) in rule.backend_refs.iter().enumerate() {
                let ns = backend.namespace(namespace);
                let field = format!("spec.rules[{i}].backendRefs[{j}]");
                match service(config, ns, &backend.name) {
                    None => errors.push(at(
                        format!("{field}.name"),
                        format!(
                            "no Service {ns}/{} exists; send to an existing Service",
                            backend.name
                        ),
                    )),
                    Some(svc) => {
                        if let Some(port) = backend.port
                            && svc.port(port).is_none()
                        {
                            errors.push(at(
                                format!("{field}.port"),
                                format!("Service {} has no port {port}", svc.key()),
                            ));
                        }
                    }
                }
            }
        }
    }
    let mut targeted: BTreeMap<(TargetKind, String), String> = BTreeMap::new();
    for policy in config.backend_traffic_policies.values() {
        let object = format!("BackendTrafficPolicy {}", policy.key());
        let file = file_of(&object);
        let namespace = policy.metadata.namespace();
        for (i, target) in policy.targets().enumerate() {
            let field = if policy.spec.target_ref.is_some() {
                "spec.targetRef".to_owned()
            } else {
                format!("spec.targetRefs[{i}]")
            };
            let Some(kind) = target.target_kind() else {
                continue;
            };
            let key = format!("{namespace}/{}", target.name);
            let exists = match kind {
                TargetKind::Service => config.services.contains_key(&key),
                TargetKind::HttpRoute => config.http_routes.contains_key(&key),
            };
            if !exists {
                errors.push(error(
                    &file,
                    &object,
                    format!("{field}.name"),
                    format!(
                        "no {} {key} exists; a BackendTrafficPolicy attaches to an object in \
                         its own namespace",
                        target.kind
                    ),
                ));
                continue;
            }
            if let Some(other) = targeted.insert((kind, key.clone()), policy.key()) {
                errors.push(error(
                    &file,
                    &object,
                    field,
                    format!(
                        "{} {key} already has BackendTrafficPolicy {other}; merge the two into \
                         one policy",
                        target.kind
                    ),
                ));
            }
        }
    }
    errors
}

fn service<'a>(config: &'a MeshConfig, namespace: &str, name: &str) -> Option<&'a Service> {
    config.services.get(&format!("{namespace}/{name}"))
}

fn error(file: &Path, object: &str, field: String, message: String) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        object: Some(object.to_owned()),
        field: Some(field),
        message,
    }
}
