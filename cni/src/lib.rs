//! What the `nodemesh-cni` plugin and the node's agent say to each other, and how the plugin
//! puts itself into the node's CNI configuration.
//!
//! The container runtime runs the plugin, last in the node's chain, when it creates a pod's
//! sandbox. The plugin connects to the agent's unix socket, sends one [`PodRequest`] (JSON,
//! ended by shutting its side down) with the pod's network namespace attached as an open
//! descriptor (`SCM_RIGHTS`, never a path the agent would have to trust), and reads one
//! [`PodReply`] until the agent closes. The agent answers once the pod is enrolled (its listeners up and capture
//! on), so the pod's first connection is already the mesh's.
#![forbid(unsafe_code)]

pub mod conflist;

use std::{
    fs::File,
    io::{self, IoSlice, Read as _},
    net::{Ipv4Addr, Shutdown},
    os::{
        fd::{AsFd, AsRawFd as _},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde::{Deserialize, Serialize};

/// Where the agent listens, unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/nodemesh/cni.sock";

/// The agent's last view of which namespaces are in the mesh, written beside its socket, so
/// that while the agent is away the plugin still lets pods of other namespaces start.
pub const MESH_NAMESPACES_FILE: &str = "mesh-namespaces.json";

/// The largest message either side sends.
pub const MAX_MESSAGE: usize = 16 * 1024;

/// What the runtime asked the plugin to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// A pod sandbox was created: enroll it (its namespace comes with the request).
    Add,
    /// The sandbox is going away: release it.
    Del,
    /// Is the pod still enrolled as it should be?
    Check,
}

/// One pod, as the runtime describes it to CNI plugins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRequest {
    pub command: Command,
    /// The sandbox's id (`CNI_CONTAINERID`).
    pub container_id: String,
    /// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` from `CNI_ARGS`.
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The pod's IPv4 addresses, from the previous plugins' result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<Ipv4Addr>,
    /// `CNI_NETNS`, for log lines only: the agent uses the descriptor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// The agent's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The pod is enrolled: listeners up, capture on.
    Enrolled,
    /// The pod does not belong in the mesh; the plugin lets it start untouched.
    NotInMesh,
    /// DEL: what the agent held for the pod is released (or was never there).
    Released,
    /// The pod belongs in the mesh but cannot be enrolled now; `message` says why. ADD fails
    /// and the runtime tries again.
    Refused,
    /// The agent has no configuration yet and cannot tell: the plugin decides as if the
    /// agent were away (by the namespaces it last published).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodReply {
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// What [`MESH_NAMESPACES_FILE`] holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshNamespaces {
    /// Namespaces labelled into the mesh in the agent's last snapshot.
    pub enrolled: Vec<String>,
}

impl MeshNamespaces {
    /// Reads the file beside `socket`; `None` when there is none (the agent never ran here).
    pub fn beside(socket: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(Self::path_beside(socket)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn path_beside(socket: &Path) -> PathBuf {
        socket.with_file_name(MESH_NAMESPACES_FILE)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// Nothing listens at the socket: the agent is not running (or not yet).
    #[error("the nodemesh agent is not reachable at {socket}: {source}")]
    Unreachable { socket: PathBuf, source: io::Error },
    /// The agent took the request but the exchange failed or took too long.
    #[error("the nodemesh agent at {socket} did not answer: {source}")]
    NoAnswer { socket: PathBuf, source: io::Error },
    #[error("the nodemesh agent at {socket} answered something unreadable: {source}")]
    BadAnswer {
        socket: PathBuf,
        source: serde_json::Error,
    },
}

/// Sends `request` (with `netns` attached, for ADD) to the agent at `socket` and waits up to
/// `timeout` for its reply.
pub fn hand_over(
    socket: &Path,
    request: &PodRequest,
    netns: Option<&File>,
    timeout: Duration,
) -> Result<PodReply, HandoffError> {
    let unreachable = |source| HandoffError::Unreachable {
        socket: socket.to_owned(),
        source,
    };
    let no_answer = |source| HandoffError::NoAnswer {
        socket: socket.to_owned(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(no_answer)?;
    let message = serde_json::to_vec(request)
        .map_err(io::Error::other)
        .map_err(no_answer)?;
    let fds: Vec<i32> = netns.iter().map(|f| f.as_fd().as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let control: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&message)],
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| no_answer(e.into()))?;
    if sent != message.len() {
        return Err(no_answer(io::Error::new(
            io::ErrorKind::WriteZero,
            "the request was cut short",
        )));
    }
    stream.shutdown(Shutdown::Write).map_err(no_answer)?;
    let mut reply = Vec::new();
    (&stream)
        .take(MAX_MESSAGE as u64)
        .read_to_end(&mut reply)
        .map_err(no_answer)?;
    if reply.is_empty() {
        return Err(no_answer(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without an answer",
        )));
    }
    serde_json::from_slice(&reply).map_err(|source| HandoffError::BadAnswer {
        socket: socket.to_owned(),
        source,
    })
}

/// Parses `CNI_ARGS` (`K=V;K=V`); unknown keys are ignored, whatever `IgnoreUnknown` says.
pub fn cni_args(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
}

/// The pod's IPv4 addresses in a CNI result (`prevResult`): those on interfaces inside the
/// sandbox, or all of them when the result names no interfaces.
pub fn pod_ipv4s(result: &serde_json::Value) -> Vec<Ipv4Addr> {
    let interfaces = result["interfaces"].as_array();
    let in_sandbox = |index: Option<u64>| match (interfaces, index) {
        (Some(list), Some(i)) => list
            .get(i as usize)
            .is_some_and(|iface| iface["sandbox"].as_str().is_some_and(|s| !s.is_empty())),
        _ => true,
    };
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ip| in_sandbox(ip["interface"].as_u64()))
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_are_split_in_any_order() {
        let args: Vec<_> = cni_args(
            "K8S_POD_UID=9f1c;IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;broken",
        )
        .collect();
        assert_eq!(
            args,
            [
                ("K8S_POD_UID", "9f1c"),
                ("IgnoreUnknown", "1"),
                ("K8S_POD_NAMESPACE", "shop"),
                ("K8S_POD_NAME", "web-0"),
            ]
        );
        assert_eq!(cni_args("").count(), 0);
    }

    #[test]
    fn the_pods_addresses_are_those_inside_its_sandbox() {
        // As the bridge plugin answers (CNI 1.0.0): the bridge, the host end, the pod's eth0.
        let result = serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "26:74:00:00:00:01"},
                {"name": "veth1", "mac": "e6:ec:00:00:00:02"},
                {"name": "eth0", "mac": "f6:df:00:00:00:03", "sandbox": "/var/run/netns/p"}
            ],
            "ips": [
                {"interface": 2, "address": "10.88.1.200/25", "gateway": "10.88.1.129"},
                {"interface": 2, "address": "fd00::5/64"},
                {"interface": 0, "address": "10.88.1.129/25"}
            ]
        });
        assert_eq!(pod_ipv4s(&result), [Ipv4Addr::new(10, 88, 1, 200)]);
        let ipam_only = serde_json::json!({"ips": [{"address": "10.0.0.9/24"}]});
        assert_eq!(pod_ipv4s(&ipam_only), [Ipv4Addr::new(10, 0, 0, 9)]);
        assert!(pod_ipv4s(&serde_json::json!({})).is_empty());
    }

    #[test]
    fn requests_and_replies_read_back_as_written() {
        let request = PodRequest {
            command: Command::Add,
            container_id: "abc".into(),
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: Some("9f1c".into()),
            ips: vec![Ipv4Addr::new(10, 0, 0, 9)],
            netns: Some("/var/run/netns/cni-1".into()),
        };
        let text = serde_json::to_string(&request).expect("json");
        assert!(text.contains("\"command\":\"ADD\""), "{text}");
        assert_eq!(
            serde_json::from_str::<PodRequest>(&text).expect("back"),
            request
        );
        let reply: PodReply = serde_json::from_str(r#"{"outcome":"not_in_mesh"}"#).expect("reply");
        assert_eq!(reply.outcome, Outcome::NotInMesh);
    }

    #[test]
    fn an_absent_agent_is_told_apart_from_a_silent_one() {
        let dir = tempfile::tempdir().expect("dir");
        let socket = dir.path().join("cni.sock");
        let request = PodRequest {
            command: Command::Del,
            container_id: "abc".into(),
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: None,
            ips: Vec::new(),
            netns: None,
        };
        let absent = hand_over(&socket, &request, None, Duration::from_secs(1));
        assert!(
            matches!(absent, Err(HandoffError::Unreachable { .. })),
            "{absent:?}"
        );
        // Listening, never answering.
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let silent = hand_over(&socket, &request, None, Duration::from_millis(200));
        assert!(
            matches!(silent, Err(HandoffError::NoAnswer { .. })),
            "{silent:?}"
        );
    }
}
