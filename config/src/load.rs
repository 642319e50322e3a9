//! Reading a configuration directory: files, documents, objects, then whole-config checks.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::{
    API_VERSION, AuthorizationPolicy, BackendTrafficPolicy, ConfigError, ConfigErrors,
    ENDPOINT_SLICE_API_VERSION, EndpointSlice, GATEWAY_API_VERSION, HttpRoute, MeshConfig,
    MeshSettings, Namespace, POLICY_API_VERSION, PeerAuthentication, ROOT_NAMESPACE,
    SECURITY_API_VERSION, Service, Workload,
};

mod check;
mod references;

/// Loads a configuration from a directory of YAML files (or from one file).
pub fn load_path(path: &Path) -> Result<MeshConfig, ConfigErrors> {
    if path.is_dir() {
        load_dir(path)
    } else {
        let text = read(path)?;
        let objects = parse_documents(path, &text).map_err(|e| ConfigErrors(vec![e]))?;
        build(objects)
    }
}

/// Loads a configuration from YAML text, as if read from `name`; for tests and tools that
/// hold the objects in memory.
pub fn load_str(name: &Path, text: &str) -> Result<MeshConfig, ConfigErrors> {
    let objects = parse_documents(name, text).map_err(|e| ConfigErrors(vec![e]))?;
    build(objects)
}

/// Loads every `*.yaml` and `*.yml` file of a directory, in name order. Hidden files and other
/// extensions are ignored, so editors' swap files do not count.
pub fn load_dir(dir: &Path) -> Result<MeshConfig, ConfigErrors> {
    let files = config_files(dir).map_err(|e| ConfigErrors(vec![e]))?;
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        match read(&file)
            .and_then(|text| parse_documents(&file, &text).map_err(|e| ConfigErrors(vec![e])))
        {
            Ok(mut parsed) => objects.append(&mut parsed),
            Err(ConfigErrors(mut e)) => errors.append(&mut e),
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    build(objects)
}

fn read(file: &Path) -> Result<String, ConfigErrors> {
    fs::read_to_string(file).map_err(|e| {
        ConfigErrors(vec![ConfigError::file(
            file,
            format!("cannot read the file: {e}"),
        )])
    })
}

fn config_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = fs::read_dir(dir).map_err(|e| {
        ConfigError::file(dir, format!("cannot read the configuration directory: {e}"))
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| is_config_file(path))
        .collect();
    files.sort();
    Ok(files)
}

fn is_config_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    !hidden && yaml && path.is_file()
}

/// One object read from a file, not yet checked against the others.
#[derive(Debug, Clone)]
pub(crate) enum Object {
    Namespace(Namespace),
    Workload(Workload),
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
    Service(Service),
    MeshSettings(MeshSettings),
    HttpRoute(HttpRoute),
    BackendTrafficPolicy(Box<BackendTrafficPolicy>),
    EndpointSlice(EndpointSlice),
}

impl Object {
    /// `Kind namespace/name` (`Namespace name` for a Namespace): how errors name the object,
    /// and the key no two objects of a configuration may share.
    fn describe(&self) -> String {
        match self {
            Object::Namespace(ns) => format!("Namespace {}", ns.name()),
            Object::Workload(w) => format!("Workload {}", w.key()),
            Object::PeerAuthentication(p) => format!("PeerAuthentication {}", p.key()),
            Object::AuthorizationPolicy(p) => format!("AuthorizationPolicy {}", p.key()),
            Object::Service(svc) => format!("Service {}", svc.key()),
            Object::MeshSettings(_) => format!("MeshSettings {ROOT_NAMESPACE}/default"),
            Object::HttpRoute(route) => format!("HTTPRoute {}", route.key()),
            Object::BackendTrafficPolicy(p) => format!("BackendTrafficPolicy {}", p.key()),
            Object::EndpointSlice(slice) => format!("EndpointSlice {}", slice.key()),
        }
    }
}

/// The kinds nodemesh reads and the apiVersion of each.
const KINDS: [(&str, &str); 9] = [
    ("Namespace", "v1"),
    ("Service", "v1"),
    ("Workload", API_VERSION),
    ("PeerAuthentication", SECURITY_API_VERSION),
    ("AuthorizationPolicy", SECURITY_API_VERSION),
    ("MeshSettings", API_VERSION),
    ("HTTPRoute", GATEWAY_API_VERSION),
    ("BackendTrafficPolicy", POLICY_API_VERSION),
    ("EndpointSlice", ENDPOINT_SLICE_API_VERSION),
];

/// Gateway API serves HTTPRoute at v1beta1 too, with the same schema.
const HTTP_ROUTE_V1BETA1: &str = "gateway.networking.k8s.io/v1beta1";

/// An object and the file it came from.
#[derive(Debug, Clone)]
struct Located {
    file: PathBuf,
    object: Object,
}

/// What one object was, for error messages: `Kind namespace/name`.
fn describe(kind: &str, value: &Value) -> String {
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<no name>");
    match meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None if kind == "Namespace" => format!("{kind} {name}"),
        None => format!("{kind} default/{name}"),
    }
}

/// Parses the YAML documents of one file into objects. Empty documents are skipped.
fn parse_documents(file: &Path, text: &str) -> Result<Vec<Located>, ConfigError> {
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde::Deserialize::deserialize(document).map_err(|e| {
            ConfigError::file(
                file,
                format!("document {} is not valid YAML: {e}", index + 1),
            )
        })?;
        if let Value::Null = value {
            continue;
        }
        objects.push(Located {
            file: file.to_owned(),
            object: parse_one(file, value)?,
        });
    }
    Ok(objects)
}

fn parse_one(file: &Path, value: Value) -> Result<Object, ConfigError> {
    let error = |object: Option<String>, field: &str, message: String| ConfigError {
        file: file.to_owned(),
        object,
        field: Some(field.to_owned()),
        message,
    };
    if !value.is_mapping() {
        return Err(ConfigError::file(
            file,
            "a document must be a Kubernetes-style object with apiVersion, kind, metadata",
        ));
    }
    let Some(kind) = value.get("kind").and_then(Value::as_str).map(str::to_owned) else {
        return Err(error(
            None,
            "kind",
            "is missing; say which kind of object this is".into(),
        ));
    };
    let object = describe(&kind, &value);
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let Some((_, expected)) = KINDS.iter().find(|(k, _)| *k == kind) else {
        let known: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
        return Err(error(
            Some(object),
            "kind",
            format!(
                "{kind:?} is not a kind nodemesh reads; use one of {}",
                known.join(", ")
            ),
        ));
    };
    if api_version != *expected && !(kind == "HTTPRoute" && api_version == HTTP_ROUTE_V1BETA1) {
        return Err(error(
            Some(object),
            "apiVersion",
            format!("{api_version:?} is not supported for {kind}; use {expected:?}"),
        ));
    }
    let parsed = match kind.as_str() {
        "Namespace" => Object::Namespace(typed(file, &object, value)?),
        "Workload" => Object::Workload(typed(file, &object, value)?),
        "PeerAuthentication" => Object::PeerAuthentication(typed(file, &object, value)?),
        "AuthorizationPolicy" => Object::AuthorizationPolicy(typed(file, &object, value)?),
        "Service" => Object::Service(typed(file, &object, value)?),
        "HTTPRoute" => Object::HttpRoute(typed(file, &object, value)?),
        "BackendTrafficPolicy" => {
            Object::BackendTrafficPolicy(Box::new(typed(file, &object, value)?))
        }
        "EndpointSlice" => Object::EndpointSlice(typed(file, &object, value)?),
        _ => Object::MeshSettings(typed(file, &object, value)?),
    };
    check::check_object(&parsed)
        .map_err(|(field, message)| error(Some(object), &field, message))?;
    Ok(parsed)
}

fn typed<T: DeserializeOwned>(file: &Path, object: &str, value: Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ConfigError {
            file: file.to_owned(),
            object: Some(object.to_owned()),
            field: (path != ".").then_some(path),
            message: e.into_inner().to_string(),
        }
    })
}

/// Checks the objects against each other and builds the configuration; any error refuses
/// the whole of it (local mode).
fn build(objects: Vec<Located>) -> Result<MeshConfig, ConfigErrors> {
    let (config, errors) = assemble_located(objects, Strictness::Whole);
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// How the whole-configuration checks treat an object that contradicts another or names
/// something missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strictness {
    /// Local mode: any error refuses the whole configuration.
    Whole,
    /// Kubernetes mode: an object that contradicts another is left out; one that names a
    /// missing object stays (a route's status says so; its requests get what Gateway API
    /// says they get). Everything else goes on.
    PerObject,
}

/// One object of the configuration, parsed and checked on its own.
#[derive(Debug, Clone)]
pub struct ParsedObject(Located);

impl ParsedObject {
    /// `Kind namespace/name`, as errors name objects.
    pub fn describe(&self) -> String {
        self.0.object.describe()
    }
}

/// Parses one object given as YAML (a document of a file, or an object read from the
/// Kubernetes API, with `origin` empty): its kind, its fields and its own rules.
pub fn parse_object(origin: &Path, value: Value) -> Result<ParsedObject, ConfigError> {
    parse_one(origin, value).map(|object| {
        ParsedObject(Located {
            file: origin.to_owned(),
            object,
        })
    })
}

/// Builds a configuration from objects parsed one by one, leaving out those that contradict
/// others (the same address twice, a workload in a namespace that does not exist) and
/// keeping those that name something missing; both are among the errors returned, for the
/// objects' status. The Kubernetes source builds its configuration this way, so that one bad
/// object never holds back the rest.
pub fn assemble(objects: impl IntoIterator<Item = ParsedObject>) -> (MeshConfig, Vec<ConfigError>) {
    assemble_located(
        objects.into_iter().map(|p| p.0).collect(),
        Strictness::PerObject,
    )
}

fn assemble_located(
    objects: Vec<Located>,
    strictness: Strictness,
) -> (MeshConfig, Vec<ConfigError>) {
    let mut config = MeshConfig::default();
    let mut errors = Vec::new();
    let mut origin: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut by_ip: BTreeMap<std::net::Ipv4Addr, (String, PathBuf)> = BTreeMap::new();
    let mut workloads = Vec::new();
    let mut services = Vec::new();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for Located { file, object } in objects {
        let key = object.describe();
        if let Some(first) = seen.get(&key) {
            errors.push(duplicate(&file, &key, first));
            continue;
        }
        seen.insert(key.clone(), file.clone());
        match object {
            Object::Workload(w) => {
                workloads.push((file, w));
                continue;
            }
            Object::Service(svc) => {
                services.push((file, svc));
                continue;
            }
            Object::Namespace(ns) => {
                config.namespaces.insert(ns.name().to_owned(), ns);
            }
            Object::PeerAuthentication(p) => {
                config.peer_authentications.insert(p.key(), p);
            }
            Object::AuthorizationPolicy(p) => {
                config.authorization_policies.insert(p.key(), p);
            }
            Object::HttpRoute(route) => {
                config.http_routes.insert(route.key(), route);
            }
            Object::BackendTrafficPolicy(policy) => {
                config
                    .backend_traffic_policies
                    .insert(policy.key(), *policy);
            }
            Object::EndpointSlice(slice) => {
                config.endpoint_slices.insert(slice.key(), slice);
            }
            Object::MeshSettings(m) => {
                config.settings = m.spec;
            }
        }
        origin.insert(key, file);
    }
    for (file, w) in workloads {
        let key = format!("Workload {}", w.key());
        let at = |field: &str, message: String| ConfigError {
            file: file.clone(),
            object: Some(key.clone()),
            field: Some(field.to_owned()),
            message,
        };
        if !config.namespaces.contains_key(w.namespace()) {
            errors.push(at(
                "metadata.namespace",
                format!(
                    "no Namespace object named {:?} exists; add one (labelled {}: \"true\" to \
                     enroll its workloads)",
                    w.namespace(),
                    crate::ENROLLED_LABEL
                ),
            ));
            continue;
        }
        if let Some(ip) = w.ip() {
            if let Some((other, other_file)) = by_ip.get(&ip) {
                errors.push(at(
                    "spec.ip",
                    format!(
                        "{ip} is already the address of Workload {other}{}; each workload \
                         needs its own address",
                        in_file(other_file)
                    ),
                ));
                continue;
            }
            by_ip.insert(ip, (w.key(), file.clone()));
        }
        origin.insert(key, file.clone());
        config.workloads.insert(w.key(), w);
    }
    for (file, svc) in services {
        let key = format!("Service {}", svc.key());
        if let Some(vip) = svc.vip() {
            if let Some((other, other_file)) = by_ip.get(&vip) {
                errors.push(ConfigError {
                    file: file.clone(),
                    object: Some(key),
                    field: Some("spec.clusterIP".to_owned()),
                    message: format!(
                        "{vip} is already the address of {other}{}; a Service needs an address \
                         of its own",
                        in_file(other_file)
                    ),
                });
                continue;
            }
            by_ip.insert(vip, (key.clone(), file.clone()));
        }
        origin.insert(key, file);
        config.services.insert(svc.key(), svc);
    }
    errors.extend(references::check(&config, &origin));
    if strictness == Strictness::Whole && !errors.is_empty() {
        return (MeshConfig::default(), errors);
    }
    (config, errors)
}

/// ` in <file>`, or nothing for an object read from the Kubernetes API.
fn in_file(file: &Path) -> String {
    if file.as_os_str().is_empty() {
        String::new()
    } else {
        format!(" in {}", file.display())
    }
}

fn duplicate(file: &Path, key: &str, first: &Path) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        object: Some(key.to_owned()),
        field: Some("metadata.name".to_owned()),
        message: format!(
            "is defined again; it is already defined{}. Keep one definition",
            in_file(first)
        ),
    }
}

/// A cheap summary of a configuration path (names, sizes and modification times of its
/// files), to notice changes without reparsing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceFingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

impl SourceFingerprint {
    pub fn of(path: &Path) -> Self {
        let files = if path.is_dir() {
            config_files(path).unwrap_or_default()
        } else {
            vec![path.to_owned()]
        };
        Self(
            files
                .into_iter()
                .map(|file| {
                    let meta = fs::metadata(&file).ok();
                    let len = meta.as_ref().map_or(0, fs::Metadata::len);
                    let modified = meta.and_then(|m| m.modified().ok());
                    (file, len, modified)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod traffic_tests;
