//! The eBPF datapath: loads the object, attaches the capture programs, owns the maps.
//!
//! Attachments are bpf links held by this process: when the agent exits, however it exits,
//! the kernel detaches them, so a restarted agent starts from a clean slate.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps, sk_lookup::SkLookupLinkId},
};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use nodemesh_ebpf_abi::{ConnTuple, EnrolledPod, OriginalDst, Stat, names};

use crate::{config::Config, netns::PodNetns};

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
    #[error("cannot load eBPF object {path}: {source}")]
    Load {
        path: PathBuf,
        source: Box<aya::EbpfError>,
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

/// The loaded datapath. Only the workload registry changes it; the proxy reads original
/// destinations through an [`OriginalDstTable`].
pub struct Datapath {
    bpf: Ebpf,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    inbound: SockHash<MapData, u32>,
    original_dst: OriginalDstTable,
    transparent: TransparentConnects,
    stats: DatapathStats,
    program_ids: Vec<u32>,
    cgroup: PathBuf,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("cgroup", &self.cgroup)
            .field("program_ids", &self.program_ids)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the object, attaches connect4/connect6/sock_ops to the cgroup2 root and loads
    /// sk_lookup for the pods to come.
    pub fn load(config: &Config) -> Result<Self, DatapathError> {
        let object = &config.ebpf_object;
        if !object.is_file() {
            return Err(DatapathError::ObjectMissing(object.clone()));
        }
        let cgroup = cgroup_root(config.cgroup_root.as_deref())?;
        let cgroup_dir = File::open(&cgroup).map_err(|source| DatapathError::OpenCgroup {
            path: cgroup.clone(),
            source,
        })?;
        let ports = config.ports;
        let mut bpf = EbpfLoader::new()
            .override_global(names::PROXY_MARK, &config.proxy_mark, true)
            .override_global(names::TRANSPARENT_MARK, &config.transparent_mark, true)
            .override_global(names::OUTBOUND_PORT, &ports.outbound, true)
            .override_global(names::INBOUND_PORT, &ports.inbound, true)
            .override_global(names::HBONE_PORT, &ports.hbone, true)
            .override_global(names::DNS_PORT, &ports.dns, true)
            .load_file(object)
            .map_err(|source| DatapathError::Load {
                path: object.clone(),
                source: Box::new(source),
            })?;

        // aya attaches through bpf_link on this kernel, and a cgroup bpf_link always runs
        // alongside other programs (the kernel's ALLOW_MULTI); asking for AllowMultiple
        // explicitly makes link_create fail with EINVAL. Several agents on one kernel (the
        // sandbox) therefore each attach their own programs to the same root.
        let mode = CgroupAttachMode::Single;
        let mut program_ids = Vec::new();
        for name in [names::CONNECT4, names::CONNECT6] {
            let program: &mut CgroupSockAddr = program(&mut bpf, name)?;
            program.load().map_err(|e| refused(name, e))?;
            program
                .attach(&cgroup_dir, mode)
                .map_err(|e| refused(name, e))?;
            program_ids.push(program.info().map_err(|e| refused(name, e))?.id());
        }
        let sock_ops: &mut SockOps = program(&mut bpf, names::SOCK_OPS)?;
        sock_ops.load().map_err(|e| refused(names::SOCK_OPS, e))?;
        sock_ops
            .attach(&cgroup_dir, mode)
            .map_err(|e| refused(names::SOCK_OPS, e))?;
        program_ids.push(
            sock_ops
                .info()
                .map_err(|e| refused(names::SOCK_OPS, e))?
                .id(),
        );
        let sk_lookup: &mut SkLookup = program(&mut bpf, names::SK_LOOKUP)?;
        sk_lookup.load().map_err(|e| refused(names::SK_LOOKUP, e))?;
        program_ids.push(
            sk_lookup
                .info()
                .map_err(|e| refused(names::SK_LOOKUP, e))?
                .id(),
        );

        let enrolled = take_map(&mut bpf, names::ENROLLED)?;
        let inbound = take_map(&mut bpf, names::INBOUND)?;
        let original_dst = OriginalDstTable(Arc::new(take_map(&mut bpf, names::TUPLE_DST)?));
        let transparent = TransparentConnects(Arc::new(std::sync::Mutex::new(take_map(
            &mut bpf,
            names::TRANSPARENT,
        )?)));
        let stats = DatapathStats(Arc::new(take_map(&mut bpf, names::STATS)?));
        Ok(Self {
            bpf,
            enrolled,
            inbound,
            original_dst,
            transparent,
            stats,
            program_ids,
            cgroup,
        })
    }

    pub fn original_dst_table(&self) -> OriginalDstTable {
        self.original_dst.clone()
    }

    pub fn transparent_connects(&self) -> TransparentConnects {
        self.transparent.clone()
    }

    pub fn stats(&self) -> DatapathStats {
        self.stats.clone()
    }

    /// Kernel ids of the loaded programs, shown by the admin endpoint.
    pub fn program_ids(&self) -> &[u32] {
        &self.program_ids
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Starts capturing a pod: inbound connections to `ip` go to `inbound_listener`, outbound
    /// connects from its namespace go to its outbound listener. The listener must already be
    /// listening; on error nothing stays applied.
    pub fn enroll(
        &mut self,
        netns: &PodNetns,
        ip: Ipv4Addr,
        inbound_listener: &impl AsRawFd,
    ) -> Result<CaptureHandle, DatapathError> {
        let key = u32::from_ne_bytes(ip.octets());
        self.inbound
            .insert(key, inbound_listener.as_raw_fd(), 0)
            .map_err(|source| DatapathError::Map {
                name: names::INBOUND,
                source: Box::new(source),
            })?;
        let link = match self
            .sk_lookup()
            .and_then(|p| p.attach(netns).map_err(|e| refused(names::SK_LOOKUP, e)))
        {
            Ok(link) => link,
            Err(e) => {
                let _ = self.inbound.remove(&key);
                return Err(e);
            }
        };
        let pod = EnrolledPod { ip4: key, flags: 0 };
        if let Err(source) = self.enrolled.insert(netns.cookie(), pod, 0) {
            let _ = self.sk_lookup().map(|p| p.detach(link));
            let _ = self.inbound.remove(&key);
            return Err(DatapathError::Map {
                name: names::ENROLLED,
                source: Box::new(source),
            });
        }
        Ok(CaptureHandle {
            netns_cookie: netns.cookie(),
            ip_key: key,
            link: Some(link),
        })
    }

    /// Stops capturing a pod: new connects go where they were going, inbound connections reach
    /// the application directly. Idempotent.
    pub fn release(&mut self, handle: &mut CaptureHandle) {
        let _ = self.enrolled.remove(&handle.netns_cookie);
        if let Some(link) = handle.link.take()
            && let Ok(program) = self.sk_lookup()
            && let Err(e) = program.detach(link)
        {
            tracing::warn!(error = %e, "detaching sk_lookup failed");
        }
        let _ = self.inbound.remove(&handle.ip_key);
    }

    fn sk_lookup(&mut self) -> Result<&mut SkLookup, DatapathError> {
        program(&mut self.bpf, names::SK_LOOKUP)
    }
}

/// What [`Datapath::enroll`] set up for one pod, for [`Datapath::release`].
#[derive(Debug)]
pub struct CaptureHandle {
    netns_cookie: u64,
    ip_key: u32,
    link: Option<SkLookupLinkId>,
}

fn program<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    bpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })
}

fn take_map<T>(bpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = bpf
        .take_map(name)
        .ok_or(DatapathError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| DatapathError::Map {
        name,
        source: Box::new(source),
    })
}

fn refused(name: &'static str, error: aya::programs::ProgramError) -> DatapathError {
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

/// The cgroup2 root: the configured one, or the first cgroup2 mount of the usual places.
fn cgroup_root(configured: Option<&Path>) -> Result<PathBuf, DatapathError> {
    let is_cgroup2 =
        |path: &Path| statfs(path).is_ok_and(|fs| fs.filesystem_type() == CGROUP2_SUPER_MAGIC);
    match configured {
        Some(path) if is_cgroup2(path) => Ok(path.to_owned()),
        Some(path) => Err(DatapathError::NotCgroup2(path.to_owned())),
        None => ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| is_cgroup2(p))
            .ok_or(DatapathError::NoCgroup2),
    }
}

/// Read access to TUPLE_DST for the proxy: where a captured connection was going.
#[derive(Clone)]
pub struct OriginalDstTable(Arc<HashMap<MapData, ConnTuple, OriginalDst>>);

impl OriginalDstTable {
    /// The original destination of the connection the proxy accepted from `client` on its
    /// outbound listener `listener`.
    pub fn lookup(&self, client: SocketAddr, listener: SocketAddr) -> Option<SocketAddrV4> {
        let (SocketAddr::V4(client), SocketAddr::V4(listener)) = (client, listener) else {
            return None;
        };
        let key = ConnTuple {
            src_ip4: u32::from_ne_bytes(client.ip().octets()),
            dst_ip4: u32::from_ne_bytes(listener.ip().octets()),
            src_port: client.port(),
            dst_port: listener.port(),
        };
        let dst = self.0.get(&key, 0).ok()?;
        Some(SocketAddrV4::new(
            Ipv4Addr::from(dst.ip4.to_ne_bytes()),
            dst.port,
        ))
    }
}

/// The proxy's transparent connects in flight, which sk_lookup lets through to the
/// application instead of steering them back to the proxy.
#[derive(Clone)]
pub struct TransparentConnects(Arc<std::sync::Mutex<HashMap<MapData, ConnTuple, u32>>>);

impl TransparentConnects {
    /// Lets the connection from `local` (the client's address, already bound) to `dst` reach
    /// the application until the returned guard is dropped.
    pub fn allow(
        &self,
        local: SocketAddrV4,
        dst: SocketAddrV4,
    ) -> Result<TransparentGuard, aya::maps::MapError> {
        let key = ConnTuple {
            src_ip4: u32::from_ne_bytes(local.ip().octets()),
            dst_ip4: u32::from_ne_bytes(dst.ip().octets()),
            src_port: local.port(),
            dst_port: dst.port(),
        };
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, 1, 0)?;
        Ok(TransparentGuard {
            map: self.clone(),
            key,
        })
    }
}

/// Removes its TRANSPARENT entry when dropped: once connected, or when the connect failed.
pub struct TransparentGuard {
    map: TransparentConnects,
    key: ConnTuple,
}

impl Drop for TransparentGuard {
    fn drop(&mut self) {
        let _ = self
            .map
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// The programs' per-CPU counters, summed.
#[derive(Clone)]
pub struct DatapathStats(Arc<PerCpuArray<MapData, u64>>);

impl std::fmt::Debug for DatapathStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatapathStats")
    }
}

impl DatapathStats {
    pub fn read(&self) -> Vec<(Stat, u64)> {
        Stat::ALL
            .iter()
            .map(|&stat| {
                let total = self
                    .0
                    .get(&(stat as u32), 0)
                    .map(|values| values.iter().sum())
                    .unwrap_or(0);
                (stat, total)
            })
            .collect()
    }
}

/// An error and its sources on one line: aya puts the errno in the source.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
