use http::Request;

use super::*;
use crate::proxy::http::full_body;

fn request(uri: &str, headers: &[(&str, &str)]) -> HttpRequest {
    let mut builder = Request::builder().uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(full_body("")).expect("request")
}

#[test]
fn hop_by_hop_headers_stay_on_their_connection() {
    let req = request(
        "/x",
        &[
            ("connection", "close, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-kept", "yes"),
        ],
    );
    let req = prepare(req, UpstreamProtocol::Http1);
    let headers = req.headers();
    for gone in ["connection", "x-private", "keep-alive", "upgrade"] {
        assert!(!headers.contains_key(gone), "{gone}");
    }
    assert_eq!(headers["te"], "trailers", "gRPC needs te: trailers");
    assert_eq!(headers["x-kept"], "yes");
}

#[test]
fn http1_gets_origin_form_and_a_host() {
    let req = prepare(
        request("http://web.shop:80/a?b=c", &[]),
        UpstreamProtocol::Http1,
    );
    assert_eq!(req.uri(), "/a?b=c");
    assert_eq!(req.headers()[header::HOST], "web.shop:80");
    assert_eq!(req.version(), Version::HTTP_11);
}

#[test]
fn http2_gets_absolute_form_with_the_host_as_authority() {
    let req = prepare(
        request("/a?b=c", &[("host", "web")]),
        UpstreamProtocol::Http2,
    );
    assert_eq!(req.uri(), "http://web/a?b=c");
    assert!(!req.headers().contains_key(header::HOST));
    assert_eq!(req.version(), Version::HTTP_2);
}
