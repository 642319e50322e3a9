//! `cargo xtask layout`: which of the agent's functions run, at idle and under the benchmark's
//! loads, written to `agent/layout.order`, the order the release build links them in (see
//! `agent/build.rs`).
//!
//! An agent's code is mapped from the page cache 64 KiB around each page it touches (the
//! kernel's fault-around), so what it runs decides its resident memory more than its size. To
//! see exactly what runs, the trace uses an agent built with every function starting on a page
//! of its own (LLVM's `-align-all-functions=12`, given to the agent crate's final compile only,
//! which leaves every symbol's name as the release build has it), run from a file system
//! freshly mounted with read-ahead off: the page cache then holds only pages a fault read, and
//! fault-around finds nothing else to map. The pages present in the agents' mappings are then
//! the functions they ran. The order puts those run at idle first, then those the loads ran.
//!
//! Trace again after changing the agent's code, dependencies or build settings: names the order
//! no longer finds are skipped by the linker and only cost memory (`cargo xtask bench` reports
//! how many it finds).

use std::{
    collections::{BTreeSet, HashSet},
    ffi::OsString,
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use nodemesh_sandbox::{BINARIES, Sandbox, Spec};
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _, SymbolKind};

mod cold_mount;

use self::cold_mount::ColdMount;
use super::Plan;
use crate::{Profile, build, require_root, root, run_step, setup, target_dir};

/// Set for the aligned build: this program then runs as cargo's rustc wrapper.
const WRAPPER_ENV: &str = "NODEMESH_LAYOUT_WRAPPER";
/// The crate whose final compile (fat LTO: all the code) gets the alignment.
const AGENT_CRATE: &str = "nodemesh_agent";
const ALIGN_FUNCTIONS: &str = "llvm-args=-align-all-functions=12";
const PAGE: u64 = 4096;

/// The order file the agent's build script links with.
pub fn order_file() -> PathBuf {
    root().join("agent/layout.order")
}

pub fn run() -> anyhow::Result<()> {
    require_root("tracing the agent's layout")?;
    setup::run()?;
    setup::bench_tools()?;
    let bin_dir = build::run(Profile::Release)?;
    println!("== building an agent with every function on a page of its own");
    let aligned = build_aligned(&bin_dir)?;
    let mount = ColdMount::create(&target_dir().join("layout"))?;
    for name in BINARIES {
        let from = if name == "nodemesh-agent" {
            aligned.clone()
        } else {
            bin_dir.join(name)
        };
        fs::copy(&from, mount.dir.join(name))
            .with_context(|| format!("cannot copy {} to the trace's mount", from.display()))?;
    }
    mount.empty_page_cache()?;
    let agent = mount.dir.join("nodemesh-agent");
    println!("== tracing: a fresh sandbox's agents at idle, then under the benchmark's loads");
    let spec = Spec {
        legacy_pods: 2,
        ..Spec::new("layout", &mount.dir)
    };
    let sandbox = Sandbox::up(&spec)?;
    let traced = trace(&sandbox, &agent);
    let down = sandbox.down();
    let (idle, loaded) = traced?;
    down?;
    let functions = Functions::of(&agent)?;
    let order = functions.order(&idle, &loaded);
    drop(mount);
    let path = order_file();
    fs::write(&path, render(&order, &functions))
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "== {}: {} functions run at idle ({} KB), {} more under load ({} KB), of {} ({} KB)",
        path.display(),
        order.idle.len(),
        functions.bytes(&order.idle) / 1024,
        order.loaded.len(),
        functions.bytes(&order.loaded) / 1024,
        functions.all.len(),
        functions.all.iter().map(|f| f.size).sum::<u64>() / 1024,
    );
    println!("== linking the release agent in that order");
    let bin_dir = build::run(Profile::Release)?;
    let coverage = OrderCoverage::of(&bin_dir.join("nodemesh-agent"))?;
    println!("== {coverage}");
    Ok(())
}

/// When this program runs as the aligned build's rustc wrapper: runs rustc, with the alignment
/// for the agent crate, and returns its exit code.
pub fn as_rustc_wrapper() -> Option<ExitCode> {
    std::env::var_os(WRAPPER_ENV)?;
    let mut args = std::env::args_os().skip(1);
    let rustc = args.next()?;
    if !Path::new(&rustc)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("rustc"))
    {
        return None;
    }
    let args: Vec<OsString> = args.collect();
    let mut command = Command::new(&rustc);
    command.args(&args);
    if args
        .windows(2)
        .any(|w| w[0] == "--crate-name" && w[1] == AGENT_CRATE)
    {
        command.args(["-C", ALIGN_FUNCTIONS]);
    }
    Some(match command.status() {
        Ok(status) => ExitCode::from(status.code().map_or(1, |c| c as u8)),
        Err(e) => {
            eprintln!("error: cannot run {}: {e}", rustc.to_string_lossy());
            ExitCode::FAILURE
        }
    })
}

/// Builds the agent again with aligned functions, without its link order (build settings only
/// reach the build script and the final compile, so every other crate stays as built), and
/// returns a copy of it; the next release build links the usual agent again.
fn build_aligned(bin_dir: &Path) -> anyhow::Result<PathBuf> {
    let wrapper = std::env::current_exe().context("cannot find this program for the wrapper")?;
    let mut build = build::release_cargo()?;
    build
        .args(["build", "--release", "--workspace", "--bins"])
        .env("RUSTC_WRAPPER", wrapper)
        .env(WRAPPER_ENV, "1")
        // A changed setting for the build script: the agent crate compiles again.
        .env("NODEMESH_LINK_ORDER", "0");
    run_step(&mut build)?;
    let copy = target_dir().join("layout-aligned-agent");
    fs::copy(bin_dir.join("nodemesh-agent"), &copy)
        .context("cannot copy the aligned agent out of the release directory")?;
    Ok(copy)
}

/// File pages of `agent` (by index) present in any sandbox agent's mappings: at idle, and
/// after the benchmark's loads.
fn trace(sandbox: &Sandbox, agent: &Path) -> anyhow::Result<(BTreeSet<u64>, BTreeSet<u64>)> {
    let pids: Vec<i32> = sandbox.status().nodes.iter().map(|n| n.agent.pid).collect();
    let idle = resident_pages(&pids, agent)?;
    let plan = Plan {
        seconds: 1,
        fixed_rate: 200,
    };
    super::measure(sandbox, plan, 1, false)?;
    let loaded = resident_pages(&pids, agent)?;
    Ok((idle, loaded))
}

/// Pages of `file` mapped in any of `pids` (`/proc/<pid>/pagemap`'s present bit).
fn resident_pages(pids: &[i32], file: &Path) -> anyhow::Result<BTreeSet<u64>> {
    let mut pages = BTreeSet::new();
    for &pid in pids {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
            .with_context(|| format!("cannot read the mappings of agent {pid}"))?;
        let mut pagemap = fs::File::open(format!("/proc/{pid}/pagemap"))?;
        for line in maps.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 6 || Path::new(fields[5]) != file {
                continue;
            }
            let (start, end) = fields[0].split_once('-').context("a maps line")?;
            let start = u64::from_str_radix(start, 16)?;
            let end = u64::from_str_radix(end, 16)?;
            let offset = u64::from_str_radix(fields[2], 16)?;
            let mut entries = vec![0u8; ((end - start) / PAGE * 8) as usize];
            pagemap.seek(SeekFrom::Start(start / PAGE * 8))?;
            pagemap.read_exact(&mut entries)?;
            for (i, entry) in entries.chunks_exact(8).enumerate() {
                let entry = u64::from_le_bytes(entry.try_into()?);
                if entry >> 63 == 1 {
                    pages.insert(offset / PAGE + i as u64);
                }
            }
        }
    }
    if pages.is_empty() {
        bail!(
            "no agent maps {}: did the sandbox start it?",
            file.display()
        );
    }
    Ok(pages)
}

/// One function of the binary: where it lies in the file.
#[derive(Debug)]
struct Function {
    name: String,
    /// File offset.
    offset: u64,
    size: u64,
}

/// The binary's functions, by file offset.
#[derive(Debug)]
struct Functions {
    all: Vec<Function>,
}

/// Functions (indices into `Functions::all`), in link order.
#[derive(Debug, Default)]
struct Order {
    idle: Vec<usize>,
    loaded: Vec<usize>,
}

impl Functions {
    fn of(binary: &Path) -> anyhow::Result<Self> {
        let data = fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
        let file = object::File::parse(&*data)
            .with_context(|| format!("{} is not an ELF file", binary.display()))?;
        let segments: Vec<(u64, u64, u64)> = file
            .segments()
            .map(|s| (s.address(), s.size(), s.file_range().0))
            .collect();
        let mut all = Vec::new();
        for symbol in file.symbols() {
            if symbol.kind() != SymbolKind::Text || symbol.size() == 0 || !symbol.is_definition() {
                continue;
            }
            let address = symbol.address();
            let Some(&(base, _, offset)) = segments
                .iter()
                .find(|(base, size, _)| (*base..base + size).contains(&address))
            else {
                continue;
            };
            all.push(Function {
                name: symbol.name()?.to_owned(),
                offset: address - base + offset,
                size: symbol.size(),
            });
        }
        all.sort_by_key(|f| f.offset);
        Ok(Self { all })
    }

    /// Functions on a page of `pages`, run at idle first, then under load, each part in the
    /// order the binary had them (the compiler's, which keeps callers near callees).
    fn order(&self, idle: &BTreeSet<u64>, loaded: &BTreeSet<u64>) -> Order {
        let touched = |pages: &BTreeSet<u64>, f: &Function| {
            let first = f.offset / PAGE;
            let last = (f.offset + f.size - 1) / PAGE;
            pages.range(first..=last).next().is_some()
        };
        let mut order = Order::default();
        for (i, function) in self.all.iter().enumerate() {
            if touched(idle, function) {
                order.idle.push(i);
            } else if touched(loaded, function) {
                order.loaded.push(i);
            }
        }
        order
    }

    fn bytes(&self, indices: &[usize]) -> u64 {
        indices.iter().map(|&i| self.all[i].size).sum()
    }
}

/// The order file: a comment, then one symbol per line (the linker skips `#` lines).
fn render(order: &Order, functions: &Functions) -> String {
    let mut text = String::from(
        "# The agent's functions in link order: run at idle, then under load.\n\
         # Written by `cargo xtask layout`; trace again after code or dependency changes.\n",
    );
    let mut seen = HashSet::new();
    for &i in order.idle.iter().chain(&order.loaded) {
        let name = &functions.all[i].name;
        if seen.insert(name.as_str()) {
            text.push_str(name);
            text.push('\n');
        }
    }
    text
}

/// How much of the order file a binary's symbols still match, and whether the binary was
/// linked in it.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct OrderCoverage {
    pub names: usize,
    pub found: usize,
    /// The first names found lie back to back in the binary, in the file's order (not so when
    /// the build left the order out: `NODEMESH_LINK_ORDER=0`, another linker).
    pub applied: bool,
}

/// How many of the order's first names found must lie back to back for it to count as applied.
const APPLIED_PREFIX: usize = 100;
/// Most a function's start is aligned to: the gap allowed between two ordered functions.
const FUNCTION_ALIGN: u64 = 64;

impl OrderCoverage {
    pub fn of(binary: &Path) -> anyhow::Result<Self> {
        let path = order_file();
        let text = fs::read_to_string(&path).unwrap_or_default();
        Ok(Self::new(&text, &Functions::of(binary)?))
    }

    fn new(order: &str, functions: &Functions) -> Self {
        let mut by_name = std::collections::HashMap::new();
        for f in &functions.all {
            by_name.entry(f.name.as_str()).or_insert(f);
        }
        let names: Vec<&str> = order
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let found: Vec<&Function> = names
            .iter()
            .filter_map(|n| by_name.get(n).copied())
            .collect();
        let prefix = &found[..found.len().min(APPLIED_PREFIX)];
        let back_to_back = |a: &Function, b: &Function| {
            (b.offset)
                .checked_sub(a.offset + a.size)
                .is_some_and(|gap| gap < FUNCTION_ALIGN)
        };
        Self {
            names: names.len(),
            found: found.len(),
            applied: prefix.len() > 1 && prefix.windows(2).all(|w| back_to_back(w[0], w[1])),
        }
    }

    /// Whether the binary is linked in the order and it still finds most of what it names
    /// (else the idle agent's memory grows back).
    pub fn is_current(&self) -> bool {
        self.applied && self.names > 0 && self.found * 100 >= self.names * 95
    }
}

impl std::fmt::Display for OrderCoverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "link order: the agent has {} of the {} functions agent/layout.order names",
            self.found, self.names
        )?;
        if !self.applied {
            write!(
                f,
                "; not linked in that order (NODEMESH_LINK_ORDER=0, or another linker)"
            )?;
        } else if !self.is_current() {
            write!(f, "; stale, run `cargo xtask layout` to trace it again")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn functions(spans: &[(&str, u64, u64)]) -> Functions {
        Functions {
            all: spans
                .iter()
                .map(|&(name, offset, size)| Function {
                    name: name.to_owned(),
                    offset,
                    size,
                })
                .collect(),
        }
    }

    fn pages(list: &[u64]) -> BTreeSet<u64> {
        list.iter().copied().collect()
    }

    #[test]
    fn idle_functions_come_first_then_loaded_ones_and_untouched_ones_are_left_out() {
        let binary = functions(&[
            ("start", 0, 100),
            ("serve", PAGE, 100),
            ("cold", 2 * PAGE, 100),
            // Spans pages 3 and 4: touched if either is.
            ("parse", 4 * PAGE - 50, 100),
            ("reload", 5 * PAGE, 100),
        ]);
        let idle = pages(&[0, 4]);
        let loaded = pages(&[0, 1, 4, 5]);
        let order = binary.order(&idle, &loaded);
        let names = |list: &[usize]| -> Vec<&str> {
            list.iter().map(|&i| binary.all[i].name.as_str()).collect()
        };
        assert_eq!(names(&order.idle), ["start", "parse"]);
        assert_eq!(names(&order.loaded), ["serve", "reload"]);
        assert_eq!(binary.bytes(&order.idle), 200);
    }

    #[test]
    fn the_order_file_names_each_symbol_once_after_its_comment() {
        let binary = functions(&[("a", 0, 10), ("b", PAGE, 10), ("a", 2 * PAGE, 10)]);
        let order = Order {
            idle: vec![1, 0],
            loaded: vec![2],
        };
        let text = render(&order, &binary);
        let names: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(names, ["b", "a"]);
        assert!(text.starts_with("# "));
    }

    #[test]
    fn an_order_is_stale_once_a_twentieth_of_its_names_are_gone() {
        let coverage = |names, found| OrderCoverage {
            names,
            found,
            applied: true,
        };
        assert!(coverage(100, 95).is_current());
        assert!(!coverage(100, 94).is_current());
        assert!(!coverage(0, 0).is_current());
    }

    #[test]
    fn a_binary_counts_as_linked_in_the_order_when_its_names_lie_in_that_order() {
        let order = "# comment\nb\ngone\nc\na\n";
        let linked = functions(&[("b", 0, 10), ("c", 16, 10), ("a", 32, 10)]);
        let coverage = OrderCoverage::new(order, &linked);
        assert_eq!((coverage.names, coverage.found), (4, 3));
        assert!(coverage.applied);
        // In the file's order but apart, as the compiler may leave them: not applied.
        let unordered = functions(&[("b", 0, 10), ("c", 4096, 10), ("a", 8192, 10)]);
        let coverage = OrderCoverage::new(order, &unordered);
        assert_eq!(coverage.found, 3);
        assert!(!coverage.applied);
        assert!(!coverage.is_current());
        assert!(coverage.to_string().contains("not linked in that order"));
    }
}
