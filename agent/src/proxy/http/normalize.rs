//! Path normalisation, in both directions before anything looks at the path: at the client's
//! node before routing, at the destination before authorization. The request goes on with the
//! normalised path, so the application serves exactly the path the policies judged. A path
//! that cannot be normalised, or a method not in upper case, gets 400 (`DPE`), as from Envoy.

use std::sync::Arc;

use http::{HeaderValue, StatusCode, Uri, Version, header, uri::PathAndQuery};
use nodemesh_policy::normalize::{InvalidRequest, check_method, normalize_path};

use super::{
    HttpRequest, HttpResponse, ResponseFlags,
    filter::{FilterLayer, HttpFilter, Inner},
    local_reply,
};
use crate::mesh::SharedMesh;

#[derive(Debug, Clone)]
pub struct Normalize {
    mesh: Arc<SharedMesh>,
}

pub type NormalizeLayer = FilterLayer<Normalize>;

impl NormalizeLayer {
    pub fn new(mesh: Arc<SharedMesh>) -> Self {
        FilterLayer(Normalize { mesh })
    }
}

/// The request's URI with its path normalised; `None` when nothing changes.
pub fn normalized_uri(
    uri: &Uri,
    mode: nodemesh_config::PathNormalization,
) -> Result<Option<Uri>, InvalidRequest> {
    let path = uri.path();
    let normal = normalize_path(path, mode)?;
    if normal == path {
        return Ok(None);
    }
    let text = match uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal.into_owned(),
    };
    let mut parts = uri.clone().into_parts();
    // A normalised path holds only characters the original could hold: it always parses.
    parts.path_and_query =
        Some(PathAndQuery::try_from(text).map_err(|_| InvalidRequest::Unrepresentable)?);
    Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| InvalidRequest::Unrepresentable)
}

/// One authority for the whole request, the one the policies judge and the application gets:
/// no user information, one Host line; an absolute-form HTTP/1 request goes on in origin form
/// with Host set to its URI's authority (which RFC 9112 says wins); an HTTP/2 request whose
/// Host header says otherwise than `:authority` is refused.
pub fn settle_authority(req: &mut HttpRequest) -> Result<(), InvalidRequest> {
    if req.headers().get_all(header::HOST).iter().count() > 1 {
        return Err(InvalidRequest::TwoHosts);
    }
    let Some(authority) = req.uri().authority().cloned() else {
        return Ok(());
    };
    if authority.as_str().contains('@') {
        return Err(InvalidRequest::UserInfo);
    }
    if req.version() >= Version::HTTP_2 {
        let contradicts = req.headers().get(header::HOST).is_some_and(|host| {
            !host
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        });
        return if contradicts {
            Err(InvalidRequest::HostMismatch)
        } else {
            Ok(())
        };
    }
    let host =
        HeaderValue::from_str(authority.as_str()).map_err(|_| InvalidRequest::Unrepresentable)?;
    req.headers_mut().insert(header::HOST, host);
    let target = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(target);
    Ok(())
}

impl HttpFilter for Normalize {
    async fn filter<S: Inner>(&self, inner: &S, mut req: HttpRequest) -> HttpResponse {
        let mode = self.mesh.load().path_normalization;
        if let Err(e) =
            check_method(req.method().as_str()).and_then(|()| settle_authority(&mut req))
        {
            return local_reply(
                StatusCode::BAD_REQUEST,
                ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR,
                e.to_string(),
            );
        }
        match normalized_uri(req.uri(), mode) {
            Ok(None) => {}
            Ok(Some(uri)) => *req.uri_mut() = uri,
            Err(e) => {
                return local_reply(
                    StatusCode::BAD_REQUEST,
                    ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR,
                    format!("invalid path {:?}: {e}", req.uri().path()),
                );
            }
        }
        inner.handle(req).await
    }
}

#[cfg(test)]
mod tests {
    use nodemesh_config::PathNormalization;
    use tower::{Layer as _, ServiceExt as _};

    use super::*;
    use crate::{
        mesh::MeshView,
        proxy::http::{flags_of, testing},
    };

    fn layer(mode: PathNormalization) -> NormalizeLayer {
        let mut config = testing::mesh_config(0, "");
        config.settings.path_normalization = mode;
        let mesh = SharedMesh::default();
        mesh.store(MeshView::new(&config, "cluster.local"));
        NormalizeLayer::new(Arc::new(mesh))
    }

    #[tokio::test]
    async fn the_layers_below_see_the_normalised_path_and_the_query_as_sent() {
        let service = layer(PathNormalization::Base).layer(testing::uri_echo_service());
        let Ok(response) = service
            .oneshot(testing::request("/public/%2e%2e/pri%76ate?q=%2e%2e"))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(testing::body_text(response).await, "/private?q=%2e%2e");
    }

    #[tokio::test]
    async fn an_absolute_form_request_goes_on_in_origin_form_with_its_authority_as_host() {
        let service = layer(PathNormalization::MergeSlashes).layer(testing::host_echo_service());
        // `testing::request` sets `Host: web`: the URI's authority wins, as RFC 9112 says.
        let Ok(response) = service
            .oneshot(testing::request("http://web.shop:8080//a/./b"))
            .await;
        assert_eq!(testing::body_text(response).await, "web.shop:8080 /a/b");
    }

    #[tokio::test]
    async fn ambiguous_authorities_get_400() {
        let service = layer(PathNormalization::Base).layer(testing::host_echo_service());
        let Ok(response) = service
            .clone()
            .oneshot(testing::request("http://x@admin.internal/"))
            .await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "user information"
        );
        let mut two = testing::request("/");
        two.headers_mut()
            .append(header::HOST, HeaderValue::from_static("admin"));
        let Ok(response) = service.clone().oneshot(two).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "two Host lines");
        let mut h2 = testing::request("http://web.shop/");
        *h2.version_mut() = Version::HTTP_2;
        let Ok(response) = service.oneshot(h2).await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "HTTP/2 with a Host that is not :authority"
        );
    }

    #[tokio::test]
    async fn none_forwards_the_path_untouched() {
        let service = layer(PathNormalization::None).layer(testing::uri_echo_service());
        let Ok(response) = service.oneshot(testing::request("/a/../b")).await;
        assert_eq!(testing::body_text(response).await, "/a/../b");
    }

    #[tokio::test]
    async fn a_method_not_in_upper_case_gets_400() {
        let service = layer(PathNormalization::Base).layer(testing::uri_echo_service());
        let mut request = testing::request("/");
        *request.method_mut() = http::Method::from_bytes(b"get").expect("method");
        let Ok(response) = service.oneshot(request).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn a_path_that_cannot_be_normalised_gets_400() {
        let service = layer(PathNormalization::Base).layer(testing::uri_echo_service());
        let Ok(response) = service.oneshot(testing::request("/a%00")).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            flags_of(&response),
            ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR
        );
    }
}
