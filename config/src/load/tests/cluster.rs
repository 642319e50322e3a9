//! Objects as a cluster gives them: Services and their EndpointSlices, headless Services,
//! pods the CNI plugin has yet to set up, and configuration assembled object by object.

use std::path::Path;

use super::*;

#[test]
fn services_pick_their_endpoints_and_need_their_own_address() {
    let dir = ConfigDir::new();
    let service = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  clusterIP: 10.96.0.10\n  selector:\n    app: web\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n  ipFamilies: [IPv4]\n";
    dir.write("web.yaml", &workload("web", "shop", "10.0.0.2", ""))
        .write("api.yaml", &workload("api", "shop", "10.0.0.3", ""))
        .write("svc.yaml", service);
    let config = dir
        .load()
        .expect("valid: unknown Kubernetes fields are ignored");
    let svc = &config.services["shop/web"];
    let endpoints: Vec<String> = config
        .endpoints(svc)
        .iter()
        .filter_map(|e| e.workload.map(Workload::key))
        .collect();
    assert_eq!(endpoints, ["shop/web"]);
    assert_eq!(svc.target_port(80), Some(8080));
    assert_eq!(svc.target_port(81), None);

    dir.write("svc.yaml", &service.replace("10.96.0.10", "10.0.0.3"));
    assert_eq!(dir.errors()[0].field.as_deref(), Some("spec.clusterIP"));
    dir.write(
        "svc.yaml",
        &service.replace("targetPort: 8080", "targetPort: http"),
    );
    assert_eq!(
        dir.errors()[0].field.as_deref(),
        Some("spec.ports[0].targetPort")
    );
}

const WEB_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n";

/// Workloads web and api, the Service web selecting web, and `SLICE` listing its endpoints.
fn web_and_api_with_a_slice() -> ConfigDir {
    let dir = ConfigDir::new();
    dir.write("web.yaml", &workload("web", "shop", "10.0.0.2", ""))
        .write("api.yaml", &workload("api", "shop", "10.0.0.3", ""))
        .write("svc.yaml", WEB_SERVICE)
        .write("slice.yaml", SLICE);
    dir
}

const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-x1\n  namespace: shop\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nendpoints:\n- addresses: [10.0.0.3]\n  conditions: {ready: true}\n- addresses: [10.0.0.2]\n  conditions: {ready: false}\n- addresses: [192.0.2.7]\nports:\n- name: http\n  port: 8080\n  protocol: TCP\n";

#[test]
fn endpoint_slices_name_a_services_endpoints_ready_ones_only() {
    let dir = web_and_api_with_a_slice();
    let config = dir.load().expect("valid");
    let endpoints: Vec<(String, Option<String>)> = config
        .endpoints(&config.services["shop/web"])
        .iter()
        .map(|e| (e.ip.to_string(), e.workload.map(Workload::key)))
        .collect();
    // The slice, not the selector: api (not selected, but listed and ready) and an address
    // outside the mesh; web is listed not ready.
    assert_eq!(
        endpoints,
        [
            ("10.0.0.3".to_owned(), Some("shop/api".to_owned())),
            ("192.0.2.7".to_owned(), None),
        ]
    );
    assert_eq!(
        config.endpoint_slices["shop/web-x1"].port_named(Some("http")),
        Some(8080)
    );

    dir.write(
        "slice.yaml",
        &SLICE.replace("    kubernetes.io/service-name: web\n", "    other: x\n"),
    );
    assert_eq!(
        dir.errors()[0].field.as_deref(),
        Some("metadata.labels.kubernetes.io/service-name")
    );
    dir.write("slice.yaml", &SLICE.replace("192.0.2.7", "192.0.2"));
    assert_eq!(
        dir.errors()[0].field.as_deref(),
        Some("endpoints[2].addresses[0]")
    );
}

#[test]
fn a_headless_service_has_no_address_of_its_own() {
    let dir = ConfigDir::new();
    dir.write("web.yaml", &workload("web", "shop", "10.0.0.2", ""))
        .write(
            "svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: None, selector: {app: web}, ports: [{port: 80}]}\n",
        );
    let config = dir.load().expect("valid");
    let svc = &config.services["shop/web"];
    assert_eq!(svc.vip(), None);
    assert_eq!(config.endpoints(svc).len(), 1);
    dir.write(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {selector: {app: web}, ports: [{port: 80}]}\n",
    );
    let errors = dir.errors();
    assert!(
        errors[0].message.contains("clusterIP"),
        "an address or None must be written: {}",
        errors[0]
    );
}

#[test]
fn a_workload_without_a_namespace_path_waits_for_the_cni_plugin() {
    let dir = ConfigDir::new();
    dir.write(
        "web.yaml",
        "apiVersion: nodemesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: web, namespace: shop, uid: 0d9e4b52-8a3c-4c38-9d44-58c0a1f2b7e1}\nspec: {node: n1, serviceAccount: web}\n",
    );
    let config = dir.load().expect("valid: no path, no address yet");
    let web = &config.workloads["shop/web"];
    assert_eq!((web.ip(), web.spec.netns.as_ref()), (None, None));
    assert_eq!(
        config.for_node("n1").workloads.len(),
        1,
        "its own node's agent gets it"
    );
    assert!(
        config.for_node("n2").workloads.is_empty(),
        "no other node can reach it yet"
    );
    dir.write(
        "web.yaml",
        "apiVersion: nodemesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: web, namespace: shop}\nspec: {node: n1, netns: /run/netns/web}\n",
    );
    assert_eq!(
        dir.errors()[0].field.as_deref(),
        Some("spec.ip"),
        "a namespace path needs the address in it"
    );
}

#[test]
fn assembled_object_by_object_a_conflict_leaves_out_one_object_not_the_rest() {
    let parse = |yaml: &str| {
        parse_object(Path::new(""), serde_yaml::from_str(yaml).expect("yaml"))
            .expect("valid on its own")
    };
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: missing}]\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n";
    let objects = vec![
        parse(NAMESPACES.split("---").next().expect("shop")),
        parse(&workload("web", "shop", "10.0.0.2", "")),
        parse(&workload("copy", "shop", "10.0.0.2", "")),
        parse(route),
    ];
    let (config, errors) = assemble(objects);
    let described: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(described.len(), 3, "{described:#?}");
    assert!(
        described[0].starts_with("Workload shop/copy: field `spec.ip`: 10.0.0.2 is already"),
        "no file to name for cluster objects: {}",
        described[0]
    );
    assert!(config.workloads.contains_key("shop/web"));
    assert!(!config.workloads.contains_key("shop/copy"));
    assert!(
        config.http_routes.contains_key("shop/r"),
        "a route naming what is missing stays, for its status to say so"
    );
}

#[test]
fn what_attaches_to_a_service_covers_its_pods_ready_or_not() {
    let dir = web_and_api_with_a_slice();
    let config = dir.load().expect("valid");
    let svc = &config.services["shop/web"];
    // web is listed not ready: no traffic goes to it, but policies on the Service cover it.
    assert!(config.serves(svc, &config.workloads["shop/web"]));
    assert!(
        !config.serves(svc, &config.workloads["shop/api"]),
        "the selector decides, not the slice"
    );
    let headless_of_slices = WEB_SERVICE.replace(", selector: {app: web}", "");
    dir.write("svc.yaml", &headless_of_slices);
    let config = dir.load().expect("valid");
    let svc = &config.services["shop/web"];
    assert!(
        config.serves(svc, &config.workloads["shop/web"]),
        "listed, not ready"
    );
    assert!(config.serves(svc, &config.workloads["shop/api"]));
}
