//! The registry's decisions, as pure functions of the configuration and of what the agent
//! holds: where a workload's network namespace comes from, and what to answer the CNI plugin.

use std::net::Ipv4Addr;

use nodemesh_cni::PodRequest;
use nodemesh_config::{ENROLLED_LABEL, MeshConfig, Workload};

use crate::netns::NetnsOrigin;

/// A namespace the agent holds for a workload it did not get a path for: handed over by the
/// CNI plugin, or found under /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffView<'a> {
    pub origin: &'a NetnsOrigin,
    /// The pod's uid, when the runtime (or the configuration, for /proc) gave it.
    pub uid: Option<&'a str>,
    /// The pod's addresses as the CNI plugin saw them.
    pub ips: &'a [Ipv4Addr],
}

/// What to do with a workload the configuration assigns to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Enroll it in the namespace found at `origin`, listening on `ip`.
    Enroll { origin: NetnsOrigin, ip: Ipv4Addr },
    /// Nothing to capture yet: no namespace (or no address) is known; the reason says what
    /// the agent waits for.
    Await(String),
    /// Something contradicts: refuse its traffic and say why.
    Fail(String),
}

/// Whether a handoff belongs to this incarnation of the workload: a pod recreated under the
/// same name has another uid, and the namespace of the old one is not its.
pub fn same_pod(workload: &Workload, handoff: &HandoffView<'_>) -> bool {
    match (workload.metadata.uid.as_deref(), handoff.uid) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// Where the namespace of `workload` comes from: a handoff of this pod first, then a path the
/// configuration names (only when `netns_from_config`, local mode).
pub fn plan(
    workload: &Workload,
    handoff: Option<&HandoffView<'_>>,
    netns_from_config: bool,
) -> Plan {
    if let Some(handoff) = handoff.filter(|h| same_pod(workload, h)) {
        let ip = match (workload.ip(), handoff.ips.first()) {
            (Some(ip), None) => ip,
            (Some(ip), Some(_)) if handoff.ips.contains(&ip) => ip,
            (Some(ip), Some(_)) => {
                return Plan::Fail(format!(
                    "the configuration gives address {ip}, but the pod's namespace ({}) has {:?}",
                    handoff.origin, handoff.ips
                ));
            }
            (None, Some(ip)) => *ip,
            (None, None) => {
                return Plan::Await(format!(
                    "its namespace ({}) is known but not its address",
                    handoff.origin
                ));
            }
        };
        return Plan::Enroll {
            origin: handoff.origin.clone(),
            ip,
        };
    }
    match (&workload.spec.netns, workload.ip()) {
        (Some(path), Some(ip)) if netns_from_config => Plan::Enroll {
            origin: NetnsOrigin::Path(path.clone()),
            ip,
        },
        (Some(path), _) if !netns_from_config => Plan::Await(format!(
            "the configuration names namespace {}, which this agent does not open \
             (--netns-from-config=false): it waits for the CNI plugin",
            path.display()
        )),
        _ if workload.metadata.uid.is_some() => Plan::Await(
            "waiting for the CNI plugin to hand its namespace over (or for one of its \
             processes, to find it under /proc)"
                .to_owned(),
        ),
        _ => Plan::Await("waiting for the CNI plugin to hand its namespace over".to_owned()),
    }
}

/// What the agent makes of a CNI ADD, given its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The pod belongs in the mesh here: take its namespace and enroll it.
    Enroll,
    /// The pod stays out of the mesh: its namespace is not enrolled, or it opts out.
    NotInMesh,
    /// The configuration does not know this pod yet (the controller may lag the runtime by a
    /// moment): wait for a snapshot that does.
    Wait,
    /// The pod cannot be enrolled here; the reason is for the runtime's log.
    Refuse(String),
}

/// Decides a CNI ADD for `pod` on `node`.
pub fn admit(mesh: &MeshConfig, node: &str, pod: &PodRequest) -> Admission {
    if let Some(namespace) = mesh.namespaces.get(&pod.namespace)
        && !namespace.enrolls_workloads()
    {
        return Admission::NotInMesh;
    }
    let key = format!("{}/{}", pod.namespace, pod.name);
    let Some(workload) = mesh.workloads.get(&key) else {
        return Admission::Wait;
    };
    if let (Some(known), Some(asked)) = (&workload.metadata.uid, &pod.uid)
        && known != asked
    {
        // The configuration still describes an earlier pod of that name.
        return Admission::Wait;
    }
    if workload.metadata.label(ENROLLED_LABEL) == Some("false") {
        return Admission::NotInMesh;
    }
    if !mesh.is_enrolled(workload) {
        return Admission::NotInMesh;
    }
    if workload.spec.node != node {
        return Admission::Refuse(format!(
            "the configuration assigns {key} to node {}, not to this node {node}",
            workload.spec.node
        ));
    }
    Admission::Enroll
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use nodemesh_cni::Command;

    use super::*;

    const NAMESPACES: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {nodemesh.dev/enabled: \"true\"}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n";

    fn mesh(workloads: &str) -> MeshConfig {
        nodemesh_config::load_str(
            Path::new("t.yaml"),
            &format!("{NAMESPACES}---\n{workloads}"),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn workload(meta: &str, spec: &str) -> String {
        format!(
            "apiVersion: nodemesh.dev/v1alpha1\nkind: Workload\nmetadata: {{namespace: shop, {meta}}}\nspec: {{node: n1, serviceAccount: web, {spec}}}\n"
        )
    }

    fn add(namespace: &str, name: &str, uid: Option<&str>) -> PodRequest {
        PodRequest {
            command: Command::Add,
            container_id: "c1".into(),
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.map(str::to_owned),
            ips: vec![Ipv4Addr::new(10, 0, 0, 9)],
            netns: None,
        }
    }

    fn cni(container: &str) -> NetnsOrigin {
        NetnsOrigin::Cni {
            container_id: container.into(),
        }
    }

    #[test]
    fn a_path_is_opened_only_in_local_mode() {
        let mesh = mesh(&workload(
            "name: web",
            "netns: /run/netns/web, ip: 10.0.0.9",
        ));
        let web = &mesh.workloads["shop/web"];
        assert_eq!(
            plan(web, None, true),
            Plan::Enroll {
                origin: NetnsOrigin::Path("/run/netns/web".into()),
                ip: Ipv4Addr::new(10, 0, 0, 9)
            }
        );
        assert!(
            matches!(plan(web, None, false), Plan::Await(why) if why.contains("does not open"))
        );
    }

    #[test]
    fn a_handoff_of_this_pod_wins_and_brings_the_address() {
        let mesh = mesh(&workload("name: web, uid: u-2", ""));
        let web = &mesh.workloads["shop/web"];
        let origin = cni("c9");
        let ips = [Ipv4Addr::new(10, 0, 0, 9)];
        let handoff = HandoffView {
            origin: &origin,
            uid: Some("u-2"),
            ips: &ips,
        };
        assert_eq!(
            plan(web, Some(&handoff), false),
            Plan::Enroll {
                origin: cni("c9"),
                ip: ips[0]
            }
        );
        let old = HandoffView {
            uid: Some("u-1"),
            ..handoff.clone()
        };
        assert!(
            matches!(plan(web, Some(&old), false), Plan::Await(_)),
            "an earlier pod's namespace is not this pod's"
        );
        assert!(matches!(plan(web, None, false), Plan::Await(why) if why.contains("/proc")));
    }

    #[test]
    fn an_address_the_namespace_does_not_have_is_refused() {
        let mesh = mesh(&workload("name: web", "ip: 10.0.0.7"));
        let origin = cni("c9");
        let ips = [Ipv4Addr::new(10, 0, 0, 9)];
        let handoff = HandoffView {
            origin: &origin,
            uid: None,
            ips: &ips,
        };
        assert!(matches!(
            plan(&mesh.workloads["shop/web"], Some(&handoff), false),
            Plan::Fail(why) if why.contains("10.0.0.7")
        ));
    }

    #[test]
    fn the_cni_plugin_is_answered_from_the_configuration() {
        let mesh = mesh(&format!(
            "{}---\n{}---\n{}",
            workload("name: web, uid: u-2", ""),
            workload("name: batch, labels: {nodemesh.dev/enabled: \"false\"}", ""),
            workload("name: far", "node: n2").replace("node: n1, ", ""),
        ));
        assert_eq!(
            admit(&mesh, "n1", &add("shop", "web", Some("u-2"))),
            Admission::Enroll
        );
        assert_eq!(
            admit(&mesh, "n1", &add("shop", "web", None)),
            Admission::Enroll,
            "runtimes that send no uid"
        );
        assert_eq!(
            admit(&mesh, "n1", &add("shop", "web", Some("u-3"))),
            Admission::Wait,
            "a newer pod than the configuration knows"
        );
        assert_eq!(
            admit(&mesh, "n1", &add("shop", "new", None)),
            Admission::Wait
        );
        assert_eq!(
            admit(&mesh, "n1", &add("shop", "batch", None)),
            Admission::NotInMesh
        );
        assert_eq!(
            admit(&mesh, "n1", &add("legacy", "x", None)),
            Admission::NotInMesh
        );
        assert_eq!(
            admit(&mesh, "n1", &add("unknown", "x", None)),
            Admission::Wait,
            "a namespace the configuration does not know yet"
        );
        assert!(matches!(
            admit(&mesh, "n1", &add("shop", "far", None)),
            Admission::Refuse(why) if why.contains("node n2")
        ));
    }
}
