//! Helpers for the namespaced integration tests in `tests/`.
//!
//! Each test brings up its own sandbox, named after the test, and removes it when the test
//! ends, passed or failed. Without root or without the built binaries a test skips with a
//! loud message; under `cargo xtask test` (`NODEMESH_REQUIRE_NAMESPACED_TESTS=1`) those are
//! failures instead, so CI can never pass by skipping. A kernel without the eBPF features
//! the agent needs is always a loud skip.
#![forbid(unsafe_code)]

pub mod hbone;
pub mod traffic;

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    ops::{Deref, DerefMut},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use nodemesh_sandbox::{Sandbox, Spec, in_netns};

/// The directory of the built binaries: the test executable lives in `target/<profile>/deps`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("test executable under target/<profile>/deps")
        .to_owned()
}

fn required() -> bool {
    std::env::var_os("NODEMESH_REQUIRE_NAMESPACED_TESTS").is_some_and(|v| v == "1")
}

fn skip(test: &str, reason: &str) -> Option<TestSandbox> {
    assert!(!required(), "{test}: {reason}");
    eprintln!("\n!!! SKIPPED {test}: {reason}\n");
    None
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let uid = s.lines().find(|l| l.starts_with("Uid:"))?;
            Some(uid.split_whitespace().nth(2)? == "0")
        })
        .unwrap_or(false)
}

/// Checks what namespaced tests need; `None` means the test was skipped (loudly).
pub fn preflight(test: &str) -> Option<()> {
    if !is_root() {
        skip(test, "needs root for eBPF and network namespaces")?;
    }
    for binary in nodemesh_sandbox::BINARIES {
        if !bin_dir().join(binary).is_file() {
            skip(
                test,
                &format!(
                    "{} is not built; run `cargo xtask build` first",
                    bin_dir().join(binary).display()
                ),
            )?;
        }
    }
    Some(())
}

/// A sandbox that is removed when the test ends.
#[derive(Debug)]
pub struct TestSandbox(Option<Sandbox>);

/// Brings up a sandbox named `name` (at most 8 letters and digits, unique per test) with the
/// default shape: 2 nodes, 2 enrolled pods and a legacy pod on each.
pub fn sandbox(name: &str) -> Option<TestSandbox> {
    sandbox_with(name, |_| {})
}

pub fn sandbox_with(name: &str, shape: impl FnOnce(&mut Spec)) -> Option<TestSandbox> {
    preflight(name)?;
    let mut spec = Spec::new(name, bin_dir());
    shape(&mut spec);
    match Sandbox::up(&spec) {
        Ok(sandbox) => Some(TestSandbox(Some(sandbox))),
        Err(e) => {
            let text = format!("{e:#}");
            if text.contains("the kernel refused eBPF program") {
                return skip(
                    name,
                    &format!("this kernel cannot run the capture programs: {text}"),
                );
            }
            panic!("sandbox {name} did not come up: {text}");
        }
    }
}

impl Deref for TestSandbox {
    type Target = Sandbox;

    fn deref(&self) -> &Sandbox {
        self.0.as_ref().expect("sandbox present until drop")
    }
}

impl DerefMut for TestSandbox {
    fn deref_mut(&mut self) -> &mut Sandbox {
        self.0.as_mut().expect("sandbox present until drop")
    }
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        if let Some(sandbox) = self.0.take() {
            let name = sandbox.status().name.clone();
            if let Err(e) = sandbox.down() {
                eprintln!("cleaning up sandbox {name} failed: {e:#}");
                if !std::thread::panicking() {
                    panic!("sandbox {name} was not removed: {e:#}");
                }
            }
        }
    }
}

/// What a TCP client in a pod saw.
#[derive(Debug, Clone)]
pub struct EchoResult {
    /// The address the client's socket is connected to: the proxy's in-pod listener when
    /// the connection was captured, the server otherwise.
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// What came back after the client sent its message and half-closed.
    pub reply: Vec<u8>,
}

/// From inside `netns`, connects to `dst`, sends `message`, half-closes and reads the echo
/// until the server closes. Proves that data and half-close both cross the path.
pub fn echo_from(netns: &str, dst: SocketAddr, message: &[u8]) -> anyhow::Result<EchoResult> {
    let message = message.to_vec();
    in_netns(netns, move || {
        let mut stream = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            .with_context(|| format!("connect to {dst}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let peer = stream.peer_addr()?;
        let local = stream.local_addr()?;
        stream.write_all(&message)?;
        stream.shutdown(Shutdown::Write)?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).context("reading the echo")?;
        Ok(EchoResult { peer, local, reply })
    })
}

/// Runs curl in a pod's namespace and returns (HTTP status, body).
pub fn curl(netns: &str, url: &str, extra: &[&str]) -> anyhow::Result<(u16, String)> {
    let mut args = vec!["-sS", "--max-time", "10", "-w", "\n%{http_code}"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = nodemesh_sandbox::run_in_netns(netns, "curl", &args)?;
    anyhow::ensure!(
        out.status.success(),
        "curl {url} in {netns} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8(out.stdout)?;
    let (body, code) = text.rsplit_once('\n').context("no status code from curl")?;
    Ok((code.trim().parse()?, body.to_owned()))
}

/// The connections an agent recorded, newest last.
pub fn connections(sandbox: &Sandbox, node: &str) -> Vec<serde_json::Value> {
    sandbox
        .agent_admin(node, "/connections")
        .expect("agent /connections")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Whether an agent recorded a connection of `direction` for `workload` to `dst`.
pub fn recorded(
    sandbox: &Sandbox,
    node: &str,
    direction: &str,
    workload: &str,
    dst: SocketAddr,
) -> bool {
    connections(sandbox, node).iter().any(|c| {
        c["direction"] == direction
            && c["workload"] == workload
            && c["original_dst"] == dst.to_string()
    })
}

pub use nodemesh_sandbox::curl::{Answer, requests, set_fault};

/// Writes (or replaces) a file of the sandbox's mesh configuration.
pub fn write_config(sandbox: &Sandbox, name: &str, yaml: &str) {
    std::fs::write(sandbox.config_dir().join(name), yaml)
        .unwrap_or_else(|e| panic!("cannot write {name}: {e}"));
}

/// A connection that stays open across the test: one line out, one line back, each time.
#[derive(Debug)]
pub struct LongLived(pub std::net::TcpStream);

impl LongLived {
    pub fn open(netns: &str, dst: SocketAddr) -> Self {
        let stream = nodemesh_sandbox::in_netns(netns, move || {
            let stream = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(stream)
        })
        .expect("connect");
        Self(stream)
    }

    pub fn round_trip(&mut self, message: &[u8]) -> Vec<u8> {
        use std::io::{Read as _, Write as _};
        self.0.write_all(message).expect("write");
        let mut reply = vec![0; message.len()];
        self.0
            .read_exact(&mut reply)
            .expect("the connection still carries bytes");
        reply
    }
}

/// Echoes `message` over and over from a pod to an address until told to stop (at most
/// `limit` attempts, 20 ms apart), counting what succeeded and what failed.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU32>,
    failed: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(netns: String, dst: SocketAddr, message: &'static [u8], limit: u32) -> Self {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU32::new(0)),
            Arc::new(AtomicU32::new(0)),
        );
        let thread = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                for _ in 0..limit {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match echo_from(&netns, dst, message) {
                        Ok(echo) if echo.reply == message => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Self {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    pub fn counts(&self) -> (u32, u32) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// Waits until `more` attempts beyond those made so far have succeeded.
    pub fn wait_successes(&self, more: u32) {
        let target = self.counts().0 + more;
        nodemesh_sandbox::poll_until(Duration::from_secs(30), || {
            anyhow::ensure!(self.counts().0 >= target, "{:?}", self.counts());
            Ok(())
        })
        .expect("the load gets through");
    }

    pub fn stop(mut self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("load thread");
        }
        self.counts()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Whether a connection from `netns` to `dst` fails (refused, reset, or closed unanswered).
/// The SPIFFE ID of an enrolled pod.
pub fn identity(sandbox: &Sandbox, pod: &str) -> nodemesh_identity::SpiffeId {
    sandbox
        .pod(pod)
        .identity
        .as_deref()
        .expect("an enrolled pod")
        .parse()
        .expect("SPIFFE ID")
}

/// Where the node proxy answers a connection captured from `pod`: the pod's address, port
/// 15001 (what a server sees as its peer when the connection went through the proxy).
pub fn proxy_of(sandbox: &Sandbox, pod: &str) -> SocketAddr {
    SocketAddr::from((sandbox.pod(pod).ip, 15001))
}

pub fn refused(netns: &str, dst: SocketAddr) -> bool {
    match echo_from(netns, dst, b"x") {
        Ok(echo) => echo.reply.is_empty(),
        Err(_) => true,
    }
}

/// Makes `pod` STRICT with a PeerAuthentication of its own and waits until its agent says so.
pub fn set_strict(sb: &Sandbox, pod: &str) {
    write_config(
        sb,
        &format!("pa-{pod}.yaml"),
        &format!(
            "apiVersion: security.nodemesh.dev/v1\nkind: PeerAuthentication\nmetadata:\n  \
             name: {pod}-strict\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      \
             app: {pod}\n  mtls:\n    mode: STRICT\n"
        ),
    );
    let node = sb.pod(pod).node.clone();
    nodemesh_sandbox::poll_until(Duration::from_secs(10), || {
        let workloads = sb.agent_admin(&node, "/workloads")?;
        let mode = workloads
            .as_array()
            .and_then(|a| a.iter().find(|w| w["name"] == pod))
            .map(|w| w["mtls_mode"].clone());
        anyhow::ensure!(mode == Some("STRICT".into()), "{pod} is {mode:?}");
        Ok(())
    })
    .expect("the agent applies STRICT");
}

/// Runs `nodemesh-agent --uninstall` for `node`'s pin directory and checks that it succeeded.
pub fn uninstall(node: &str, pin_dir: &std::path::Path) -> std::process::Output {
    let out = std::process::Command::new(bin_dir().join("nodemesh-agent"))
        .args(["--node", node, "--uninstall", "--bpf-pin-dir"])
        .arg(pin_dir)
        .output()
        .expect("run nodemesh-agent --uninstall");
    assert!(out.status.success(), "{out:?}");
    out
}
