//! `cargo xtask bench`: the mesh's cost, measured in the sandbox as ratios against the same
//! work between pods outside the mesh (the legacy pods), in one run, same node and across
//! nodes. Real load tools: wrk, oha, sockperf, iperf3. Outputs `target/bench/results.json`,
//! `results.md` and `chart.png`. Figures are never asserted anywhere.

mod figures;
pub mod layout;
mod medians;
mod output;
pub mod pgo;
mod profile;
mod report;
mod routed;
mod tools;

use std::{fs, net::SocketAddr, time::Duration};

use anyhow::Context as _;
use nodemesh_sandbox::{Sandbox, Spec};
use serde_json::json;

use self::{
    medians::{median, median_load, median_measured},
    report::Row,
    tools::{LoadResult, Server},
};
pub use self::{output::readme, tools::oha_binary};
use crate::{Profile, build, require_root, setup, target_dir};

const SOCKPERF_PORT: u16 = 11111;
const IPERF_PORT: u16 = 5201;
/// How long the agents' allocator takes to return freed pages to the system: jemalloc's
/// default `dirty_decay_ms` is 10 s, and its background threads purge in steps (measured
/// here: half within 4 s of the end of an iperf3 load, the rest at about 14 s).
const ALLOCATOR_DECAY: Duration = Duration::from_secs(20);

/// How long each measurement runs, and the fixed request rate.
#[derive(Debug, Clone, Copy)]
struct Plan {
    seconds: u64,
    fixed_rate: u32,
}

/// The client and server pods of one measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Case {
    client: &'static str,
    server: &'static str,
}

const SAME_NODE_NO_MESH: Case = Case {
    client: "n1-legacy",
    server: "n1-legacy2",
};
const SAME_NODE_MESH: Case = Case {
    client: "n1-p1",
    server: "n1-p2",
};
const CROSS_NODE_NO_MESH: Case = Case {
    client: "n1-legacy",
    server: "n2-legacy",
};
const CROSS_NODE_MESH: Case = Case {
    client: "n1-p1",
    server: "n2-p1",
};

/// How `cargo xtask bench` was asked to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub quick: bool,
    /// Repetitions of every figure (the median is reported, with the spread).
    pub repeat: Option<usize>,
    /// Record the agents' profiles and scheduler counts in the first repetition.
    pub profile: bool,
}

/// Everything measured for one case.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Measured {
    http_c1: LoadResult,
    http_c16: LoadResult,
    cpu_ms_per_1000: f64,
    http_fixed: LoadResult,
    http_close: LoadResult,
    /// New connections one at a time: what a connection's setup adds.
    http_close_c1: LoadResult,
    tcp_rr: LoadResult,
    gbps_1: f64,
    gbps_4: f64,
    /// Share of all the host's CPUs busy during each iperf3 run, in %.
    busy_1: f64,
    busy_4: f64,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let Options {
        quick,
        repeat,
        profile,
    } = options;
    let repeat = repeat.unwrap_or(if quick { 1 } else { 3 }).max(1);
    require_root("the benchmark")?;
    setup::run()?;
    setup::bench_tools()?;
    let bin_dir = build::run(Profile::Release)?;
    let pgo = pgo::ProfileUse::current()?;
    println!("== {pgo}");
    // A function changed since the profile was made has none: say when the code moved on.
    let pgo_age = pgo::ProfileAge::current();
    if pgo.is_applied() {
        println!("== {pgo_age}");
    }
    // The idle agent's memory depends on its functions' link order matching its code.
    let link_order = layout::OrderCoverage::of(&bin_dir.join("nodemesh-agent"))?;
    println!("== {link_order}");
    let plan = if quick {
        Plan {
            seconds: 2,
            fixed_rate: 500,
        }
    } else {
        Plan {
            seconds: 8,
            fixed_rate: 1000,
        }
    };
    let spec = Spec {
        legacy_pods: 2,
        ..Spec::new("bench", bin_dir)
    };
    println!("== bringing up the benchmark sandbox (release build)");
    let sandbox = Sandbox::up(&spec)?;
    let result = measure(&sandbox, plan, repeat, profile);
    let down = sandbox.down();
    let mut outcome = result?;
    down?;
    outcome.raw["link_order"] = json!(link_order);
    if !link_order.is_current() {
        outcome.notes.push(link_order.to_string());
    }
    outcome.raw["pgo"] = json!(pgo);
    outcome.raw["pgo_age"] = json!(pgo_age);
    if !pgo.is_applied() {
        outcome.notes.push(pgo.to_string());
    } else if !pgo_age.is_current() {
        outcome.notes.push(pgo_age.to_string());
    }
    let agent = format!(
        "the agent's release build{}{}",
        if !pgo.is_applied() {
            ", without a profile"
        } else if pgo_age.is_stale() {
            ", optimised with a profile older than its code (agent/pgo.profdata)"
        } else if pgo_age.is_current() {
            ", optimised with its profile (agent/pgo.profdata)"
        } else {
            ", optimised with a profile of unknown age (agent/pgo.profdata)"
        },
        if link_order.is_current() {
            ", linked in its traced order"
        } else {
            ""
        }
    );
    output::write_outputs(&outcome, plan, quick, repeat, &agent)
}

/// What one run measured, ready to report.
struct Outcome {
    rows: Vec<Row>,
    /// Agent resident memory, MB, by situation.
    memory: Vec<(String, f64)>,
    /// Anything that makes a figure less trustworthy (errors seen by a load tool).
    notes: Vec<String>,
    /// Every tool's own figures.
    raw: serde_json::Value,
    /// The HTTP-routed path against no mesh and the L4 mesh path, cross node.
    routed: Vec<routed::RoutedRow>,
    /// Context switches and wakeups of each agent per unit of load (`--profile`).
    scheduler: Vec<profile::PerUnit>,
}

/// The agents a probed measurement watches, and what it found.
struct Probe {
    agents: Vec<(&'static str, i32)>,
    found: Vec<profile::PerUnit>,
}

/// Runs `load`, recording each probed agent's profile (named `<figure>-<node>`) and its
/// scheduler counts per unit of what the load did.
fn probed<T>(
    probe: Option<&mut Probe>,
    figure: &str,
    unit: &'static str,
    units: impl Fn(&T) -> f64,
    load: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let Some(probe) = probe else {
        return load();
    };
    let mut watching = Vec::new();
    for &(node, pid) in &probe.agents {
        let before = profile::SchedCounts::of(pid)?;
        let recording = profile::Recording::start(&format!("{figure}-{node}"), pid)?;
        watching.push((node, pid, before, recording));
    }
    let result = load()?;
    for (node, pid, before, recording) in watching {
        let counts = profile::SchedCounts::of(pid)?.since(before);
        let (svg, parts) = recording.finish()?;
        println!("   profile: {}", svg.display());
        probe.found.push(profile::PerUnit::new(
            figure,
            node,
            unit,
            counts,
            units(&result),
            parts,
        ));
    }
    Ok(result)
}

/// One of the HTTP paths measured beside the L4 path (see `routed`).
type HttpPath = fn(&Sandbox, Plan, &std::path::Path) -> anyhow::Result<routed::Routed>;

fn measure(
    sandbox: &Sandbox,
    plan: Plan,
    repeat: usize,
    profiling: bool,
) -> anyhow::Result<Outcome> {
    let agent_pid = |node: &str| sandbox.node(node).agent.pid;
    let mut memory = Vec::new();
    agents_memory(sandbox, "idle", &mut memory)?;
    memory.push((
        "node n1 agent, idle: anonymous memory only (heap, stacks)".to_owned(),
        tools::rss_anon_mb(agent_pid("n1"))?,
    ));
    memory.push((
        "node n1: the eBPF maps (kernel memory, not resident)".to_owned(),
        tools::bpf_maps_mb(agent_pid("n1"))?,
    ));
    let servers = start_servers(sandbox)?;
    tools::settle();
    let script = target_dir().join("bench/wrk-report.lua");
    fs::create_dir_all(script.parent().context("bench dir")?)?;
    fs::write(&script, tools::WRK_REPORT)?;
    let cases = [
        ("same node, no mesh", SAME_NODE_NO_MESH),
        ("same node, mesh", SAME_NODE_MESH),
        ("cross node, no mesh", CROSS_NODE_NO_MESH),
        ("cross node, mesh", CROSS_NODE_MESH),
    ];
    let mut runs: [Vec<Measured>; 4] = Default::default();
    let mut routed_runs = Vec::new();
    let mut metrics_runs = Vec::new();
    let mut notes = Vec::new();
    let mut probe = profiling.then(|| Probe {
        agents: vec![("n1", agent_pid("n1")), ("n2", agent_pid("n2"))],
        found: Vec::new(),
    });
    for rep in 0..repeat {
        println!("== repetition {} of {repeat}", rep + 1);
        for (i, (label, case)) in cases.iter().enumerate() {
            println!("== {label}: {} -> {}", case.client, case.server);
            let m = measure_case(sandbox, *case, plan, &script, None)?;
            note_errors(
                &mut notes,
                label,
                rep,
                [
                    ("HTTP keep-alive, 1 connection", m.http_c1),
                    ("HTTP keep-alive, 16 connections", m.http_c16),
                    ("HTTP at a fixed rate", m.http_fixed),
                    ("HTTP Connection: close", m.http_close),
                    ("HTTP Connection: close, 1 connection", m.http_close_c1),
                ],
            );
            runs[i].push(m);
        }
        let http_paths: [(&str, &str, HttpPath, &mut Vec<routed::Routed>); 2] = [
            (
                "HTTP-routed: n1-p1 -> Service routed (n2-p1)",
                "cross node, routed",
                routed::measure,
                &mut routed_runs,
            ),
            (
                "request metrics on: n1-p1 -> n2-p1",
                "cross node, request metrics",
                routed::measure_http_metrics,
                &mut metrics_runs,
            ),
        ];
        for (title, label, measure, runs) in http_paths {
            println!("== cross node, mesh, {title}");
            let m = measure(sandbox, plan, &script)?;
            note_errors(
                &mut notes,
                label,
                rep,
                [
                    ("HTTP keep-alive, 1 connection", m.http_c1),
                    ("HTTP keep-alive, 16 connections", m.http_c16),
                    ("HTTP at a fixed rate", m.http_fixed),
                ],
            );
            runs.push(m);
        }
    }
    if let Some(probe) = probe.as_mut() {
        // Profiling slows the agents down: a pass of its own, whose figures are not kept.
        println!("== profiling: cross node, mesh (these figures are not reported)");
        measure_case(sandbox, CROSS_NODE_MESH, plan, &script, Some(&mut *probe))?;
        routed::profile(sandbox, plan, &script, probe)?;
    }
    let measured: Vec<Measured> = runs.iter().map(|r| median_measured(r)).collect();
    let routed_measured = routed::median(&routed_runs);
    let metrics_measured = routed::median(&metrics_runs);
    drop(servers);
    memory_after_loads(sandbox, &mut memory)?;
    let (cross_no, cross_mesh) = (measured[2], measured[3]);
    let rate = plan.fixed_rate;
    let rows = figures::rows(&runs, rate);
    let raw = json!({
        "same_node": { "no_mesh": runs[0], "mesh": runs[1] },
        "cross_node": { "no_mesh": runs[2], "mesh": runs[3], "routed": routed_runs, "http_metrics": metrics_runs },
    });
    Ok(Outcome {
        rows,
        memory,
        notes,
        raw,
        routed: routed::rows(
            &cross_no,
            &cross_mesh,
            &metrics_measured,
            &routed_measured,
            rate,
        ),
        scheduler: probe.map(|p| p.found).unwrap_or_default(),
    })
}

/// Both agents' resident memory, as rows `node <n> agent, <when>`.
fn agents_memory(
    sandbox: &Sandbox,
    when: &str,
    memory: &mut Vec<(String, f64)>,
) -> anyhow::Result<()> {
    for node in ["n1", "n2"] {
        let mb = tools::rss_mb(sandbox.node(node).agent.pid)?;
        memory.push((format!("node {node} agent, {when}"), mb));
    }
    Ok(())
}

/// What the loads left behind in the agents, then, once the allocator has returned what they
/// freed (tens of MB of buffers after the throughput loads), the cost of open connections and
/// of idle tunnels (CONNECT streams on the pooled HBONE connection from n1 to n2).
fn memory_after_loads(sandbox: &Sandbox, memory: &mut Vec<(String, f64)>) -> anyhow::Result<()> {
    agents_memory(sandbox, "right after the loads", memory)?;
    std::thread::sleep(ALLOCATOR_DECAY);
    let held = hold_connections(sandbox, 1000)?;
    agents_memory(sandbox, "1000 open connections", memory)?;
    drop(held);
    std::thread::sleep(Duration::from_secs(1));
    let held = hold_connections(sandbox, 10_000)?;
    agents_memory(sandbox, "10,000 idle HBONE streams", memory)?;
    drop(held);
    Ok(())
}

/// A note for each of `loads` that saw errors: a figure with errors is less trustworthy.
fn note_errors<const N: usize>(
    notes: &mut Vec<String>,
    label: &str,
    rep: usize,
    loads: [(&str, LoadResult); N],
) {
    for (what, load) in loads {
        if load.errors > 0 {
            notes.push(format!(
                "{label}: {what}: {} errors, {} requests completed (repetition {})",
                load.errors,
                load.requests,
                rep + 1
            ));
        }
    }
}

/// sockperf and iperf3 servers in every server pod, for the run.
fn start_servers(sandbox: &Sandbox) -> anyhow::Result<Vec<Server>> {
    let mut servers = Vec::new();
    for case in [
        SAME_NODE_NO_MESH,
        SAME_NODE_MESH,
        CROSS_NODE_NO_MESH,
        CROSS_NODE_MESH,
    ] {
        let pod = sandbox.pod(case.server);
        let ip = pod.ip.to_string();
        servers.push(Server::start(
            &pod.netns,
            "sockperf",
            &[
                "server",
                "--tcp",
                "-i",
                &ip,
                "-p",
                &SOCKPERF_PORT.to_string(),
            ],
        )?);
        servers.push(Server::start(
            &pod.netns,
            "iperf3",
            &["-s", "-B", &ip, "-p", &IPERF_PORT.to_string()],
        )?);
    }
    Ok(servers)
}

fn measure_case(
    sandbox: &Sandbox,
    case: Case,
    plan: Plan,
    script: &std::path::Path,
    mut probe: Option<&mut Probe>,
) -> anyhow::Result<Measured> {
    let client = &sandbox.pod(case.client).netns;
    let server = sandbox.pod(case.server);
    let url = format!("http://{}/", server.server.http);
    let t = plan.seconds;
    let requests = |l: &LoadResult| l.requests as f64;
    let http_c1 = probed(probe.as_deref_mut(), "c1", "request", requests, || {
        tools::wrk(client, &url, 1, 1, t, false, script)
    })?;
    let before = tools::host_busy_ms()?;
    let http_c16 = probed(probe.as_deref_mut(), "c16", "request", requests, || {
        tools::wrk(client, &url, 2, 16, t, false, script)
    })?;
    let cpu_ms = tools::host_busy_ms()? - before;
    let http_fixed = tools::oha(client, &url, plan.fixed_rate, 4, t)?;
    let http_close = probed(
        probe.as_deref_mut(),
        "close",
        "connection",
        requests,
        || tools::wrk(client, &url, 1, 4, t, true, script),
    )?;
    let http_close_c1 = tools::wrk(client, &url, 1, 1, t, true, script)?;
    let tcp_rr = tools::sockperf(client, server.ip, SOCKPERF_PORT, t)?;
    // Per megabyte carried.
    let megabytes = |gbps: &f64| gbps * t as f64 * 125.0;
    let (gbps_1, busy_1) = tools::busy_during(|| {
        probed(probe, "iperf1", "MB", megabytes, || {
            tools::iperf3(client, server.ip, 1, t)
        })
    })?;
    let (gbps_4, busy_4) = tools::busy_during(|| tools::iperf3(client, server.ip, 4, t))?;
    Ok(Measured {
        cpu_ms_per_1000: if http_c16.requests > 0 {
            cpu_ms / http_c16.requests as f64 * 1000.0
        } else {
            0.0
        },
        http_c1,
        http_c16,
        http_fixed,
        http_close,
        http_close_c1,
        tcp_rr,
        gbps_1,
        gbps_4,
        busy_1,
        busy_4,
    })
}

/// Opens `n` connections from n1-p1 to n2-p1's echo port through the mesh and holds them.
fn hold_connections(sandbox: &Sandbox, n: usize) -> anyhow::Result<Vec<std::net::TcpStream>> {
    let dst: SocketAddr = sandbox.pod("n2-p1").server.echo;
    let held = nodemesh_sandbox::hold_connections(&sandbox.pod("n1-p1").netns, dst, n)?;
    // Let both agents finish setting up the tunnels before memory is read.
    std::thread::sleep(Duration::from_secs(2));
    Ok(held)
}
