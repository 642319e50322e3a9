//! The sandbox's processes: an agent in every node namespace, a test server in every pod.
//! Each is started with `nsenter --net`, which leaves the mount namespace alone (the agent
//! needs the host's cgroup2 and bpffs mounts), in its own process group so a Ctrl-C in the
//! terminal that ran `sandbox up` does not reach it.

use std::{
    fs::{File, OpenOptions},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::{
        signal::{Signal, kill},
        wait::{WaitPidFlag, waitpid},
    },
    unistd::Pid,
};

use crate::{
    NodeStatus, PodStatus,
    http::http_get,
    layout::{Layout, netns_path},
    poll_until,
    status::ControllerStatus,
    topology::in_netns,
};

fn log_file(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open log {}", path.display()))
}

pub fn spawn_in_netns(
    netns: &str,
    program: &Path,
    args: &[String],
    log: &Path,
) -> anyhow::Result<i32> {
    let out = log_file(log)?;
    let err = out.try_clone()?;
    let child = Command::new("nsenter")
        .arg(format!("--net={}", netns_path(netns).display()))
        .arg("--")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {} in {netns}", program.display()))?;
    Ok(child.id() as i32)
}

pub fn start_test_server(layout: &Layout, pod: &PodStatus) -> anyhow::Result<i32> {
    spawn_in_netns(
        &pod.netns,
        &layout.bin_dir.join("nodemesh-testserver"),
        &["--pod".to_owned(), pod.name.clone()],
        &pod.server.log,
    )
}

/// Writes a random bootstrap token per node: one file per agent, and the map the controller
/// checks them against. Readable by root only.
pub fn provision_tokens(layout: &Layout) -> anyhow::Result<()> {
    let mut map = String::new();
    for node in layout.all_nodes() {
        let mut bytes = [0u8; 24];
        File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .context("cannot read /dev/urandom")?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&layout.token_file(&node), &token)?;
        map.push_str(&format!("{}: {token}\n", node.name));
    }
    write_private(&layout.node_tokens_file(), &map)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn start_controller(layout: &Layout) -> anyhow::Result<i32> {
    let args = [
        "--config".to_owned(),
        layout.config_dir().display().to_string(),
        "--monitoring-addr".to_owned(),
        layout.controller_addr().to_string(),
        "--ca-dir".to_owned(),
        layout.ca_dir().display().to_string(),
        "--ca-addr".to_owned(),
        layout.ca_api_addr().to_string(),
        "--ca-server-names".to_owned(),
        layout.fabric_ip().to_string(),
        "--node-tokens".to_owned(),
        layout.node_tokens_file().display().to_string(),
        "--workload-cert-ttl".to_owned(),
        format!("{}s", layout.workload_cert_ttl.as_secs()),
    ];
    spawn_in_netns(
        &layout.fabric_netns(),
        &layout.bin_dir.join("nodemesh-controller"),
        &args,
        &layout.logs_dir().join("controller.log"),
    )
}

/// Waits until the controller has a valid configuration in force.
pub fn wait_controller_ready(
    controller: &ControllerStatus,
    timeout: Duration,
) -> anyhow::Result<()> {
    let url = format!("http://{}/readyz", controller.monitoring);
    // A process that exited ends the wait at once (the inner error), with its log.
    poll_until(timeout, || {
        if !is_alive(controller.pid) {
            return Ok(Err(anyhow::anyhow!(
                "the controller exited:\n{}",
                log_tail(&controller.log)
            )));
        }
        let response = http_get(&controller.netns, &url, Duration::from_secs(1))?;
        if response.status != 200 {
            bail!("controller: {}", response.body.trim());
        }
        Ok(Ok(()))
    })?
}

pub fn start_agent(layout: &Layout, index: usize) -> anyhow::Result<i32> {
    let node = layout.node(index);
    let log = layout.logs_dir().join(format!("agent-{}.log", node.name));
    let mut args = vec![
        "--node".to_owned(),
        node.name.clone(),
        "--state-dir".to_owned(),
        layout
            .state_dir()
            .join("agents")
            .join(&node.name)
            .display()
            .to_string(),
        "--ebpf-object".to_owned(),
        layout.bin_dir.join("nodemesh-ebpf.o").display().to_string(),
        "--bpf-pin-dir".to_owned(),
        layout.pin_dir(&node).display().to_string(),
        // The sandbox is torn down as a whole: nothing to wait for.
        "--drain-seconds".to_owned(),
        "2".to_owned(),
        "--admin-addr".to_owned(),
        layout.admin_addr(&node).to_string(),
        "--metrics-addr".to_owned(),
        layout.metrics_addr(&node).to_string(),
        "--readiness-addr".to_owned(),
        layout.readiness_addr(&node).to_string(),
        "--controller".to_owned(),
        format!("https://{}", layout.ca_api_addr()),
        "--controller-ca".to_owned(),
        layout.ca_dir().join("ca-cert.pem").display().to_string(),
        "--token-file".to_owned(),
        layout.token_file(&node).display().to_string(),
        "--access-log".to_owned(),
        layout.access_log(&node).display().to_string(),
        // Pods made through the node's CNI chain (see `cni`) are handed over here.
        "--cni-socket".to_owned(),
        layout.cni_socket(&node.name).display().to_string(),
    ];
    args.extend(layout.agent_args.iter().cloned());
    let agent = layout.bin_dir.join("nodemesh-agent");
    match layout.agent_wrapper.split_first() {
        None => spawn_in_netns(&node.netns, &agent, &args, &log),
        Some((program, wrapper_args)) => {
            let mut wrapped = wrapper_args.to_vec();
            wrapped.push(agent.display().to_string());
            wrapped.extend(args);
            spawn_in_netns(&node.netns, Path::new(program), &wrapped, &log)
        }
    }
}

/// Whether `pid` is a live process: any of its threads not yet a zombie. Reaps it if it is our
/// exited child.
///
/// Every thread counts, not only the first: when a multi-threaded process is killed, its first
/// thread can be a zombie while the others are still exiting and its sockets still open.
pub fn is_alive(pid: i32) -> bool {
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    threads.flatten().any(|thread| {
        std::fs::read_to_string(thread.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name in parentheses: "Z" is a zombie, "X" dead.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
    })
}

/// SIGTERM, then SIGKILL for whatever is still alive after `grace`.
pub fn terminate(pids: &[i32], grace: Duration) {
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pids.iter().any(|&p| is_alive(p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pid in pids.iter().filter(|&&p| is_alive(p)) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && pids.iter().any(|&p| is_alive(p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILL, and waits up to `timeout` for the process to be gone.
pub fn kill_now(pid: i32, timeout: Duration) -> anyhow::Result<()> {
    kill(Pid::from_raw(pid), Signal::SIGKILL).with_context(|| format!("kill -9 {pid}"))?;
    let deadline = Instant::now() + timeout;
    while is_alive(pid) {
        if Instant::now() >= deadline {
            bail!("process {pid} still alive {timeout:?} after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Waits until a pod's test server accepts connections on both ports.
pub fn wait_server_ready(pod: &PodStatus, timeout: Duration) -> anyhow::Result<()> {
    let (http, echo) = (pod.server.http, pod.server.echo);
    poll_until(timeout, || {
        if !is_alive(pod.server.pid) {
            bail!(
                "test server of pod {} exited:\n{}",
                pod.name,
                log_tail(&pod.server.log)
            );
        }
        in_netns(&pod.netns, move || {
            for addr in [http, echo] {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                    .with_context(|| format!("test server not answering on {addr}"))?;
            }
            Ok(())
        })
    })
}

/// Waits until a node's agent says it is ready.
pub fn wait_agent_ready(node: &NodeStatus, timeout: Duration) -> anyhow::Result<()> {
    let url = format!("http://{}/healthz/ready", node.agent.readiness);
    poll_until(timeout, || {
        if !is_alive(node.agent.pid) {
            return Ok(Err(anyhow::anyhow!(
                "agent of node {} exited:\n{}",
                node.name,
                log_tail(&node.agent.log)
            )));
        }
        let response = http_get(&node.netns, &url, Duration::from_secs(1))?;
        if response.status != 200 {
            bail!("agent of node {}: {}", node.name, response.body.trim());
        }
        Ok(Ok(()))
    })?
}

/// Runs a program inside a network namespace and returns its output, for tests and the demo
/// (`curl`, `ss`).
pub fn run_in_netns(netns: &str, program: &str, args: &[&str]) -> anyhow::Result<Output> {
    Command::new("nsenter")
        .arg(format!("--net={}", netns_path(netns).display()))
        .arg("--")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program} in {netns}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state letter of one thread of `pid`.
    fn thread_state(pid: i32, tid: i32) -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        rest.split_whitespace().next().map(str::to_owned)
    }

    #[test]
    fn a_process_whose_first_thread_exited_is_alive_until_its_last_thread_has() {
        // The first thread ends itself (exit(2), not exit_group) while a second one waits on
        // stdin: the first is a zombie, the process is not gone.
        let script = "import ctypes, sys, threading\n\
                      threading.Thread(target=sys.stdin.read).start()\n\
                      ctypes.CDLL(None).syscall(60, 0)\n";
        let mut child = match std::process::Command::new("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => panic!("python3 is needed for this test (cargo xtask setup): {e}"),
        };
        let pid = child.id() as i32;
        poll_until(Duration::from_secs(10), || {
            anyhow::ensure!(
                thread_state(pid, pid).as_deref() == Some("Z"),
                "first thread runs"
            );
            Ok(())
        })
        .expect("the first thread exits");
        assert!(is_alive(pid), "a process with a running thread is alive");

        drop(child.stdin.take());
        poll_until(Duration::from_secs(10), || {
            anyhow::ensure!(!is_alive(pid), "still alive");
            Ok(())
        })
        .expect("the process is gone once its last thread ends");
    }
}
