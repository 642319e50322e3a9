//! `nodemesh-cni`: the chained CNI plugin that hands each new pod to the node's agent.
//!
//! Run by the container runtime (`CNI_COMMAND` set), it follows the CNI specification: the
//! network configuration on stdin, the result (the previous plugins', unchanged) or an error
//! as JSON on stdout, notes on stderr. Run by hand or by the DaemonSet's init container,
//! `nodemesh-cni install` copies it into the node's CNI bin directory and adds it to the
//! node's CNI configuration; `nodemesh-cni uninstall` takes it out again.
#![forbid(unsafe_code)]

use std::{
    fs::File,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use nodemesh_cni::{
    Command, DEFAULT_SOCKET, HandoffError, MeshNamespaces, Outcome, PodRequest, cni_args,
    conflist::{self, PluginSettings},
    hand_over, pod_ipv4s,
};
use serde::Deserialize;
use serde_json::{Value, json};

/// The CNI versions this plugin speaks.
const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Largest configuration read from stdin.
const MAX_CONFIG: u64 = 1024 * 1024;

/// The CNI specification's error codes used here.
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const MISSING_ENVIRONMENT: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
}

/// The plugin's network configuration: its entry in the chain, as the runtime passes it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default = "default_socket")]
    agent_socket: PathBuf,
    #[serde(default = "default_excluded")]
    exclude_namespaces: Vec<String>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default = "default_timeout")]
    timeout_seconds: u64,
    #[serde(default)]
    prev_result: Option<Value>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".to_owned()]
}

fn default_timeout() -> u64 {
    15
}

/// A CNI error: printed as JSON on stdout, exit status 1.
#[derive(Debug)]
struct CniError {
    code: u32,
    msg: &'static str,
    details: String,
}

impl CniError {
    fn new(code: u32, msg: &'static str, details: impl Into<String>) -> Self {
        Self {
            code,
            msg,
            details: details.into(),
        }
    }
}

fn main() -> ExitCode {
    match std::env::var("CNI_COMMAND") {
        Ok(command) => run_cni(&command),
        Err(_) => run_installer(),
    }
}

fn run_cni(command: &str) -> ExitCode {
    // The configuration's CNI version, once read, for the error's own.
    let mut version = "1.0.0".to_owned();
    let outcome = (|| {
        let mut text = String::new();
        std::io::stdin()
            .take(MAX_CONFIG)
            .read_to_string(&mut text)
            .map_err(|e| CniError::new(code::IO, "cannot read stdin", e.to_string()))?;
        if command == "VERSION" {
            let asked = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["cniVersion"].as_str().map(str::to_owned));
            return Ok(Some(json!({
                "cniVersion": asked.unwrap_or_else(|| "1.1.0".to_owned()),
                "supportedVersions": SUPPORTED_VERSIONS,
            })));
        }
        let conf: NetConf = serde_json::from_str(&text).map_err(|e| {
            CniError::new(
                code::DECODE,
                "cannot decode the network configuration",
                e.to_string(),
            )
        })?;
        version.clone_from(&conf.cni_version);
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                "incompatible CNI version",
                format!(
                    "config is {:?}, nodemesh-cni supports {SUPPORTED_VERSIONS:?}",
                    conf.cni_version
                ),
            ));
        }
        match command {
            "ADD" => add(&conf).map(Some),
            "DEL" => {
                del(&conf);
                Ok(None)
            }
            "CHECK" => check(&conf).map(|()| None),
            "STATUS" => status(&conf).map(|()| None),
            // Nothing of a pod lives in the plugin: what the agent holds, DEL releases.
            "GC" => Ok(None),
            other => Err(CniError::new(
                code::MISSING_ENVIRONMENT,
                "unknown CNI_COMMAND",
                format!("{other:?}; use ADD, DEL, CHECK, STATUS, GC or VERSION"),
            )),
        }
    })();
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(stdout, "{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let error = json!({
                "cniVersion": version,
                "code": e.code,
                "msg": e.msg,
                "details": e.details,
            });
            let _ = writeln!(stdout, "{error}");
            eprintln!("nodemesh-cni: {}: {}", e.msg, e.details);
            ExitCode::FAILURE
        }
    }
}

fn env(name: &'static str) -> Result<String, CniError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            CniError::new(
                code::MISSING_ENVIRONMENT,
                "missing environment variable",
                format!("{name} is not set"),
            )
        })
}

/// The pod named by `CNI_ARGS`, unless it is no Kubernetes pod or its namespace is excluded.
fn pod(conf: &NetConf, command: Command) -> Result<Option<PodRequest>, CniError> {
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    let (mut namespace, mut name, mut uid) = (None, None, None);
    for (key, value) in cni_args(&args) {
        match key {
            "K8S_POD_NAMESPACE" => namespace = Some(value.to_owned()),
            "K8S_POD_NAME" => name = Some(value.to_owned()),
            "K8S_POD_UID" => uid = Some(value.to_owned()).filter(|u| !u.is_empty()),
            _ => {}
        }
    }
    let (Some(namespace), Some(name)) = (namespace, name) else {
        return Ok(None);
    };
    if conf.exclude_namespaces.contains(&namespace) {
        return Ok(None);
    }
    Ok(Some(PodRequest {
        command,
        container_id: env("CNI_CONTAINERID")?,
        namespace,
        name,
        uid,
        ips: conf.prev_result.as_ref().map(pod_ipv4s).unwrap_or_default(),
        netns: std::env::var("CNI_NETNS").ok().filter(|n| !n.is_empty()),
    }))
}

/// The previous plugins' result, in the configuration's CNI version.
fn pass_through(conf: &NetConf) -> Value {
    let mut result = conf.prev_result.clone().unwrap_or_else(|| json!({}));
    if let Some(object) = result.as_object_mut() {
        object.insert("cniVersion".into(), conf.cni_version.clone().into());
    }
    result
}

fn add(conf: &NetConf) -> Result<Value, CniError> {
    let Some(request) = pod(conf, Command::Add)? else {
        return Ok(pass_through(conf));
    };
    let netns_path = env("CNI_NETNS")?;
    let netns = File::open(&netns_path).map_err(|e| {
        CniError::new(
            code::IO,
            "cannot open the pod's network namespace",
            format!("{netns_path}: {e}"),
        )
    })?;
    let pod = format!("{}/{}", request.namespace, request.name);
    let timeout = Duration::from_secs(conf.timeout_seconds.max(1));
    // Whether the agent's last published view puts the pod's namespace outside the mesh.
    let outside_the_mesh = || {
        MeshNamespaces::beside(&conf.agent_socket)
            .is_some_and(|known| !known.enrolled.contains(&request.namespace))
    };
    match hand_over(&conf.agent_socket, &request, Some(&netns), timeout) {
        Ok(reply) => match reply.outcome {
            Outcome::Enrolled | Outcome::NotInMesh => Ok(pass_through(conf)),
            Outcome::Unknown if outside_the_mesh() => Ok(pass_through(conf)),
            Outcome::Unknown => unreachable_agent(
                conf,
                &pod,
                &format!("without a configuration yet ({})", reply.message),
            ),
            Outcome::Refused | Outcome::Released => Err(CniError::new(
                code::TRY_AGAIN_LATER,
                "the nodemesh agent cannot enroll the pod yet",
                format!("{pod}: {}", reply.message),
            )),
        },
        Err(HandoffError::Unreachable { socket, source }) => {
            if outside_the_mesh() {
                return Ok(pass_through(conf));
            }
            unreachable_agent(
                conf,
                &pod,
                &format!("not reachable at {}: {source}", socket.display()),
            )
        }
        Err(e) => unreachable_agent(conf, &pod, &e.to_string()),
    }
}

/// The pod may belong in the mesh and the agent cannot say: fail its creation (the runtime
/// tries again), unless the operator chose to let such pods start without the mesh.
fn unreachable_agent(conf: &NetConf, pod: &str, why: &str) -> Result<Value, CniError> {
    if conf.fail_open {
        eprintln!(
            "nodemesh-cni: {pod} starts WITHOUT the mesh (failOpen): the nodemesh agent is {why}"
        );
        return Ok(pass_through(conf));
    }
    Err(CniError::new(
        code::TRY_AGAIN_LATER,
        "the nodemesh agent is not available",
        format!(
            "{pod} may belong in the mesh and the agent is {why}; the pod starts once the \
             node's nodemesh-agent runs (set failOpen in the nodemesh-cni entry to start such \
             pods without the mesh instead)"
        ),
    ))
}

/// Best effort: the sandbox goes whatever the agent says.
fn del(conf: &NetConf) {
    let Ok(Some(request)) = pod(conf, Command::Del) else {
        return;
    };
    let timeout = Duration::from_secs(conf.timeout_seconds.max(1));
    if let Err(e) = hand_over(&conf.agent_socket, &request, None, timeout) {
        eprintln!(
            "nodemesh-cni: releasing {}/{}: {e}",
            request.namespace, request.name
        );
    }
}

fn check(conf: &NetConf) -> Result<(), CniError> {
    let Some(request) = pod(conf, Command::Check)? else {
        return Ok(());
    };
    let timeout = Duration::from_secs(conf.timeout_seconds.max(1));
    let reply = hand_over(&conf.agent_socket, &request, None, timeout).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            "the nodemesh agent is not available",
            e.to_string(),
        )
    })?;
    match reply.outcome {
        Outcome::Enrolled | Outcome::NotInMesh => Ok(()),
        Outcome::Refused | Outcome::Released | Outcome::Unknown => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the pod is not enrolled as it should be",
            reply.message,
        )),
    }
}

/// Ready when the agent listens; with `failOpen`, always (ADD lets pods start anyway, so a
/// node need not be marked not ready for want of the agent).
fn status(conf: &NetConf) -> Result<(), CniError> {
    if conf.fail_open {
        return Ok(());
    }
    match std::os::unix::net::UnixStream::connect(&conf.agent_socket) {
        Ok(_) => Ok(()),
        Err(_) => Err(CniError::new(
            code::PLUGIN_NOT_AVAILABLE,
            "the nodemesh agent is not running",
            format!("nothing listens at {}", conf.agent_socket.display()),
        )),
    }
}

/// `install` and `uninstall`, for the DaemonSet's init container and for operators.
fn run_installer() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match installer(&args) {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("nodemesh-cni: {message}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: nodemesh-cni install --cni-bin-dir DIR --cni-conf-dir DIR \
    [--agent-socket PATH] [--exclude-namespaces NS,NS] [--fail-open] [--timeout-seconds N]\n\
    \x20      nodemesh-cni uninstall --cni-bin-dir DIR --cni-conf-dir DIR\n\
    (run by the container runtime, with CNI_COMMAND set, it is the CNI plugin)";

fn installer(args: &[String]) -> Result<String, String> {
    let (verb, rest) = args.split_first().ok_or_else(|| USAGE.to_owned())?;
    let mut bin_dir = None;
    let mut conf_dir = None;
    let mut settings = PluginSettings {
        agent_socket: PathBuf::from(DEFAULT_SOCKET),
        exclude_namespaces: default_excluded(),
        fail_open: false,
        timeout_seconds: default_timeout(),
    };
    let mut rest = rest.iter();
    while let Some(flag) = rest.next() {
        let mut value = || {
            rest.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--cni-bin-dir" => bin_dir = Some(PathBuf::from(value()?)),
            "--cni-conf-dir" => conf_dir = Some(PathBuf::from(value()?)),
            "--agent-socket" => settings.agent_socket = PathBuf::from(value()?),
            "--exclude-namespaces" => {
                settings.exclude_namespaces = value()?
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            "--fail-open" => settings.fail_open = true,
            "--timeout-seconds" => {
                let text = value()?;
                settings.timeout_seconds = text
                    .parse()
                    .map_err(|_| format!("--timeout-seconds {text:?} is not a number"))?;
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let (Some(bin_dir), Some(conf_dir)) = (bin_dir, conf_dir) else {
        return Err(format!(
            "--cni-bin-dir and --cni-conf-dir are required\n{USAGE}"
        ));
    };
    let binary = bin_dir.join(conflist::PLUGIN_TYPE);
    match verb.as_str() {
        "install" => {
            copy_self(&binary)?;
            let installed = conflist::install(&conf_dir, &settings).map_err(|e| e.to_string())?;
            Ok(match installed {
                conflist::Installed::Unchanged(file) => format!(
                    "{} installed; {} already chains it",
                    binary.display(),
                    file.display()
                ),
                conflist::Installed::Written(file) => format!(
                    "{} installed and added to {}",
                    binary.display(),
                    file.display()
                ),
            })
        }
        "uninstall" => {
            let changed = conflist::uninstall(&conf_dir).map_err(|e| e.to_string())?;
            match std::fs::remove_file(&binary) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove {}: {e}", binary.display())),
            }
            Ok(match changed {
                Some(file) => format!("removed from {} and {}", file.display(), bin_dir.display()),
                None => format!("no CNI configuration in {} chained it", conf_dir.display()),
            })
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    }
}

/// Copies this executable to `target` beside it first, then renames it into place, so that a
/// runtime never runs half a binary.
fn copy_self(target: &Path) -> Result<(), String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let temporary = target.with_file_name(".nodemesh-cni.tmp");
    std::fs::copy(&me, &temporary)
        .and_then(|_| std::fs::rename(&temporary, target))
        .map_err(|e| format!("cannot install {}: {e}", target.display()))
}
