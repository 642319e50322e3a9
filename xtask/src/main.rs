//! Project tasks. `cargo xtask demo` and `cargo xtask test` are all a newcomer needs; both
//! install what is missing first (`cargo xtask setup`).
#![forbid(unsafe_code)]

mod bench;
mod build;
mod demo;
mod fuzz;
mod manifests;
mod sandbox_cmd;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "nodemesh project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what is missing: LLVM 22 dev packages, bpf-linker, the nightly's rust-src,
    /// and the tools tests use. Fast when nothing is missing.
    Setup,
    /// Install what is missing (as `setup`), then build the eBPF object and every binary.
    Build {
        /// Optimised build (what benchmarks use).
        #[arg(long)]
        release: bool,
    },
    /// Build everything, bring up the local sandbox, show the mesh working, tear it down.
    Demo,
    /// Formatting, clippy with warnings denied, and every test.
    Test,
    /// Measure the mesh's cost against the same work without it (JSON, markdown, PNG in
    /// target/bench).
    Bench {
        /// A smoke run: short measurements, once, under two minutes once built.
        #[arg(long)]
        quick: bool,
        /// Repetitions of every figure (3 for a full run, 1 with --quick); the median is
        /// reported with the spread.
        #[arg(long)]
        repeat: Option<usize>,
        /// Also record the agents' CPU profiles (perf, flame graphs) and scheduler counts
        /// during the cross-node mesh loads, in a pass of their own, into
        /// target/bench/profiles/.
        #[arg(long)]
        profile: bool,
        /// Do not measure: put the tables of target/bench/results.json into README.md.
        #[arg(long, conflicts_with_all = ["quick", "repeat", "profile"])]
        readme: bool,
    },
    /// Run every fuzz target (random structured input to the config loader, HBONE CONNECT
    /// handling, protocol detection, the path normaliser, the policy matcher) for a while.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Trace which of the agent's functions run at idle and under the benchmark's loads, in
    /// a sandbox of its own, and write agent/layout.order, the order the release build links
    /// them in (less code resident per agent). Run again after changing the agent's code or
    /// dependencies; `cargo xtask bench` says when the order has gone stale.
    Layout,
    /// Profile the agent (an instrumented build in a sandbox of its own, through a short pass
    /// of the benchmark's loads) into agent/pgo.profdata, which release builds are optimised
    /// with. Run again after changing the agent's hot paths, its dependencies or the
    /// toolchain, then `cargo xtask layout`.
    Pgo,
    /// Regenerate manifests/ (kustomization, CRDs, controller, agent) from code.
    Manifests,
    /// The local sandbox: network namespaces as nodes and pods, one agent per node.
    Sandbox {
        #[command(subcommand)]
        command: sandbox_cmd::SandboxCommand,
    },
}

fn main() -> ExitCode {
    if let Some(code) = bench::layout::as_rustc_wrapper() {
        return code;
    }
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run().and_then(|()| build::run(profile(release)).map(drop))
        }
        Task::Demo => demo::run(),
        Task::Test => test::run(),
        Task::Fuzz { seconds } => fuzz::run(seconds),
        Task::Manifests => manifests::write(),
        Task::Layout => bench::layout::run(),
        Task::Pgo => bench::pgo::run(),
        Task::Bench {
            quick,
            repeat,
            profile,
            readme,
        } => {
            if readme {
                bench::readme()
            } else {
                bench::run(bench::Options {
                    quick,
                    repeat,
                    profile,
                })
            }
        }
        Task::Sandbox { command } => sandbox_cmd::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A cargo build profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Dev,
    Release,
}

fn profile(release: bool) -> Profile {
    if release {
        Profile::Release
    } else {
        Profile::Dev
    }
}

impl Profile {
    /// The directory under `target/` the profile builds into.
    pub fn dir_name(self) -> &'static str {
        match self {
            Profile::Dev => "debug",
            Profile::Release => "release",
        }
    }
}

/// Where `cargo install` put oha.
pub fn bench_oha_binary() -> String {
    bench::oha_binary()
}

/// The workspace root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// The directory with the binaries and eBPF object of `profile`.
pub fn bin_dir(profile: Profile) -> PathBuf {
    target_dir().join(profile.dir_name())
}

/// The cargo that runs this xtask.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root());
    command
}

/// Runs a command, echoing it; fails with the command line when it fails.
pub fn run_step(command: &mut Command) -> anyhow::Result<()> {
    let line = describe(command);
    eprintln!("$ {line}");
    let status = command
        .status()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// What the building rustc (`RUSTC`, else the toolchain's) prints for `args`, run from the
/// workspace so that the same toolchain answers as builds it.
pub fn rustc_output(args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()));
    command.current_dir(root()).args(args);
    stdout_of(&mut command)
}

/// What `command` prints when it succeeds; its error output in the error when it fails.
pub fn stdout_of(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot run `{}`", describe(command)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(command),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("{what} needs root (eBPF programs and network namespaces); run it as root");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    // Effective uid from /proc avoids another dependency for one number.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}
