//! `POST /v1/certificates`: an agent obtains only the identities of enrolled workloads on its
//! node; every refusal says why and is counted by reason.

use std::{net::SocketAddr, time::UNIX_EPOCH};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use nodemesh_identity::{
    SpiffeId,
    api::{CertificateApiRequest, CertificateApiResponse},
};

use super::{AgentApi, Body, Refusal, json, read_json};

impl AgentApi {
    pub(super) async fn certificates(
        &self,
        req: Request<Incoming>,
        node: &str,
        peer: SocketAddr,
    ) -> Response<Body> {
        let metrics = self.state.metrics();
        match self.issue(req, node).await {
            Ok((id, response)) => {
                metrics.certificates_signed.inc();
                tracing::info!(%peer, node, identity = %id, serial = %response.serial, "certificate issued");
                json(StatusCode::OK, &response)
            }
            Err(refusal) => {
                metrics
                    .certificates_refused
                    .with_label_values(&[refusal.reason])
                    .inc();
                tracing::warn!(%peer, node, reason = refusal.reason, "certificate refused: {}", refusal.message);
                refusal.response()
            }
        }
    }

    async fn issue(
        &self,
        req: Request<Incoming>,
        node: &str,
    ) -> Result<(SpiffeId, CertificateApiResponse), Refusal> {
        let request: CertificateApiRequest = read_json(req).await?;
        let id: SpiffeId = request
            .identity
            .parse()
            .map_err(|e: nodemesh_identity::SpiffeIdError| Refusal::bad_request(e.to_string()))?;
        self.state
            .authorize(node, &id)
            .map_err(|(reason, message)| Refusal::new(StatusCode::FORBIDDEN, reason, message))?;
        let issued = self
            .ca
            .sign_workload(&request.csr, &id, self.workload_ttl)
            .map_err(|e| Refusal::bad_request(e.to_string()))?;
        let response = CertificateApiResponse {
            certificate_chain: issued.chain_pem,
            trust_bundle: self.ca.bundle().to_pem(),
            serial: issued.serial,
            not_after_unix: issued
                .not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        Ok((id, response))
    }
}
