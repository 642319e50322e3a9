//! Which node an agent runs on, in Kubernetes, without a shared secret: the agent presents
//! its projected ServiceAccount token (audience `nodemesh`); the API server's TokenReview
//! says whose it is; it must be the agent's ServiceAccount's, bound to a pod of it, and that
//! pod's node is the agent's node. A token of another node's agent can therefore only ever
//! obtain that node's identities.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};

use super::cluster::{Cluster, Kind};

/// The extra fields the API server puts in a review of a pod-bound token.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// How long a token's review is reused (projected tokens live an hour and more).
const CACHE_FOR: Duration = Duration::from_secs(60);
/// How long a refused token is refused without asking the API server again: a client
/// sending junk must not make the controller send a TokenReview per request.
const REFUSED_FOR: Duration = Duration::from_secs(10);
/// Reviews kept at most: one per agent, with room for rotation.
const CACHE_SIZE: usize = 4096;

/// Why a token is refused; the text says what to check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error("the API server does not accept the token: {0}")]
    NotAuthenticated(String),
    #[error(
        "the token is not for audience {wanted:?} (it is for {got:?}); mount a projected token \
         with audience {wanted:?}"
    )]
    Audience { wanted: String, got: Vec<String> },
    #[error("the token belongs to {user}, not to the agent's ServiceAccount {agent}")]
    NotTheAgent { user: String, agent: String },
    #[error(
        "the token is not bound to a pod; use a projected ServiceAccount token (the pod's \
         own volume), not a long-lived Secret"
    )]
    Unbound,
    #[error("the token's pod {pod} is not an agent pod the controller knows ({reason})")]
    UnknownPod { pod: String, reason: String },
    #[error("cannot ask the API server to review the token: {0}")]
    Api(String),
}

/// Reviews by the token's SHA-256: the node, or why the token was refused, and when.
type ReviewCache = HashMap<[u8; 32], (Result<String, ReviewError>, Instant)>;

/// Reviews agents' tokens through the API server.
pub struct TokenReviewer {
    client: Client,
    audience: String,
    /// `namespace`, `name` of the agents' ServiceAccount.
    agent: (String, String),
    cluster: Arc<Cluster>,
    /// By the token's SHA-256: the node, or why it was refused, and when.
    cache: Mutex<ReviewCache>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub fn new(
        client: Client,
        audience: String,
        agent: (String, String),
        cluster: Arc<Cluster>,
    ) -> Self {
        Self {
            client,
            audience,
            agent,
            cluster,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The node of the agent whose token this is.
    pub async fn node_of(&self, token: &str) -> Result<String, ReviewError> {
        let digest: [u8; 32] =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes())
                .as_ref()
                .try_into()
                .unwrap_or([0; 32]);
        if let Some((verdict, at)) = self.cache().get(&digest) {
            let fresh = match verdict {
                Ok(_) => at.elapsed() < CACHE_FOR,
                Err(_) => at.elapsed() < REFUSED_FOR,
            };
            if fresh {
                return verdict.clone();
            }
        }
        let review = TokenReview {
            metadata: Default::default(),
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            status: None,
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        // The API server unreachable is no verdict on the token: not remembered.
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError::Api(e.to_string()))?;
        let verdict = self.judge(&reviewed);
        if matches!(verdict, Err(ReviewError::UnknownPod { .. }))
            && self.cluster.listing(Kind::Pod) == super::cluster::Listing::Pending
        {
            return Err(ReviewError::Api(
                "the controller is still listing the cluster's pods; try again".to_owned(),
            ));
        }
        let mut cache = self.cache();
        if cache.len() >= CACHE_SIZE {
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_FOR);
        }
        if cache.len() < CACHE_SIZE {
            cache.insert(digest, (verdict.clone(), Instant::now()));
        }
        verdict
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ReviewCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a review says: the node, or why the token is no agent's.
    fn judge(&self, review: &TokenReview) -> Result<String, ReviewError> {
        let status = review.status.clone().unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(ReviewError::NotAuthenticated(
                status
                    .error
                    .unwrap_or_else(|| "not authenticated".to_owned()),
            ));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(ReviewError::Audience {
                wanted: self.audience.clone(),
                got: audiences,
            });
        }
        let user = status.user.unwrap_or_default();
        let (agent_ns, agent_sa) = &self.agent;
        let agent = format!("system:serviceaccount:{agent_ns}:{agent_sa}");
        let username = user.username.unwrap_or_default();
        if username != agent {
            return Err(ReviewError::NotTheAgent {
                user: username,
                agent,
            });
        }
        let extra = user.extra.unwrap_or_default();
        let one = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (one(POD_NAME), one(POD_UID)) else {
            return Err(ReviewError::Unbound);
        };
        let pod_key = format!("{agent_ns}/{pod_name}");
        let unknown = |reason: &str| ReviewError::UnknownPod {
            pod: pod_key.clone(),
            reason: reason.to_owned(),
        };
        let pod = self
            .cluster
            .get(Kind::Pod, &pod_key)
            .ok_or_else(|| unknown("not among the cluster's pods"))?;
        if pod["metadata"]["uid"].as_str() != Some(pod_uid.as_str()) {
            return Err(unknown("another pod of that name runs now"));
        }
        if pod["spec"]["serviceAccountName"].as_str() != Some(agent_sa.as_str()) {
            return Err(unknown("it does not run as the agents' ServiceAccount"));
        }
        let node = pod["spec"]["nodeName"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| unknown("it is not scheduled"))?;
        if let Some(claimed) = one(NODE_NAME)
            && claimed != node
        {
            return Err(unknown(&format!(
                "the token says node {claimed}, the pod runs on {node}"
            )));
        }
        if self.cluster.get(Kind::Node, node).is_none() {
            return Err(unknown(&format!(
                "its node {node} is not among the cluster's nodes"
            )));
        }
        Ok(node.to_owned())
    }
}
