//! Sending statuses and Events to the API server: only what differs from what the cluster
//! holds (and from what was just sent, while the watch has yet to bring it back), and one
//! Event per refusal of a given version of an object.

use std::collections::{HashMap, HashSet};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use super::{CONTROLLER_NAME, object_status, our_parents, route_parents, same_status};
use crate::kubernetes::{
    build::{Built, Verdict},
    cluster::{Cluster, Kind, ObjectKey},
};

/// Longest Event note the API server takes.
const MAX_NOTE: usize = 1024;

pub struct StatusWriter {
    client: Client,
    /// This replica's name (the Events' `reportingInstance`).
    identity: String,
    /// What was last sent, by object.
    sent: HashMap<(Kind, ObjectKey), Value>,
    /// Refusals told already: uid, generation, message.
    told: HashSet<(String, i64, String)>,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("identity", &self.identity)
            .field("sent", &self.sent.len())
            .finish_non_exhaustive()
    }
}

impl StatusWriter {
    pub fn new(client: Client, identity: String) -> Self {
        Self {
            client,
            identity,
            sent: HashMap::new(),
            told: HashSet::new(),
        }
    }

    /// Brings the status of every object with a verdict up to date, and tells each new
    /// refusal with an Event.
    pub async fn write(&mut self, cluster: &Cluster, built: &Built, now: &str) {
        for ((kind, key), verdict) in &built.verdicts {
            if !kind.defined_by_crd() {
                continue;
            }
            let Some(object) = cluster.get(*kind, key) else {
                continue;
            };
            let desired = if *kind == Kind::HttpRoute {
                json!({ "parents": route_parents(&object, Some(verdict), &built.mesh, now) })
            } else {
                object_status(&object, verdict, now)
            };
            let id = (*kind, key.clone());
            // For a route, only nodemesh's entries count: others' are theirs.
            let (current, wanted) = if *kind == Kind::HttpRoute {
                (
                    Value::Array(our_parents(&object["status"]["parents"])),
                    Value::Array(our_parents(&desired["parents"])),
                )
            } else {
                (object["status"].clone(), desired.clone())
            };
            if same_status(&current, &wanted) {
                // In the cluster as wanted: a later change by anyone is noticed again.
                self.sent.remove(&id);
            } else if !self.sent.get(&id).is_some_and(|s| same_status(s, &wanted))
                && self.patch(*kind, &object, &desired).await
            {
                self.sent.insert(id, wanted);
            }
            if verdict.refused {
                self.tell(*kind, &object, verdict).await;
            }
        }
        self.sent.retain(|id, _| built.verdicts.contains_key(id));
        // Refusals of objects still refused; the rest need not be remembered.
        let refused: HashSet<String> = built
            .verdicts
            .iter()
            .filter(|(_, v)| v.refused)
            .filter_map(|((kind, key), _)| cluster.get(*kind, key))
            .filter_map(|o| o["metadata"]["uid"].as_str().map(str::to_owned))
            .collect();
        self.told.retain(|(uid, _, _)| refused.contains(uid));
    }

    async fn patch(&self, kind: Kind, object: &Value, status: &Value) -> bool {
        let meta = &object["metadata"];
        let (Some(namespace), Some(name)) = (meta["namespace"].as_str(), meta["name"].as_str())
        else {
            return false;
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &kind.api_resource());
        // The version read: if another writer changed the status since, the API server
        // answers 409 and the next round starts from what it wrote.
        let patch = Patch::Merge(json!({
            "metadata": { "resourceVersion": meta["resourceVersion"] },
            "status": status,
        }));
        match api
            .patch_status(name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => true,
            // Deleted, or written by another, meanwhile.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => false,
            Err(e) => {
                tracing::warn!(kind = kind.model_name(), %namespace, %name, error = %e, "cannot write status");
                false
            }
        }
    }

    /// An Event on the object: what was refused and why, once per version of the object.
    async fn tell(&mut self, kind: Kind, object: &Value, verdict: &Verdict) {
        let meta = &object["metadata"];
        let (Some(namespace), Some(name), Some(uid)) = (
            meta["namespace"].as_str(),
            meta["name"].as_str(),
            meta["uid"].as_str(),
        ) else {
            return;
        };
        let generation = meta["generation"].as_i64().unwrap_or(0);
        let message = verdict.message();
        let told = (uid.to_owned(), generation, message.clone());
        if self.told.contains(&told) {
            return;
        }
        let resource = kind.api_resource();
        let mut note = format!("{} {namespace}/{name} refused: {message}", resource.kind);
        if note.len() > MAX_NOTE {
            let mut cut = MAX_NOTE - 3;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str("...");
        }
        let now = Timestamp::now();
        // Object names are at most 253 characters; the suffix makes it unique.
        let suffix = format!(".{:x}", now.as_nanosecond());
        let mut prefix = name.to_owned();
        prefix.truncate(253 - suffix.len());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!("{}{suffix}", prefix.trim_end_matches(['.', '-']))),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some("Warning".to_owned()),
            reason: Some("Refused".to_owned()),
            action: Some("Validate".to_owned()),
            note: Some(note),
            regarding: Some(ObjectReference {
                api_version: Some(resource.api_version.clone()),
                kind: Some(resource.kind.clone()),
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                uid: Some(uid.to_owned()),
                ..ObjectReference::default()
            }),
            reporting_controller: Some(CONTROLLER_NAME.to_owned()),
            reporting_instance: Some(self.identity.clone()),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => {
                self.told.insert(told);
            }
            Err(e) => {
                tracing::warn!(kind = %resource.kind, %namespace, %name, error = %e, "cannot record an Event");
            }
        }
    }
}
