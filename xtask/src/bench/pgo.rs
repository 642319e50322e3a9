//! `cargo xtask pgo`: the agent's execution profile under the benchmark's loads, written to
//! `agent/pgo.profdata`, which the release build optimises with (profile-guided optimisation:
//! hot paths laid out and inlined for the branches they take, cold code kept out of their
//! way).
//!
//! The profile comes from an instrumented build of the workspace (`-Cprofile-generate`, a
//! target directory of its own, the release profile and features the release build has, so
//! that every function's name and shape match), whose agent runs as both agents of a sandbox
//! named `pgo` through one short pass of the benchmark's loads, on the L4 path, the routed
//! path and with request metrics. The agents write their counts when they exit; rustup's
//! `llvm-profdata` merges them. The profile is tied to the rustc that made it (its LLVM reads
//! the file, its code generation decides the functions' shapes): `agent/pgo.toolchain` names
//! it, and another rustc builds without the profile, saying so. `agent/pgo.source` names the
//! commit it was made from, so that the benchmark can say when the agent's code has changed
//! since.
//!
//! Make it again after changing the agent's hot paths, its dependencies or the toolchain: a
//! function whose code changed since gets no profile (the build stays correct, it only loses
//! that function's optimisation). The link order depends on the profile's inlining, so
//! `cargo xtask layout` comes after.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use nodemesh_sandbox::{BINARIES, Sandbox, Spec};

mod age;

pub use self::age::ProfileAge;
use super::Plan;
use crate::{Profile, build, cargo, require_root, root, run_step, setup, target_dir};

/// Set to `0` to build without the profile.
const SWITCH_ENV: &str = "NODEMESH_PGO";

/// The profile the release build uses.
pub fn profile_file() -> PathBuf {
    root().join("agent/pgo.profdata")
}

/// The rustc that made the profile (`rustc -vV`'s release and LLVM version lines).
fn toolchain_file() -> PathBuf {
    root().join("agent/pgo.toolchain")
}

/// Whether a release build uses the profile, and why not when it does not.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileUse {
    Applied { toolchain: String },
    Off,
    Missing,
    OtherToolchain { profile: String, rustc: String },
}

impl ProfileUse {
    /// What the release build does with the profile, here and now.
    pub fn current() -> anyhow::Result<Self> {
        if std::env::var(SWITCH_ENV).as_deref() == Ok("0") {
            return Ok(Self::Off);
        }
        if !profile_file().is_file() {
            return Ok(Self::Missing);
        }
        let made_by = fs::read_to_string(toolchain_file()).unwrap_or_default();
        Ok(Self::decide(&made_by, &rustc_toolchain()?))
    }

    fn decide(made_by: &str, rustc: &str) -> Self {
        let (made_by, rustc) = (made_by.trim(), rustc.trim());
        if made_by == rustc {
            Self::Applied {
                toolchain: rustc.to_owned(),
            }
        } else {
            Self::OtherToolchain {
                profile: made_by.to_owned(),
                rustc: rustc.to_owned(),
            }
        }
    }

    pub fn is_applied(&self) -> bool {
        matches!(self, Self::Applied { .. })
    }

    /// The rustc flags that apply the profile, when it applies.
    pub fn flags(&self) -> Option<Vec<String>> {
        self.is_applied().then(|| {
            vec![
                format!("-Cprofile-use={}", profile_file().display()),
                // A function changed since the profile was made only loses its profile; LLVM's
                // warning for each would bury the build's own.
                "-Cllvm-args=-no-pgo-warn-mismatch".to_owned(),
            ]
        })
    }
}

impl std::fmt::Display for ProfileUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Applied { .. } => f.write_str(
                "profile-guided: the release agent is optimised with agent/pgo.profdata",
            ),
            Self::Off => write!(
                f,
                "profile-guided: off ({SWITCH_ENV}=0), the release build ignores agent/pgo.profdata"
            ),
            Self::Missing => f.write_str(
                "profile-guided: no agent/pgo.profdata, the release build has no profile \
                 (make one with `cargo xtask pgo`)",
            ),
            Self::OtherToolchain { profile, rustc } => write!(
                f,
                "profile-guided: agent/pgo.profdata was made by {}, this is {}: the release \
                 build leaves it out (make it again with `cargo xtask pgo`)",
                one_line(profile),
                one_line(rustc)
            ),
        }
    }
}

fn one_line(toolchain: &str) -> String {
    if toolchain.is_empty() {
        return "an unknown rustc".to_owned();
    }
    toolchain.lines().collect::<Vec<_>>().join(", ")
}

/// The lines of `rustc -vV` that decide whether a profile applies: the release and LLVM.
fn rustc_toolchain() -> anyhow::Result<String> {
    Ok(toolchain_lines(&crate::rustc_output(&["-vV"])?))
}

fn toolchain_lines(version: &str) -> String {
    version
        .lines()
        .filter(|l| l.starts_with("release:") || l.starts_with("LLVM version:"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `flags` added to the rustflags the environment gives cargo (`CARGO_ENCODED_RUSTFLAGS`, else
/// `RUSTFLAGS` split at whitespace, as cargo reads them), passed encoded: a path with a space
/// stays one flag.
pub fn add_rustflags(command: &mut Command, flags: &[String]) {
    let encoded = std::env::var("CARGO_ENCODED_RUSTFLAGS").ok();
    let given = std::env::var("RUSTFLAGS").unwrap_or_default();
    let all = with_rustflags(encoded.as_deref(), &given, flags);
    command
        .env_remove("RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", all);
}

fn with_rustflags(encoded: Option<&str>, plain: &str, flags: &[String]) -> String {
    let given: Vec<&str> = match encoded {
        Some(encoded) => encoded.split('\x1f').filter(|f| !f.is_empty()).collect(),
        None => plain.split_whitespace().collect(),
    };
    given
        .into_iter()
        .chain(flags.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join("\x1f")
}

pub fn run() -> anyhow::Result<()> {
    require_root("making the agent's profile")?;
    setup::run()?;
    setup::bench_tools()?;
    let profdata = setup::llvm_profdata()?;
    // The other binaries and the eBPF object, as the release build has them.
    let bin_dir = build::run(Profile::Release)?;
    let dir = target_dir().join("pgo-generate");
    let raw = dir.join("raw");
    println!("== building an instrumented agent (a target directory of its own)");
    let mut build = cargo();
    build
        .args(["build", "--release", "--workspace", "--bins"])
        .env("CARGO_TARGET_DIR", &dir);
    add_rustflags(
        &mut build,
        &[format!("-Cprofile-generate={}", raw.display())],
    );
    run_step(&mut build)?;
    // Build scripts and proc macros are instrumented too and wrote their counts while building.
    remove_dir(&raw)?;
    let run_dir = dir.join("bin");
    fs::create_dir_all(&run_dir)?;
    for name in BINARIES {
        let from = if name == "nodemesh-agent" {
            dir.join("release").join(name)
        } else {
            bin_dir.join(name)
        };
        fs::copy(&from, run_dir.join(name))
            .with_context(|| format!("cannot copy {} to {}", from.display(), run_dir.display()))?;
    }
    println!("== profiling: a sandbox's agents through a short pass of the benchmark's loads");
    let spec = Spec {
        legacy_pods: 2,
        ..Spec::new("pgo", &run_dir)
    };
    let mut sandbox = Sandbox::up(&spec)?;
    let plan = Plan {
        seconds: 2,
        fixed_rate: 1000,
    };
    let measured = super::measure(&sandbox, plan, 1, false).map(drop);
    // The counts are written when an agent exits: stop them before the sandbox goes.
    let stopped = ["n1", "n2"]
        .into_iter()
        .try_for_each(|node| sandbox.stop_agent(node));
    let down = sandbox.down();
    measured?;
    stopped?;
    down?;
    let counts = profraw_files(&raw)?;
    let profile = profile_file();
    run_step(
        Command::new(&profdata)
            .args(["merge", "--sparse", "-o"])
            .arg(&profile)
            .args(&counts),
    )?;
    fs::write(toolchain_file(), rustc_toolchain()?)
        .with_context(|| format!("cannot write {}", toolchain_file().display()))?;
    age::record()?;
    remove_dir(&dir)?;
    println!(
        "== {}: {} KB from {} agent run(s)",
        profile.display(),
        fs::metadata(&profile)?.len() / 1024,
        counts.len()
    );
    println!("== building the release agent with it");
    build::run(Profile::Release)?;
    println!(
        "== {}; trace the link order again for it: cargo xtask layout",
        ProfileUse::current()?
    );
    Ok(())
}

fn profraw_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "profraw"))
                .collect()
        })
        .unwrap_or_default();
    if files.is_empty() {
        bail!(
            "the instrumented agents wrote no counts to {}: did they exit on SIGTERM within \
             the sandbox's grace?",
            dir.display()
        );
    }
    Ok(files)
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUSTC: &str = "rustc 1.95.0 (59807616e 2026-04-14)\nbinary: rustc\n\
                         commit-hash: 59807616e1fa2540724bfbac14d7976d7e4a3860\n\
                         commit-date: 2026-04-14\nhost: x86_64-unknown-linux-gnu\n\
                         release: 1.95.0\nLLVM version: 22.1.2\n";

    #[test]
    fn the_toolchain_is_the_release_and_llvm() {
        assert_eq!(
            toolchain_lines(RUSTC),
            "release: 1.95.0\nLLVM version: 22.1.2\n"
        );
    }

    #[test]
    fn a_profile_applies_only_with_the_rustc_that_made_it() {
        let this = toolchain_lines(RUSTC);
        let applied = ProfileUse::decide(&this, &this);
        assert!(applied.is_applied());
        let flags = applied.flags().expect("flags");
        assert!(
            flags[0].starts_with("-Cprofile-use=") && flags[0].ends_with("agent/pgo.profdata"),
            "{flags:?}"
        );

        let newer = this.replace("1.95.0", "1.96.0");
        let other = ProfileUse::decide(&this, &newer);
        assert!(!other.is_applied());
        assert_eq!(other.flags(), None);
        let said = other.to_string();
        assert!(
            said.contains("release: 1.95.0, LLVM version: 22.1.2")
                && said.contains("release: 1.96.0")
                && said.contains("cargo xtask pgo"),
            "{said}"
        );
        // A profile without its toolchain file was made by nobody known.
        let unknown = ProfileUse::decide("", &this);
        assert!(!unknown.is_applied());
        assert!(unknown.to_string().contains("an unknown rustc"));
    }

    #[test]
    fn added_rustflags_keep_the_given_ones_and_each_flag_whole() {
        let ours = ["-Cprofile-use=/a dir/pgo.profdata".to_owned()];
        assert_eq!(
            with_rustflags(None, " -Ctarget-cpu=native  -g ", &ours),
            "-Ctarget-cpu=native\x1f-g\x1f-Cprofile-use=/a dir/pgo.profdata"
        );
        // The encoded form wins over the plain one, as with cargo, and keeps its spaces.
        assert_eq!(
            with_rustflags(Some("-Clink-arg=a b\x1f-g"), "-Cignored", &ours),
            "-Clink-arg=a b\x1f-g\x1f-Cprofile-use=/a dir/pgo.profdata"
        );
        assert_eq!(
            with_rustflags(None, "", &ours),
            "-Cprofile-use=/a dir/pgo.profdata"
        );
    }
}
