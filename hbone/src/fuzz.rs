//! Fuzz target for the server's CONNECT handling (`cargo xtask fuzz`): requests with random
//! methods, authorities and headers, and random bytes where HTTP/2 frames should be. The
//! server answers each request with 200 (only a CONNECT to a socket address the handler takes),
//! 400, 405 or the handler's refusal, and garbage ends the connection without a panic.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt as _;

use crate::{ConnectRequest, ServerSettings, serve, status};

const AUTHORITIES: &[&str] = &[
    "10.0.0.2:9000",
    "10.0.0.2:80",
    "[::1]:9000",
    "[fe80::1%25eth0]:9000",
    "10.0.0.2",
    "10.0.0.2:",
    ":9000",
    "10.0.0.2:99999",
    "web.shop:9000",
    "10.0.0.2:9000:1",
    "",
    "*",
    "user@10.0.0.2:9000",
];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The server under test: CONNECTs to port 9000 are taken, others refused with 503.
fn spawn_server(
    io: tokio::io::DuplexStream,
) -> tokio::task::JoinHandle<Result<(), crate::HboneError>> {
    tokio::spawn(async move {
        let settings = ServerSettings::default();
        serve(
            io,
            &settings,
            std::future::pending(),
            |connect: ConnectRequest| async move {
                if connect.authority.port() != 9000 {
                    return status(StatusCode::SERVICE_UNAVAILABLE);
                }
                connect.accept().0
            },
        )
        .await
    })
}

proptest! {
    #[test]
    fn fuzz_hbone_connect(
        method in proptest::sample::select(&["CONNECT", "GET", "POST", "connect", "PRI"][..]),
        authority in prop_oneof![proptest::sample::select(AUTHORITIES).prop_map(str::to_owned), "[ -~]{0,24}"],
        headers in prop::collection::vec(("[a-z-]{1,12}", "[ -~]{0,40}"), 0..6),
    ) {
        runtime().block_on(async {
            let (client_io, server_io) = tokio::io::duplex(64 * 1024);
            let server = spawn_server(server_io);
            let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake::<_, Empty<Bytes>>(TokioIo::new(client_io))
                .await
                .expect("HTTP/2 with the server");
            tokio::spawn(connection);
            let Ok(method) = Method::from_bytes(method.as_bytes()) else { return Ok(()) };
            let mut builder = Request::builder().method(method.clone()).uri(authority.as_str());
            for (name, value) in &headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
            // What the HTTP library will not even build is not a request a peer can send.
            let Ok(request) = builder.body(Empty::new()) else { return Ok(()) };
            let answer = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request)).await;
            let Ok(Ok(response)) = answer else {
                // The client library refused it on its side (a CONNECT without authority).
                prop_assert!(!server.is_finished() || server.await.is_ok());
                return Ok(());
            };
            let code = response.status();
            let takes = method == Method::CONNECT
                && authority.parse::<std::net::SocketAddr>().is_ok_and(|a| a.port() == 9000);
            prop_assert!(
                [StatusCode::OK, StatusCode::BAD_REQUEST, StatusCode::METHOD_NOT_ALLOWED, StatusCode::SERVICE_UNAVAILABLE].contains(&code),
                "{} {:?} answered {}", method, authority, code
            );
            prop_assert_eq!(code == StatusCode::OK, takes, "{} {:?} answered {}", method, authority, code);
            Ok(())
        })?;
    }

    #[test]
    fn fuzz_hbone_garbage(bytes in prop::collection::vec(any::<u8>(), 0..512), preface in any::<bool>()) {
        runtime().block_on(async {
            let (mut client_io, server_io) = tokio::io::duplex(64 * 1024);
            let server = spawn_server(server_io);
            if preface {
                let _ = client_io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            }
            let _ = client_io.write_all(&bytes).await;
            drop(client_io);
            let ended = tokio::time::timeout(Duration::from_secs(10), server).await;
            prop_assert!(ended.is_ok(), "the server did not end the connection");
            prop_assert!(ended.is_ok_and(|joined| joined.is_ok()), "the server panicked");
            Ok(())
        })?;
    }
}
