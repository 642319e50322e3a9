//! From the cluster's objects to a configuration, object by object: each is converted
//! (`convert`) and validated as a local file's would be; one that fails keeps its last good
//! version in force (or none, if it never had one) and says why, and the others go on.
//! The verdicts feed the objects' status and Events.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
};

use nodemesh_config::{ConfigError, MeshConfig, ParsedObject};

use super::{
    cluster::{Kind, ObjectKey, Objects},
    convert,
};

/// What became of one object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Empty when the object is in force as it is.
    pub problems: Vec<ConfigError>,
    /// Whether the object, as it is now, is not in force: it is invalid, or contradicts
    /// another. (One that names something missing is in force, and has problems.)
    pub refused: bool,
    /// Whether an earlier version of the object stays in force instead.
    pub kept_previous: bool,
    /// What stands in for a refused security policy with no earlier version: it fails
    /// closed (see [`stand_in`]).
    pub stand_in: Option<&'static str>,
}

impl Verdict {
    pub fn accepted(&self) -> bool {
        self.problems.is_empty()
    }

    /// What is wrong, for a status message or an Event: field and reason, object by object
    /// left implicit.
    pub fn message(&self) -> String {
        let mut parts: Vec<String> = self
            .problems
            .iter()
            .map(|p| match &p.field {
                Some(field) => format!("field `{field}`: {}", p.message),
                None => p.message.clone(),
            })
            .collect();
        if self.kept_previous {
            parts.push("the previous version stays in force".to_owned());
        }
        if let Some(stand_in) = self.stand_in {
            parts.push(format!("until it is fixed, {stand_in}"));
        }
        parts.join("; ")
    }
}

/// The last version of each object that was valid, by kind and key, with the uid of the
/// object it belongs to (a new object of the same name starts afresh).
#[derive(Debug, Default)]
pub struct LastGood(HashMap<(Kind, ObjectKey), (Option<String>, ParsedObject)>);

/// A configuration built from the cluster, and the verdict on each object of nodemesh's
/// kinds and each HTTPRoute (every object with a problem, of any kind, has one).
#[derive(Debug, Default)]
pub struct Built {
    pub mesh: MeshConfig,
    pub verdicts: BTreeMap<(Kind, ObjectKey), Verdict>,
}

fn uid(object: &serde_json::Value) -> Option<String> {
    object["metadata"]["uid"].as_str().map(str::to_owned)
}

/// Builds the configuration `objects` describe.
pub fn build(objects: &Objects, last_good: &mut LastGood) -> Built {
    let mut parsed = Vec::new();
    let mut verdicts: BTreeMap<(Kind, ObjectKey), Verdict> = BTreeMap::new();
    let mut seen = HashSet::new();
    for (kind, of_kind) in objects {
        for (key, object) in of_kind {
            let Some(model) = convert::to_model(*kind, object, objects) else {
                continue;
            };
            seen.insert((*kind, key.clone()));
            let id = (*kind, key.clone());
            let value = match serde_yaml::to_value(&model) {
                Ok(value) => value,
                Err(e) => {
                    // Not expected: the model's object is built from JSON just read.
                    tracing::error!(kind = kind.model_name(), %key, error = %e, "cannot convert the object to the configuration's form; it is left out");
                    continue;
                }
            };
            match nodemesh_config::parse_object(Path::new(""), value) {
                Ok(object_parsed) => {
                    last_good
                        .0
                        .insert(id.clone(), (uid(object), object_parsed.clone()));
                    parsed.push(object_parsed);
                    if kind.defined_by_crd() {
                        verdicts.insert(id, Verdict::default());
                    }
                }
                Err(problem) => {
                    let previous = last_good
                        .0
                        .get(&id)
                        .filter(|(known, _)| *known == uid(object))
                        .map(|(_, p)| p.clone());
                    let kept_previous = previous.is_some();
                    let stand_in = match previous {
                        Some(previous) => {
                            parsed.push(previous);
                            None
                        }
                        None => stand_in(*kind, object).map(|(parsed_in, what)| {
                            parsed.push(parsed_in);
                            what
                        }),
                    };
                    verdicts.insert(
                        id,
                        Verdict {
                            problems: vec![problem],
                            refused: true,
                            kept_previous,
                            stand_in,
                        },
                    );
                }
            }
        }
    }
    // What is gone from the cluster is gone for good.
    last_good.0.retain(|id, _| seen.contains(id));
    let (mesh, problems) = nodemesh_config::assemble(parsed);
    for problem in problems {
        let Some(id) = problem.object.as_deref().and_then(object_of) else {
            tracing::warn!(%problem, "a problem of no object");
            continue;
        };
        let refused = !in_mesh(&mesh, id.0, &id.1);
        let verdict = verdicts.entry(id).or_default();
        verdict.refused |= refused;
        verdict.problems.push(problem);
    }
    Built { mesh, verdicts }
}

/// Whether the configuration holds an object of `kind` under `key`.
fn in_mesh(mesh: &MeshConfig, kind: Kind, key: &str) -> bool {
    match kind {
        Kind::Namespace => mesh.namespaces.contains_key(key),
        Kind::Pod => mesh.workloads.contains_key(key),
        Kind::Service => mesh.services.contains_key(key),
        Kind::EndpointSlice => mesh.endpoint_slices.contains_key(key),
        Kind::AuthorizationPolicy => mesh.authorization_policies.contains_key(key),
        Kind::PeerAuthentication => mesh.peer_authentications.contains_key(key),
        Kind::BackendTrafficPolicy => mesh.backend_traffic_policies.contains_key(key),
        Kind::HttpRoute => mesh.http_routes.contains_key(key),
        // One per mesh, and nothing contradicts it.
        Kind::MeshSettings => true,
        Kind::Node => false,
    }
}

/// What stands in for a security policy that does not validate and has no earlier version
/// (a new object, or one the controller has not seen valid since it started): the same
/// scope, failing closed, so that a typo never opens what the policy meant to close. An
/// AuthorizationPolicy becomes a DENY of everything (ALLOW: one that allows nothing, which
/// denies what no other ALLOW allows; AUDIT: nothing); a PeerAuthentication, STRICT. Its
/// selector or targets are kept when they can be read, else it covers its namespace (the
/// mesh, in the root namespace).
pub fn stand_in(kind: Kind, object: &serde_json::Value) -> Option<(ParsedObject, &'static str)> {
    use serde_json::{Map, Value, json};
    let spec = &object["spec"];
    let mut scope = Map::new();
    if spec["selector"].is_object()
        && serde_json::from_value::<nodemesh_config::WorkloadSelector>(spec["selector"].clone())
            .is_ok()
    {
        scope.insert("selector".into(), spec["selector"].clone());
    }
    let meta = &object["metadata"];
    let metadata = json!({
        "name": meta["name"],
        "namespace": meta["namespace"],
        "creationTimestamp": meta["creationTimestamp"],
    });
    let (spec, what) = match kind {
        Kind::AuthorizationPolicy => {
            if kind == Kind::AuthorizationPolicy
                && let Some(targets) = spec.get("targetRefs").filter(|t| t.is_array())
                && serde_json::from_value::<Vec<nodemesh_config::PolicyTargetRef>>(targets.clone())
                    .is_ok()
            {
                scope.remove("selector");
                scope.insert("targetRefs".into(), targets.clone());
            }
            match spec["action"].as_str().unwrap_or("ALLOW") {
                "AUDIT" => return None,
                "ALLOW" => {
                    scope.insert("action".into(), "ALLOW".into());
                    (scope, "it allows nothing to the workloads it selects")
                }
                _ => {
                    scope.insert("action".into(), "DENY".into());
                    scope.insert("rules".into(), json!([{}]));
                    (scope, "it denies everything to the workloads it selects")
                }
            }
        }
        Kind::PeerAuthentication => {
            scope.insert("mtls".into(), json!({ "mode": "STRICT" }));
            (scope, "the workloads it selects accept mTLS only (STRICT)")
        }
        _ => return None,
    };
    let mut model = Map::new();
    model.insert("apiVersion".into(), object["apiVersion"].clone());
    model.insert("kind".into(), object["kind"].clone());
    model.insert("metadata".into(), metadata);
    model.insert("spec".into(), Value::Object(spec));
    let mut value = Value::Object(model);
    if value["metadata"]["creationTimestamp"].is_null()
        && let Some(meta) = value["metadata"].as_object_mut()
    {
        meta.remove("creationTimestamp");
    }
    let yaml = serde_yaml::to_value(&value).ok()?;
    match nodemesh_config::parse_object(Path::new(""), yaml) {
        Ok(parsed) => Some((parsed, what)),
        Err(e) => {
            tracing::error!(error = %e, "cannot make the stand-in of a refused policy");
            None
        }
    }
}

/// The kind and key of an object as errors name it (`HTTPRoute shop/web`).
fn object_of(described: &str) -> Option<(Kind, ObjectKey)> {
    let (name, key) = described.split_once(' ')?;
    let kind = Kind::ALL.into_iter().find(|k| k.model_name() == name)?;
    Some((kind, key.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    fn objects(list: Vec<(Kind, serde_json::Value)>) -> Objects {
        let mut objects: Objects = BTreeMap::new();
        for (kind, object) in list {
            objects
                .entry(kind)
                .or_default()
                .insert(super::super::cluster::key_of(&object), Arc::new(object));
        }
        objects
    }

    fn namespace() -> (Kind, serde_json::Value) {
        (
            Kind::Namespace,
            json!({"metadata": {"name": "shop", "labels": {"nodemesh.dev/enabled": "true"}}}),
        )
    }

    fn policy(uid: &str, action: &str) -> (Kind, serde_json::Value) {
        (
            Kind::AuthorizationPolicy,
            json!({
                "apiVersion": "security.nodemesh.dev/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "deny-all", "namespace": "shop", "uid": uid, "generation": 1},
                "spec": {"action": action, "rules": [{}]}
            }),
        )
    }

    #[test]
    fn an_invalid_edit_keeps_the_last_good_version_in_force() {
        let mut last_good = LastGood::default();
        let first = build(
            &objects(vec![namespace(), policy("u1", "DENY")]),
            &mut last_good,
        );
        assert!(
            first
                .mesh
                .authorization_policies
                .contains_key("shop/deny-all")
        );
        assert!(first.verdicts[&(Kind::AuthorizationPolicy, "shop/deny-all".into())].accepted());

        let broken = build(
            &objects(vec![namespace(), policy("u1", "DENNY")]),
            &mut last_good,
        );
        assert_eq!(
            broken.mesh.authorization_policies["shop/deny-all"]
                .spec
                .action,
            nodemesh_config::Action::Deny,
            "the DENY stays in force"
        );
        let verdict = &broken.verdicts[&(Kind::AuthorizationPolicy, "shop/deny-all".into())];
        assert!(verdict.refused && verdict.kept_previous);
        assert!(
            verdict.message().contains("DENNY") && verdict.message().ends_with("stays in force"),
            "{}",
            verdict.message()
        );

        // Deleted and created again, broken: nothing of the old one comes back, and what it
        // cannot say it denies, it denies everything.
        build(&objects(vec![namespace()]), &mut last_good);
        let recreated = build(
            &objects(vec![namespace(), policy("u2", "DENNY")]),
            &mut last_good,
        );
        let verdict = &recreated.verdicts[&(Kind::AuthorizationPolicy, "shop/deny-all".into())];
        assert!(!verdict.kept_previous);
        let stand_in = &recreated.mesh.authorization_policies["shop/deny-all"];
        assert_eq!(stand_in.spec.action, nodemesh_config::Action::Deny);
        assert_eq!(stand_in.spec.rules.len(), 1);
        assert!(
            verdict
                .message()
                .ends_with("until it is fixed, it denies everything to the workloads it selects"),
            "{}",
            verdict.message()
        );
    }

    #[test]
    fn a_refused_policy_with_no_earlier_version_fails_closed_in_its_own_scope() {
        let allow = json!({
            "apiVersion": "security.nodemesh.dev/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u3"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
                     "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}
        });
        let built = build(
            &objects(vec![namespace(), (Kind::AuthorizationPolicy, allow)]),
            &mut LastGood::default(),
        );
        let stand_in = &built.mesh.authorization_policies["shop/web"];
        assert_eq!(stand_in.spec.action, nodemesh_config::Action::Allow);
        assert!(stand_in.spec.rules.is_empty(), "allows nothing");
        assert_eq!(
            stand_in
                .spec
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone()),
            Some([("app".to_owned(), "web".to_owned())].into()),
            "only the workloads it selected"
        );
        let peer = json!({
            "apiVersion": "security.nodemesh.dev/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u4"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"},
                     "portLevelMtls": {"http": {"mode": "DISABLE"}}}
        });
        let built = build(
            &objects(vec![namespace(), (Kind::PeerAuthentication, peer)]),
            &mut LastGood::default(),
        );
        assert_eq!(
            built.mesh.peer_authentications["shop/web"].mode(),
            nodemesh_config::MtlsMode::Strict
        );
    }

    #[test]
    fn a_route_naming_a_missing_service_is_kept_and_its_problem_reported() {
        let route = json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                     "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}
        });
        let built = build(
            &objects(vec![namespace(), (Kind::HttpRoute, route)]),
            &mut LastGood::default(),
        );
        assert!(built.mesh.http_routes.contains_key("shop/r"));
        let verdict = &built.verdicts[&(Kind::HttpRoute, "shop/r".into())];
        assert_eq!(verdict.problems.len(), 2, "{verdict:?}");
        assert!(
            !verdict.refused && !verdict.kept_previous,
            "in force, with problems"
        );
    }
}
