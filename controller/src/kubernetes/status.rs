//! What the controller writes back: each object of nodemesh's kinds gets an `Accepted`
//! condition saying whether it is in force and if not why; each HTTPRoute attached to a
//! Service gets its GAMMA parent status (`Accepted`, `ResolvedRefs`, Gateway API's reasons)
//! under nodemesh's controller name, leaving other implementations' entries alone; a refused
//! object gets a Kubernetes Event, so `kubectl describe` shows it.
//!
//! The statuses are computed here as pure functions; [`StatusWriter`] sends what differs
//! from what the cluster holds, and only the elected replica runs it.

mod write;

use nodemesh_config::MeshConfig;
use serde_json::{Value, json};

pub use self::write::StatusWriter;
use super::{build::Verdict, convert::is_service_parent};

/// nodemesh's name in route status (`controllerName`): a domain-prefixed path.
pub const CONTROLLER_NAME: &str = "nodemesh.dev/controller";

/// One condition (Kubernetes' `metav1.Condition`), with its transition time taken from
/// `previous` when nothing but the time would change.
fn condition(
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    previous: Option<&Value>,
    now: &str,
) -> Value {
    let status = if status { "True" } else { "False" };
    let since = previous
        .filter(|p| p["status"] == status)
        .and_then(|p| p["lastTransitionTime"].as_str())
        .unwrap_or(now);
    let mut condition = json!({
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    });
    if let Some(generation) = generation {
        condition["observedGeneration"] = generation.into();
    }
    condition
}

fn find_condition<'a>(conditions: &'a Value, kind: &str) -> Option<&'a Value> {
    conditions.as_array()?.iter().find(|c| c["type"] == kind)
}

/// The status an object of nodemesh's kinds should have, given the verdict on it.
pub fn object_status(object: &Value, verdict: &Verdict, now: &str) -> Value {
    let generation = object["metadata"]["generation"].as_i64();
    let previous = find_condition(&object["status"]["conditions"], "Accepted");
    let accepted = if verdict.accepted() {
        condition("Accepted", true, "Accepted", "", generation, previous, now)
    } else {
        // Refused as written, or in force but naming an object that does not exist.
        let reason = if verdict.refused {
            "Invalid"
        } else {
            "TargetNotFound"
        };
        condition(
            "Accepted",
            false,
            reason,
            &verdict.message(),
            generation,
            previous,
            now,
        )
    };
    json!({ "conditions": [accepted] })
}

/// The route's `status.parents`: other implementations' entries as they are, and one of
/// nodemesh's for each Service parent, in the place of the one it replaces (new ones last;
/// ones of parents the route no longer has, gone).
pub fn route_parents(
    route: &Value,
    verdict: Option<&Verdict>,
    mesh: &MeshConfig,
    now: &str,
) -> Value {
    let namespace = route["metadata"]["namespace"].as_str().unwrap_or("default");
    let generation = route["metadata"]["generation"].as_i64();
    let current: Vec<Value> = route["status"]["parents"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // As written, it is refused: its previous version (or nothing) is in force.
    let refused = verdict.filter(|v| v.refused);
    let resolved = backends_resolved(route, namespace, mesh);
    let mut ours: Vec<(Value, Value)> = Vec::new();
    for parent in route["spec"]["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| is_service_parent(p))
    {
        let previous = current.iter().find(|p| {
            p["controllerName"] == CONTROLLER_NAME && same_parent(&p["parentRef"], parent)
        });
        let previous_conditions = previous.map(|p| &p["conditions"]).unwrap_or(&Value::Null);
        let (accepted, reason, message) = match refused {
            Some(verdict) => (false, "UnsupportedValue", verdict.message()),
            None => match parent_problem(parent, namespace, mesh) {
                Some(problem) => (false, "NoMatchingParent", problem),
                None => (true, "Accepted", String::new()),
            },
        };
        let (refs_ok, refs_reason, refs_message) = match &resolved {
            Ok(()) => (true, "ResolvedRefs", String::new()),
            Err((reason, message)) => (false, *reason, message.clone()),
        };
        let entry = json!({
            "parentRef": parent,
            "controllerName": CONTROLLER_NAME,
            "conditions": [
                condition("Accepted", accepted, reason, &message, generation,
                    find_condition(previous_conditions, "Accepted"), now),
                condition("ResolvedRefs", refs_ok, refs_reason, &refs_message, generation,
                    find_condition(previous_conditions, "ResolvedRefs"), now),
            ],
        });
        ours.push((parent.clone(), entry));
    }
    let mut parents = Vec::new();
    for entry in &current {
        if entry["controllerName"] != CONTROLLER_NAME {
            parents.push(entry.clone());
        } else if let Some(index) = ours
            .iter()
            .position(|(parent, _)| same_parent(&entry["parentRef"], parent))
        {
            parents.push(ours.remove(index).1);
        }
    }
    parents.extend(ours.into_iter().map(|(_, entry)| entry));
    Value::Array(parents)
}

/// nodemesh's entries of a route's `status.parents`, in a stable order: what the writer
/// compares, whatever the order others keep the list in.
pub fn our_parents(parents: &Value) -> Vec<Value> {
    let mut ours: Vec<Value> = parents
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["controllerName"] == CONTROLLER_NAME)
        .cloned()
        .collect();
    ours.sort_by_key(|p| p["parentRef"].to_string());
    ours
}

/// Whether two parentRefs name the same parent.
fn same_parent(a: &Value, b: &Value) -> bool {
    let field = |v: &Value, f: &str| v[f].clone();
    ["name", "namespace", "kind", "port", "sectionName"]
        .iter()
        .all(|f| field(a, f) == field(b, f))
        && is_service_parent(a) == is_service_parent(b)
}

/// Why a Service parent does not take the route, if it does not.
fn parent_problem(parent: &Value, namespace: &str, mesh: &MeshConfig) -> Option<String> {
    let ns = parent["namespace"].as_str().unwrap_or(namespace);
    let name = parent["name"].as_str().unwrap_or_default();
    let Some(service) = mesh.services.get(&format!("{ns}/{name}")) else {
        return Some(format!("parent Service {ns}/{name} not found"));
    };
    if service.vip().is_none() {
        return Some(format!(
            "parent Service {ns}/{name} is headless; a route attaches to a Service with a \
             cluster IP"
        ));
    }
    if let Some(port) = parent["port"].as_u64()
        && !service.spec.ports.iter().any(|p| u64::from(p.port) == port)
    {
        return Some(format!("parent Service {ns}/{name} has no port {port}"));
    }
    None
}

/// Whether every backendRef names an existing Service (and port): Gateway API's
/// `ResolvedRefs`, with the reason of the first that does not.
fn backends_resolved(
    route: &Value,
    namespace: &str,
    mesh: &MeshConfig,
) -> Result<(), (&'static str, String)> {
    let backends = route["spec"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rule| rule["backendRefs"].as_array().into_iter().flatten());
    for backend in backends {
        let group = backend["group"].as_str().unwrap_or("");
        let kind = backend["kind"].as_str().unwrap_or("Service");
        if !matches!(group, "" | "core") || kind != "Service" {
            return Err((
                "InvalidKind",
                format!("backendRef to group {group:?} kind {kind:?}; nodemesh sends to Services"),
            ));
        }
        let ns = backend["namespace"].as_str().unwrap_or(namespace);
        let name = backend["name"].as_str().unwrap_or_default();
        let Some(service) = mesh.services.get(&format!("{ns}/{name}")) else {
            return Err((
                "BackendNotFound",
                format!("backend Service {ns}/{name} not found"),
            ));
        };
        if let Some(port) = backend["port"].as_u64()
            && !service.spec.ports.iter().any(|p| u64::from(p.port) == port)
        {
            return Err((
                "BackendNotFound",
                format!("backend Service {ns}/{name} has no port {port}"),
            ));
        }
    }
    Ok(())
}

/// Whether two statuses say the same, transition times aside.
pub fn same_status(a: &Value, b: &Value) -> bool {
    fn strip(value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .filter(|(k, _)| *k != "lastTransitionTime")
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(strip).collect()),
            other => other.clone(),
        }
    }
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests;
