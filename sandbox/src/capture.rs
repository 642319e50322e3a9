//! Packet captures with tcpdump inside a sandbox namespace: how the tests and the demo show
//! what crosses a node's uplink.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// tcpdump writing a pcap file of one interface inside a network namespace.
#[derive(Debug)]
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Starts capturing and returns once tcpdump says it is listening.
    pub fn start(netns: &str, interface: &str, file: &Path) -> anyhow::Result<Self> {
        // `ip netns exec`, not nsenter: libpcap reads the interface from /sys, which only
        // `ip netns exec` remounts for the namespace.
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            // --immediate-mode: each packet reaches the file as it arrives, instead of in
            // blocks that a stop could lose.
            .args([
                "tcpdump",
                "-Z",
                "root",
                "--immediate-mode",
                "-U",
                "-n",
                "-i",
                interface,
            ])
            .arg("-w")
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start tcpdump (cargo xtask setup installs it)")?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening on") => break,
                Some(Ok(_)) => {}
                _ => {
                    let _ = child.kill();
                    bail!("tcpdump did not start capturing on {interface} in {netns}");
                }
            }
        }
        Ok(Self {
            child,
            file: file.to_owned(),
        })
    }

    /// Stops tcpdump once the file has stopped growing, and returns the file's bytes.
    pub fn stop(mut self) -> anyhow::Result<Vec<u8>> {
        let size = || std::fs::metadata(&self.file).map_or(0, |m| m.len());
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut last = size();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let now = size();
            if now == last {
                break;
            }
            last = now;
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);

        self.child.wait()?;
        Ok(std::fs::read(&self.file)?)
    }

    /// Packets of the capture matching a tcpdump filter, one line each.
    pub fn read(file: &Path, filter: &str) -> anyhow::Result<Vec<String>> {
        let out = Command::new("tcpdump")
            .args(["-Z", "root", "-n", "-r"])
            .arg(file)
            .arg(filter)
            .output()
            .context("cannot run tcpdump -r")?;
        if !out.status.success() {
            bail!(
                "tcpdump -r {} failed: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
