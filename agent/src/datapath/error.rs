//! What can go wrong loading and running the datapath, each error saying what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("eBPF object {0} not found; build it with `cargo xtask build` or pass --ebpf-object")]
    ObjectMissing(PathBuf),
    #[error(
        "no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified; mount one \
         (mount -t cgroup2 none /sys/fs/cgroup/unified) or pass --cgroup-root"
    )]
    NoCgroup2,
    #[error("{0} is not a cgroup2 directory; pass the root of a cgroup2 mount as --cgroup-root")]
    NotCgroup2(PathBuf),
    #[error("cannot open cgroup {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot pin the datapath in {path}: {reason}; the pin directory must be on a bpffs \
         mount (mount -t bpf bpf /sys/fs/bpf, or in a DaemonSet a hostPath volume of /sys/fs/bpf)"
    )]
    Pin { path: PathBuf, reason: String },
    #[error(
        "cannot load eBPF object {path}: {source}; if the pinned datapath in {pin_dir} is from \
         an incompatible version, remove it with `nodemesh-agent --uninstall`"
    )]
    Load {
        path: PathBuf,
        pin_dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error(
        "the map {map} pinned in {pin_dir} has {pinned} where this agent's programs need \
         {expected}: it was made by an incompatible version; remove it with \
         `nodemesh-agent --uninstall --bpf-pin-dir {pin_dir}` (capture is off until this agent \
         starts) and start again"
    )]
    Incompatible {
        map: &'static str,
        pin_dir: PathBuf,
        pinned: String,
        expected: String,
    },
    #[error("eBPF object has no {kind} named {name}; rebuild it with `cargo xtask build`")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error(
        "the kernel refused eBPF program {name}: {reason}; nodemesh needs Linux 5.10 or newer \
         with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF, and must run as root"
    )]
    Program { name: &'static str, reason: String },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<aya::maps::MapError>,
    },
}

pub(super) fn map_error(name: &'static str, source: aya::maps::MapError) -> DatapathError {
    DatapathError::Map {
        name,
        source: Box::new(source),
    }
}

pub(super) fn refused(name: &'static str, error: aya::programs::ProgramError) -> DatapathError {
    let reason = match &error {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            tracing::debug!(program = name, log = %verifier_log, "verifier log");
            format!("{io_error} (run with RUST_LOG=debug for the verifier log)")
        }
        other => error_chain(other),
    };
    DatapathError::Program { name, reason }
}

/// An error and its sources on one line: aya puts the errno in the source.
pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
