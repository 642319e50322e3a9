//! Putting `nodemesh-cni` into the node's CNI configuration, and taking it out again.
//!
//! The runtime uses the first file of its configuration directory, in name order, that reads
//! as a network configuration (`.conf`, `.conflist` or `.json`). nodemesh's entry goes last in
//! that file's plugin list, after whatever gives the pod its interface and address; a
//! single-plugin `.conf` (or `.json`) is turned into a list first, and renamed `.conflist`. Files are
//! replaced whole (written beside, then renamed), so a runtime never reads half of one.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

/// The plugin's `type`: the name of its binary in the runtime's CNI bin directory.
pub const PLUGIN_TYPE: &str = "nodemesh-cni";

/// The CNI version a converted single-plugin configuration gets when it names none.
const DEFAULT_CNI_VERSION: &str = "0.3.1";

#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error("cannot read the CNI configuration directory {dir}: {source}")]
    ReadDir { dir: PathBuf, source: io::Error },
    #[error(
        "no CNI network configuration in {dir}; install the cluster's network plugin first \
         (nodemesh chains after it)"
    )]
    NoPrimary { dir: PathBuf },
    #[error("{file} is not a CNI network configuration: {reason}")]
    NotAConfig { file: PathBuf, reason: String },
    #[error("cannot write {file}: {source}")]
    Write { file: PathBuf, source: io::Error },
}

/// How the plugin behaves, written into its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSettings {
    /// The agent's socket.
    pub agent_socket: PathBuf,
    /// Namespaces whose pods the plugin never hands over (the cluster's own, the mesh's).
    pub exclude_namespaces: Vec<String>,
    /// With the agent unreachable, start a pod that may belong in the mesh anyway (`true`) or
    /// fail its creation so that the runtime tries again (`false`, the default).
    pub fail_open: bool,
    /// How long to wait for the agent's answer, in seconds.
    pub timeout_seconds: u64,
}

impl PluginSettings {
    /// The plugin's entry in a chain.
    pub fn entry(&self) -> Value {
        json!({
            "type": PLUGIN_TYPE,
            "agentSocket": self.agent_socket,
            "excludeNamespaces": self.exclude_namespaces,
            "failOpen": self.fail_open,
            "timeoutSeconds": self.timeout_seconds,
        })
    }
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// The entry was already there, as wanted.
    Unchanged(PathBuf),
    /// The file was written (and `.conf` renamed `.conflist`).
    Written(PathBuf),
}

fn is_config_name(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("conf" | "conflist" | "json")
    )
}

/// Whether `value` reads as a network configuration: a single plugin (`type`) or a list
/// with at least one plugin.
fn is_network_config(value: &Value) -> bool {
    value["type"].is_string()
        || value["plugins"]
            .as_array()
            .is_some_and(|plugins| !plugins.is_empty())
}

/// The configuration the runtime uses: the first file, in name order, that reads as one.
pub fn primary(dir: &Path) -> Result<Option<(PathBuf, Value)>, ConflistError> {
    let entries = fs::read_dir(dir).map_err(|source| ConflistError::ReadDir {
        dir: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_config_name(p) && p.is_file())
        .collect();
    files.sort();
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        if let Ok(value) = serde_json::from_str::<Value>(&text)
            && is_network_config(&value)
        {
            return Ok(Some((file, value)));
        }
    }
    Ok(None)
}

/// The configuration with `entry` last in its plugin list, in place of any earlier entry of
/// nodemesh's. A single-plugin configuration becomes a list holding it.
pub fn with_entry(config: &Value, entry: &Value) -> Value {
    let mut list = as_list(config);
    if let Some(plugins) = list["plugins"].as_array_mut() {
        plugins.retain(|p| p["type"] != PLUGIN_TYPE);
        plugins.push(entry.clone());
    }
    list
}

/// The configuration without nodemesh's entry.
pub fn without_entry(config: &Value) -> Value {
    let mut config = config.clone();
    if let Some(plugins) = config["plugins"].as_array_mut() {
        plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    }
    config
}

fn as_list(config: &Value) -> Value {
    if config["plugins"].is_array() {
        return config.clone();
    }
    let mut plugin = config.clone();
    let version = plugin
        .as_object_mut()
        .and_then(|p| p.remove("cniVersion"))
        .unwrap_or_else(|| Value::from(DEFAULT_CNI_VERSION));
    let name = plugin["name"].clone();
    json!({ "cniVersion": version, "name": name, "plugins": [plugin] })
}

/// Makes sure nodemesh's entry, as `settings` say, is last in the node's primary CNI
/// configuration in `dir`.
pub fn install(dir: &Path, settings: &PluginSettings) -> Result<Installed, ConflistError> {
    let Some((file, config)) = primary(dir)? else {
        return Err(ConflistError::NoPrimary {
            dir: dir.to_owned(),
        });
    };
    let wanted = with_entry(&config, &settings.entry());
    // Runtimes read `.conf` and `.json` as one plugin, `.conflist` as a list.
    let is_list = file.extension().and_then(|e| e.to_str()) == Some("conflist");
    if wanted == config && is_list {
        return Ok(Installed::Unchanged(file));
    }
    let target = if is_list {
        file.clone()
    } else {
        file.with_extension("conflist")
    };
    write_whole(&target, &wanted)?;
    if target != file {
        fs::remove_file(&file).map_err(|source| ConflistError::Write {
            file: file.clone(),
            source,
        })?;
    }
    Ok(Installed::Written(target))
}

/// Takes nodemesh's entry out of the primary configuration; returns the file changed, if any.
pub fn uninstall(dir: &Path) -> Result<Option<PathBuf>, ConflistError> {
    let Some((file, config)) = primary(dir)? else {
        return Ok(None);
    };
    let without = without_entry(&config);
    if without == config {
        return Ok(None);
    }
    write_whole(&file, &without)?;
    Ok(Some(file))
}

/// Writes `value` to a hidden file beside `file`, then renames it over `file`.
fn write_whole(file: &Path, value: &Value) -> Result<(), ConflistError> {
    let error = |source| ConflistError::Write {
        file: file.to_owned(),
        source,
    };
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = file.with_file_name(format!(".{name}.nodemesh-tmp"));
    let mut text = serde_json::to_string_pretty(value).map_err(|e| error(e.into()))?;
    text.push('\n');
    let mut out = fs::File::create(&temporary).map_err(error)?;
    out.write_all(text.as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(error)?;
    fs::rename(&temporary, file).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PluginSettings {
        PluginSettings {
            agent_socket: "/var/run/nodemesh/cni.sock".into(),
            exclude_namespaces: vec!["kube-system".into()],
            fail_open: false,
            timeout_seconds: 15,
        }
    }

    const BRIDGE_LIST: &str = r#"{"cniVersion":"1.0.0","name":"podnet","plugins":[{"type":"bridge","bridge":"cni0"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn the_entry_goes_last_once_and_comes_out_again() {
        let config: Value = serde_json::from_str(BRIDGE_LIST).expect("json");
        let once = with_entry(&config, &settings().entry());
        let twice = with_entry(&once, &settings().entry());
        assert_eq!(once, twice, "installing again changes nothing");
        let types: Vec<&str> = once["plugins"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|p| p["type"].as_str())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "nodemesh-cni"]);
        assert_eq!(without_entry(&once), config);
    }

    #[test]
    fn a_single_plugin_config_becomes_a_list_keeping_its_version() {
        let single = serde_json::json!({"cniVersion": "0.4.0", "name": "k8s", "type": "ptp"});
        let list = with_entry(&single, &settings().entry());
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["name"], "k8s");
        assert_eq!(
            list["plugins"][0],
            serde_json::json!({"name": "k8s", "type": "ptp"})
        );
        assert_eq!(list["plugins"][1]["type"], PLUGIN_TYPE);
    }

    #[test]
    fn install_picks_the_runtimes_file_and_renames_a_conf() {
        let dir = tempfile::tempdir().expect("dir");
        fs::write(
            dir.path().join("99-loopback.conf"),
            r#"{"cniVersion":"0.3.1","name":"lo","type":"loopback"}"#,
        )
        .expect("write");
        fs::write(
            dir.path().join("10-flannel.conf"),
            r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel"}"#,
        )
        .expect("write");
        fs::write(dir.path().join("05-broken.conflist"), "{not json").expect("write");
        fs::write(dir.path().join("README"), "ignored").expect("write");
        let installed = install(dir.path(), &settings()).expect("install");
        let file = dir.path().join("10-flannel.conflist");
        assert_eq!(installed, Installed::Written(file.clone()));
        assert!(!dir.path().join("10-flannel.conf").exists());
        assert_eq!(
            install(dir.path(), &settings()).expect("again"),
            Installed::Unchanged(file.clone())
        );
        let written: Value =
            serde_json::from_str(&fs::read_to_string(&file).expect("read")).expect("json");
        assert_eq!(written["plugins"][0]["type"], "flannel");
        assert_eq!(
            written["plugins"][1]["agentSocket"],
            "/var/run/nodemesh/cni.sock"
        );

        // The network plugin rewrites its file without us: installing again puts us back.
        fs::write(&file, BRIDGE_LIST).expect("rewrite");
        assert_eq!(
            install(dir.path(), &settings()).expect("reinstall"),
            Installed::Written(file.clone())
        );
        assert_eq!(
            uninstall(dir.path()).expect("uninstall"),
            Some(file.clone())
        );
        let back: Value =
            serde_json::from_str(&fs::read_to_string(&file).expect("read")).expect("json");
        assert_eq!(
            back,
            serde_json::from_str::<Value>(BRIDGE_LIST).expect("json")
        );
        assert_eq!(uninstall(dir.path()).expect("nothing left"), None);
    }

    #[test]
    fn a_json_file_is_one_plugin_and_becomes_a_conflist() {
        let dir = tempfile::tempdir().expect("dir");
        fs::write(
            dir.path().join("10-calico.json"),
            r#"{"cniVersion":"0.3.1","name":"k8s-pod-network","type":"calico"}"#,
        )
        .expect("write");
        let file = dir.path().join("10-calico.conflist");
        assert_eq!(
            install(dir.path(), &settings()).expect("install"),
            Installed::Written(file.clone())
        );
        assert!(!dir.path().join("10-calico.json").exists());
        let written: Value =
            serde_json::from_str(&fs::read_to_string(&file).expect("read")).expect("json");
        assert_eq!(written["plugins"][0]["type"], "calico");
    }

    #[test]
    fn without_a_network_plugin_there_is_nothing_to_chain_after() {
        let dir = tempfile::tempdir().expect("dir");
        assert!(matches!(
            install(dir.path(), &settings()),
            Err(ConflistError::NoPrimary { .. })
        ));
    }
}
