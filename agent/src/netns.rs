//! Network namespaces of pods: the agent creates the proxy's in-pod sockets inside them.
//!
//! A socket belongs to the namespace it was created in, for its whole life. So the proxy enters
//! a pod's namespace on the current thread only for the `socket()` call, then returns; no await
//! happens in between, so a tokio worker never runs other work inside a pod's namespace.
#![expect(
    unsafe_code,
    reason = "SO_NETNS_COOKIE has no safe wrapper in nix or socket2"
)]

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::sched::{CloneFlags, setns};

/// The agent's own network namespace, which every thread returns to, and its cookie.
static AGENT_NETNS: OnceLock<(File, u64)> = OnceLock::new();

/// Remembers the agent's own network namespace. Call once at startup, before any thread
/// enters another namespace.
pub fn init() -> io::Result<()> {
    let file = File::open("/proc/thread-self/ns/net")?;
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let cookie = netns_cookie(probe.as_fd())?;
    let _ = AGENT_NETNS.set((file, cookie));
    Ok(())
}

fn agent_cookie() -> Option<u64> {
    AGENT_NETNS.get().map(|(_, cookie)| *cookie)
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "cannot open network namespace {path}: {source}; check that the workload's netns exists"
    )]
    Open { path: PathBuf, source: io::Error },
    #[error("{origin} is not a network namespace: {source}")]
    NotNetns { origin: String, source: io::Error },
    #[error(
        "{origin} is the agent's own network namespace, not a pod's; the agent never enrolls \
         its host"
    )]
    AgentsOwn { origin: String },
}

/// Where the agent got a pod's namespace from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsOrigin {
    /// A path named by the configuration (local mode).
    Path(PathBuf),
    /// Handed over by the CNI plugin when the container runtime created the pod.
    Cni { container_id: String },
    /// Found under /proc: a process of the pod lives in it.
    Proc { pid: u32 },
}

impl std::fmt::Display for NetnsOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(path) => write!(f, "{}", path.display()),
            Self::Cni { container_id } => write!(f, "cni:{container_id}"),
            Self::Proc { pid } => write!(f, "/proc/{pid}/ns/net"),
        }
    }
}

/// An open handle on a pod's network namespace.
#[derive(Debug)]
pub struct PodNetns {
    origin: NetnsOrigin,
    file: File,
    cookie: u64,
}

impl std::fmt::Display for PodNetns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.origin.fmt(f)
    }
}

impl PodNetns {
    /// Opens the namespace at `path` (such as `/run/netns/web`) and reads its cookie, the key
    /// the eBPF programs know it by.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::from_file(file, NetnsOrigin::Path(path.to_owned()))
    }

    /// Takes a namespace handed over as an open file (by the CNI plugin, or from /proc):
    /// checks that it is a network namespace and not the agent's own.
    pub fn from_file(file: File, origin: NetnsOrigin) -> Result<Self, NetnsError> {
        let mut netns = Self {
            origin,
            file,
            cookie: 0,
        };
        netns.cookie = netns
            .run(|| {
                let probe =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
                netns_cookie(probe.as_fd())
            })
            .map_err(|source| NetnsError::NotNetns {
                origin: netns.origin.to_string(),
                source,
            })?;
        if Some(netns.cookie) == agent_cookie() {
            return Err(NetnsError::AgentsOwn {
                origin: netns.origin.to_string(),
            });
        }
        Ok(netns)
    }

    /// A handle on the test process's own namespace, for tests of what holds one and never
    /// enters it.
    #[cfg(test)]
    pub fn for_tests() -> Self {
        let path = Path::new("/proc/self/ns/net");
        Self {
            origin: NetnsOrigin::Path(path.to_owned()),
            file: File::open(path).expect("own network namespace"),
            cookie: 0,
        }
    }

    /// Another handle on the same namespace, for a new enrollment of the same pod.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            origin: self.origin.clone(),
            file: self.file.try_clone()?,
            cookie: self.cookie,
        })
    }

    pub fn origin(&self) -> &NetnsOrigin {
        &self.origin
    }

    /// Whether the path no longer names the namespace opened: it was removed, or replaced by
    /// another one mounted at the same path. A namespace handed over as a file has no path:
    /// the CNI plugin tells when the pod's sandbox is replaced.
    pub fn replaced(&self) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let NetnsOrigin::Path(path) = &self.origin else {
            return false;
        };
        let Ok(now) = std::fs::metadata(path) else {
            return true;
        };
        let Ok(open) = self.file.metadata() else {
            return false;
        };
        (now.dev(), now.ino()) != (open.dev(), open.ino())
    }

    /// The kernel's cookie for this namespace (`SO_NETNS_COOKIE`).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` with the current thread inside this namespace. `f` must not block on anything
    /// but its own syscalls.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let (home, _) = AGENT_NETNS
            .get()
            .ok_or_else(|| io::Error::other("netns::init() was not called at startup"))?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let result = f();
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // This thread would go on in the pod's namespace, and every later socket it made
            // would land there: stopping is the only safe answer.
            eprintln!(
                "nodemesh-agent: cannot return from network namespace {} ({e}); aborting",
                self.origin
            );
            std::process::abort();
        }
        result
    }
}

impl AsFd for PodNetns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Reads `SO_NETNS_COOKIE` of a socket: the cookie of the namespace it was created in.
pub fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes and `len` holds the buffer's size; the
    // kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receives up to `max` bytes from a unix socket, and the one descriptor they may carry
/// (`SCM_RIGHTS`): how the CNI plugin hands a pod's namespace over. More than one
/// descriptor is an error; every descriptor received is closed unless returned.
pub fn receive_with_descriptor(
    socket: BorrowedFd<'_>,
    max: usize,
) -> io::Result<(Vec<u8>, Option<File>)> {
    use std::os::fd::{FromRawFd as _, OwnedFd};

    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

    let mut buffer = vec![0u8; max];
    let mut control = nix::cmsg_space!([std::os::fd::RawFd; 2]);
    let (bytes, truncated, received) = {
        let mut iov = [io::IoSliceMut::new(&mut buffer)];
        let message = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut received: Vec<OwnedFd> = Vec::new();
        for cmsg in message.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    // SAFETY: the kernel just installed `fd` in this process for this message
                    // (SCM_RIGHTS); nothing else owns it, so it is taken over exactly once.
                    received.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let truncated = message.flags.intersects(MsgFlags::MSG_CTRUNC);
        (message.bytes, truncated, received)
    };
    if truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a message with more descriptors than one",
        ));
    }
    let mut received = received.into_iter();
    let descriptor = received.next().map(File::from);
    if received.next().is_some() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more than one descriptor in one message",
        ));
    }
    buffer.truncate(bytes);
    Ok((buffer, descriptor))
}
