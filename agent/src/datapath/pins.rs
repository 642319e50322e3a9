//! The pin directory: where the datapath outlives the agent, how it is prepared, checked
//! against this agent's programs, replaced link by link, and removed.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
};

use aya::programs::links::FdLink;
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
use nodemesh_ebpf_abi::names;

use super::{DatapathError, error::error_chain};

/// The maps that are pinned, so that the programs of this run and of the next share them.
/// `STATS` is not: counters start again with each agent.
pub(super) const PINNED_MAPS: [&str; 6] = [
    names::ENROLLED,
    names::PODS,
    names::COOKIE_DST,
    names::TUPLE_DST,
    names::INBOUND,
    names::TRANSPARENT,
];

/// Where bpffs is mounted on every Linux host that has one.
const BPFFS: &str = "/sys/fs/bpf";

/// Removes what an agent pinned in `pin_dir`: every capture program is detached and the maps
/// are freed, so the node's workloads talk directly again. The agent must be stopped first,
/// or its own links stay attached until it exits. Returns whether there was anything.
pub fn uninstall(pin_dir: &Path) -> std::io::Result<bool> {
    match std::fs::remove_dir_all(pin_dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The pin file of a cgroup program's link: its name without the `nodemesh_` prefix.
pub(super) fn link_name(program: &str) -> &str {
    program.strip_prefix("nodemesh_").unwrap_or(program)
}

/// Pinned maps that hold only connections in flight (between a connect and its SYN, between
/// the SYN and the proxy's accept): one of an earlier version's shape is replaced by a new
/// one rather than refused. At worst the connections opened while the agent starts lose their
/// original destination, and the proxy refuses them.
const IN_FLIGHT_MAPS: [&str; 2] = [names::COOKIE_DST, names::TUPLE_DST];

/// What to do with a pinned map, given its shape and the one this agent's programs need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PinnedMap {
    Reuse,
    Replace,
    Refuse,
}

impl PinnedMap {
    fn decide(name: &str, pinned: &str, expected: &str) -> Self {
        if pinned == expected {
            Self::Reuse
        } else if IN_FLIGHT_MAPS.contains(&name) {
            Self::Replace
        } else {
            Self::Refuse
        }
    }
}

/// Refuses pinned maps whose shape (key and value sizes, capacity) differs from what the
/// object's programs declare: reusing them would corrupt the datapath rather than fail. Maps
/// of connections in flight are unpinned instead, so that the programs make new ones.
pub(super) fn check_pinned_maps(
    object: &[u8],
    path: &Path,
    pin_dir: &Path,
) -> Result<(), DatapathError> {
    let parsed = aya_obj::Object::parse(object).map_err(|e| DatapathError::Load {
        path: path.to_owned(),
        pin_dir: pin_dir.to_owned(),
        source: Box::new(aya::EbpfError::ParseError(e)),
    })?;
    let shape = |key: u32, value: u32, entries: u32| {
        format!("{key}-byte keys, {value}-byte values and {entries} entries")
    };
    for name in PINNED_MAPS {
        let pin = pin_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let declared = parsed
            .maps
            .get(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        let pinned = aya::maps::MapInfo::from_pin(&pin).map_err(|e| DatapathError::Map {
            name,
            source: Box::new(e),
        })?;
        let expected = shape(
            declared.key_size(),
            declared.value_size(),
            declared.max_entries(),
        );
        let found = shape(pinned.key_size(), pinned.value_size(), pinned.max_entries());
        match PinnedMap::decide(name, &found, &expected) {
            PinnedMap::Reuse => {}
            PinnedMap::Replace => {
                std::fs::remove_file(&pin).map_err(|e| DatapathError::Pin {
                    path: pin.clone(),
                    reason: format!("cannot replace a map of an earlier version: {e}"),
                })?;
                tracing::info!(
                    map = name,
                    pinned = %found,
                    expected = %expected,
                    "replacing a map of connections in flight pinned by an earlier version"
                );
            }
            PinnedMap::Refuse => {
                return Err(DatapathError::Incompatible {
                    map: name,
                    pin_dir: pin_dir.to_owned(),
                    pinned: found,
                    expected,
                });
            }
        }
    }
    Ok(())
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there, and creates the pin directory.
pub(super) fn prepare_pin_dir(pin_dir: &Path) -> Result<(), DatapathError> {
    let error = |reason: String| DatapathError::Pin {
        path: pin_dir.to_owned(),
        reason,
    };
    let is_bpffs = |path: &Path| statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC);
    let bpffs = Path::new(BPFFS);
    if pin_dir.starts_with(bpffs) && !is_bpffs(bpffs) {
        nix::mount::mount(
            Some("bpf"),
            bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| error(format!("cannot mount bpffs at {BPFFS}: {e}")))?;
        tracing::info!("mounted bpffs at {BPFFS}");
    }
    std::fs::create_dir_all(pin_dir.join("pods")).map_err(|e| error(e.to_string()))?;
    if !is_bpffs(pin_dir) {
        return Err(error("it is not on bpffs".into()));
    }
    Ok(())
}

/// Pins `link` at `path`, replacing what is pinned there in one step: the new link is pinned
/// under a temporary name (`<name>_new`) and renamed over the old one, which the kernel then detaches.
pub(super) fn pin_in_place(link: FdLink, path: &Path) -> Result<(), DatapathError> {
    let error = |reason: String| DatapathError::Pin {
        path: path.to_owned(),
        reason,
    };
    // bpffs refuses names holding a dot.
    let mut staging = path.as_os_str().to_owned();
    staging.push(OsStr::new("_new"));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let pinned = link.pin(&staging).map_err(|e| error(error_chain(&e)))?;
    if let Err(e) = std::fs::rename(&staging, path) {
        let _ = pinned.unpin();
        return Err(error(format!("cannot move the pin into place: {e}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_directory_off_bpffs_is_refused_saying_so() {
        let dir = std::env::temp_dir().join(format!("nodemesh-pins-{}", std::process::id()));
        let refused = prepare_pin_dir(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let text = refused.expect_err("not bpffs").to_string();
        assert!(
            text.contains("not on bpffs") && text.contains("mount -t bpf"),
            "{text}"
        );
    }

    #[test]
    fn uninstalling_twice_says_there_was_nothing_the_second_time() {
        let dir = std::env::temp_dir().join(format!("nodemesh-uninstall-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("pods")).expect("a pin directory");
        assert!(uninstall(&dir).expect("removed"));
        assert!(!uninstall(&dir).expect("nothing left"));
    }

    #[test]
    fn only_maps_of_connections_in_flight_are_replaced_when_their_shape_changed() {
        let (old, new) = ("262144 entries", "65536 entries");
        assert_eq!(
            PinnedMap::decide(names::TUPLE_DST, new, new),
            PinnedMap::Reuse
        );
        assert_eq!(
            PinnedMap::decide(names::TUPLE_DST, old, new),
            PinnedMap::Replace
        );
        assert_eq!(
            PinnedMap::decide(names::COOKIE_DST, old, new),
            PinnedMap::Replace
        );
        for kept in [
            names::ENROLLED,
            names::PODS,
            names::INBOUND,
            names::TRANSPARENT,
        ] {
            assert_eq!(
                PinnedMap::decide(kept, old, new),
                PinnedMap::Refuse,
                "{kept}"
            );
        }
    }

    #[test]
    fn links_are_pinned_without_the_program_prefix() {
        assert_eq!(link_name(names::CONNECT4), "connect4");
        assert_eq!(link_name("other"), "other");
    }
}
