//! The benchmark's outputs: JSON with every figure, a markdown table of mesh/no-mesh ratios,
//! and a PNG chart of those ratios (SVG drawn here, rasterised by rsvg-convert).

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, bail};
use serde::Serialize;

/// One figure measured with and without the mesh.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub figure: String,
    pub unit: &'static str,
    /// Whether a larger value is better (throughput) or worse (latency, CPU).
    pub higher_is_better: bool,
    pub same_node: Pair,
    pub cross_node: Pair,
    /// What nodemesh aims at on this figure (cross-node ratio), from DESIGN.md.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    /// The medians of the repetitions.
    pub no_mesh: f64,
    pub mesh: f64,
    /// Every repetition's figure.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub no_mesh_runs: Vec<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mesh_runs: Vec<f64>,
}

impl Pair {
    /// The medians of the runs, and the runs.
    pub fn of(no_mesh_runs: Vec<f64>, mesh_runs: Vec<f64>) -> Self {
        Self {
            no_mesh: super::median(no_mesh_runs.clone()),
            mesh: super::median(mesh_runs.clone()),
            no_mesh_runs,
            mesh_runs,
        }
    }

    pub fn ratio(&self) -> f64 {
        if self.no_mesh == 0.0 {
            0.0
        } else {
            self.mesh / self.no_mesh
        }
    }

    /// The ratio as the table shows it; "n/a" when nothing was measured without the mesh.
    pub fn ratio_text(&self) -> String {
        if self.no_mesh == 0.0 {
            "n/a".to_owned()
        } else {
            format!("{:.2}x", self.ratio())
        }
    }
}

fn number(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// A figure with the spread of its repetitions: `160 (152-171)`.
fn spread(median: f64, runs: &[f64]) -> String {
    if runs.len() < 2 {
        return number(median);
    }
    let min = runs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = runs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} ({}-{})", number(median), number(min), number(max))
}

/// Context switches, wakeups and CPU time of each agent per unit of load, and where its
/// samples were, from a profiled run.
pub fn scheduler_markdown(found: &[super::profile::PerUnit]) -> String {
    if found.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\nScheduler and CPU, cross node, mesh (from a profiling pass of its own, whose figures \
         are not reported; flame graphs in `target/bench/profiles/`; CPU time includes the \
         profiler's cost of unwinding each sample; `routed` is the HTTP-routed path):\n\n\
         | load | agent | context switches per unit | times scheduled per unit | CPU µs per unit |\n\
         |---|---|---|---|---|\n",
    );
    for f in found {
        let _ = writeln!(
            out,
            "| {} (per {}) | {} | {:.2} | {:.2} | {:.1} |",
            f.figure, f.unit, f.node, f.context_switches, f.scheduled, f.cpu_us
        );
    }
    let _ = write!(
        out,
        "\nWhere each agent's CPU goes (per cent of its samples in the same pass; the last \
         column, over all parts, is in the kernel):\n\n| load | agent |"
    );
    for name in super::profile::PART_NAMES {
        let _ = write!(out, " {name} |");
    }
    let _ = writeln!(out, " kernel |");
    out.push_str(&"|---".repeat(super::profile::PART_NAMES.len() + 3));
    out.push_str("|\n");
    for f in found {
        let _ = write!(out, "| {} | {} |", f.figure, f.node);
        for share in &f.parts.shares {
            let _ = write!(out, " {share:.0} |");
        }
        let _ = writeln!(out, " {:.0} |", f.parts.kernel);
    }
    out
}

pub fn markdown(rows: &[Row], memory: &[(String, f64)], notes: &[String], header: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{header}\n");
    let _ = writeln!(
        out,
        "| figure | same node: no mesh | mesh | ratio | cross node: no mesh | mesh | ratio | target (cross) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} ({}) | {} | {} | {} | {} | {} | {} | {} |",
            row.figure,
            row.unit,
            spread(row.same_node.no_mesh, &row.same_node.no_mesh_runs),
            spread(row.same_node.mesh, &row.same_node.mesh_runs),
            row.same_node.ratio_text(),
            spread(row.cross_node.no_mesh, &row.cross_node.no_mesh_runs),
            spread(row.cross_node.mesh, &row.cross_node.mesh_runs),
            row.cross_node.ratio_text(),
            row.target.unwrap_or("")
        );
    }
    let _ = writeln!(out, "\n| agent memory | MB | target |\n|---|---|---|");
    for (what, mb) in memory {
        let target = if what.ends_with("agent, idle") {
            "≤ 10"
        } else if what.ends_with("1000 open connections") {
            "≤ 32"
        } else {
            ""
        };
        let _ = writeln!(out, "| {what} | {mb:.1} | {target} |");
    }
    if !notes.is_empty() {
        let _ = writeln!(
            out,
            "\nErrors during the run (a figure with errors is less trustworthy):"
        );
        for note in notes {
            let _ = writeln!(out, "- {note}");
        }
    }

    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Horizontal bars of the mesh/no-mesh ratio per figure, same node and cross node, with the
/// no-cost line at 1.0.
pub fn svg(rows: &[Row], title: &str) -> String {
    let label = |row: &Row| {
        format!(
            "{} ({})",
            row.figure,
            if row.higher_is_better {
                "higher is better"
            } else {
                "lower is better"
            }
        )
    };
    // DejaVu Sans at 12 px averages under 7 px per character.
    let longest = rows
        .iter()
        .map(|r| label(r).chars().count())
        .max()
        .unwrap_or(0);
    let (left, width, bar, gap) = (20.0 + longest as f64 * 7.0, 520.0, 12.0, 14.0);
    let height = 70.0 + rows.len() as f64 * (2.0 * bar + gap) + 40.0;
    let max = rows
        .iter()
        .flat_map(|r| [r.same_node.ratio(), r.cross_node.ratio()])
        .fold(1.5_f64, f64::max)
        .min(8.0);
    let x = |ratio: f64| left + width * (ratio.min(max) / max);
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{height}' font-family='DejaVu Sans' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>\
         <text x='10' y='22' font-size='15' font-weight='bold'>{}</text>\
         <text x='10' y='42' fill='#555'>mesh / no mesh; bars in blue: same node, orange: cross node; the line marks 1.0 (no cost)</text>",
        left + width + 80.0,
        escape(title)
    );
    for (i, row) in rows.iter().enumerate() {
        let y = 60.0 + i as f64 * (2.0 * bar + gap);
        let _ = write!(
            out,
            "<text x='{}' y='{}' text-anchor='end'>{}</text>",
            left - 8.0,
            y + bar + 4.0,
            escape(&label(row))
        );
        for (k, (pair, colour)) in [(&row.same_node, "#4e79a7"), (&row.cross_node, "#f28e2b")]
            .into_iter()
            .enumerate()
        {
            let (ratio, top) = (pair.ratio(), y + k as f64 * bar);
            let _ = write!(
                out,
                "<rect x='{left}' y='{top}' width='{:.1}' height='{}' fill='{colour}'/>\
                 <text x='{:.1}' y='{:.1}' font-size='11'>{}</text>",
                x(ratio) - left,
                bar - 1.0,
                x(ratio) + 4.0,
                top + bar - 2.0,
                pair.ratio_text()
            );
        }
    }
    let one = x(1.0);
    let _ = write!(
        out,
        "<line x1='{one}' x2='{one}' y1='52' y2='{}' stroke='black' stroke-dasharray='4 3'/></svg>",
        height - 30.0
    );
    out
}

/// Rasterises the SVG next to it as PNG.
pub fn png(svg_file: &Path, png_file: &Path) -> anyhow::Result<()> {
    let status = Command::new("rsvg-convert")
        .arg("-o")
        .arg(png_file)
        .arg(svg_file)
        .status()
        .context("cannot run rsvg-convert (cargo xtask bench installs librsvg2-bin)")?;
    if !status.success() {
        bail!("rsvg-convert failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Row {
        Row {
            figure: "TCP throughput".to_owned(),
            unit: "Gbit/s",
            higher_is_better: true,
            same_node: Pair::of(vec![20.0], vec![5.0]),
            cross_node: Pair::of(vec![0.0], vec![4.0]),
            target: Some("≥ 0.7x"),
        }
    }

    #[test]
    fn repetitions_show_as_the_median_and_their_spread() {
        let pair = Pair::of(vec![160.0, 152.0, 171.0], vec![1.0, 2.0]);
        assert_eq!(pair.no_mesh, 160.0);
        assert_eq!(
            pair.mesh, 1.5,
            "an even count takes the mean of the middle two"
        );
        assert_eq!(spread(pair.no_mesh, &pair.no_mesh_runs), "160 (152-171)");
        assert_eq!(spread(7.0, &[7.0]), "7.00", "one run has no spread");
    }

    #[test]
    fn the_table_shows_both_figures_and_their_ratio() {
        let notes = vec!["cross node, mesh: 1 error".to_owned()];
        let table = markdown(&[row()], &[("idle".to_owned(), 12.34)], &notes, "header");
        assert!(
            table.contains(
                "| TCP throughput (Gbit/s) | 20.0 | 5.00 | 0.25x | 0.00 | 4.00 | n/a | ≥ 0.7x |"
            ),
            "{table}"
        );
        assert!(table.contains("| idle | 12.3 |"), "{table}");
        assert!(table.contains("- cross node, mesh: 1 error"), "{table}");
    }

    #[test]
    fn the_scheduler_tables_give_each_profiled_load_a_row_of_every_column() {
        use super::super::profile::{PART_NAMES, Parts, PerUnit, SchedCounts};
        let counts = SchedCounts {
            voluntary: 200,
            involuntary: 4,
            scheduled: 204,
            cpu_ns: 8_000_000,
        };
        let parts = Parts {
            shares: vec![2.0, 20.0, 10.0, 30.0, 25.0, 8.0, 5.0],
            kernel: 55.0,
        };
        let found = [PerUnit::new(
            "routed-c1",
            "n1",
            "request",
            counts,
            100.0,
            parts,
        )];
        let table = scheduler_markdown(&found);
        assert!(
            table.contains("| routed-c1 (per request) | n1 | 2.04 | 2.04 | 80.0 |"),
            "{table}"
        );
        assert!(
            table.contains("| routed-c1 | n1 | 2 | 20 | 10 | 30 | 25 | 8 | 5 | 55 |"),
            "{table}"
        );
        let header = table
            .lines()
            .find(|l| l.starts_with("| load | agent | access log"))
            .expect("the parts table has a header");
        assert_eq!(header.matches('|').count(), PART_NAMES.len() + 4, "{table}");
        assert!(scheduler_markdown(&[]).is_empty());
    }

    #[test]
    fn the_chart_escapes_labels_and_draws_a_bar_per_node_kind() {
        let mut r = row();
        r.figure = "a <b> & c".to_owned();
        let svg = svg(&[r], "title");
        assert!(svg.contains("a &lt;b&gt; &amp; c"), "{svg}");
        assert_eq!(svg.matches("<rect x=").count(), 2, "{svg}");
    }
}
