//! The objects of the manifests: the namespace, the controller and the agent, with what each
//! may do and why.

use serde_json::{Value, json};

use super::{IMAGE, NAMESPACE};

fn labels(component: &str) -> Value {
    json!({ "app.kubernetes.io/name": "nodemesh", "app.kubernetes.io/component": component })
}

pub(super) fn namespace() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": NAMESPACE, "labels": { "app.kubernetes.io/name": "nodemesh" } },
    })
}

fn env_from_field(name: &str, path: &str) -> Value {
    json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": path } } })
}

pub(super) fn controller() -> Vec<Value> {
    let read = ["get", "list", "watch"];
    vec![
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": { "name": "nodemesh-controller", "namespace": NAMESPACE, "labels": labels("controller") },
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": { "name": "nodemesh-controller", "labels": labels("controller") },
            "rules": [
                // The mesh's view of the cluster.
                { "apiGroups": [""], "resources": ["namespaces", "pods", "services", "nodes"], "verbs": read },
                { "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read },
                { "apiGroups": ["security.nodemesh.dev"], "resources": ["authorizationpolicies", "peerauthentications"], "verbs": read },
                { "apiGroups": ["nodemesh.dev"], "resources": ["meshsettings"], "verbs": read },
                { "apiGroups": ["policy.nodemesh.dev"], "resources": ["backendtrafficpolicies"], "verbs": read },
                { "apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes"], "verbs": read },
                // What became of each object.
                { "apiGroups": ["security.nodemesh.dev"], "resources": ["authorizationpolicies/status", "peerauthentications/status"], "verbs": ["patch"] },
                { "apiGroups": ["nodemesh.dev"], "resources": ["meshsettings/status"], "verbs": ["patch"] },
                { "apiGroups": ["policy.nodemesh.dev"], "resources": ["backendtrafficpolicies/status"], "verbs": ["patch"] },
                { "apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes/status"], "verbs": ["patch"] },
                { "apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"] },
                // Which node an agent's token belongs to.
                { "apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"] },
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": { "name": "nodemesh-controller", "labels": labels("controller") },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "nodemesh-controller" },
            "subjects": [{ "kind": "ServiceAccount", "name": "nodemesh-controller", "namespace": NAMESPACE }],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": { "name": "nodemesh-controller", "namespace": NAMESPACE, "labels": labels("controller") },
            "rules": [
                // Only its own Secret, Lease and ConfigMap; creating cannot be limited by name.
                { "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["nodemesh-ca"], "verbs": ["get"] },
                { "apiGroups": [""], "resources": ["secrets"], "verbs": ["create"] },
                { "apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["nodemesh-root-ca"], "verbs": ["get", "update"] },
                { "apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"] },
                { "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["nodemesh-controller"], "verbs": ["get", "update"] },
                { "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"] },
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": { "name": "nodemesh-controller", "namespace": NAMESPACE, "labels": labels("controller") },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "nodemesh-controller" },
            "subjects": [{ "kind": "ServiceAccount", "name": "nodemesh-controller", "namespace": NAMESPACE }],
        }),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": "nodemesh-controller", "namespace": NAMESPACE, "labels": labels("controller") },
            "spec": {
                // Any replica serves agents and signs; the one holding the Lease writes status.
                "replicas": 2,
                "selector": { "matchLabels": labels("controller") },
                "template": {
                    "metadata": { "labels": labels("controller") },
                    "spec": {
                        "serviceAccountName": "nodemesh-controller",
                        "affinity": { "podAntiAffinity": { "preferredDuringSchedulingIgnoredDuringExecution": [{
                            "weight": 100,
                            "podAffinityTerm": {
                                "labelSelector": { "matchLabels": labels("controller") },
                                "topologyKey": "kubernetes.io/hostname",
                            },
                        }]}},
                        "containers": [{
                            "name": "controller",
                            "image": IMAGE,
                            "command": ["/usr/local/bin/nodemesh-controller"],
                            "args": ["--source", "kubernetes", "--log-json"],
                            "env": [
                                env_from_field("POD_NAME", "metadata.name"),
                                env_from_field("POD_NAMESPACE", "metadata.namespace"),
                            ],
                            "ports": [
                                { "name": "monitoring", "containerPort": 15014 },
                                { "name": "certificates", "containerPort": 15012 },
                            ],
                            "readinessProbe": { "httpGet": { "path": "/readyz", "port": 15014 } },
                            "livenessProbe": { "httpGet": { "path": "/healthz", "port": 15014 }, "initialDelaySeconds": 5 },
                            "resources": {
                                "requests": { "cpu": "20m", "memory": "48Mi" },
                                "limits": { "memory": "512Mi" },
                            },
                            "securityContext": {
                                "runAsNonRoot": true,
                                "runAsUser": 65532,
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "capabilities": { "drop": ["ALL"] },
                                "seccompProfile": { "type": "RuntimeDefault" },
                            },
                        }],
                    },
                },
            },
        }),
        json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": { "name": "nodemesh-controller", "namespace": NAMESPACE, "labels": labels("controller") },
            "spec": { "minAvailable": 1, "selector": { "matchLabels": labels("controller") } },
        }),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": "nodemesh-controller", "namespace": NAMESPACE, "labels": labels("controller") },
            "spec": {
                "selector": labels("controller"),
                "ports": [
                    { "name": "certificates", "port": 15012, "targetPort": 15012 },
                    { "name": "monitoring", "port": 15014, "targetPort": 15014 },
                ],
            },
        }),
    ]
}

fn host_path(name: &str, path: &str, kind: &str) -> Value {
    json!({ "name": name, "hostPath": { "path": path, "type": kind } })
}

pub(super) fn agent() -> Vec<Value> {
    let excluded = format!("kube-system,{NAMESPACE}");
    vec![
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": { "name": "nodemesh-agent", "namespace": NAMESPACE, "labels": labels("agent") },
            // Its token is projected with nodemesh's audience instead; no API access at all.
            "automountServiceAccountToken": false,
        }),
        json!({
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": { "name": "nodemesh-agent", "namespace": NAMESPACE, "labels": labels("agent") },
            "spec": {
                "selector": { "matchLabels": labels("agent") },
                "updateStrategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 1 } },
                "template": {
                    "metadata": { "labels": labels("agent") },
                    "spec": {
                        "serviceAccountName": "nodemesh-agent",
                        "automountServiceAccountToken": false,
                        // The agent's own sockets (the controller, other nodes, probes) live
                        // in the node's network; each pod's are made in the pod's.
                        "hostNetwork": true,
                        "dnsPolicy": "ClusterFirstWithHostNet",
                        "priorityClassName": "system-node-critical",
                        // Beyond the agent's own drain (--drain-seconds, 30 by default).
                        "terminationGracePeriodSeconds": 40,
                        "tolerations": [{ "operator": "Exists" }],
                        "initContainers": [{
                            // Pins must be on the host's bpffs to outlive the agent's
                            // container; only this step needs privilege, to mount it there.
                            "name": "mount-bpffs",
                            "image": IMAGE,
                            "command": ["/bin/sh", "-c", "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf"],
                            "securityContext": { "privileged": true },
                            "volumeMounts": [
                                { "name": "bpf", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional" },
                            ],
                        }, {
                            "name": "install-cni",
                            "image": IMAGE,
                            "command": [
                                "/usr/local/bin/nodemesh-cni", "install",
                                "--cni-bin-dir", "/host/opt/cni/bin",
                                "--cni-conf-dir", "/host/etc/cni/net.d",
                                "--agent-socket", "/var/run/nodemesh/cni.sock",
                                "--exclude-namespaces", excluded,
                            ],
                            "securityContext": { "runAsUser": 0, "allowPrivilegeEscalation": false, "capabilities": { "drop": ["ALL"] } },
                            "volumeMounts": [
                                { "name": "cni-bin", "mountPath": "/host/opt/cni/bin" },
                                { "name": "cni-conf", "mountPath": "/host/etc/cni/net.d" },
                            ],
                        }],
                        "containers": [{
                            "name": "agent",
                            "image": IMAGE,
                            "command": ["/usr/local/bin/nodemesh-agent"],
                            "args": [
                                "--state-dir", "/var/lib/nodemesh/agent",
                                "--ebpf-object", "/usr/local/lib/nodemesh/nodemesh-ebpf.o",
                                "--controller", "https://nodemesh-controller.nodemesh-system.svc:15012",
                                "--controller-ca", "/etc/nodemesh/roots/ca-cert.pem",
                                "--token-file", "/var/run/secrets/nodemesh/token",
                                "--netns-from-config", "false",
                                "--cni-socket", "/var/run/nodemesh/cni.sock",
                                "--cni-conf-dir", "/host/etc/cni/net.d",
                                "--cni-exclude-namespaces", excluded,
                                "--proc-root", "/host/proc",
                                "--log-format", "json",
                            ],
                            "env": [env_from_field("NODE_NAME", "spec.nodeName")],
                            "ports": [
                                { "name": "metrics", "containerPort": 15020 },
                                { "name": "readiness", "containerPort": 15021 },
                            ],
                            "readinessProbe": { "httpGet": { "path": "/healthz/ready", "port": 15021 } },
                            "resources": {
                                "requests": { "cpu": "50m", "memory": "32Mi" },
                                "limits": { "memory": "1Gi" },
                            },
                            "securityContext": {
                                "privileged": false,
                                "runAsUser": 0,
                                "capabilities": {
                                    "drop": ["ALL"],
                                    // BPF: load the capture programs, pin them; NET_ADMIN:
                                    // attach them (cgroup, sock_ops, sk_lookup), routing rules
                                    // in pods, SO_MARK and IP_TRANSPARENT; SYS_ADMIN: enter
                                    // pods' network namespaces; SYS_PTRACE: open the namespaces
                                    // of other users' processes under /proc. (Raising the
                                    // open-file limit to its hard limit needs nothing more; eBPF
                                    // memory is charged to the cgroup, not RLIMIT_MEMLOCK.)
                                    "add": ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"],
                                },
                                // eBPF and setns are not in the runtime's default profile.
                                "seccompProfile": { "type": "Unconfined" },
                                "appArmorProfile": { "type": "Unconfined" },
                            },
                            "volumeMounts": [
                                { "name": "state", "mountPath": "/var/lib/nodemesh/agent" },
                                { "name": "roots", "mountPath": "/etc/nodemesh/roots", "readOnly": true },
                                { "name": "token", "mountPath": "/var/run/secrets/nodemesh", "readOnly": true },
                                { "name": "cgroup", "mountPath": "/sys/fs/cgroup" },
                                // The pinned datapath outlives the container: a restarted agent
                                // takes it over, and capture never lapses in between.
                                { "name": "bpf", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer" },
                                { "name": "proc", "mountPath": "/host/proc", "readOnly": true },
                                { "name": "run", "mountPath": "/var/run/nodemesh" },
                                { "name": "cni-conf", "mountPath": "/host/etc/cni/net.d" },
                            ],
                        }],
                        "volumes": [
                            host_path("state", "/var/lib/nodemesh/agent", "DirectoryOrCreate"),
                            { "name": "roots", "configMap": { "name": "nodemesh-root-ca" } },
                            { "name": "token", "projected": { "sources": [{ "serviceAccountToken": {
                                "audience": "nodemesh", "expirationSeconds": 3600, "path": "token",
                            }}]}},
                            host_path("cgroup", "/sys/fs/cgroup", "Directory"),
                            host_path("bpf", "/sys/fs/bpf", "Directory"),
                            host_path("proc", "/proc", "Directory"),
                            host_path("run", "/var/run/nodemesh", "DirectoryOrCreate"),
                            host_path("cni-bin", "/opt/cni/bin", "DirectoryOrCreate"),
                            host_path("cni-conf", "/etc/cni/net.d", "DirectoryOrCreate"),
                        ],
                    },
                },
            },
        }),
    ]
}
