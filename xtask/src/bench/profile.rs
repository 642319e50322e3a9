//! What the agents do while a load runs: CPU profiles (`perf record`, sampled on the CPU
//! clock, which works where hardware counters do not, with DWARF call graphs) turned into
//! flame graphs (inferno), a top list and the share of each part of the proxy, and the
//! scheduler's counts per request (context switches, times scheduled in and time on a CPU,
//! from /proc, every thread of the agent).

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

/// Samples per second per CPU.
const FREQUENCY: &str = "499";

/// The scheduler's counts for every thread of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedCounts {
    pub voluntary: u64,
    pub involuntary: u64,
    /// Times a thread was put on a CPU (`schedstat`'s third field): wakeups, near enough.
    pub scheduled: u64,
    /// Time on a CPU, ns (`schedstat`'s first field).
    pub cpu_ns: u64,
}

impl SchedCounts {
    pub fn of(pid: i32) -> anyhow::Result<Self> {
        let mut counts = Self::default();
        let tasks = format!("/proc/{pid}/task");
        for task in fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
            let dir = task?.path();
            let status = fs::read_to_string(dir.join("status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            counts.voluntary += field("voluntary_ctxt_switches:");
            counts.involuntary += field("nonvoluntary_ctxt_switches:");
            let schedstat = fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
            let schedstat = |n: usize| -> u64 {
                schedstat
                    .split_whitespace()
                    .nth(n)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            counts.cpu_ns += schedstat(0);
            counts.scheduled += schedstat(2);
        }
        Ok(counts)
    }

    pub fn since(self, earlier: Self) -> Self {
        Self {
            voluntary: self.voluntary.saturating_sub(earlier.voluntary),
            involuntary: self.involuntary.saturating_sub(earlier.involuntary),
            scheduled: self.scheduled.saturating_sub(earlier.scheduled),
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
        }
    }
}

/// Context switches, wakeups and CPU time of one agent per request (or per connection, or per
/// megabyte, as the load counts), and where its samples were.
#[derive(Debug, Clone, Serialize)]
pub struct PerUnit {
    pub figure: String,
    pub node: String,
    pub unit: &'static str,
    pub context_switches: f64,
    pub scheduled: f64,
    /// µs on a CPU, profiler included (`perf` unwinding each sample's stack costs the agent).
    pub cpu_us: f64,
    pub parts: Parts,
}

impl PerUnit {
    pub fn new(
        figure: &str,
        node: &str,
        unit: &'static str,
        counts: SchedCounts,
        units: f64,
        parts: Parts,
    ) -> Self {
        let per = |n: u64| if units > 0.0 { n as f64 / units } else { 0.0 };
        Self {
            figure: figure.to_owned(),
            node: node.to_owned(),
            unit,
            context_switches: per(counts.voluntary + counts.involuntary),
            scheduled: per(counts.scheduled),
            cpu_us: per(counts.cpu_ns) / 1000.0,
            parts,
        }
    }
}

/// The parts of the proxy a sample can be in, by the frames of its stack (the first that
/// matches, in this order).
pub const PART_NAMES: [&str; 7] = [
    "access log (its thread)",
    "HTTP stack (route, policy layers)",
    "upstream HTTP connection (client codec)",
    "HBONE connection (HTTP/2, TLS)",
    "application's connection (HTTP server or byte copy)",
    "waiting for events",
    "other",
];

/// The share (per cent) of an agent's samples in each of [`PART_NAMES`], and the share in
/// the kernel over all.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Parts {
    pub shares: Vec<f64>,
    pub kernel: f64,
}

impl Default for Parts {
    /// No samples.
    fn default() -> Self {
        Self {
            shares: vec![0.0; PART_NAMES.len()],
            kernel: 0.0,
        }
    }
}

/// Which of [`PART_NAMES`] a stack (thread name first, leaf last) is in.
fn part_of(frames: &[&str]) -> usize {
    let any = |needles: &[&str]| {
        frames
            .iter()
            .any(|frame| needles.iter().any(|needle| frame.contains(needle)))
    };
    if frames.first().is_some_and(|thread| *thread == "access-log") {
        0
    } else if any(&["proxy::http::filter::Filtered"]) {
        1
    } else if any(&["upstream::pool::spawn_driver"]) {
        2
    } else if any(&[
        "nodemesh_hbone::client::handshake",
        "nodemesh_hbone::server::serve",
    ]) {
        3
    } else if any(&[
        "proxy::outbound::handle",
        "proxy::hbone_inbound::",
        "proxy::inbound::",
        "proxy::local::",
    ]) {
        4
    } else if any(&["::park", "epoll_wait"]) {
        5
    } else {
        6
    }
}

/// The stacks of folded text (`thread;a;b;c count`, one per line) with their sample counts;
/// lines that are not stacks are skipped.
fn stacks(text: &str) -> impl Iterator<Item = (Vec<&str>, u64)> {
    text.lines().filter_map(|line| {
        let (stack, count) = line.rsplit_once(' ')?;
        Some((stack.split(';').collect(), count.parse().ok()?))
    })
}

/// Where the samples of folded stacks (kernel frames ending `_[k]`) are.
pub fn parts(folded: &[u8]) -> Parts {
    let text = String::from_utf8_lossy(folded);
    let mut counts = [0u64; PART_NAMES.len()];
    let (mut total, mut kernel) = (0u64, 0u64);
    for (frames, count) in stacks(&text) {
        counts[part_of(&frames)] += count;
        total += count;
        if frames.last().is_some_and(|leaf| leaf.ends_with("_[k]")) {
            kernel += count;
        }
    }
    let share = |n: u64| {
        if total > 0 {
            n as f64 * 100.0 / total as f64
        } else {
            0.0
        }
    };
    Parts {
        shares: counts.iter().map(|&n| share(n)).collect(),
        kernel: share(kernel),
    }
}

/// A `perf record` of one agent for the length of one load.
#[derive(Debug)]
pub struct Recording {
    child: Child,
    data: PathBuf,
    name: String,
}

/// Where profiles go.
pub fn dir() -> PathBuf {
    crate::target_dir().join("bench/profiles")
}

impl Recording {
    pub fn start(name: &str, pid: i32) -> anyhow::Result<Self> {
        fs::create_dir_all(dir())?;
        let data = dir().join(format!("{name}.perf.data"));
        let child = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", FREQUENCY])
            .args(["--call-graph", "dwarf,16384", "-p", &pid.to_string(), "-o"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run perf (cargo xtask setup installs linux-perf)")?;
        Ok(Self {
            child,
            data,
            name: name.to_owned(),
        })
    }

    /// Stops recording (SIGINT, as perf expects) and writes `<name>.svg` (flame graph) and
    /// `<name>.top.txt` (where the samples are, by function); an agent that did nothing
    /// meanwhile gets a top list saying so, and no flame graph. Returns what it wrote and
    /// the samples' [`Parts`].
    pub fn finish(self) -> anyhow::Result<(PathBuf, Parts)> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let out = self.child.wait_with_output().context("perf record")?;
        if !out.status.success() && !self.data.exists() {
            bail!(
                "perf record failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let script = Command::new("perf")
            .args(["script", "-F", "comm,tid,time,event,ip,sym,dso", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("perf script")?;
        let folded = pipe(
            &crate::setup::inferno_binary("inferno-collapse-perf"),
            &["--kernel"],
            &script.stdout,
        )?;
        let top_list = dir().join(format!("{}.top.txt", self.name));
        // The raw data is large; the flame graph and the top list are what is read.
        let _ = fs::remove_file(&self.data);
        if folded.iter().all(u8::is_ascii_whitespace) {
            fs::write(
                &top_list,
                "no samples: the agent did not run during this load\n",
            )?;
            return Ok((top_list, Parts::default()));
        }
        let svg = dir().join(format!("{}.svg", self.name));
        let title = format!("nodemesh agent: {}", self.name);
        let flame = pipe(
            &crate::setup::inferno_binary("inferno-flamegraph"),
            &["--title", &title],
            &folded,
        )?;
        fs::write(&svg, flame)?;
        fs::write(
            dir().join(format!("{}.top.txt", self.name)),
            top(&folded, 40),
        )?;
        // The raw data is large; the flame graph and the top list are what is read.
        let _ = fs::remove_file(&self.data);
        Ok((svg, parts(&folded)))
    }
}

fn pipe(program: &Path, args: &[&str], input: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", program.display()))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// The functions where the samples are, from folded stacks (`a;b;c count`): by the leaf
/// (self) and by any frame (total), the `n` heaviest of each, in per cent.
pub fn top(folded: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(folded);
    let mut total = 0u64;
    let mut leaf: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut any: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for (frames, count) in stacks(&text) {
        total += count;
        if let Some(last) = frames.last() {
            *leaf.entry(last).or_default() += count;
        }
        let mut seen = std::collections::HashSet::new();
        for frame in frames {
            if seen.insert(frame) {
                *any.entry(frame).or_default() += count;
            }
        }
    }
    let mut out = format!("{total} samples\n");
    for (title, table) in [("self", &leaf), ("total (self and callees)", &any)] {
        let mut sorted: Vec<(&&str, &u64)> = table.iter().collect();
        sorted.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let _ = writeln!(out, "\n{title}:");
        for (frame, count) in sorted.into_iter().take(n) {
            let share = if total > 0 {
                *count as f64 * 100.0 / total as f64
            } else {
                0.0
            };
            let _ = writeln!(out, "{share:6.2}%  {frame}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_list_counts_leaves_and_every_frame_once_per_stack() {
        let folded =
            b"agent;main;poll;read 6\nagent;main;poll;write 3\nagent;main;encrypt;encrypt 1\n";
        let text = top(folded, 3);
        assert!(text.starts_with("10 samples\n"), "{text}");
        assert!(text.contains(" 60.00%  read"), "{text}");
        assert!(text.contains("100.00%  agent"), "{text}");
        assert!(
            text.contains(" 10.00%  encrypt"),
            "a recursive frame counts once: {text}"
        );
    }

    #[test]
    fn counts_since_an_earlier_reading() {
        let earlier = SchedCounts {
            voluntary: 10,
            involuntary: 2,
            scheduled: 15,
            cpu_ns: 1_000_000,
        };
        let now = SchedCounts {
            voluntary: 110,
            involuntary: 12,
            scheduled: 135,
            cpu_ns: 3_500_000,
        };
        let per = PerUnit::new(
            "c1",
            "n1",
            "request",
            now.since(earlier),
            50.0,
            Parts::default(),
        );
        assert_eq!(per.context_switches, 2.2);
        assert_eq!(per.scheduled, 2.4);
        assert_eq!(per.cpu_us, 50.0);
    }

    #[test]
    fn each_sample_counts_in_the_first_part_its_stack_matches() {
        let folded = b"\
nodemesh-worker;run;UntilReleased<proxy::outbound::handle>;hyper::dispatch;Filtered<proxy::http::filter::Filtered<Route>>;pick 3
nodemesh-worker;run;UntilReleased<proxy::outbound::handle>;hyper::dispatch;writev;tcp_sendmsg_[k] 4
nodemesh-worker;run;upstream::pool::spawn_driver::{{closure}};encode 2
nodemesh-worker;run;nodemesh_hbone::client::handshake::{{closure}};aes_gcm_encrypt 4
nodemesh-worker;block_on;nodemesh_hbone::server::serve::{{closure}};h2::Connection::poll 1
nodemesh-worker;run;UntilReleased<proxy::hbone_inbound::open>;copy 1
nodemesh-worker;block_on;Context::park;epoll_wait;do_epoll_wait_[k] 3
access-log;write_entries;serde_json::to_writer 1
nodemesh-worker;main;clap::parse 1
";
        let found = parts(folded);
        // Access log, stack, upstream, HBONE, application, waiting, other; of 20 samples.
        assert_eq!(found.shares, vec![5.0, 15.0, 10.0, 25.0, 25.0, 15.0, 5.0]);
        assert_eq!(found.kernel, 35.0);
    }
}
