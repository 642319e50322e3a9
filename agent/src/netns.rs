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

/// The agent's own network namespace, which every thread returns to.
static AGENT_NETNS: OnceLock<File> = OnceLock::new();

/// Remembers the agent's own network namespace. Call once at startup, before any thread
/// enters another namespace.
pub fn init() -> io::Result<()> {
    let file = File::open("/proc/thread-self/ns/net")?;
    let _ = AGENT_NETNS.set(file);
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "cannot open network namespace {path}: {source}; check that the workload's netns exists"
    )]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not a network namespace: {source}")]
    NotNetns { path: PathBuf, source: io::Error },
}

/// An open handle on a pod's network namespace.
#[derive(Debug)]
pub struct PodNetns {
    path: PathBuf,
    file: File,
    cookie: u64,
}

impl PodNetns {
    /// Opens the namespace at `path` (such as `/run/netns/web`) and reads its cookie, the key
    /// the eBPF programs know it by.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let mut netns = Self {
            path: path.to_owned(),
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
                path: path.to_owned(),
                source,
            })?;
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path no longer names the namespace opened: it was removed, or replaced by
    /// another one mounted at the same path.
    pub fn replaced(&self) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(now) = std::fs::metadata(&self.path) else {
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
        let home = AGENT_NETNS
            .get()
            .ok_or_else(|| io::Error::other("netns::init() was not called at startup"))?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let result = f();
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // This thread would go on in the pod's namespace, and every later socket it made
            // would land there: stopping is the only safe answer.
            eprintln!(
                "nodemesh-agent: cannot return from network namespace {} ({e}); aborting",
                self.path.display()
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
