//! Which replica writes status: the holder of a `coordination.k8s.io` Lease, elected as
//! client-go elects (lease 15 s, renewed every 2 s, given up after 10 s without a renewal).
//! Every replica serves agents and signs certificates; only status and Events need one
//! writer, or replicas would undo each other's timestamps.
//!
//! A replica trusts its own clock only: another holder's lease counts as expired once the
//! record has not changed for the lease's duration, whatever times it holds.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The Lease's name, in the controller's namespace.
pub const LEASE_NAME: &str = "nodemesh-controller";
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// The lease as last seen, and when (by this replica's clock) it last changed.
#[derive(Debug, Default)]
struct Observed {
    spec: Option<LeaseSpec>,
    at: Option<Instant>,
}

impl Observed {
    /// The outcome of writing the lease: this replica leads with what it wrote, or another
    /// wrote first (409) and it follows.
    fn written(&mut self, result: kube::Result<Lease>) -> kube::Result<Round> {
        match result {
            Ok(lease) => {
                self.spec = lease.spec;
                self.at = Some(Instant::now());
                Ok(Round::Leading)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Round::Following),
            Err(e) => Err(e),
        }
    }
}

/// What one round of trying decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    Leading,
    Following,
}

/// Tries once to take or keep the lease.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    me: &str,
    observed: &mut Observed,
) -> kube::Result<Round> {
    let now = MicroTime(Timestamp::now());
    let seconds = LEASE_DURATION.as_secs() as i32;
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_owned()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        let written = api.create(&PostParams::default(), &lease).await;
        return observed.written(written);
    };
    let old = lease.spec.clone().unwrap_or_default();
    if observed.spec.as_ref() != Some(&old) {
        observed.spec = Some(old.clone());
        observed.at = Some(Instant::now());
    }
    let holder = old.holder_identity.as_deref().unwrap_or("");
    let duration = old
        .lease_duration_seconds
        .map_or(LEASE_DURATION, |s| Duration::from_secs(s.max(0) as u64));
    let held_by_other =
        !holder.is_empty() && holder != me && observed.at.is_some_and(|at| at.elapsed() < duration);
    if held_by_other {
        return Ok(Round::Following);
    }
    let mine = holder == me;
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(me.to_owned()),
        lease_duration_seconds: Some(seconds),
        acquire_time: if mine {
            old.acquire_time
        } else {
            Some(now.clone())
        },
        renew_time: Some(now),
        lease_transitions: Some(old.lease_transitions.unwrap_or(0) + i32::from(!mine)),
        ..LeaseSpec::default()
    });
    // The resourceVersion read is sent back: a concurrent writer makes this a 409.
    let written = api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await;
    observed.written(written)
}

/// Runs the election until `stop`; `leading` says whether this replica writes status.
pub async fn elect(
    client: Client,
    namespace: String,
    me: String,
    leading: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut observed = Observed::default();
    let mut last_renewal: Option<Instant> = None;
    let mut failing = false;
    loop {
        // A call that hangs (kube sets no read timeout) must not keep a leader leading.
        let round = tokio::time::timeout(
            RENEW_DEADLINE,
            try_acquire_or_renew(&api, &me, &mut observed),
        )
        .await
        .unwrap_or_else(|_| {
            Err(kube::Error::Service(
                format!("no answer within {RENEW_DEADLINE:?}").into(),
            ))
        });
        if round.is_ok() {
            failing = false;
        }
        match round {
            Ok(Round::Leading) => {
                if !*leading.borrow() {
                    tracing::info!(lease = %format!("{namespace}/{LEASE_NAME}"), "elected: this replica writes status");
                }
                last_renewal = Some(Instant::now());
                leading.send_replace(true);
            }
            Ok(Round::Following) => {
                if *leading.borrow() {
                    tracing::warn!("another replica holds the lease now; no longer writing status");
                }
                last_renewal = None;
                leading.send_replace(false);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        error = %e,
                        "cannot reach the lease (does the controller's Role allow get, create \
                         and update of leases?)"
                    );
                    failing = true;
                }
                if last_renewal.is_some_and(|t| t.elapsed() >= RENEW_DEADLINE) {
                    tracing::warn!("lease not renewed in time; no longer writing status");
                    last_renewal = None;
                    leading.send_replace(false);
                }
            }
        }
        let jitter =
            Duration::from_millis(fastrand::u64(0..=(RETRY_PERIOD.as_millis() as u64 / 5)));
        if stop
            .run_until_cancelled(tokio::time::sleep(RETRY_PERIOD + jitter))
            .await
            .is_none()
        {
            if *leading.borrow() {
                release(&api, &me).await;
                leading.send_replace(false);
            }
            return;
        }
    }
}

/// Gives the lease up on a clean stop, so that another replica takes over at once rather
/// than after the lease's duration (client-go's ReleaseOnCancel).
async fn release(api: &Api<Lease>, me: &str) {
    let Ok(Some(mut lease)) = api.get_opt(LEASE_NAME).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    let now = MicroTime(Timestamp::now());
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.acquire_time = Some(now.clone());
    spec.renew_time = Some(now);
    match api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => tracing::info!("lease released"),
        Err(e) => tracing::warn!(error = %e, "cannot release the lease; it expires by itself"),
    }
}
