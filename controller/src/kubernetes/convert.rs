//! From the cluster's objects to the configuration model's: the same kinds a local directory
//! holds, so that one validation and one snapshot builder serve both sources.
//!
//! - a Pod becomes a Workload (its node, address, service account and labels); pods on the
//!   host's network, finished ones and ones not yet scheduled are none;
//! - a Service keeps its TCP ports, and a named `targetPort` becomes the number its
//!   EndpointSlices give it; ExternalName Services and IPv6-only ones are none;
//! - an HTTPRoute keeps only its Service parents (GAMMA); one with none is another
//!   implementation's, and none of nodemesh's;
//! - everything keeps only the metadata the model reads, and no status.

use std::net::Ipv4Addr;

use nodemesh_config::SERVICE_NAME_LABEL;
use serde_json::{Map, Value, json};

use super::cluster::{Kind, Objects};

/// kubectl's copy of the last applied object: large, and never read.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The model's object for a cluster object, or `None` when it has none.
pub fn to_model(kind: Kind, object: &Value, objects: &Objects) -> Option<Value> {
    match kind {
        Kind::Node => None,
        Kind::Namespace => Some(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": metadata(object, false),
        })),
        Kind::Pod => workload(object).filter(|_| !address_taken_over(object, objects)),
        Kind::Service => service(object, objects),
        Kind::EndpointSlice => Some(endpoint_slice(object)),
        Kind::HttpRoute => http_route(object),
        Kind::AuthorizationPolicy
        | Kind::PeerAuthentication
        | Kind::MeshSettings
        | Kind::BackendTrafficPolicy => {
            let mut model = Map::new();
            model.insert("apiVersion".into(), object["apiVersion"].clone());
            model.insert("kind".into(), object["kind"].clone());
            model.insert("metadata".into(), metadata(object, false));
            if !object["spec"].is_null() {
                model.insert("spec".into(), object["spec"].clone());
            }
            Some(Value::Object(model))
        }
    }
}

/// The metadata the model reads: name, namespace, labels, annotations (less kubectl's copy
/// of the object), creation time; the uid only where asked (pods).
fn metadata(object: &Value, with_uid: bool) -> Value {
    let meta = &object["metadata"];
    let mut kept = Map::new();
    for field in ["name", "namespace", "labels", "creationTimestamp"] {
        if let Some(value) = meta.get(field).filter(|v| !v.is_null()) {
            kept.insert(field.into(), value.clone());
        }
    }
    if let Some(annotations) = meta["annotations"].as_object() {
        let annotations: Map<String, Value> = annotations
            .iter()
            .filter(|(k, _)| *k != LAST_APPLIED)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !annotations.is_empty() {
            kept.insert("annotations".into(), Value::Object(annotations));
        }
    }
    if with_uid && let Some(uid) = meta.get("uid").filter(|v| v.is_string()) {
        kept.insert("uid".into(), uid.clone());
    }
    Value::Object(kept)
}

/// A pod's IPv4 address: `status.podIP`, or the first IPv4 of `status.podIPs` (dual stack
/// lists IPv6 first on some clusters).
fn pod_ipv4(object: &Value) -> Option<Ipv4Addr> {
    let status = &object["status"];
    status["podIP"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .or_else(|| {
            status["podIPs"]
                .as_array()?
                .iter()
                .filter_map(|entry| entry["ip"].as_str()?.parse().ok())
                .next()
        })
}

/// Whether a terminating pod's address is held by another pod that is not terminating: the
/// address was given again, and the new pod is the workload at it.
fn address_taken_over(pod: &Value, objects: &Objects) -> bool {
    if pod["metadata"]["deletionTimestamp"].is_null() {
        return false;
    }
    let Some(ip) = pod_ipv4(pod) else {
        return false;
    };
    objects.get(&Kind::Pod).is_some_and(|pods| {
        pods.values().any(|other| {
            other["metadata"]["deletionTimestamp"].is_null()
                && other["metadata"]["uid"] != pod["metadata"]["uid"]
                && other["spec"]["hostNetwork"].as_bool() != Some(true)
                && pod_ipv4(other) == Some(ip)
        })
    })
}

fn workload(pod: &Value) -> Option<Value> {
    let spec = &pod["spec"];
    if spec["hostNetwork"].as_bool() == Some(true) {
        return None;
    }
    if matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let node = spec["nodeName"].as_str().filter(|n| !n.is_empty())?;
    let service_account = spec["serviceAccountName"]
        .as_str()
        .filter(|sa| !sa.is_empty())
        .unwrap_or("default");
    let mut workload_spec = Map::new();
    workload_spec.insert("node".into(), node.into());
    workload_spec.insert("serviceAccount".into(), service_account.into());
    if let Some(ip) = pod_ipv4(pod) {
        workload_spec.insert("ip".into(), ip.to_string().into());
    }
    Some(json!({
        "apiVersion": nodemesh_config::API_VERSION,
        "kind": "Workload",
        "metadata": metadata(pod, true),
        "spec": workload_spec,
    }))
}

fn service(object: &Value, objects: &Objects) -> Option<Value> {
    let spec = &object["spec"];
    if spec["type"].as_str() == Some("ExternalName") {
        return None;
    }
    let cluster_ip = match spec["clusterIP"].as_str() {
        Some("None") => "None".to_owned(),
        _ => {
            let addresses = spec["clusterIPs"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(std::iter::once(&spec["clusterIP"]));
            addresses
                .filter_map(|ip| ip.as_str()?.parse::<Ipv4Addr>().ok())
                .next()?
                .to_string()
        }
    };
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let ports: Vec<Value> = spec["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["protocol"].as_str().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| {
            let mut port = Map::new();
            for field in ["name", "port", "appProtocol"] {
                if let Some(value) = p.get(field).filter(|v| !v.is_null()) {
                    port.insert(field.into(), value.clone());
                }
            }
            match &p["targetPort"] {
                Value::Number(n) => {
                    port.insert("targetPort".into(), Value::Number(n.clone()));
                }
                Value::String(named) => {
                    // A name: the number the Service's EndpointSlices give its port.
                    let number = named_port(objects, namespace, name, p["name"].as_str(), named)?;
                    port.insert("targetPort".into(), number.into());
                }
                _ => {}
            }
            Some(Value::Object(port))
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    let mut model_spec = Map::new();
    model_spec.insert("clusterIP".into(), cluster_ip.into());
    model_spec.insert("ports".into(), Value::Array(ports));
    if let Some(selector) = spec["selector"].as_object().filter(|s| !s.is_empty()) {
        model_spec.insert("selector".into(), Value::Object(selector.clone()));
    }
    Some(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(object, false),
        "spec": model_spec,
    }))
}

/// The number a Service's EndpointSlices give the service port `port_name` (whose
/// `targetPort` is the container port `target`); `None` while no slice says.
fn named_port(
    objects: &Objects,
    namespace: &str,
    service: &str,
    port_name: Option<&str>,
    target: &str,
) -> Option<u64> {
    let slices = objects.get(&Kind::EndpointSlice)?;
    let number = slices
        .values()
        .filter(|s| {
            s["metadata"]["namespace"].as_str() == Some(namespace)
                && s["metadata"]["labels"][SERVICE_NAME_LABEL].as_str() == Some(service)
        })
        .flat_map(|s| s["ports"].as_array().into_iter().flatten())
        .find(|p| p["name"].as_str().unwrap_or("") == port_name.unwrap_or(""))
        .and_then(|p| p["port"].as_u64());
    if number.is_none() {
        tracing::debug!(
            service = %format!("{namespace}/{service}"),
            target,
            "a named targetPort no EndpointSlice resolves yet: the port is left out"
        );
    }
    number
}

fn endpoint_slice(object: &Value) -> Value {
    let endpoints: Vec<Value> = object["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let mut endpoint = Map::new();
            endpoint.insert("addresses".into(), e["addresses"].clone());
            if let Some(ready) = e["conditions"]["ready"].as_bool() {
                endpoint.insert("conditions".into(), json!({ "ready": ready }));
            }
            if let Some(node) = e["nodeName"].as_str() {
                endpoint.insert("nodeName".into(), node.into());
            }
            Value::Object(endpoint)
        })
        .collect();
    let ports: Vec<Value> = object["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let mut port = Map::new();
            for field in ["name", "port"] {
                if let Some(value) = p.get(field).filter(|v| !v.is_null()) {
                    port.insert(field.into(), value.clone());
                }
            }
            Value::Object(port)
        })
        .collect();
    let mut slice = Map::new();
    slice.insert(
        "apiVersion".into(),
        nodemesh_config::ENDPOINT_SLICE_API_VERSION.into(),
    );
    slice.insert("kind".into(), "EndpointSlice".into());
    slice.insert("metadata".into(), metadata(object, false));
    slice.insert("addressType".into(), object["addressType"].clone());
    slice.insert("endpoints".into(), Value::Array(endpoints));
    if !ports.is_empty() {
        slice.insert("ports".into(), Value::Array(ports));
    }
    Value::Object(slice)
}

/// Whether a parentRef names a Service (GAMMA): group `""` (or `core`) and kind `Service`.
pub fn is_service_parent(parent: &Value) -> bool {
    matches!(parent["group"].as_str(), Some("" | "core"))
        && parent["kind"].as_str() == Some("Service")
}

fn http_route(object: &Value) -> Option<Value> {
    let parents: Vec<Value> = object["spec"]["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| is_service_parent(p))
        .map(|p| {
            let mut parent = p.clone();
            parent["group"] = "".into();
            parent
        })
        .collect();
    if parents.is_empty() {
        return None;
    }
    let mut spec = object["spec"].clone();
    spec["parentRefs"] = Value::Array(parents);
    Some(json!({
        "apiVersion": nodemesh_config::GATEWAY_API_VERSION,
        "kind": "HTTPRoute",
        "metadata": metadata(object, false),
        "spec": spec,
    }))
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use super::*;

    fn none() -> Objects {
        BTreeMap::new()
    }

    #[test]
    fn a_scheduled_pod_is_a_workload_and_others_are_none() {
        let pod = json!({
            "metadata": {
                "name": "web-0", "namespace": "shop", "uid": "u-1",
                "labels": {"app": "web"}, "resourceVersion": "7",
                "annotations": {LAST_APPLIED: "{...}", "team": "a"}
            },
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": []},
            "status": {"phase": "Running", "podIP": "fd00::5", "podIPs": [{"ip": "fd00::5"}, {"ip": "10.1.0.5"}]}
        });
        assert_eq!(
            to_model(Kind::Pod, &pod, &none()),
            Some(json!({
                "apiVersion": "nodemesh.dev/v1alpha1",
                "kind": "Workload",
                "metadata": {"name": "web-0", "namespace": "shop", "uid": "u-1",
                             "labels": {"app": "web"}, "annotations": {"team": "a"}},
                "spec": {"node": "n1", "serviceAccount": "web", "ip": "10.1.0.5"}
            }))
        );
        let mut pending = pod.clone();
        pending["status"] = json!({"phase": "Pending"});
        pending["spec"]["serviceAccountName"] = Value::Null;
        assert_eq!(
            to_model(Kind::Pod, &pending, &none()).map(|w| w["spec"].clone()),
            Some(json!({"node": "n1", "serviceAccount": "default"})),
            "a pod the CNI plugin has yet to set up has no address"
        );
        let mut host = pod.clone();
        host["spec"]["hostNetwork"] = true.into();
        assert_eq!(to_model(Kind::Pod, &host, &none()), None);
        let mut done = pod.clone();
        done["status"]["phase"] = "Succeeded".into();
        assert_eq!(to_model(Kind::Pod, &done, &none()), None);
        let mut unscheduled = pod;
        unscheduled["spec"]["nodeName"] = Value::Null;
        assert_eq!(to_model(Kind::Pod, &unscheduled, &none()), None);
    }

    #[test]
    fn a_terminating_pod_gives_its_address_up_to_the_pod_that_has_it_now() {
        let pod = |name: &str, uid: &str, terminating: bool| {
            let mut pod = json!({
                "metadata": {"name": name, "namespace": "shop", "uid": uid},
                "spec": {"nodeName": "n1"},
                "status": {"phase": "Running", "podIP": "10.1.0.5"}
            });
            if terminating {
                pod["metadata"]["deletionTimestamp"] = "2026-12-03T20:00:00Z".into();
            }
            pod
        };
        let old = pod("web-0", "u-old", true);
        let new = pod("web-1", "u-new", false);
        let objects: Objects = BTreeMap::from([(
            Kind::Pod,
            BTreeMap::from([
                ("shop/web-0".to_owned(), Arc::new(old.clone())),
                ("shop/web-1".to_owned(), Arc::new(new.clone())),
            ]),
        )]);
        assert_eq!(to_model(Kind::Pod, &old, &objects), None);
        assert!(to_model(Kind::Pod, &new, &objects).is_some());
        assert!(
            to_model(Kind::Pod, &old, &none()).is_some(),
            "alone, a terminating pod is still its address's workload"
        );
    }

    #[test]
    fn a_service_keeps_its_tcp_ports_and_its_named_target_ports_get_numbers() {
        let service = json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "type": "ClusterIP", "clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.10"],
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "http-web", "protocol": "TCP", "appProtocol": "http"},
                    {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"},
                    {"name": "admin", "port": 9000, "targetPort": 9000}
                ]
            }
        });
        let slice = json!({
            "metadata": {"name": "web-abc", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": true, "serving": true}, "nodeName": "n1", "targetRef": {"kind": "Pod"}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "admin", "port": 9000}]
        });
        let objects: Objects = BTreeMap::from([(
            Kind::EndpointSlice,
            BTreeMap::from([("shop/web-abc".to_owned(), Arc::new(slice.clone()))]),
        )]);
        assert_eq!(
            to_model(Kind::Service, &service, &objects).map(|s| s["spec"].clone()),
            Some(json!({
                "clusterIP": "10.96.0.10",
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80, "appProtocol": "http", "targetPort": 8080},
                    {"name": "admin", "port": 9000, "targetPort": 9000}
                ]
            }))
        );
        assert_eq!(
            to_model(Kind::Service, &service, &none()).map(|s| s["spec"]["ports"].clone()),
            Some(json!([{"name": "admin", "port": 9000, "targetPort": 9000}])),
            "a name no slice resolves yet leaves its port out"
        );
        assert_eq!(
            to_model(Kind::EndpointSlice, &slice, &none()),
            Some(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "web-abc", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": true}, "nodeName": "n1"}],
                "ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9000}]
            }))
        );
        let mut external = service.clone();
        external["spec"]["type"] = "ExternalName".into();
        assert_eq!(to_model(Kind::Service, &external, &objects), None);
        let mut v6 = service;
        v6["spec"]["clusterIPs"] = json!(["fd00::10"]);
        assert_eq!(to_model(Kind::Service, &v6, &objects), None, "IPv6 only");
    }

    #[test]
    fn a_route_keeps_its_service_parents_and_a_gateways_route_is_not_ours() {
        let route = json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "shop", "generation": 3},
            "spec": {
                "parentRefs": [
                    {"name": "web", "kind": "Service", "group": "core", "port": 80},
                    {"name": "public", "kind": "Gateway", "group": "gateway.networking.k8s.io"}
                ],
                "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]
            },
            "status": {"parents": []}
        });
        let model = to_model(Kind::HttpRoute, &route, &none()).expect("ours");
        assert_eq!(
            model["spec"]["parentRefs"],
            json!([{"name": "web", "kind": "Service", "group": "", "port": 80}])
        );
        assert!(model.get("status").is_none());
        assert_eq!(model["metadata"], json!({"name": "r", "namespace": "shop"}));
        let mut gateway_only = route;
        gateway_only["spec"]["parentRefs"] =
            json!([{"name": "public", "kind": "Gateway", "group": "gateway.networking.k8s.io"}]);
        assert_eq!(to_model(Kind::HttpRoute, &gateway_only, &none()), None);
    }
}
