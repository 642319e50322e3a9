//! The access log: one JSON line per proxied connection and per HTTP request. The traffic
//! path only offers an entry to a bounded queue (dropping, and counting, when it is full); a
//! thread of its own formats and writes.

use std::{
    path::PathBuf,
    sync::mpsc::{self, Receiver, SyncSender, TrySendError},
    time::Duration,
};

use prometheus::{IntCounter, Registry};
use serde::Serialize;

use crate::state::ConnectionRecord;

/// Entries waiting to be written before new ones are dropped.
const QUEUE: usize = 8192;
/// How long the writer lets lines gather once it has emptied the queue; lines reach the file
/// up to this much later.
const LINGER: Duration = Duration::from_millis(10);

/// Where the log goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for AccessLogTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "" => Err("give stdout, a file path, or off".to_owned()),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

/// One HTTP request, as the source's or the destination's proxy saw it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestLogEntry {
    /// `outbound` at the client's node, `inbound` at the server's.
    pub direction: &'static str,
    pub start_unix_ms: u64,
    pub duration_ms: f64,
    pub workload: String,
    pub client: String,
    pub source_identity: Option<String>,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub protocol: &'static str,
    pub response_code: u16,
    pub response_flags: std::borrow::Cow<'static, str>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Outbound: the endpoint the request went to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Outbound: the HTTPRoute rule that routed the request, `namespace/name#index`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Outbound: the Service's host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Entry {
    Connection {
        #[serde(flatten)]
        record: Box<ConnectionRecord>,
        response_flags: &'static str,
    },
    Request(Box<RequestLogEntry>),
}

#[derive(Debug)]
pub struct AccessLog {
    queue: SyncSender<Entry>,
    /// Keep an entry when a draw below this threshold comes out (1.0 keeps all).
    threshold: u64,
    dropped: IntCounter,
}

impl AccessLog {
    /// Opens the target and starts the writer thread. `sample` is the share of entries kept.
    pub fn start(
        target: &AccessLogTarget,
        sample: f64,
        registry: &Registry,
    ) -> std::io::Result<Self> {
        let mut out: Box<dyn std::io::Write + Send> = match target {
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("cannot open access log {}: {e}", path.display()),
                        )
                    })?,
            ),
        };
        let (queue, entries) = mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".to_owned())
            .spawn(move || write_entries(&entries, &mut out))?;
        let dropped = IntCounter::new(
            "nodemesh_access_log_dropped_total",
            "Access log entries dropped because the writer fell behind",
        )
        .expect("valid metric");
        registry
            .register(Box::new(dropped.clone()))
            .expect("metric registered once");
        Ok(Self {
            queue,
            threshold: (sample.clamp(0.0, 1.0) * u64::MAX as f64) as u64,
            dropped,
        })
    }

    /// Whether this entry is kept, by a draw from the proxy's one random source.
    fn sampled(&self) -> bool {
        self.threshold == u64::MAX || fastrand::u64(..) < self.threshold
    }

    fn offer(&self, entry: Entry) {
        if let Err(TrySendError::Full(_)) = self.queue.try_send(entry) {
            self.dropped.inc();
        }
    }

    pub fn connection(&self, record: &ConnectionRecord, response_flags: &'static str) {
        if self.sampled() {
            self.offer(Entry::Connection {
                record: Box::new(record.clone()),
                response_flags,
            });
        }
    }

    pub fn request(&self, entry: RequestLogEntry) {
        if self.sampled() {
            self.offer(Entry::Request(Box::new(entry)));
        }
    }
}

fn write_entries(entries: &Receiver<Entry>, out: &mut dyn std::io::Write) {
    const BATCH_BYTES: usize = 60 * 1024;
    let mut buffer = Vec::with_capacity(64 * 1024);
    while let Ok(first) = entries.recv() {
        let mut next = Some(first);
        while let Some(entry) = next {
            if serde_json::to_writer(&mut buffer, &entry).is_ok() {
                buffer.push(b'\n');
            }
            next = if buffer.len() < BATCH_BYTES {
                entries.try_recv().ok()
            } else {
                None
            };
        }
        // A batch short of full means the queue is empty.
        let drained = buffer.len() < BATCH_BYTES;
        if out.write_all(&buffer).and_then(|()| out.flush()).is_err() {
            return;
        }
        buffer.clear();
        // Let the next lines gather: one wake-up and one write per batch instead of one per
        // connection, each costing the proxy a futex wake and this thread a context switch.
        if drained {
            std::thread::sleep(LINGER);
        }
    }
}
