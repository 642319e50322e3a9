//! The sandbox's network: namespaces, veth pairs, a bridge between nodes, addresses, routes.
//! Made with iproute2, the tool operators use to inspect it afterwards.

use std::{fs::File, process::Command};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

use crate::layout::{Layout, netns_path};

/// Runs `ip` with `args`; the error carries the command and what ip printed.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `ip -n <netns> <args>`.
fn ip_in(netns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    ip(&full).map(drop)
}

fn sysctl_in(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let setting = format!("{key}={value}");
    let output = Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-qw", &setting])
        .output()
        .context("cannot run `ip netns exec ... sysctl`")?;
    if !output.status.success() {
        bail!(
            "cannot set {setting} in {netns}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn add_netns(name: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])
}

/// Creates the whole network of a sandbox.
pub fn create(layout: &Layout) -> anyhow::Result<()> {
    let fabric = layout.fabric_netns();
    add_netns(&fabric)?;
    ip_in(&fabric, &["link", "add", "br0", "type", "bridge"])?;
    ip_in(&fabric, &["link", "set", "br0", "up"])?;
    ip_in(
        &fabric,
        &[
            "addr",
            "add",
            &format!("{}/24", layout.fabric_ip()),
            "dev",
            "br0",
        ],
    )?;
    let nodes = layout.all_nodes();
    for node in &nodes {
        let port = format!("{}-up", node.name);
        add_netns(&node.netns)?;
        ip_in(
            &node.netns,
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &fabric,
            ],
        )?;
        ip_in(&fabric, &["link", "set", &port, "master", "br0", "up"])?;
        ip_in(
            &node.netns,
            &["addr", "add", &format!("{}/24", node.ip), "dev", "eth0"],
        )?;
        ip_in(&node.netns, &["link", "set", "eth0", "up"])?;
        sysctl_in(&node.netns, "net.ipv4.ip_forward", "1")?;
        for pod in layout.pods_of(node) {
            let gateway = pod.gateway.to_string();
            add_netns(&pod.netns)?;
            ip_in(
                &node.netns,
                &[
                    "link",
                    "add",
                    &pod.host_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    &pod.netns,
                ],
            )?;
            ip_in(
                &node.netns,
                &["addr", "add", &format!("{gateway}/32"), "dev", &pod.host_if],
            )?;
            ip_in(&node.netns, &["link", "set", &pod.host_if, "up"])?;
            ip_in(
                &node.netns,
                &[
                    "route",
                    "add",
                    &format!("{}/32", pod.ip),
                    "dev",
                    &pod.host_if,
                ],
            )?;
            ip_in(
                &pod.netns,
                &["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"],
            )?;
            ip_in(&pod.netns, &["link", "set", "eth0", "up"])?;
            ip_in(&pod.netns, &["route", "add", &gateway, "dev", "eth0"])?;
            ip_in(
                &pod.netns,
                &["route", "add", "default", "via", &gateway, "dev", "eth0"],
            )?;
        }
    }
    // Every node and the fabric reach every other node's pods through that node.
    for node in &nodes {
        let cidr = format!("10.88.{}.0/24", node.index + 1);
        let via = node.ip.to_string();
        ip_in(&fabric, &["route", "add", &cidr, "via", &via])?;
        for other in nodes.iter().filter(|o| o.index != node.index) {
            ip_in(&other.netns, &["route", "add", &cidr, "via", &via])?;
        }
    }
    Ok(())
}

/// Network namespaces that belong to sandbox `name` (`<name>-...`).
pub fn sandbox_namespaces(name: &str) -> anyhow::Result<Vec<String>> {
    let prefix = format!("{name}-");
    let dir = std::path::Path::new("/run/netns");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .context("cannot list /run/netns")?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    names.sort();
    Ok(names)
}

/// Processes living in network namespace `name`.
pub fn netns_pids(name: &str) -> Vec<i32> {
    ip(&["netns", "pids", name])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn delete_netns(name: &str) -> anyhow::Result<()> {
    if netns_path(name).exists() {
        ip(&["netns", "del", name])?;
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside network namespace `netns` (a name under /run/netns) and
/// returns its result. The thread ends with `f`, so nothing else ever runs in that namespace.
pub fn in_netns<T: Send>(
    netns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let path = netns_path(netns);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = File::open(&path)
                    .with_context(|| format!("no network namespace {}", path.display()))?;
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("cannot enter network namespace {netns}"))?;
                f()
            })
            .join()
            .unwrap_or_else(|_| bail!("a thread working in network namespace {netns} panicked"))
    })
}
