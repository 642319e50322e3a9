//! The access log: one JSON line per proxied connection and per HTTP request. The traffic
//! path only offers an entry to a bounded queue (dropping, and counting, when it is full); a
//! thread of its own formats and writes.

use std::{
    borrow::Cow,
    net::{IpAddr, SocketAddrV4},
    path::PathBuf,
    sync::{
        Arc,
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    time::Duration,
};

use http::{HeaderValue, Method, Uri};
use prometheus::{IntCounter, Registry};
use serde::{Serialize, Serializer, ser::SerializeMap};

use super::Labels;
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

/// One HTTP request, as the source's or the destination's proxy saw it. What the request
/// path hands over is shared or plain data; the writer thread formats it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestLogEntry {
    /// `outbound` at the client's node, `inbound` at the server's.
    pub direction: &'static str,
    pub start_unix_ms: u64,
    pub duration_ms: f64,
    #[serde(serialize_with = "shared_str")]
    pub workload: Arc<str>,
    pub client: IpAddr,
    #[serde(serialize_with = "optional_shared_str")]
    pub source_identity: Option<Arc<str>>,
    /// `method`, `path` and `authority`.
    #[serde(flatten)]
    pub request: RequestLine,
    pub protocol: &'static str,
    pub response_code: u16,
    pub response_flags: Cow<'static, str>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Outbound: the endpoint the request went to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<SocketAddrV4>,
    /// Outbound: the HTTPRoute rule that routed the request, `namespace/name#index`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "rule")]
    pub route: Option<(Arc<str>, usize)>,
    /// Outbound: the labels the request was counted with, for their Service's host name.
    #[serde(
        rename = "destination_service",
        skip_serializing_if = "Option::is_none",
        serialize_with = "service_of"
    )]
    pub destination: Option<Arc<Labels>>,
}

/// A request's method, path and host (`:authority`, else `Host`, as routing reads it), held as
/// the request had them: taking one copies no string.
#[derive(Debug, Clone)]
pub struct RequestLine {
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
}

impl RequestLine {
    pub fn of<B>(req: &http::Request<B>) -> Self {
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            host: req.headers().get(http::header::HOST).cloned(),
        }
    }

    pub fn method(&self) -> &str {
        self.method.as_str()
    }

    pub fn path(&self) -> &str {
        self.uri.path()
    }

    pub fn authority(&self) -> &str {
        nodemesh_traffic::filters::host_of(self.uri.authority(), self.host.as_ref())
    }
}

impl Serialize for RequestLine {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("method", self.method())?;
        map.serialize_entry("path", self.path())?;
        map.serialize_entry("authority", self.authority())?;
        map.end()
    }
}

fn shared_str<S: Serializer>(value: &Arc<str>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(value)
}

fn optional_shared_str<S: Serializer>(
    value: &Option<Arc<str>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    value.as_deref().serialize(serializer)
}

fn rule<S: Serializer>(
    value: &Option<(Arc<str>, usize)>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some((route, index)) => serializer.collect_str(&format_args!("{route}#{index}")),
        None => serializer.serialize_none(),
    }
}

fn service_of<S: Serializer>(
    labels: &Option<Arc<Labels>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    labels
        .as_deref()
        .map(Labels::destination_service)
        .serialize(serializer)
}

#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Entry {
    Connection {
        #[serde(flatten)]
        record: Finished,
        response_flags: &'static str,
    },
    Request(Box<RequestLogEntry>),
}

/// A finished connection's record, shared with `/connections`.
#[derive(Debug)]
struct Finished(Arc<ConnectionRecord>);

impl Serialize for Finished {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
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

    pub fn connection(&self, record: &Arc<ConnectionRecord>, response_flags: &'static str) {
        if self.sampled() {
            self.offer(Entry::Connection {
                record: Finished(record.clone()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines `write_entries` makes of `entries`.
    fn lines(entries: Vec<Entry>) -> Vec<serde_json::Value> {
        let (queue, received) = mpsc::sync_channel(entries.len());
        for entry in entries {
            queue.try_send(entry).expect("room");
        }
        drop(queue);
        let mut out = Vec::new();
        write_entries(&received, &mut out);
        String::from_utf8(out)
            .expect("utf-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
            .collect()
    }

    fn request(method: &str, uri: &str, host: Option<&str>) -> http::Request<()> {
        let mut req = http::Request::builder().method(method).uri(uri);
        if let Some(host) = host {
            req = req.header(http::header::HOST, host);
        }
        req.body(()).expect("request")
    }

    #[test]
    fn a_request_line_names_what_the_request_went_to_with_the_strings_formatted_by_the_writer() {
        let labels = Labels::of(&ConnectionRecord {
            destination_service: Some("shop/web".into()),
            ..ConnectionRecord::example()
        })
        .with_destination(Some("shop/web-v2"), None, Some("shop/web"));
        let entry = RequestLogEntry {
            direction: "outbound",
            start_unix_ms: 1_700_000_000_123,
            duration_ms: 1.5,
            workload: Arc::from("shop/client"),
            client: "10.0.0.9".parse().expect("ip"),
            source_identity: Some(Arc::from("spiffe://cluster.local/ns/shop/sa/client")),
            request: RequestLine::of(&request("POST", "/cart?id=1", Some("web.shop:8080"))),
            protocol: "http",
            response_code: 503,
            response_flags: Cow::Borrowed("UF,URX"),
            request_bytes: 12,
            response_bytes: 34,
            traceparent: None,
            upstream: Some("10.0.1.7:8080".parse().expect("addr")),
            route: Some((Arc::from("shop/web"), 1)),
            destination: Some(Arc::new(labels)),
        };
        let inbound = RequestLogEntry {
            direction: "inbound",
            source_identity: None,
            request: RequestLine::of(&request("GET", "http://api.shop:9090/items", None)),
            upstream: None,
            route: None,
            destination: None,
            ..entry.clone()
        };
        let lines = lines(vec![
            Entry::Request(Box::new(entry)),
            Entry::Request(Box::new(inbound)),
        ]);
        assert_eq!(
            lines[0],
            serde_json::json!({
                "kind": "request",
                "direction": "outbound",
                "start_unix_ms": 1_700_000_000_123_u64,
                "duration_ms": 1.5,
                "workload": "shop/client",
                "client": "10.0.0.9",
                "source_identity": "spiffe://cluster.local/ns/shop/sa/client",
                "method": "POST",
                "path": "/cart",
                "authority": "web.shop",
                "protocol": "http",
                "response_code": 503,
                "response_flags": "UF,URX",
                "request_bytes": 12,
                "response_bytes": 34,
                "upstream": "10.0.1.7:8080",
                "route": "shop/web#1",
                "destination_service": "web.shop.svc.cluster.local",
            })
        );
        // The fields come in this order, the nested request line included.
        let keys: Vec<&str> = lines[0]
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "kind",
                "direction",
                "start_unix_ms",
                "duration_ms",
                "workload",
                "client",
                "source_identity",
                "method",
                "path",
                "authority",
                "protocol",
                "response_code",
                "response_flags",
                "request_bytes",
                "response_bytes",
                "upstream",
                "route",
                "destination_service",
            ]
        );
        // Without routing, no outbound fields; the host from an absolute URI.
        assert_eq!(lines[1]["authority"], "api.shop");
        assert_eq!(lines[1]["path"], "/items");
        assert_eq!(lines[1]["source_identity"], serde_json::Value::Null);
        for absent in ["upstream", "route", "destination_service", "traceparent"] {
            assert!(lines[1].get(absent).is_none(), "{absent}: {}", lines[1]);
        }
    }
}
