//! The eBPF datapath: loads the object, attaches the capture programs, owns the maps.
//!
//! Capture must outlive the agent, or a stopped, killed or restarting agent would let
//! enrolled pods talk around the mesh. So the links and maps are pinned in bpffs under the
//! agent's pin directory (one per node), and stay in force whatever happens to this process:
//!
//! ```text
//! <pin dir>/ENROLLED PODS COOKIE_DST TUPLE_DST INBOUND TRANSPARENT   maps
//! <pin dir>/connect4 connect6 sock_ops                                cgroup links
//! <pin dir>/pods/<netns cookie>                                       sk_lookup link per pod
//! ```
//!
//! While no proxy listener is in `INBOUND`, the programs refuse what they capture. A starting
//! agent reuses the pinned maps, attaches its own programs next to the pinned ones and then
//! swaps each pin to its own link (a rename, so capture never lapses), and re-enrolls its
//! workloads with new listeners. Removing the pin directory (`nodemesh-agent --uninstall`)
//! detaches everything.

use std::{
    collections::{BTreeSet, HashSet},
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicU64},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps, links::FdLink},
};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use nodemesh_ebpf_abi::{ConnTuple, EnrolledPod, Listener, listener_key, names, pod_flags};

pub use self::{
    error::DatapathError, original_dst::OriginalDstTable, pins::uninstall, stats::DatapathStats,
    transparent::TransparentConnects,
};
use self::{
    error::{map_error, refused},
    pins::{PINNED_MAPS, check_pinned_maps, link_name, pin_in_place, prepare_pin_dir},
};
use crate::{config::Config, netns::PodNetns};

mod error;
mod original_dst;
mod pins;
mod stats;
mod take;
mod transparent;

/// The loaded datapath. Only the workload registry changes it; the proxy reads original
/// destinations through an [`OriginalDstTable`].
pub struct Datapath {
    bpf: Ebpf,
    pin_dir: PathBuf,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    pods: HashMap<MapData, u32, EnrolledPod>,
    inbound: SockHash<MapData, u64>,
    original_dst: OriginalDstTable,
    transparent: TransparentConnects,
    stats: DatapathStats,
    program_ids: Vec<u32>,
    cgroup: PathBuf,
    /// Pods whose capture a previous agent left pinned, by netns cookie.
    adopted: BTreeSet<u64>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("cgroup", &self.cgroup)
            .field("program_ids", &self.program_ids)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the object with the pinned maps (made on first use), attaches connect4,
    /// connect6 and sock_ops to the cgroup2 root in place of any pinned ones, and loads
    /// sk_lookup for the pods to come. What a previous agent left pinned for its pods stays
    /// in force, refusing their traffic, until [`enroll`](Self::enroll) takes each over or
    /// [`sweep`](Self::sweep) removes it.
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
        let pin_dir = config.bpf_pin_dir.clone();
        prepare_pin_dir(&pin_dir)?;
        let ports = config.ports;
        let mut loader = EbpfLoader::new();
        loader
            .override_global(names::PROXY_MARK, &config.proxy_mark, true)
            .override_global(names::TRANSPARENT_MARK, &config.transparent_mark, true)
            .override_global(names::OUTBOUND_PORT, &ports.outbound, true)
            .override_global(names::HBONE_PORT, &ports.hbone, true);
        for name in PINNED_MAPS {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let bytes = std::fs::read(object).map_err(|e| DatapathError::Load {
            path: object.clone(),
            pin_dir: pin_dir.clone(),
            source: Box::new(aya::EbpfError::FileError {
                path: object.clone(),
                error: e,
            }),
        })?;
        check_pinned_maps(&bytes, object, &pin_dir)?;
        let mut bpf = loader.load(&bytes).map_err(|source| DatapathError::Load {
            path: object.clone(),
            pin_dir: pin_dir.clone(),
            source: Box::new(source),
        })?;

        // aya attaches through bpf_link on this kernel, and a cgroup bpf_link always runs
        // alongside other programs (the kernel's ALLOW_MULTI); asking for AllowMultiple
        // explicitly makes link_create fail with EINVAL. Several agents on one kernel (the
        // sandbox) therefore each attach their own programs to the same root, and a restarted
        // agent's programs run next to the pinned ones of its predecessor until the swap.
        let mode = CgroupAttachMode::Single;
        let mut program_ids = Vec::new();
        for name in [names::CONNECT4, names::CONNECT6] {
            let program: &mut CgroupSockAddr = program(&mut bpf, name)?;
            program.load().map_err(|e| refused(name, e))?;
            let id = program
                .attach(&cgroup_dir, mode)
                .map_err(|e| refused(name, e))?;
            let link = program.take_link(id).map_err(|e| refused(name, e))?;
            let link = FdLink::try_from(link).map_err(|e| DatapathError::Program {
                name,
                reason: format!("its cgroup link cannot be pinned: {e}"),
            })?;
            pin_in_place(link, &pin_dir.join(link_name(name)))?;
            program_ids.push(program.info().map_err(|e| refused(name, e))?.id());
        }
        let sock_ops: &mut SockOps = program(&mut bpf, names::SOCK_OPS)?;
        sock_ops.load().map_err(|e| refused(names::SOCK_OPS, e))?;
        let id = sock_ops
            .attach(&cgroup_dir, mode)
            .map_err(|e| refused(names::SOCK_OPS, e))?;
        let link = sock_ops
            .take_link(id)
            .map_err(|e| refused(names::SOCK_OPS, e))?;
        let link = FdLink::try_from(link).map_err(|e| DatapathError::Program {
            name: names::SOCK_OPS,
            reason: format!("its cgroup link cannot be pinned: {e}"),
        })?;
        pin_in_place(link, &pin_dir.join(link_name(names::SOCK_OPS)))?;
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

        let enrolled: HashMap<MapData, u64, EnrolledPod> = take_map(&mut bpf, names::ENROLLED)?;
        let pods = take_map(&mut bpf, names::PODS)?;
        let inbound = take_map(&mut bpf, names::INBOUND)?;
        let taken = Arc::new(AtomicU64::new(0));
        let original_dst =
            OriginalDstTable::new(take_map(&mut bpf, names::TUPLE_DST)?, taken.clone());
        let mut transparent: HashMap<MapData, ConnTuple, u32> =
            take_map(&mut bpf, names::TRANSPARENT)?;
        // Connects of a previous proxy that never completed: none of them is coming.
        let stale: Vec<ConnTuple> = transparent.keys().filter_map(Result::ok).collect();
        for key in stale {
            let _ = transparent.remove(&key);
        }
        let transparent = TransparentConnects::new(transparent);
        let stats = DatapathStats {
            counters: Arc::new(take_map(&mut bpf, names::STATS)?),
            tuples_taken: taken,
        };
        let adopted = enrolled.keys().filter_map(Result::ok).collect();
        Ok(Self {
            bpf,
            pin_dir,
            enrolled,
            pods,
            inbound,
            original_dst,
            transparent,
            stats,
            program_ids,
            cgroup,
            adopted,
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

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// How many pods a previous agent left captured, waiting to be taken over.
    pub fn adopted(&self) -> usize {
        self.adopted.len()
    }

    /// Starts capturing a pod: inbound connections to `ip` go to the proxy's inbound and
    /// HBONE listeners, outbound connects from its namespace go to its outbound listener. The
    /// listeners must already be listening. Takes over what a previous agent pinned for the
    /// same namespace without a moment uncaptured; on error nothing new stays applied.
    pub fn enroll(
        &mut self,
        netns: &PodNetns,
        ip: Ipv4Addr,
        inbound: &impl AsRawFd,
        hbone: &impl AsRawFd,
        strict: bool,
    ) -> Result<CaptureHandle, DatapathError> {
        let ip_key = u32::from_ne_bytes(ip.octets());
        let keys = [
            (listener_key(ip_key, Listener::Inbound), inbound.as_raw_fd()),
            (listener_key(ip_key, Listener::Hbone), hbone.as_raw_fd()),
        ];
        for (i, (key, fd)) in keys.iter().enumerate() {
            if let Err(source) = self.inbound.insert(key, *fd, 0) {
                for (key, _) in &keys[..i] {
                    let _ = self.inbound.remove(key);
                }
                return Err(map_error(names::INBOUND, source));
            }
        }
        let handle = CaptureHandle {
            netns_cookie: netns.cookie(),
            ip_key,
        };
        match self.capture(&handle, netns, if strict { pod_flags::STRICT } else { 0 }) {
            Ok(()) => Ok(handle),
            Err(e) => {
                for (key, _) in &keys {
                    let _ = self.inbound.remove(key);
                }
                Err(e)
            }
        }
    }

    /// Captures a pod that could not be enrolled with nowhere to go: its connects fail with
    /// EPERM and connections to `ip` are refused, instead of either going around the mesh.
    pub fn refuse(
        &mut self,
        netns: &PodNetns,
        ip: Ipv4Addr,
    ) -> Result<CaptureHandle, DatapathError> {
        let handle = CaptureHandle {
            netns_cookie: netns.cookie(),
            ip_key: u32::from_ne_bytes(ip.octets()),
        };
        self.capture(&handle, netns, pod_flags::REFUSE)?;
        Ok(handle)
    }

    /// Attaches and pins sk_lookup in the pod's namespace, then records the pod in `PODS`
    /// and `ENROLLED`.
    fn capture(
        &mut self,
        handle: &CaptureHandle,
        netns: &PodNetns,
        flags: u32,
    ) -> Result<(), DatapathError> {
        let pods_dir = self.pin_dir.join("pods");
        let pin = pods_dir.join(handle.netns_cookie.to_string());
        // A pin left by a previous agent runs its program, which reads these same maps:
        // attaching ours next to it and swapping the pin keeps capture unbroken.
        self.adopted.remove(&handle.netns_cookie);
        let program = self.sk_lookup()?;
        let id = program
            .attach(netns)
            .map_err(|e| refused(names::SK_LOOKUP, e))?;
        let link = program
            .take_link(id)
            .map_err(|e| refused(names::SK_LOOKUP, e))?;
        pin_in_place(link.into(), &pin)?;
        let pod = EnrolledPod {
            ip4: handle.ip_key,
            flags,
        };
        let recorded = self
            .pods
            .insert(handle.ip_key, pod, 0)
            .map_err(|e| map_error(names::PODS, e))
            .and_then(|()| {
                self.enrolled
                    .insert(handle.netns_cookie, pod, 0)
                    .map_err(|e| map_error(names::ENROLLED, e))
            });
        if let Err(e) = recorded {
            let _ = self.pods.remove(&handle.ip_key);
            let _ = std::fs::remove_file(&pin);
            return Err(e);
        }
        Ok(())
    }

    /// Changes the mTLS switch of an enrolled pod (inbound UDP is refused under STRICT).
    pub fn set_strict(&mut self, handle: &CaptureHandle, strict: bool) {
        let Ok(mut pod) = self.enrolled.get(&handle.netns_cookie, 0) else {
            return;
        };
        let flags = if strict {
            pod.flags | pod_flags::STRICT
        } else {
            pod.flags & !pod_flags::STRICT
        };
        if flags == pod.flags {
            return;
        }
        pod.flags = flags;
        let _ = self.pods.insert(handle.ip_key, pod, 0);
        let _ = self.enrolled.insert(handle.netns_cookie, pod, 0);
    }

    /// Stops capturing a pod the configuration no longer puts here: new connects go where
    /// they were going, inbound connections reach the application directly. Idempotent.
    pub fn release(&mut self, handle: &CaptureHandle) {
        self.forget(handle.netns_cookie, Some(handle.ip_key));
        for listener in [Listener::Inbound, Listener::Hbone] {
            let _ = self.inbound.remove(&listener_key(handle.ip_key, listener));
        }
    }

    /// Removes the capture of every pinned pod that is not in `keep` (netns cookies): pods a
    /// previous agent enrolled that this configuration no longer has, and namespaces gone.
    /// Returns how many were removed.
    pub fn sweep(&mut self, keep: &HashSet<u64>) -> usize {
        let mut cookies: BTreeSet<u64> = self.enrolled.keys().filter_map(Result::ok).collect();
        if let Ok(entries) = std::fs::read_dir(self.pin_dir.join("pods")) {
            cookies.extend(
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok()),
            );
        }
        let kept_ips: HashSet<u32> = keep
            .iter()
            .filter_map(|cookie| self.enrolled.get(cookie, 0).ok())
            .map(|pod| pod.ip4)
            .collect();
        let mut removed = 0;
        for cookie in cookies.into_iter().filter(|c| !keep.contains(c)) {
            let ip = self
                .enrolled
                .get(&cookie, 0)
                .ok()
                .map(|pod| pod.ip4)
                .filter(|ip| !kept_ips.contains(ip));
            self.forget(cookie, ip);
            self.adopted.remove(&cookie);
            removed += 1;
        }
        removed
    }

    /// Removes the capture pinned in a namespace that was replaced, leaving the pod's
    /// address (now captured in its new namespace) alone.
    pub fn forget_namespace(&mut self, cookie: u64) {
        self.forget(cookie, None);
    }

    fn forget(&mut self, cookie: u64, ip_key: Option<u32>) {
        let _ = self.enrolled.remove(&cookie);
        if let Some(ip) = ip_key {
            let _ = self.pods.remove(&ip);
        }
        let pin = self.pin_dir.join("pods").join(cookie.to_string());
        match std::fs::remove_file(&pin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(pin = %pin.display(), error = %e, "cannot unpin sk_lookup"),
        }
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
}

impl CaptureHandle {
    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }
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
