//! The mesh CA in Kubernetes: a Secret in the controller's namespace (`nodemesh-ca`:
//! `ca-cert.pem`, `ca-key.pem`, optionally `trust-bundle.pem`), supplied by the operator or
//! created by the first controller that finds none; and its roots, published in a ConfigMap
//! (`nodemesh-root-ca`) for the agents to trust the controller by. Agents never mount the
//! Secret: a node that could read it could sign any identity.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Context as _;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, api::PostParams};
use nodemesh_identity::{CertificateAuthority, TrustBundle, generate_root};

pub const CERT: &str = "ca-cert.pem";
pub const KEY: &str = "ca-key.pem";
pub const BUNDLE: &str = "trust-bundle.pem";

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

fn from_secret(
    secret: &Secret,
    namespace: &str,
    name: &str,
) -> anyhow::Result<CertificateAuthority> {
    let origin = |key: &str| PathBuf::from(format!("Secret {namespace}/{name} key {key}"));
    let (Some(cert), Some(key)) = (text(secret, CERT), text(secret, KEY)) else {
        anyhow::bail!(
            "Secret {namespace}/{name} lacks {CERT} or {KEY}; give both (PEM), or delete the \
             Secret for the controller to create a new root"
        );
    };
    let bundle = text(secret, BUNDLE);
    let (cert_origin, key_origin, bundle_origin) = (origin(CERT), origin(KEY), origin(BUNDLE));
    Ok(CertificateAuthority::from_pem(
        (&cert, &cert_origin),
        (&key, &key_origin),
        bundle.as_deref().map(|b| (b, bundle_origin.as_path())),
    )?)
}

/// The CA in Secret `namespace/name`, made (a new root for `trust_domain`) if there is none.
/// Two replicas starting together both try; the one that loses takes the winner's.
pub async fn load_or_create(
    client: Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> anyhow::Result<CertificateAuthority> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    if let Some(secret) = api
        .get_opt(name)
        .await
        .with_context(|| format!("cannot read Secret {namespace}/{name}"))?
    {
        tracing::info!(secret = %format!("{namespace}/{name}"), "mesh CA from its Secret");
        return from_secret(&secret, namespace, name);
    }
    let (cert, key) = generate_root(trust_domain)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_owned(),
                "nodemesh".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([
            (CERT.to_owned(), ByteString(cert.into_bytes())),
            (KEY.to_owned(), ByteString(key.into_bytes())),
        ])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), "created a new mesh root CA");
            from_secret(&created, namespace, name)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let theirs = api
                .get(name)
                .await
                .with_context(|| format!("cannot read Secret {namespace}/{name}"))?;
            from_secret(&theirs, namespace, name)
        }
        Err(e) => Err(e).with_context(|| format!("cannot create Secret {namespace}/{name}")),
    }
}

/// Publishes the mesh's roots in ConfigMap `namespace/name` (`ca-cert.pem`), creating or
/// updating it when it differs.
pub async fn publish_roots(
    client: Client,
    namespace: &str,
    name: &str,
    bundle: &TrustBundle,
) -> anyhow::Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let pem = bundle.to_pem().concat();
    let data = BTreeMap::from([(CERT.to_owned(), pem)]);
    let existing = api
        .get_opt(name)
        .await
        .with_context(|| format!("cannot read ConfigMap {namespace}/{name}"))?;
    match existing {
        Some(current) if current.data.as_ref() == Some(&data) => Ok(()),
        Some(mut current) => {
            current.data = Some(data);
            api.replace(name, &PostParams::default(), &current)
                .await
                .with_context(|| format!("cannot update ConfigMap {namespace}/{name}"))?;
            Ok(())
        }
        None => {
            let map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..ConfigMap::default()
            };
            match api.create(&PostParams::default(), &map).await {
                Ok(_) => Ok(()),
                // Another replica made it meanwhile, from the same Secret.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => {
                    Err(e).with_context(|| format!("cannot create ConfigMap {namespace}/{name}"))
                }
            }
        }
    }
}
