//! The sandbox's test server, run in every pod.
//!
//! Port 8080 speaks HTTP/1.1 and h2c (prior knowledge):
//! - `/` (and any path not below) echoes method, path, the client address it saw and the pod
//!   name (JSON; the pod name also in header `x-pod`);
//! - `/headers` returns the request headers as JSON;
//! - `/delay/<ms>` answers like `/` after that many milliseconds (at most 60 000);
//! - `/status/<code>` answers with that status code;
//! - `/bytes/<n>` returns n bytes;
//! - `/v1/traces` is a minimal OTLP/HTTP JSON receiver: POST stores an export, GET returns
//!   the stored ones (for tests of span export);
//! - `/fault`: `PUT` with `{"status": 503, "ratio": 1.0, "count": null, "delayMs": 0}` makes
//!   later requests fail that way with that probability (or only the next `count`),
//!   `DELETE` clears it, `GET` shows it.
//!
//! Every answer carries `x-pod` (the pod's name) and `x-served` (how many requests, other than
//! `/fault`, this server has answered), so that a test can count attempts.
//!
//! Port 9000 echoes TCP.
#![forbid(unsafe_code)]

mod body;
mod fault;

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
};

use crate::{
    body::{ResponseBody, full},
    fault::{Fault, FaultSwitch},
};

/// The fault to inject, and the count of requests served.
static FAULTS: FaultSwitch = FaultSwitch::new();

const MAX_DELAY: Duration = Duration::from_secs(60);

/// Test server for the nodemesh sandbox: HTTP/1.1 + h2c and a TCP echo.
#[derive(Debug, Parser)]
#[command(name = "nodemesh-testserver", version)]
struct Args {
    /// The pod name to report.
    #[arg(long)]
    pod: String,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    listen: IpAddr,
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    #[arg(long, default_value_t = 9000)]
    echo_port: u16,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Benchmarks hold a thousand connections open at once.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let http_addr = SocketAddr::new(args.listen, args.http_port);
    let echo_addr = SocketAddr::new(args.listen, args.echo_port);
    let http = TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("cannot listen on {http_addr}"))?;
    let echo = TcpListener::bind(echo_addr)
        .await
        .with_context(|| format!("cannot listen on {echo_addr}"))?;
    let pod: &'static str = Box::leak(args.pod.into_boxed_str());
    tokio::spawn(serve_echo(echo));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => return Ok(()),
            accepted = http.accept() => {
                let Ok((stream, client)) = accepted else { continue };
                tokio::spawn(serve_http(stream, client, pod));
            }
        }
    }
}

async fn serve_http(stream: TcpStream, client: SocketAddr, pod: &'static str) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |req| async move {
        Ok::<_, Infallible>(respond(req, client, pod).await)
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// OTLP/HTTP span exports received on `/v1/traces`, newest last, so that tests can see what
/// a proxy exported. Bounded: the oldest are dropped.
static TRACES: std::sync::Mutex<Vec<serde_json::Value>> = std::sync::Mutex::new(Vec::new());
const TRACES_KEPT: usize = 1000;

async fn respond(req: Request<Incoming>, client: SocketAddr, pod: &str) -> Response<ResponseBody> {
    let path = req.uri().path().to_owned();
    if path == "/v1/traces" {
        return with_pod(traces(req).await, pod);
    }
    if path == "/fault" {
        return with_pod(fault(req).await, pod);
    }
    let (served, injected) = FAULTS.next(fastrand::f64());
    if let Some(injected) = injected {
        tokio::time::sleep(injected.delay).await;
        if let Some(status) = injected.status.and_then(|s| StatusCode::from_u16(s).ok()) {
            let response = Response::builder()
                .status(status)
                .body(full(format!(
                    "fault injected: status {}\n",
                    status.as_u16()
                )))
                .unwrap_or_default();
            return with_served(with_pod(response, pod), served);
        }
    }
    let response = answer(req, client, pod).await;
    with_served(response, served)
}

/// `PUT` sets the fault from JSON, `DELETE` clears it, `GET` shows it.
async fn fault(req: Request<Incoming>) -> Response<ResponseBody> {
    use http_body_util::BodyExt as _;
    match *req.method() {
        http::Method::PUT => {
            let body = match req.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => return bad_request(&format!("cannot read the body: {e}")),
            };
            let fault: Fault = match serde_json::from_slice(&body) {
                Ok(fault) => fault,
                Err(e) => {
                    return bad_request(&format!(
                        "not a fault: {e}; send {{\"status\": 503, \"ratio\": 1.0, \"count\": null, \"delayMs\": 0}}"
                    ));
                }
            };
            match FAULTS.set(fault) {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({ "fault": fault })),
                Err(e) => bad_request(&e),
            }
        }
        http::Method::DELETE => {
            FAULTS.clear();
            json(StatusCode::OK, &serde_json::json!({ "fault": null }))
        }
        http::Method::GET => json(
            StatusCode::OK,
            &serde_json::json!({ "fault": FAULTS.get() }),
        ),
        _ => bad_request("use PUT, DELETE or GET on /fault"),
    }
}

fn with_served(mut response: Response<ResponseBody>, served: u64) -> Response<ResponseBody> {
    if let Ok(value) = HeaderValue::from_str(&served.to_string()) {
        response.headers_mut().insert("x-served", value);
    }
    response
}

/// The answer of a request without a fault.
async fn answer(req: Request<Incoming>, client: SocketAddr, pod: &str) -> Response<ResponseBody> {
    let path = req.uri().path().to_owned();
    let mut segments = path.trim_start_matches('/').splitn(2, '/');
    let response = match (segments.next().unwrap_or(""), segments.next()) {
        ("", None) => echo(&req, client, pod),
        ("headers", None) => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .keys()
                .map(|name| {
                    let values: Vec<&str> = req
                        .headers()
                        .get_all(name)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect();
                    (name.to_string(), values.join(", ").into())
                })
                .collect();
            json(StatusCode::OK, &serde_json::Value::Object(headers))
        }
        ("delay", Some(ms)) => match ms.parse::<u64>() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms).min(MAX_DELAY)).await;
                echo(&req, client, pod)
            }
            Err(_) => bad_request("use /delay/<milliseconds>"),
        },
        ("status", Some(code)) => match code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(status) => Response::builder()
                .status(status)
                .body(full(format!("status {}\n", status.as_u16())))
                .unwrap_or_default(),
            None => bad_request("use /status/<code> with a code from 100 to 999"),
        },
        ("bytes", Some(n)) => match n.parse::<u64>() {
            Ok(n) => Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, n)
                .body(ResponseBody::repeat(n))
                .unwrap_or_default(),
            Err(_) => bad_request("use /bytes/<count>"),
        },
        // Any other path echoes too, so that policies on paths have something to allow.
        _ => echo(&req, client, pod),
    };
    with_pod(response, pod)
}

/// POST stores an OTLP/HTTP JSON export; GET returns every export kept.
async fn traces(req: Request<Incoming>) -> Response<ResponseBody> {
    use http_body_util::BodyExt as _;
    match *req.method() {
        http::Method::GET => {
            let kept = TRACES.lock().unwrap_or_else(|e| e.into_inner());
            json(StatusCode::OK, &serde_json::Value::Array(kept.clone()))
        }
        http::Method::POST => {
            let body = match req.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => return bad_request(&format!("cannot read the body: {e}")),
            };
            let export = match serde_json::from_slice(&body) {
                Ok(export) => export,
                Err(e) => return bad_request(&format!("not OTLP JSON: {e}")),
            };
            let mut kept = TRACES.lock().unwrap_or_else(|e| e.into_inner());
            kept.push(export);
            let excess = kept.len().saturating_sub(TRACES_KEPT);
            kept.drain(..excess);
            json(StatusCode::OK, &serde_json::json!({}))
        }
        _ => bad_request("use GET or POST on /v1/traces"),
    }
}

fn echo(req: &Request<Incoming>, client: SocketAddr, pod: &str) -> Response<ResponseBody> {
    json(
        StatusCode::OK,
        &serde_json::json!({
            "method": req.method().as_str(),
            "path": req.uri().path_and_query().map_or("/", |p| p.as_str()),
            "protocol": format!("{:?}", req.version()),
            "client": client.to_string(),
            "pod": pod,
        }),
    )
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<ResponseBody> {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(Bytes::from(body)))
        .unwrap_or_default()
}

fn bad_request(hint: &str) -> Response<ResponseBody> {
    Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .body(full(format!("{hint}\n")))
        .unwrap_or_default()
}

fn with_pod(mut response: Response<ResponseBody>, pod: &str) -> Response<ResponseBody> {
    if let Ok(value) = HeaderValue::from_str(pod) {
        response.headers_mut().insert("x-pod", value);
    }
    response
}

async fn serve_echo(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let (mut reader, mut writer) = stream.split();
            if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
                let _ = writer.shutdown().await;
            }
        });
    }
}
