//! Authorization of each request at the destination: the pod's AuthorizationPolicies judge its
//! HTTP attributes; a denied request gets 403 naming the policy, flag `RBAC`.

use std::sync::Arc;

use http::{StatusCode, header};
use nodemesh_policy::{Decision, HttpAttributes};

use super::{
    HttpRequest, HttpResponse, ResponseFlags,
    filter::{FilterLayer, HttpFilter, Inner},
    local_reply,
};

/// Judges requests for one connection's peer and destination port.
pub trait Judge: Send + Sync + std::fmt::Debug {
    fn decide(&self, http: &HttpAttributes) -> Decision;
}

/// The judge of a connection's requests, set per connection.
#[derive(Debug, Clone)]
pub struct Judging(pub Arc<dyn Judge>);

#[derive(Debug, Clone, Default)]
pub struct Authz;

pub type AuthzLayer = FilterLayer<Authz>;

/// A request's attributes as policies see them: `:authority` as sent (port included), every
/// header line with its value as bytes, the path as normalisation left it.
pub fn attributes(req: &HttpRequest) -> HttpAttributes {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        });
    let scheme = req
        .uri()
        .scheme_str()
        .map(str::to_owned)
        .or_else(|| Some("http".to_owned()));
    HttpAttributes {
        method: req.method().as_str().to_owned(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().map(str::to_owned),
        authority,
        scheme,
        headers: req
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect(),
    }
}

impl HttpFilter for Authz {
    async fn filter<S: Inner>(&self, inner: &S, req: HttpRequest) -> HttpResponse {
        let Some(Judging(judge)) = req.extensions().get::<Judging>().cloned() else {
            return local_reply(
                StatusCode::FORBIDDEN,
                ResponseFlags::RBAC,
                "RBAC: access denied: the request reached authorization without a judge",
            );
        };
        let decision = judge.decide(&attributes(&req));
        if !decision.allowed {
            let by = decision.denied_by().unwrap_or_default();
            return local_reply(
                StatusCode::FORBIDDEN,
                ResponseFlags::RBAC,
                format!("RBAC: access denied by {by}"),
            );
        }
        inner.handle(req).await
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use nodemesh_policy::{Peer, Request, TrustDomains, WorkloadPolicies};
    use tower::{Layer as _, ServiceExt as _};

    use super::*;
    use crate::proxy::http::{flags_of, testing};

    /// Judges with policies as the destination's proxy would, for one peer.
    #[derive(Debug)]
    struct Policies(WorkloadPolicies, Peer);

    impl Judge for Policies {
        fn decide(&self, http: &HttpAttributes) -> Decision {
            self.0.decide(&Request {
                peer: &self.1,
                destination_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
                destination_port: 8080,
                sni: None,
                http: Some(http),
            })
        }
    }

    fn judging(yaml: &str) -> Judging {
        let policy: nodemesh_config::AuthorizationPolicy =
            serde_yaml::from_str(yaml).expect("policy");
        let peer = Peer::authenticated(
            "spiffe://cluster.local/ns/shop/sa/frontend",
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        );
        let trust = TrustDomains::new("cluster.local", &[]);
        Judging(Arc::new(Policies(
            WorkloadPolicies::new([&policy], &trust),
            peer,
        )))
    }

    const GET_PUBLIC: &str = "apiVersion: security.nodemesh.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: public, namespace: shop}\nspec:\n  action: ALLOW\n  rules:\n  - to: [{operation: {methods: [GET], paths: [\"/public/*\"]}}]\n";

    #[tokio::test]
    async fn an_allowed_request_goes_on_and_a_denied_one_gets_403_naming_the_policy() {
        let service = AuthzLayer::default().layer(testing::status_service(200));
        let mut allowed = testing::request("/public/x");
        allowed.extensions_mut().insert(judging(GET_PUBLIC));
        let Ok(response) = service.clone().oneshot(allowed).await;
        assert_eq!(response.status(), StatusCode::OK);

        let mut denied = testing::request("/private");
        denied.extensions_mut().insert(judging(GET_PUBLIC));
        let Ok(response) = service.oneshot(denied).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(flags_of(&response), ResponseFlags::RBAC);
        let body = testing::body_text(response).await;
        assert!(body.contains("AuthorizationPolicy shop/public"), "{body}");
    }

    #[tokio::test]
    async fn without_a_judge_nothing_passes() {
        let service = AuthzLayer::default().layer(testing::status_service(200));
        let Ok(response) = service.oneshot(testing::request("/")).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "fails closed");
    }
}
