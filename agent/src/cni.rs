//! The agent's CNI socket: where `nodemesh-cni` hands over each new pod's network namespace
//! and waits until the pod is enrolled, so that the pod's first connection is captured.
//!
//! One connection carries one request (ended by the plugin shutting its side down) and one
//! reply. The socket is made in a directory only root may enter, and only root may connect:
//! the descriptor that comes with a request is taken as the pod's namespace, so whoever
//! connects must be the runtime. The request goes to the workload registry (in the agent's
//! main loop), which answers.

use std::{
    io,
    os::{fd::AsFd as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use nodemesh_cni::{Command, MAX_MESSAGE, MeshNamespaces, Outcome, PodReply, PodRequest};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;

use crate::netns::{NetnsOrigin, PodNetns, receive_with_descriptor};

/// How long a connected plugin may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the registry may take to answer: the plugin waits 15 s by default.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CniSocketError {
    #[error("cannot prepare the CNI socket directory {dir}: {source}")]
    Directory { dir: PathBuf, source: io::Error },
    #[error("cannot listen on the CNI socket {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
}

/// A request of the plugin, for the registry to answer.
#[derive(Debug)]
pub struct CniRequest {
    pub pod: PodRequest,
    /// The pod's namespace (ADD only), checked to be a network namespace that is not the
    /// agent's own.
    pub netns: Option<PodNetns>,
    reply: oneshot::Sender<PodReply>,
}

impl CniRequest {
    pub fn answer(self, outcome: Outcome, message: impl Into<String>) {
        let _ = self.reply.send(PodReply {
            outcome,
            message: message.into(),
        });
    }

    /// `namespace/name` of the pod.
    pub fn key(&self) -> String {
        format!("{}/{}", self.pod.namespace, self.pod.name)
    }
}

/// The listening socket.
#[derive(Debug)]
pub struct CniSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl CniSocket {
    /// Listens at `path`, replacing what a previous agent left there. The directory is made
    /// (mode 0700) if missing.
    pub fn bind(path: &Path) -> Result<Self, CniSocketError> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        let dir_error = |source| CniSocketError::Directory {
            dir: dir.to_owned(),
            source,
        };
        // A directory of its own is made private; an existing one is left as it is.
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(dir_error)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(dir_error)?;
        }
        let listen_error = |source| CniSocketError::Listen {
            path: path.to_owned(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(listen_error(e)),
        }
        let listener = UnixListener::bind(path).map_err(listen_error)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(listen_error)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts plugins until `stop`, handing each request to `requests`.
    pub async fn serve(self, requests: mpsc::Sender<CniRequest>, stop: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((connection, _)) => {
                    let requests = requests.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_one(connection, requests).await {
                            tracing::warn!(error = %e, "CNI plugin exchange failed");
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors, most likely: pause rather than spin.
                    tracing::warn!(error = %e, "cannot accept on the CNI socket");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Reads the request: the first read brings the descriptor, the rest of the message
/// follows until the plugin shuts its side down.
async fn read_request(connection: &mut UnixStream) -> io::Result<(Vec<u8>, Option<std::fs::File>)> {
    connection.readable().await?;
    let (mut bytes, descriptor) = loop {
        match connection.try_io(Interest::READABLE, || {
            receive_with_descriptor(connection.as_fd(), MAX_MESSAGE)
        }) {
            Ok(first) => break first,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => connection.readable().await?,
            Err(e) => return Err(e),
        }
    };
    let mut rest = Vec::new();
    (&mut *connection)
        .take((MAX_MESSAGE - bytes.len()) as u64)
        .read_to_end(&mut rest)
        .await?;
    bytes.extend_from_slice(&rest);
    Ok((bytes, descriptor))
}

async fn serve_one(
    mut connection: UnixStream,
    requests: mpsc::Sender<CniRequest>,
) -> io::Result<()> {
    let (bytes, descriptor) = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut connection))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request within 5 s"))??;
    let reply = match serde_json::from_slice::<PodRequest>(&bytes) {
        Err(e) => refused(format!("the request is not readable: {e}")),
        Ok(pod) => {
            let netns = match (pod.command, descriptor) {
                (Command::Add, None) => {
                    return send(&mut connection, &refused("ADD needs the pod's namespace")).await;
                }
                (Command::Add, Some(file)) => {
                    let origin = NetnsOrigin::Cni {
                        container_id: pod.container_id.clone(),
                    };
                    match PodNetns::from_file(file, origin) {
                        Ok(netns) => Some(netns),
                        Err(e) => return send(&mut connection, &refused(e.to_string())).await,
                    }
                }
                // A descriptor where none belongs is dropped (closed) here.
                (_, _) => None,
            };
            let (tx, rx) = oneshot::channel();
            let request = CniRequest {
                pod,
                netns,
                reply: tx,
            };
            if requests.send(request).await.is_err() {
                refused("the agent is stopping")
            } else {
                match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
                    Ok(Ok(reply)) => reply,
                    Ok(Err(_)) => refused("the agent dropped the request"),
                    Err(_) => refused("the agent took too long to enroll the pod"),
                }
            }
        }
    };
    send(&mut connection, &reply).await
}

fn refused(message: impl Into<String>) -> PodReply {
    PodReply {
        outcome: Outcome::Refused,
        message: message.into(),
    }
}

async fn send(connection: &mut UnixStream, reply: &PodReply) -> io::Result<()> {
    let bytes = serde_json::to_vec(reply).map_err(io::Error::other)?;
    connection.write_all(&bytes).await?;
    connection.shutdown().await
}

/// Writes which namespaces are in the mesh beside the socket, for the plugin to read while
/// the agent is away (written whole, then renamed). Blocking: call it off the runtime.
pub fn publish_mesh_namespaces(socket: &Path, enrolled: Vec<String>) -> io::Result<()> {
    let file = MeshNamespaces::path_beside(socket);
    let temporary = file.with_extension("tmp");
    let text = serde_json::to_vec(&MeshNamespaces { enrolled }).map_err(io::Error::other)?;
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, &file)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use nodemesh_cni::hand_over;

    use super::*;

    fn request(command: Command) -> PodRequest {
        PodRequest {
            command,
            container_id: "c1".into(),
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: Some("9f1c".into()),
            ips: vec![Ipv4Addr::new(10, 0, 0, 9)],
            netns: None,
        }
    }

    #[tokio::test]
    async fn a_request_reaches_the_registry_and_its_answer_the_plugin() {
        crate::netns::init().expect("own namespace");
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("run/cni.sock");
        let socket = CniSocket::bind(&path).expect("bind");
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "only root connects");
        let (tx, mut rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        tokio::spawn(socket.serve(tx, stop.clone()));
        tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                let outcome = match request.pod.command {
                    Command::Del => Outcome::Released,
                    _ => Outcome::NotInMesh,
                };
                request.answer(outcome, "");
            }
        });
        let ask = |command| {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                hand_over(&path, &request(command), None, Duration::from_secs(5))
            })
        };
        let del = ask(Command::Del).await.expect("task").expect("answer");
        assert_eq!(del.outcome, Outcome::Released);
        // ADD without the namespace is refused by the socket itself.
        let add = ask(Command::Add).await.expect("task").expect("answer");
        assert_eq!(add.outcome, Outcome::Refused);
        assert!(add.message.contains("namespace"), "{}", add.message);
        // The agent's own namespace is never a pod's.
        let own = std::fs::File::open("/proc/self/ns/net").expect("own netns");
        let path2 = path.clone();
        let own_add = tokio::task::spawn_blocking(move || {
            hand_over(
                &path2,
                &request(Command::Add),
                Some(&own),
                Duration::from_secs(5),
            )
        })
        .await
        .expect("task")
        .expect("answer");
        assert_eq!(own_add.outcome, Outcome::Refused);
        // Entering a namespace needs root; without it the check fails earlier, as refused.
        let root = nix::unistd::geteuid().is_root();
        assert!(
            own_add.message.contains("agent's own") || !root,
            "{}",
            own_add.message
        );
        stop.cancel();
    }
}
