//! Node-local delivery: a connection from one enrolled pod to another pod this agent serves
//! skips the tunnel. The outbound half hands the client's stream to the destination's side
//! (`destination`, as at the far end of a tunnel) in the same task, without TLS, HTTP/2 and a
//! TCP connection to itself.
//!
//! The client's identity is the one the tunnel would have proven: the connection was captured
//! in the source pod's namespace, which is how the agent knows whose certificate to present in
//! a tunnel too. Only a destination whose identity is the one the mesh expects, and which is
//! not draining, is delivered to here; any other goes by tunnel and fails or passes there.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use nodemesh_identity::SpiffeId;

use super::{
    PodContext, ProxyError, ProxyShared,
    destination::{self, Delivery},
};

/// The pods this agent serves, by address.
#[derive(Debug, Default)]
pub struct LocalPods(RwLock<HashMap<Ipv4Addr, Arc<PodContext>>>);

impl LocalPods {
    pub fn insert(&self, pod: Arc<PodContext>) {
        self.write().insert(pod.ip, pod);
    }

    /// Forgets the pod at `ip` if it is still `key` (a new pod may have the address already).
    pub fn remove(&self, ip: Ipv4Addr, key: &str) {
        let mut pods = self.write();
        if pods.get(&ip).is_some_and(|pod| pod.key == key) {
            pods.remove(&ip);
        }
    }

    /// The pod at `ip` to deliver a connection to in-process: served here, proving
    /// `identity`, and still accepting connections.
    pub(crate) fn destination(&self, ip: Ipv4Addr, identity: &SpiffeId) -> Option<Arc<PodContext>> {
        let pods = self.0.read().unwrap_or_else(|e| e.into_inner());
        pods.get(&ip)
            .filter(|pod| pod.identity == *identity && !pod.stop_accepting.is_cancelled())
            .cloned()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Ipv4Addr, Arc<PodContext>>> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Accepts a connection from `source`'s `client` to `dst` at the local `destination`, as its
/// tunnel's far end would.
pub(super) async fn accept(
    source: &PodContext,
    client: SocketAddr,
    dst: SocketAddr,
    destination: Arc<PodContext>,
    shared: &Arc<ProxyShared>,
) -> Result<Delivery, ProxyError> {
    destination::accept(destination, shared, client, dst, &source.identity, || None).await
}

/// How much an in-memory pipe to a local destination holds each way.
const PIPE_BUFFER: usize = 64 * 1024;

/// For a connection the proxy makes itself (an HTTP request's upstream): accepts it at the
/// local `destination` as [`accept`] does and carries it on its own task; returns the near end
/// of the pipe to it.
pub(crate) async fn pipe(
    source: &PodContext,
    client: SocketAddr,
    dst: SocketAddr,
    destination: Arc<PodContext>,
    shared: &Arc<ProxyShared>,
) -> Result<tokio::io::DuplexStream, ProxyError> {
    let delivery = accept(source, client, dst, destination, shared).await?;
    let (near, far) = tokio::io::duplex(PIPE_BUFFER);
    let shared = shared.clone();
    // The destination's record says how it ended; the near end sees it as its stream ending.
    tokio::spawn(async move { delivery.carry(far, &shared).await.map(drop) });
    Ok(near)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(account: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", account).expect("identity")
    }

    fn pod(key: &str, last: u8, account: &str) -> Arc<PodContext> {
        Arc::new(PodContext::for_tests(
            key,
            Ipv4Addr::new(10, 0, 0, last),
            id(account),
        ))
    }

    /// The key of the pod a connection to 10.0.0.`last` expecting `account` is delivered to.
    fn delivered_to(pods: &LocalPods, last: u8, account: &str) -> Option<String> {
        pods.destination(Ipv4Addr::new(10, 0, 0, last), &id(account))
            .map(|pod| pod.key.clone())
    }

    #[test]
    fn a_served_pod_with_the_expected_identity_is_delivered_to_in_process() {
        let pods = LocalPods::default();
        pods.insert(pod("default/web", 2, "web"));

        assert_eq!(
            delivered_to(&pods, 2, "web").as_deref(),
            Some("default/web")
        );
        assert_eq!(
            delivered_to(&pods, 3, "web"),
            None,
            "an address served elsewhere goes by tunnel"
        );
    }

    #[test]
    fn another_identity_than_the_mesh_expects_goes_by_tunnel() {
        let pods = LocalPods::default();
        pods.insert(pod("default/web", 2, "web"));

        assert_eq!(delivered_to(&pods, 2, "db"), None);
    }

    #[test]
    fn a_draining_pod_is_not_delivered_to() {
        let pods = LocalPods::default();
        let web = pod("default/web", 2, "web");
        pods.insert(web.clone());

        web.stop_accepting.cancel();

        assert_eq!(delivered_to(&pods, 2, "web"), None);
    }

    #[test]
    fn removing_a_pod_leaves_a_newer_one_at_its_address() {
        let pods = LocalPods::default();
        pods.insert(pod("default/old", 2, "web"));
        pods.insert(pod("default/new", 2, "web"));

        pods.remove(Ipv4Addr::new(10, 0, 0, 2), "default/old");
        assert_eq!(
            delivered_to(&pods, 2, "web").as_deref(),
            Some("default/new")
        );
        pods.remove(Ipv4Addr::new(10, 0, 0, 2), "default/new");
        assert_eq!(delivered_to(&pods, 2, "web"), None);
    }
}
