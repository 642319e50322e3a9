//! Finding the network namespaces of pods that were running before the agent: a process of
//! the pod sits in a cgroup whose path names the pod's uid (kubelet's layout, with the
//! cgroupfs and the systemd drivers alike), and `/proc/<pid>/ns/net` is its namespace.
//!
//! The namespace is opened from /proc, never from a path the configuration names, and the
//! agent's own namespace is never taken for a pod's.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    path::Path,
};

/// A pod's namespace found under /proc.
#[derive(Debug)]
pub struct Found {
    pub pid: u32,
    pub netns: File,
}

/// The pod uid a line of `/proc/<pid>/cgroup` names, in its canonical form
/// (`8-4-4-4-12` lower-case hex with dashes):
/// - cgroupfs: `0::/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63...`
/// - systemd: `0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/cri-containerd-....scope`
pub fn pod_uid_in_cgroup(line: &str) -> Option<String> {
    let path = line.splitn(3, ':').nth(2)?;
    for (at, _) in path.match_indices("pod") {
        // `pod` must start a path element or follow a `-` (systemd slice names).
        if at > 0 && !matches!(path.as_bytes()[at - 1], b'/' | b'-') {
            continue;
        }
        let rest = &path[at + 3..];
        let hex: String = rest
            .chars()
            .take(36)
            .map(|c| {
                if c == '_' {
                    '-'
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect();
        if is_uid(&hex) {
            let end = rest.as_bytes().get(36).copied();
            if end.is_none_or(|b| matches!(b, b'/' | b'.')) {
                return Some(hex);
            }
        }
    }
    None
}

fn is_uid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Scans `proc_root` (normally `/proc`) for processes of the pods in `wanted` (uids, in
/// canonical form) and opens each pod's namespace once, from its oldest process found.
pub fn find_pods(proc_root: &Path, wanted: &HashSet<String>) -> HashMap<String, Found> {
    let mut found: HashMap<String, (u64, Found)> = HashMap::new();
    if wanted.is_empty() {
        return HashMap::new();
    }
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return HashMap::new();
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let Ok(cgroups) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        let Some(uid) = cgroups
            .lines()
            .find_map(pod_uid_in_cgroup)
            .filter(|uid| wanted.contains(uid))
        else {
            continue;
        };
        let started = start_time(&dir).unwrap_or(u64::MAX);
        if found.get(&uid).is_some_and(|(t, _)| *t <= started) {
            continue;
        }
        // A process that exited meanwhile is simply not found.
        if let Ok(netns) = File::open(dir.join("ns/net")) {
            found.insert(uid, (started, Found { pid, netns }));
        }
    }
    found.into_iter().map(|(uid, (_, f))| (uid, f)).collect()
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot.
fn start_time(dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let after_name = stat.rsplit_once(')')?.1;
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";

    #[test]
    fn both_cgroup_drivers_name_the_pod() {
        for line in [
            "0::/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63d4fa",
            "0::/kubepods/pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63d4fa",
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/cri-containerd-9bca.scope",
            "0::/kubepods.slice/kubepods-pod2c48913c_b29f_11e7_9350_020968147796.slice/crio-9bca.scope",
            "12:memory:/docker/1f2e/kubepods/besteffort/pod2c48913c-b29f-11e7-9350-020968147796/abc",
            "0::/../../pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63d4fa",
            "0::/kubepods/besteffort/pod2C48913C-B29F-11E7-9350-020968147796",
        ] {
            assert_eq!(pod_uid_in_cgroup(line).as_deref(), Some(UID), "{line}");
        }
    }

    #[test]
    fn other_cgroups_name_no_pod() {
        for line in [
            "0::/",
            "0::/system.slice/containerd.service",
            "0::/user.slice/user-0.slice/session-1.scope",
            "0::/kubepods/burstable/pod2c48913c-b29f-11e7-9350/abc",
            "0::/notapod2c48913c-b29f-11e7-9350-020968147796/abc",
            "0::/kubepods/pod2c48913c-b29f-11e7-9350-020968147796x/abc",
            "garbage",
        ] {
            assert_eq!(pod_uid_in_cgroup(line), None, "{line}");
        }
    }

    #[test]
    fn the_oldest_process_of_a_wanted_pod_is_taken() {
        let proc_root = tempfile::tempdir().expect("dir");
        let fake = |pid: u32, cgroup: &str, start: u64| {
            let dir = proc_root.path().join(pid.to_string());
            std::fs::create_dir_all(dir.join("ns")).expect("dir");
            std::fs::write(dir.join("cgroup"), cgroup).expect("cgroup");
            std::fs::write(
                dir.join("stat"),
                format!(
                    "{pid} (pause (x)) S 1 1 1 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0"
                ),
            )
            .expect("stat");
            std::fs::write(dir.join("ns/net"), format!("netns of {pid}")).expect("ns");
        };
        let pod = format!("0::/kubepods/besteffort/pod{UID}/c1\n");
        fake(40, &pod, 900);
        fake(41, &pod, 100);
        fake(
            42,
            "0::/kubepods/besteffort/pod11111111-2222-3333-4444-555555555555/c2\n",
            50,
        );
        fake(43, "0::/system.slice/sshd.service\n", 10);
        std::fs::create_dir_all(proc_root.path().join("self")).expect("dir");
        let wanted = HashSet::from([UID.to_owned()]);
        let found = find_pods(proc_root.path(), &wanted);
        assert_eq!(found.len(), 1);
        let pod = &found[UID];
        assert_eq!(pod.pid, 41, "the oldest process");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut &pod.netns, &mut text).expect("read");
        assert_eq!(text, "netns of 41");
        assert!(find_pods(proc_root.path(), &HashSet::new()).is_empty());
    }
}
