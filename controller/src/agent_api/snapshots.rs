//! `GET /v1/snapshots` and `POST /v1/acks`: each agent's view of the mesh, pushed as soon as
//! the controller accepts a configuration, and what the agent did with it.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Either;
use hyper::body::{Frame, Incoming};
use nodemesh_config::snapshot::{SnapshotAck, SnapshotMessage};
use tokio::sync::mpsc;

use super::{AgentApi, Body, json, read_json};

/// How often an idle stream carries a heartbeat, so that an agent can tell a quiet
/// controller from a lost connection.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// A response body fed by a channel: the snapshot stream.
#[derive(Debug)]
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|bytes| Ok(Frame::data(bytes))))
    }
}

fn line(message: &SnapshotMessage) -> Bytes {
    let mut bytes = serde_json::to_vec(message).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

impl AgentApi {
    pub(super) fn stream_snapshots(&self, node: &str, peer: SocketAddr) -> Response<Body> {
        let (tx, rx) = mpsc::channel(4);
        let mut updates = self.state.subscribe();
        let state = self.state.clone();
        let stop = self.stop.clone();
        let node = node.to_owned();
        tokio::spawn(async move {
            let _stream = state.agent_connected(&node);
            tracing::info!(node, %peer, "agent subscribed to snapshots");
            // What this agent has: a configuration whose change touches nothing of this
            // node's view is not sent again.
            let mut sent: Option<nodemesh_config::MeshConfig> = None;
            let mut version = 0;
            loop {
                let current = updates.borrow_and_update().clone();
                if let Some(accepted) = current {
                    let view = accepted.mesh.for_node(&node);
                    if sent.as_ref() != Some(&view) {
                        version = accepted.version;
                        let message = SnapshotMessage {
                            version,
                            config: Some(view.clone()),
                        };
                        if tx.send(line(&message)).await.is_err() {
                            break;
                        }
                        state.snapshot_sent(&node, version);
                        sent = Some(view);
                    }
                }
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tx.closed() => {
                            tracing::info!(node, %peer, "agent's snapshot stream closed");
                            return;
                        }
                        changed = updates.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            break;
                        }
                        () = tokio::time::sleep(HEARTBEAT) => {
                            let heartbeat = SnapshotMessage { version, config: None };
                            if tx.send(line(&heartbeat)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .body(Either::Right(ChannelBody(rx)))
            .unwrap_or_else(|_| {
                Response::new(Either::Left(http_body_util::Full::new(Bytes::new())))
            })
    }

    pub(super) async fn ack(&self, req: Request<Incoming>, node: &str) -> Response<Body> {
        match read_json::<SnapshotAck>(req).await {
            Ok(ack) => {
                if !ack.applied {
                    tracing::warn!(node, version = ack.version, error = ?ack.error, "agent could not apply a snapshot");
                }
                self.state.snapshot_acked(node, &ack);
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "recorded": ack.version }),
                )
            }
            Err(refusal) => refusal.response(),
        }
    }
}
