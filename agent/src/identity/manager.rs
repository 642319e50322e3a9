//! Keeps a valid certificate for every identity an enrolled workload of this node runs as.
//!
//! One task per identity fetches a certificate as soon as a workload with that identity is
//! enrolled, then renews it half-way through its life (spread over 45-55% so that renewals do
//! not bunch), retrying with backoff while the controller is unreachable. A certificate keeps
//! serving while it is valid, controller or not; once it has expired, the identity fails
//! closed: its connections are refused until a new certificate arrives. Certificates are kept
//! in the agent's state directory (key files 0600), so that an agent restarted while the
//! controller is away serves with the ones it had.

use std::{
    collections::HashMap,
    hash::{BuildHasher as _, RandomState},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use nodemesh_identity::{CertificateRequest, SpiffeId, TrustBundle, WorkloadCertificate, tls};
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};

use crate::controller_client::{ClientError, ControllerClient};
use crate::state::unix_millis;

/// How long a connection waits for its identity's first certificate.
const FIRST_CERTIFICATE_WAIT: Duration = Duration::from_secs(5);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot obtain a certificate for {id}: {source}")]
    Controller { id: String, source: ClientError },
    #[error("the controller's answer for {id} is unusable: {reason}")]
    BadAnswer { id: String, reason: String },
    #[error("no workload of this node runs as {0}")]
    NotManaged(String),
    #[error("no certificate for {0} yet; the controller has not answered")]
    NotYet(String),
    #[error(
        "the certificate for {id} expired {ago:?} ago and could not be renewed; its \
         connections are refused until the controller answers"
    )]
    Expired { id: String, ago: Duration },
}

/// A certificate in use, with what the proxy builds from it once.
#[derive(Debug)]
pub struct Identity {
    pub cert: WorkloadCertificate,
    pub bundle: TrustBundle,
    /// The HBONE server configuration presenting this certificate.
    pub server_config: Arc<rustls::ServerConfig>,
}

impl Identity {
    pub fn id(&self) -> &SpiffeId {
        self.cert.id()
    }

    /// An HBONE client configuration presenting this certificate and accepting only
    /// `expected` as the server.
    pub fn client_config(
        &self,
        expected: SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        tls::client_config(&self.cert, &self.bundle, expected)
            .map(Arc::new)
            .map_err(|e| IdentityError::BadAnswer {
                id: self.id().to_string(),
                reason: e.to_string(),
            })
    }
}

#[derive(Debug)]
struct Entry {
    workloads: usize,
    current: watch::Receiver<Option<Arc<Identity>>>,
    task: JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One identity as `/certs` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CertStatus {
    pub identity: String,
    pub workloads: usize,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_before_unix_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after_unix_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_to_expiry: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_roots: Option<usize>,
}

#[derive(Debug)]
pub struct IdentityManager {
    client: Arc<ControllerClient>,
    store: Arc<CertStore>,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
}

/// Certificates kept on disk, one JSON file per identity.
#[derive(Debug)]
struct CertStore {
    dir: std::path::PathBuf,
}

#[derive(Serialize, serde::Deserialize)]
struct Kept {
    chain: Vec<String>,
    key: String,
    bundle: Vec<String>,
}

impl CertStore {
    fn file(&self, id: &SpiffeId) -> std::path::PathBuf {
        let name: String = id
            .to_string()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{name}.json"))
    }

    /// The kept certificate of `id`, if there is one still valid.
    fn load(&self, id: &SpiffeId) -> Option<Identity> {
        let kept: Kept = serde_json::from_slice(&std::fs::read(self.file(id)).ok()?).ok()?;
        let cert = WorkloadCertificate::from_pem(id.clone(), &kept.chain, &kept.key).ok()?;
        if !cert.is_valid_at(SystemTime::now()) {
            return None;
        }
        let bundle = TrustBundle::from_pem(&kept.bundle.concat()).ok()?;
        let server_config = tls::server_config(&cert, &bundle).ok()?;
        Some(Identity {
            cert,
            bundle,
            server_config: Arc::new(server_config),
        })
    }

    fn save(&self, identity: &Identity) -> std::io::Result<()> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        std::fs::create_dir_all(&self.dir)?;
        let (chain, key) = identity.cert.to_pem();
        let kept = Kept {
            chain,
            key,
            bundle: identity.bundle.to_pem(),
        };
        let file = self.file(identity.id());
        let tmp = file.with_extension("json.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?
            .write_all(&serde_json::to_vec(&kept).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, &file)
    }
}

impl IdentityManager {
    /// Keeps certificates under `state_dir/certs`.
    pub fn new(client: Arc<ControllerClient>, state_dir: &std::path::Path) -> Self {
        Self {
            client,
            store: Arc::new(CertStore {
                dir: state_dir.join("certs"),
            }),
            entries: Mutex::default(),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A workload running as `id` was enrolled: keep a certificate for it.
    pub fn acquire(&self, id: SpiffeId) {
        let mut entries = self.entries();
        if let Some(entry) = entries.get_mut(&id) {
            entry.workloads += 1;
            return;
        }
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(keep_fresh(
            self.client.clone(),
            self.store.clone(),
            id.clone(),
            tx,
        ));
        entries.insert(
            id,
            Entry {
                workloads: 1,
                current: rx,
                task,
            },
        );
    }

    /// A workload running as `id` was released; the last one stops the renewals.
    pub fn release(&self, id: &SpiffeId) {
        let mut entries = self.entries();
        if let Some(entry) = entries.get_mut(id) {
            entry.workloads -= 1;
            if entry.workloads == 0 {
                entries.remove(id);
            }
        }
    }

    /// The valid certificate of `id`, waiting a little for the first one. Fails closed once
    /// the certificate has expired.
    pub async fn get(&self, id: &SpiffeId) -> Result<Arc<Identity>, IdentityError> {
        let mut current = self
            .entries()
            .get(id)
            .map(|e| e.current.clone())
            .ok_or_else(|| IdentityError::NotManaged(id.to_string()))?;
        let waited =
            tokio::time::timeout(FIRST_CERTIFICATE_WAIT, current.wait_for(Option::is_some)).await;
        let identity = match waited {
            Ok(Ok(identity)) => identity.clone(),
            _ => return Err(IdentityError::NotYet(id.to_string())),
        };
        let identity = identity.ok_or_else(|| IdentityError::NotYet(id.to_string()))?;
        let now = SystemTime::now();
        if !identity.cert.is_valid_at(now) {
            return Err(IdentityError::Expired {
                id: id.to_string(),
                ago: now
                    .duration_since(identity.cert.not_after())
                    .unwrap_or_default(),
            });
        }
        Ok(identity)
    }

    /// Every managed identity, for `/certs`.
    pub fn status(&self) -> Vec<CertStatus> {
        let now = SystemTime::now();
        let mut all: Vec<CertStatus> = self
            .entries()
            .iter()
            .map(|(id, entry)| {
                let current = entry.current.borrow().clone();
                let state = match &current {
                    None => "pending",
                    Some(i) if i.cert.is_valid_at(now) => "valid",
                    Some(_) => "expired",
                };
                CertStatus {
                    identity: id.to_string(),
                    workloads: entry.workloads,
                    state,
                    serial: current.as_ref().map(|i| i.cert.serial().to_owned()),
                    not_before_unix_ms: current.as_ref().map(|i| unix_millis(i.cert.not_before())),
                    not_after_unix_ms: current.as_ref().map(|i| unix_millis(i.cert.not_after())),
                    seconds_to_expiry: current.as_ref().map(|i| {
                        match i.cert.not_after().duration_since(now) {
                            Ok(left) => left.as_secs() as i64,
                            Err(past) => -(past.duration().as_secs() as i64),
                        }
                    }),
                    trust_roots: current.as_ref().map(|i| i.bundle.roots().len()),
                }
            })
            .collect();
        all.sort_by(|a, b| a.identity.cmp(&b.identity));
        all
    }
}

/// A number in [0, 1) that differs between calls, for spreading renewals and retries.
fn spread() -> f64 {
    (RandomState::new().hash_one(SystemTime::now()) >> 11) as f64 / (1u64 << 53) as f64
}

async fn fetch(client: &ControllerClient, id: &SpiffeId) -> Result<Identity, IdentityError> {
    let bad = |reason: String| IdentityError::BadAnswer {
        id: id.to_string(),
        reason,
    };
    let request = CertificateRequest::new(id.clone()).map_err(|e| bad(e.to_string()))?;
    let answer = client
        .sign(&request)
        .await
        .map_err(|source| IdentityError::Controller {
            id: id.to_string(),
            source,
        })?;
    let bundle = TrustBundle::from_pem(&answer.trust_bundle.concat()).map_err(bad)?;
    let cert = request
        .complete(&answer.certificate_chain)
        .map_err(|e| bad(e.to_string()))?;
    let server_config = tls::server_config(&cert, &bundle).map_err(|e| bad(e.to_string()))?;
    Ok(Identity {
        cert,
        bundle,
        server_config: Arc::new(server_config),
    })
}

async fn keep_fresh(
    client: Arc<ControllerClient>,
    store: Arc<CertStore>,
    id: SpiffeId,
    current: watch::Sender<Option<Arc<Identity>>>,
) {
    if let Some(kept) = store.load(&id) {
        tracing::info!(identity = %id, serial = kept.cert.serial(), "serving with the certificate kept by the last run");
        let renew_at = kept.cert.renew_at(spread());
        current.send_replace(Some(Arc::new(kept)));
        tokio::time::sleep(
            renew_at
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        )
        .await;
    }
    let mut retry = RETRY_MIN;
    loop {
        match fetch(&client, &id).await {
            Ok(identity) => {
                tracing::info!(
                    identity = %id,
                    serial = identity.cert.serial(),
                    expires_in_s = identity
                        .cert
                        .not_after()
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .as_secs(),
                    "certificate obtained"
                );
                let renew_at = identity.cert.renew_at(spread());
                if let Err(e) = store.save(&identity) {
                    tracing::warn!(identity = %id, error = %e, "cannot keep the certificate for the next start");
                }
                current.send_replace(Some(Arc::new(identity)));
                retry = RETRY_MIN;
                let wait = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                let expired = current
                    .borrow()
                    .as_ref()
                    .is_some_and(|i| !i.cert.is_valid_at(SystemTime::now()));
                if expired {
                    tracing::error!(
                        identity = %id,
                        "certificate expired and cannot be renewed, connections of this identity are refused: {e}"
                    );
                } else {
                    tracing::warn!(identity = %id, retry_in_s = retry.as_secs(), "cannot obtain a certificate: {e}");
                }
                tokio::time::sleep(retry.mul_f64(0.8 + 0.4 * spread())).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}
