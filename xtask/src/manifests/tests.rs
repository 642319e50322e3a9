//! The manifests' own checks: the CRDs' schemas structural and carrying their validation,
//! the agent without API access or privilege, and every example fitting its CRD.

use kube::CustomResourceExt as _;
use nodemesh_config::{
    AuthorizationPolicyResource, BackendTrafficPolicyResource, MeshSettingsResource,
    PeerAuthenticationResource,
};
use serde_json::{Value, json};

use std::fs;

use super::{agent, controller, files};
use crate::root;

#[test]
fn the_crds_carry_the_validation_their_schema_can() {
    let crd = serde_json::to_value(AuthorizationPolicyResource::crd()).expect("json");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1");
    assert_eq!(version["subresources"]["status"], json!({}));
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(
        spec["properties"]["action"]["enum"],
        json!(["ALLOW", "DENY", "AUDIT", "CUSTOM"])
    );
    let peer = serde_json::to_value(PeerAuthenticationResource::crd()).expect("json");
    let mtls = &peer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["mtls"];
    assert!(mtls.to_string().contains("STRICT"), "{mtls}");
    let files = files().expect("files");
    assert!(
        files
            .iter()
            .any(|(n, _)| n == "crds/authorizationpolicies.security.nodemesh.dev.yaml")
    );
}

#[test]
fn every_schema_is_structural() {
    // Every node of a structural schema says its type, or says anything goes.
    fn check(at: &str, schema: &Value) {
        let Some(map) = schema.as_object() else {
            return;
        };
        // Kubernetes refuses these in a CRD's schema.
        assert!(
            !map.contains_key("patternProperties"),
            "{at} has patternProperties"
        );
        assert!(
            map.get("additionalProperties") != Some(&Value::Bool(false)),
            "{at} has additionalProperties: false"
        );
        for forbidden in ["$ref", "definitions", "oneOf", "anyOf"] {
            assert!(
                !map.contains_key(forbidden) || forbidden == "oneOf" || forbidden == "anyOf",
                "{at} has {forbidden}"
            );
        }
        let free = map.contains_key("x-kubernetes-preserve-unknown-fields")
            || map.contains_key("x-kubernetes-int-or-string");
        assert!(
            map.contains_key("type") || free,
            "{at} has no type: {schema}"
        );
        for (name, property) in map
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            check(&format!("{at}.{name}"), property);
        }
        if let Some(items) = map.get("items") {
            check(&format!("{at}[]"), items);
        }
        if let Some(values) = map.get("additionalProperties").filter(|v| v.is_object()) {
            check(&format!("{at}{{}}"), values);
        }
    }
    for crd in [
        AuthorizationPolicyResource::crd(),
        PeerAuthenticationResource::crd(),
        MeshSettingsResource::crd(),
        BackendTrafficPolicyResource::crd(),
    ] {
        let value = serde_json::to_value(&crd).expect("json");
        let name = crd.metadata.name.clone().unwrap_or_default();
        check(
            &name,
            &value["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
        );
    }
}

#[test]
fn the_agent_has_no_api_access_and_no_shared_secret() {
    let agent = agent();
    let text = serde_json::to_string(&agent).expect("json");
    assert!(
        !text.contains("secretName"),
        "no Secret is mounted into agents"
    );
    let containers = &agent[1]["spec"]["template"]["spec"]["containers"];
    assert_eq!(
        containers[0]["securityContext"]["privileged"], false,
        "the long-running agent is not privileged"
    );
    let controller = serde_json::to_string(&controller()).expect("json");
    assert!(
        !controller.contains("nodemesh-agent\",\"namespace\""),
        "no RoleBinding names the agent"
    );
}

mod examples {
    //! The examples users copy, held against the CRDs' schemas as the API server would hold
    //! them: no field of theirs pruned, every value of the type and among the values the
    //! schema allows.

    use super::*;

    /// What the API server would do to `value` under `schema`: the first field it would
    /// prune or refuse, with its path.
    fn problem(at: &str, value: &Value, schema: &Value) -> Option<String> {
        if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
            && schema.get("properties").is_none()
        {
            return None;
        }
        if value.is_null() {
            return (schema.get("nullable") != Some(&Value::Bool(true)))
                .then(|| format!("{at} is null"));
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            return Some(format!("{at}: {value} is not one of {allowed:?}"));
        }
        let kind = schema.get("type").and_then(Value::as_str).unwrap_or("");
        let fits = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => schema.get("x-kubernetes-int-or-string").is_some(),
        };
        if !fits {
            return Some(format!("{at}: {value} is not of type {kind:?}"));
        }
        match value {
            Value::Object(map) => {
                let properties = schema.get("properties").and_then(Value::as_object);
                let additional = schema.get("additionalProperties").filter(|a| a.is_object());
                for (name, field) in map {
                    let at = format!("{at}.{name}");
                    let field_schema = properties.and_then(|p| p.get(name)).or(additional);
                    match field_schema {
                        Some(field_schema) => {
                            if let Some(found) = problem(&at, field, field_schema) {
                                return Some(found);
                            }
                        }
                        None => return Some(format!("{at} would be pruned: the schema lacks it")),
                    }
                }
                None
            }
            Value::Array(items) => {
                let item_schema = schema.get("items")?;
                items
                    .iter()
                    .enumerate()
                    .find_map(|(i, item)| problem(&format!("{at}[{i}]"), item, item_schema))
            }
            _ => None,
        }
    }

    #[test]
    fn every_example_fits_its_crd() {
        let crds: Vec<Value> = [
            serde_json::to_value(AuthorizationPolicyResource::crd()),
            serde_json::to_value(PeerAuthenticationResource::crd()),
            serde_json::to_value(MeshSettingsResource::crd()),
            serde_json::to_value(BackendTrafficPolicyResource::crd()),
        ]
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("json");
        let mut checked = 0;
        for dir in ["examples/policies", "examples/traffic"] {
            for entry in fs::read_dir(root().join(dir)).expect("examples") {
                let path = entry.expect("entry").path();
                if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                    continue;
                }
                let text = fs::read_to_string(&path).expect("read");
                for document in serde_yaml::Deserializer::from_str(&text) {
                    let value: Value = serde::Deserialize::deserialize(document).expect("yaml");
                    let kind = value["kind"].as_str().unwrap_or_default();
                    let Some(crd) = crds.iter().find(|c| c["spec"]["names"]["kind"] == kind) else {
                        continue;
                    };
                    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
                    let spec_schema = &schema["properties"]["spec"];
                    if let Some(found) = problem("spec", &value["spec"], spec_schema) {
                        panic!("{}: {kind}: {found}", path.display());
                    }
                    checked += 1;
                }
            }
        }
        assert!(
            checked >= 8,
            "only {checked} examples of nodemesh's kinds checked"
        );
    }

    #[test]
    fn a_field_the_schema_lacks_is_caught() {
        let schema =
            json!({"type": "object", "properties": {"a": {"type": "string", "enum": ["x"]}}});
        assert_eq!(problem("spec", &json!({"a": "x"}), &schema), None);
        assert!(problem("spec", &json!({"b": 1}), &schema).is_some_and(|p| p.contains("pruned")));
        assert!(problem("spec", &json!({"a": "y"}), &schema).is_some());
        assert!(problem("spec", &json!({"a": 1}), &schema).is_some());
    }
}
