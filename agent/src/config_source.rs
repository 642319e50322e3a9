//! Where the agent's configuration comes from: the controller's snapshot stream, kept on
//! disk so that an agent restarted while the controller is away starts from its last good
//! snapshot, and resynchronises when the controller returns.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::{Buf as _, BytesMut};
use http_body_util::BodyExt as _;
use nodemesh_config::{
    MeshConfig,
    snapshot::{SnapshotAck, SnapshotMessage},
};
use tokio::sync::mpsc;

use crate::controller_client::ControllerClient;

/// Longest silence on the stream before the agent assumes the connection is lost (the
/// controller sends a heartbeat every 10 s).
const STREAM_SILENCE: Duration = Duration::from_secs(35);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
const SAVED: &str = "snapshot.json";

#[derive(Debug)]
pub enum SourceEvent {
    /// A snapshot to put in force.
    Snapshot {
        version: u64,
        mesh: Box<MeshConfig>,
    },
    Connected,
    Disconnected(String),
}

#[derive(Debug)]
pub struct SnapshotSource {
    client: Arc<ControllerClient>,
    dir: PathBuf,
}

impl SnapshotSource {
    pub fn new(client: Arc<ControllerClient>, dir: &Path) -> Self {
        Self {
            client,
            dir: dir.to_owned(),
        }
    }

    /// The snapshot saved by the last run, if any and readable.
    pub fn load_saved(&self) -> Option<(u64, MeshConfig)> {
        let file = self.dir.join(SAVED);
        let bytes = std::fs::read(&file).ok()?;
        match serde_json::from_slice::<SnapshotMessage>(&bytes) {
            Ok(SnapshotMessage {
                version,
                config: Some(mesh),
            }) => Some((version, mesh)),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "ignoring an unreadable saved snapshot");
                None
            }
        }
    }

    /// Keeps a snapshot that was put in force, replacing the previous one atomically.
    pub fn save(&self, version: u64, mesh: &MeshConfig) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let file = self.dir.join(SAVED);
        let tmp = file.with_extension("json.tmp");
        let message = SnapshotMessage {
            version,
            config: Some(mesh.clone()),
        };
        std::fs::write(
            &tmp,
            serde_json::to_vec(&message).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &file)
    }

    /// Reports what the agent did with a snapshot; best effort, in the background.
    pub fn ack(&self, ack: SnapshotAck) {
        let client = self.client.clone();
        tokio::spawn(async move {
            if let Err(e) = client.ack(&ack).await {
                tracing::debug!(version = ack.version, error = %e, "acknowledgement not delivered");
            }
        });
    }

    /// Follows the controller's stream until `events` is closed, reconnecting with backoff.
    pub async fn follow(self: Arc<Self>, events: mpsc::Sender<SourceEvent>) {
        let mut retry = RETRY_MIN;
        loop {
            match self.client.snapshots().await {
                Ok(body) => {
                    retry = RETRY_MIN;
                    if events.send(SourceEvent::Connected).await.is_err() {
                        return;
                    }
                    let reason = self.read_stream(body, &events).await;
                    if events
                        .send(SourceEvent::Disconnected(reason))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    if events
                        .send(SourceEvent::Disconnected(e.to_string()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    /// Reads snapshots until the stream ends; returns why it ended.
    async fn read_stream(
        &self,
        mut body: hyper::body::Incoming,
        events: &mpsc::Sender<SourceEvent>,
    ) -> String {
        let mut buffer = BytesMut::new();
        loop {
            let frame = match tokio::time::timeout(STREAM_SILENCE, body.frame()).await {
                Err(_) => return format!("no snapshot or heartbeat for {STREAM_SILENCE:?}"),
                Ok(None) => return "the controller closed the stream".to_owned(),
                Ok(Some(Err(e))) => return format!("the stream broke: {e}"),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buffer.extend_from_slice(&data);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line = buffer.split_to(end + 1);
                let mut line = line.chunk();
                line = &line[..line.len() - 1];
                match serde_json::from_slice::<SnapshotMessage>(line) {
                    Ok(SnapshotMessage {
                        version,
                        config: Some(mesh),
                    }) => {
                        let event = SourceEvent::Snapshot {
                            version,
                            mesh: Box::new(mesh),
                        };
                        if events.send(event).await.is_err() {
                            return "the agent is stopping".to_owned();
                        }
                    }
                    Ok(_heartbeat) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable snapshot; keeping the last good one");
                        self.ack(SnapshotAck {
                            version: 0,
                            applied: false,
                            error: Some(format!("unreadable snapshot: {e}")),
                        });
                    }
                }
            }
        }
    }
}
