//! The load tools the benchmark drives, each run inside a pod's network namespace, and the
//! parsing of what they print: wrk (HTTP/1.1 keep-alive and Connection: close), oha (HTTP at a
//! fixed rate), sockperf (TCP request/response), iperf3 (throughput).

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Serialize;

/// wrk's Lua hook printing what the benchmark needs as one JSON line (latencies in µs).
pub const WRK_REPORT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":%d,"p50":%d,"p99":%d,"p999":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LoadResult {
    pub requests: u64,
    pub per_second: f64,
    pub errors: u64,
    pub latency: Latency,
}

fn in_netns(netns: &str, program: &str) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["--", program]);
    command
}

fn output(mut command: Command, what: &str) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// wrk with `connections` connections on `threads` threads for `seconds`.
pub fn wrk(
    netns: &str,
    url: &str,
    threads: u32,
    connections: u32,
    seconds: u64,
    close: bool,
    script: &Path,
) -> anyhow::Result<LoadResult> {
    let mut command = in_netns(netns, "wrk");
    command
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
        ])
        .arg("-s")
        .arg(script);
    if close {
        command.args(["-H", "Connection: close"]);
    }
    command.arg(url);
    let text = output(command, "wrk")?;
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("wrk printed no report: {text}"))?;
    let report: serde_json::Value = serde_json::from_str(line)?;
    let get = |k: &str| report[k].as_f64().unwrap_or(0.0);
    let seconds = get("duration_us") / 1e6;
    Ok(LoadResult {
        requests: get("requests") as u64,
        per_second: if seconds > 0.0 {
            get("requests") / seconds
        } else {
            0.0
        },
        errors: get("errors") as u64,
        latency: Latency {
            p50_us: get("p50"),
            p99_us: get("p99"),
            p999_us: get("p999"),
        },
    })
}

/// oha at a fixed rate: latency without coordinated omission.
pub fn oha(
    netns: &str,
    url: &str,
    rate: u32,
    connections: u32,
    seconds: u64,
) -> anyhow::Result<LoadResult> {
    let mut command = in_netns(netns, &oha_binary());
    command.args([
        "-z",
        &format!("{seconds}s"),
        "-q",
        &rate.to_string(),
        "-c",
        &connections.to_string(),
        "--latency-correction",
        "--no-tui",
        "--output-format",
        "json",
        url,
    ]);
    let text = output(command, "oha")?;
    let report: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("oha's report is not JSON: {text}"))?;
    let percentile = |p: &str| report["latencyPercentiles"][p].as_f64().unwrap_or(0.0) * 1e6;
    let summary = &report["summary"];
    if let Some(errors) = report["errorDistribution"]
        .as_object()
        .filter(|e| !e.is_empty())
    {
        eprintln!(
            "oha in {netns} saw errors: {}",
            serde_json::Value::Object(errors.clone())
        );
    }

    Ok(LoadResult {
        requests: report["statusCodeDistribution"]["200"]
            .as_u64()
            .unwrap_or(0),
        per_second: summary["requestsPerSec"].as_f64().unwrap_or(0.0),
        errors: report["errorDistribution"].as_object().map_or(0, |e| {
            e.values().filter_map(serde_json::Value::as_u64).sum()
        }),
        latency: Latency {
            p50_us: percentile("p50"),
            p99_us: percentile("p99"),
            p999_us: percentile("p99.9"),
        },
    })
}

pub fn oha_binary() -> String {
    let home = std::env::var("CARGO_HOME")
        .or_else(|_| std::env::var("HOME").map(|h| format!("{h}/.cargo")))
        .unwrap_or_else(|_| "/root/.cargo".to_owned());
    format!("{home}/bin/oha")
}

/// A server run for the benchmark inside a pod; killed when dropped.
pub struct Server(Child);

impl Server {
    pub fn start(netns: &str, program: &str, args: &[&str]) -> anyhow::Result<Self> {
        let child = in_netns(netns, program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {program} in {netns}"))?;
        Ok(Self(child))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// sockperf ping-pong over TCP: full round trips of a 64-byte message.
pub fn sockperf(
    netns: &str,
    server: Ipv4Addr,
    port: u16,
    seconds: u64,
) -> anyhow::Result<LoadResult> {
    let mut command = in_netns(netns, "sockperf");
    command.args([
        "ping-pong",
        "--tcp",
        "--full-rtt",
        "-m",
        "64",
        "-i",
        &server.to_string(),
        "-p",
        &port.to_string(),
        "-t",
        &seconds.to_string(),
    ]);
    parse_sockperf(&output(command, "sockperf")?)
}

/// sockperf's summary: percentiles of the round trips, and the messages of the measured
/// period (warm-up excluded).
fn parse_sockperf(text: &str) -> anyhow::Result<LoadResult> {
    let percentile = |p: &str| {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("sockperf printed no percentile {p}: {text}"))
    };
    let valid = text
        .lines()
        .find(|l| l.contains("[Valid Duration]"))
        .with_context(|| format!("sockperf printed no measured period: {text}"))?;
    let field = |name: &str| {
        valid
            .split(';')
            .find_map(|part| part.split_once(name).map(|(_, value)| value))
            .map(|v| v.trim_end_matches(" sec").trim())
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no {name} in sockperf's {valid:?}"))
    };
    let (seconds, received) = (field("RunTime=")?, field("ReceivedMessages=")?);
    Ok(LoadResult {
        requests: received as u64,
        per_second: if seconds > 0.0 {
            received / seconds
        } else {
            0.0
        },
        errors: 0,
        latency: Latency {
            p50_us: percentile("50.000")?,
            p99_us: percentile("99.000")?,
            p999_us: percentile("99.900")?,
        },
    })
}

/// iperf3 throughput in Gbit/s with `streams` parallel streams.
pub fn iperf3(netns: &str, server: Ipv4Addr, streams: u32, seconds: u64) -> anyhow::Result<f64> {
    let mut command = in_netns(netns, "iperf3");
    command.args([
        "-c",
        &server.to_string(),
        "-P",
        &streams.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ]);
    let text = output(command, "iperf3")?;
    let report: serde_json::Value =
        serde_json::from_str(&text).context("iperf3's report is not JSON")?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 reported no throughput")?;
    Ok(bits / 1e9)
}

/// Busy CPU time of the whole host (user, nice, system, irq, softirq, steal), in ms.
pub fn host_busy_ms() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| fields.get(*i))
        .sum();
    // USER_HZ is 100 on Linux: one jiffy is 10 ms.
    Ok(busy * 10.0)
}

/// Runs `load` and returns its result with the share of all the host's CPUs that were busy
/// meanwhile, in %: whether a figure is bound by the machine rather than by one path.
pub fn busy_during<T>(load: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let before = host_busy_ms()?;
    let started = std::time::Instant::now();
    let result = load()?;
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    let busy = (host_busy_ms()? - before) / (wall_ms * cpus) * 100.0;
    Ok((result, busy.min(100.0)))
}

/// Resident memory of a process, in MB.
pub fn rss_mb(pid: i32) -> anyhow::Result<f64> {
    status_mb(pid, "VmRSS:")
}

/// The anonymous part of a process's resident memory (heap, stacks), in MB: the rest is
/// file pages, mostly the binary's code, shared with the page cache.
pub fn rss_anon_mb(pid: i32) -> anyhow::Result<f64> {
    status_mb(pid, "RssAnon:")
}

fn status_mb(pid: i32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kb / 1024.0)
}

/// The kernel memory of the eBPF maps a process holds, in MB: each map's `memlock` (what its
/// capacity reserves, or holds now for maps allocated as they fill) from the `fdinfo` of its
/// descriptors, each map once. Not part of the resident memory; the kernel charges it to the
/// memory cgroup of the process that made the map.
pub fn bpf_maps_mb(pid: i32) -> anyhow::Result<f64> {
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let fd = entry?.file_name();
        let is_map = std::fs::read_link(format!("/proc/{pid}/fd/{}", fd.to_string_lossy()))
            .is_ok_and(|target| target == Path::new("anon_inode:bpf-map"));
        if !is_map {
            continue;
        }
        // A descriptor closed meanwhile has no fdinfo: it is simply not counted.
        let Ok(info) =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy()))
        else {
            continue;
        };
        let (id, memlock) = map_memlock(&info)
            .with_context(|| format!("no map_id or memlock in the fdinfo of a map: {info}"))?;
        if seen.insert(id) {
            bytes += memlock;
        }
    }
    Ok(bytes as f64 / (1024.0 * 1024.0))
}

/// A map descriptor's id and `memlock` bytes, from its fdinfo.
fn map_memlock(fdinfo: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    Some((field("map_id:")?, field("memlock:")?))
}

/// Lets a server come up.
pub fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_maps_kernel_memory_is_read_from_its_fdinfo() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t1\n\
                      key_size:\t12\nvalue_size:\t4\nmax_entries:\t65536\nmap_flags:\t0x0\n\
                      map_extra:\t0x0\nmemlock:\t5768224\nmap_id:\t1347\nfrozen:\t0\n";
        assert_eq!(map_memlock(fdinfo), Some((1347, 5_768_224)));
        assert_eq!(
            map_memlock("pos:\t0\nmap_id:\t3\n"),
            None,
            "no memlock, no figure"
        );
    }

    /// The end of what sockperf 3.7 prints for a ping-pong run.
    const SOCKPERF: &str = "\
sockperf: [Total Run] RunTime=1.000 sec; Warm up time=400 msec; SentMessages=27822; ReceivedMessages=27821
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=9623; ReceivedMessages=9623
sockperf: Summary: Round trip is 57.113 usec
sockperf: ---> <MAX> observation = 2810.801
sockperf: ---> percentile 99.999 = 2810.801
sockperf: ---> percentile 99.900 =  412.833
sockperf: ---> percentile 99.000 =  132.464
sockperf: ---> percentile 50.000 =   67.531
sockperf: ---> <MIN> observation =    4.293
";

    #[test]
    fn sockperf_figures_come_from_the_measured_period() {
        let result = parse_sockperf(SOCKPERF).expect("a complete summary parses");
        assert_eq!(result.requests, 9623);
        assert!(
            (result.per_second - 9623.0 / 0.55).abs() < 1.0,
            "{}",
            result.per_second
        );
        assert_eq!(result.latency.p50_us, 67.531);
        assert_eq!(result.latency.p99_us, 132.464);
        assert_eq!(result.latency.p999_us, 412.833);
    }

    #[test]
    fn sockperf_without_a_summary_is_an_error() {
        let err = parse_sockperf("sockperf: No messages were received from the server.")
            .expect_err("nothing measured");
        assert!(err.to_string().contains("no measured period"), "{err}");
    }
}
