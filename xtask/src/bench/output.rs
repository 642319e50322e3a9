//! What a run leaves: `target/bench/results.{json,md}`, the chart, and README's tables.

use std::fs;

use anyhow::Context as _;
use serde_json::json;

use super::{Outcome, Plan, report, routed};
use crate::target_dir;

/// The machine the figures come from: CPU model and count, kernel, and the TCP congestion
/// control the sandbox's namespaces take from it at creation. The last moves the figures:
/// BBR paces every socket with a timer, which on this machine kind held one iperf3 stream
/// without the mesh to 17.5 Gbit/s against 28 with CUBIC.
fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "an unknown CPU".to_owned());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    let congestion = fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .map_or_else(|_| "unknown".to_owned(), |c| c.trim().to_owned());
    format!(
        "{} vCPUs ({cpu}), Linux {kernel}, TCP congestion control {congestion}",
        std::thread::available_parallelism().map_or(0, usize::from)
    )
}

pub(super) fn write_outputs(
    outcome: &Outcome,
    plan: Plan,
    quick: bool,
    repeat: usize,
    agent: &str,
) -> anyhow::Result<()> {
    let Outcome {
        rows,
        memory,
        notes,
        raw,
        routed,
        scheduler,
    } = outcome;
    let dir = target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let machine = machine();
    let header = format!(
        "nodemesh benchmark ({}, {} s per figure, {repeat} repetition{}{}): sandbox with 2 nodes, \
         mesh pods vs legacy pods in one run, on {machine}; {agent}. CPU placement: none \
         pinned; load tools, test servers, agents and the kernel share the machine. Ratio = mesh \
         / no mesh{}.",
        if quick { "--quick" } else { "full" },
        plan.seconds,
        if repeat == 1 { "" } else { "s" },
        if repeat > 1 {
            ", each figure the median with (min-max) of the repetitions"
        } else {
            ""
        },
        if repeat > 1 { ", of the medians" } else { "" },
    );
    let markdown = report::markdown(rows, memory, notes, &header)
        + &routed::markdown(routed)
        + &report::scheduler_markdown(scheduler);

    fs::write(dir.join("results.md"), &markdown)?;
    fs::write(
        dir.join("results.json"),
        serde_json::to_vec_pretty(&json!({
            "quick": quick,
            "machine": machine,
            "repetitions": repeat,
            "seconds_per_figure": plan.seconds,
            "fixed_rate": plan.fixed_rate,
            "rows": rows,
            "routed_rows": routed,
            "agent_memory_mb": memory.iter().map(|(k, v)| json!({ "what": k, "mb": v })).collect::<Vec<_>>(),
            "scheduler_per_unit": scheduler,
            "notes": notes,
            "raw": raw,
            "markdown": markdown,
        }))?,
    )?;
    let svg = dir.join("chart.svg");
    fs::write(
        &svg,
        report::svg(rows, "nodemesh: cost of the mesh (mesh / no mesh)"),
    )?;
    report::png(&svg, &dir.join("chart.png"))?;
    println!("\n{markdown}");
    println!(
        "written: {} (results.json, results.md, chart.png{})",
        dir.display(),
        if scheduler.is_empty() {
            ""
        } else {
            "; profiles/*.svg and *.top.txt"
        }
    );
    Ok(())
}

/// Markers around README's benchmark tables, which `cargo xtask bench --readme` rewrites.
const README_BEGIN: &str = "<!-- bench:begin (cargo xtask bench --readme writes this) -->";
const README_END: &str = "<!-- bench:end -->";

/// Puts the tables of `target/bench/results.json` into README, between its markers.
pub fn readme() -> anyhow::Result<()> {
    let results = target_dir().join("bench/results.json");
    let text = fs::read_to_string(&results).with_context(|| {
        format!(
            "cannot read {}; run `cargo xtask bench` first",
            results.display()
        )
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)?;
    let markdown = json["markdown"]
        .as_str()
        .context("results.json holds no tables; run `cargo xtask bench` again")?;
    if json["quick"] == true {
        anyhow::bail!("README shows full runs only; run `cargo xtask bench` without --quick");
    }
    let path = crate::root().join("README.md");
    let readme = fs::read_to_string(&path)?;
    let (Some(begin), Some(end)) = (readme.find(README_BEGIN), readme.find(README_END)) else {
        anyhow::bail!("README.md lacks the markers {README_BEGIN} ... {README_END}");
    };
    let updated = format!(
        "{}{README_BEGIN}\n{}\n{}",
        &readme[..begin],
        markdown.trim_end(),
        &readme[end..]
    );
    fs::write(&path, updated)?;
    eprintln!("README.md: benchmark tables from {}", results.display());
    Ok(())
}
